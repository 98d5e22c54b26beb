"""External inputs given by URI (a teacher in S3) made local for the stages, which read folders only.

A teacher at `s3://bucket/prefix` is either a checkpoint of one of our stores (a `manifest.json` beside
its files: downloaded through the store, hashes verified) or a plain prefix of transformers files
(sizes and MD5s checked against the listing, sha256 recorded). `<cache>/teachers/<content digest>` is a
link to the verified copy, made once per content: the listing's ETags and sizes (a plain prefix) or the
manifest's file digests (a checkpoint of ours), so a teacher uploaded again to the same prefix is a new
copy, never the old one; a copy whose content differs from the listing the run's keys were computed from
(the teacher changed while it was fetched) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.chain import local_teacher_source
from pipeline.executor import Source, content_digest
from pipeline.store import (
    MANIFEST_NAME,
    LocalStore,
    NotFoundError,
    S3Store,
    StoreError,
    config_digest,
    open_store,
    split_checkpoint_uri,
)


@dataclass(frozen=True)
class RemoteFolder:
    """A folder at `uri` that the stages will read at `local`, after `fetch()`.

    expected: what the copy must hold, (kind, digest): ("listing", digest of the objects' names, sizes and
    ETags) for a plain prefix, ("content", content digest) for a checkpoint of ours; None: not checked.
    """

    uri: str
    local: Path
    endpoint_url: str | None = None
    expected: tuple[str, str] | None = None

    def fetch(self) -> Path:
        if urlparse(self.uri).scheme.lower() == "file":
            return self.local
        if not (self.local / MANIFEST_NAME).is_file() or not self._holds_expected():
            download_folder(self.uri, self.local, endpoint_url=self.endpoint_url)
            if not self._holds_expected():
                raise StoreError(f"the teacher at {self.uri} changed while it was fetched (its files differ from "
                                 "the listing this run was planned with); run again to plan with the new one")
        return self.local

    def _holds_expected(self) -> bool:
        if self.expected is None:
            return True
        kind, digest = self.expected
        try:
            manifest = json.loads((self.local / MANIFEST_NAME).read_text())
            found = manifest["config_digest"] if kind == "listing" else content_digest(manifest)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return found == digest


def local_teacher(path: str | None, cache_root: Path, endpoint_url: str | None = None) -> RemoteFolder | None:
    """None for a local teacher folder (or none at all); a RemoteFolder for a file:// URI, or for an s3://
    one (listed now: its copy is named after its content)."""
    if not path:
        return None
    scheme = urlparse(path).scheme.lower()
    if scheme == "file":
        parsed = urlparse(path)
        return RemoteFolder(path, Path(unquote(parsed.netloc + parsed.path)))
    if scheme == "s3":
        return _s3_teacher(path, cache_root, endpoint_url)[0]
    return None


def teacher_source(path: str, cache_root: Path, endpoint_url: str | None = None) -> Source:
    """The user's teacher as the executor's Source: a local folder (digested by its files' sha256) or an
    s3:// prefix (digested by its objects' ETags and sizes, or by its manifest when it is one of our
    checkpoints), listed and readable file by file without downloading the weights."""
    if urlparse(path).scheme.lower() != "s3":
        return local_teacher_source(path)
    remote, source = _s3_teacher(path, cache_root, endpoint_url)
    return source


def _s3_teacher(path: str, cache_root: Path, endpoint_url: str | None) -> tuple[RemoteFolder, Source]:
    """The s3:// teacher's RemoteFolder (its copy named after its content) and Source (its listing, digest
    and small files). S3 errors are the store's one-line errors."""
    store = open_store(path.rstrip("/"), endpoint_url=endpoint_url)
    assert isinstance(store, S3Store)
    listed = [item for item in store._list_objects("") if not item["Key"].endswith("/")]
    if not listed:
        raise StoreError(f"nothing at {path}: give the s3:// prefix of a saved transformers checkpoint")
    objects = {item["Key"]: f"{item.get('ETag', '')}:{item['Size']}" for item in listed}
    read = store._read_bytes
    digest = config_digest(objects)  # what the keys hold of it (unchanged: a teacher's key stays the same)
    expected = ("listing", config_digest(sorted((item["Key"], item["Size"], item["ETag"].strip('"'))
                                                for item in listed)))
    files = tuple(sorted(name for name in objects if name != MANIFEST_NAME))
    if MANIFEST_NAME in objects:  # one of our checkpoints: its content digest, whatever the upload
        try:
            manifest = json.loads(read(MANIFEST_NAME))
            digest = content_digest(manifest)
            expected = ("content", digest)
            version = manifest.get("version")
            files = tuple(sorted(entry["path"] for entry in manifest["files"]))
            if version:  # the files of the committed version, read by their names in the checkpoint
                read = lambda name, _read=store._read_bytes, _version=version: _read(f"{_version}/{name}")  # noqa: E731
        except (ValueError, KeyError, TypeError):
            pass
    remote = RemoteFolder(path, cache_root / "teachers" / digest[:16], endpoint_url, expected)
    return remote, Source(path, digest, remote.fetch, files, read)


def download_folder(uri: str, destination: Path, *, endpoint_url: str | None = None) -> Path:
    """Makes `destination` a verified local copy of the folder at an s3:// URI, through the store.

    The store downloads into its content-addressed cache (`<destination's parent>/.store/`), checking
    every file (sha256 against a manifest of ours, else size and MD5 against the listing); then
    `destination` becomes a link to that folder in one rename, so it is always absent, the old copy or
    the new one, never half of either.
    """
    uri = uri.rstrip("/")
    cache_dir = destination.parent / ".store"
    try:  # one of our checkpoints: verified download through the store
        store_uri, name = split_checkpoint_uri(uri)
        store = open_store(store_uri, endpoint_url=endpoint_url, cache_dir=cache_dir)
        if store.has_checkpoint(name):
            return _point(destination, store.get_checkpoint(name))
    except ValueError:  # not <store>/<name>: a bucket root or an unusual name
        pass
    store = open_store(uri, endpoint_url=endpoint_url, cache_dir=cache_dir)
    if isinstance(store, LocalStore):
        return store.root
    assert isinstance(store, S3Store)
    try:
        folder = store.get_folder()
    except NotFoundError:
        raise StoreError(f"nothing at {uri}: give the s3:// prefix of a saved transformers checkpoint") from None
    return _point(destination, folder)


def _point(destination: Path, folder: Path) -> Path:
    """Replaces `destination` by a link to `folder` in one rename."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_dir() and not destination.is_symlink():  # a copy made by an older version
        retired = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.old")
        os.rename(destination, retired)
        shutil.rmtree(retired, ignore_errors=True)
    link = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.link")
    os.symlink(os.path.relpath(folder, destination.parent), link)
    os.replace(link, destination)
    return destination


__all__ = ["RemoteFolder", "download_folder", "local_teacher", "teacher_source"]
