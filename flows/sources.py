"""External inputs given by URI (a teacher in S3) made local for the stages, which read folders only.

A teacher at `s3://bucket/prefix` is either a checkpoint of one of our stores (a `manifest.json` beside
its files: downloaded through the store, hashes verified) or a plain prefix of transformers files
(downloaded as they are). It lands in `<cache>/teachers/<digest of the URI>/`, once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.chain import local_teacher_source
from pipeline.executor import Source, content_digest
from pipeline.store import LocalStore, S3Store, StoreError, config_digest, open_store, split_checkpoint_uri

_COMPLETE = ".complete"  # written last into a downloaded folder


@dataclass(frozen=True)
class RemoteFolder:
    """A folder at `uri` that the stages will read at `local`, after `fetch()`."""

    uri: str
    local: Path
    endpoint_url: str | None = None

    def fetch(self) -> Path:
        if urlparse(self.uri).scheme.lower() == "file" or (self.local / _COMPLETE).is_file():
            return self.local
        download_folder(self.uri, self.local, endpoint_url=self.endpoint_url)
        return self.local


def local_teacher(path: str | None, cache_root: Path, endpoint_url: str | None = None) -> RemoteFolder | None:
    """None for a local teacher folder (or none at all); a RemoteFolder for an s3:// or file:// URI."""
    if not path:
        return None
    scheme = urlparse(path).scheme.lower()
    if scheme == "file":
        parsed = urlparse(path)
        return RemoteFolder(path, Path(unquote(parsed.netloc + parsed.path)))
    if scheme == "s3":
        digest = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
        return RemoteFolder(path, cache_root / "teachers" / digest, endpoint_url)
    return None


def teacher_source(path: str, cache_root: Path, endpoint_url: str | None = None) -> Source:
    """The user's teacher as the executor's Source: a local folder (digested by its files' sha256) or an
    s3:// prefix (digested by its objects' ETags and sizes, or by its manifest when it is one of our
    checkpoints), listed and readable file by file without downloading the weights."""
    remote = local_teacher(path, cache_root, endpoint_url)
    if remote is None or urlparse(path).scheme.lower() == "file":
        return local_teacher_source(path)
    store = open_store(path.rstrip("/"), endpoint_url=endpoint_url)
    assert isinstance(store, S3Store)
    prefix = f"{store.prefix}/" if store.prefix else ""
    client = store.client
    objects = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    objects[item["Key"][len(prefix):]] = f"{item.get('ETag', '')}:{item['Size']}"
    except Exception as error:
        raise StoreError(f"cannot list {path}: {str(error).splitlines()[0]}") from error
    if not objects:
        raise StoreError(f"nothing at {path}: give the s3:// prefix of a saved transformers checkpoint")

    def read(name: str) -> bytes:
        return client.get_object(Bucket=store.bucket, Key=prefix + name)["Body"].read()

    digest = config_digest(objects)
    if "manifest.json" in objects:  # one of our checkpoints: its content digest, whatever the upload
        import json

        try:
            digest = content_digest(json.loads(read("manifest.json")))
        except (ValueError, KeyError):
            pass
    files = tuple(sorted(name for name in objects if name != "manifest.json"))
    return Source(path, digest, remote.fetch, files, read)


def download_folder(uri: str, destination: Path, *, endpoint_url: str | None = None) -> Path:
    """Copies every object under an s3:// prefix into `destination` (replaced only when complete)."""
    uri = uri.rstrip("/")
    try:  # one of our checkpoints: verified download through the store
        store_uri, name = split_checkpoint_uri(uri)
        store = open_store(store_uri, endpoint_url=endpoint_url, cache_dir=destination.parent / ".store")
        if store.has_checkpoint(name):
            return _install(store.get_checkpoint(name), destination)  # verified download, moved into place
    except ValueError:  # not <store>/<name>: a bucket root or an unusual name
        pass
    store = open_store(uri, endpoint_url=endpoint_url)
    if isinstance(store, LocalStore):
        return store.root
    assert isinstance(store, S3Store)
    prefix = f"{store.prefix}/" if store.prefix else ""
    client = store.client
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix)
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    ]
    if not keys:
        raise StoreError(f"nothing at {uri}: give the s3:// prefix of a saved transformers checkpoint")
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.partial"
    try:
        for key in keys:
            target = staging / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(store.bucket, key, str(target))
        return _install(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(source: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(destination, ignore_errors=True)
    os.rename(source, destination)
    (destination / _COMPLETE).write_text("")
    return destination


__all__ = ["RemoteFolder", "download_folder", "local_teacher", "teacher_source"]
