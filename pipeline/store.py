"""Checkpoint store: a checkpoint is a folder of files plus ``manifest.json``, on local disk or in S3.

One layout for both backends, under the store root ``<root>`` (a local folder, or ``s3://bucket/prefix``):

    <root>/<name>/<relative/path/of/each/file>    the checkpoint's files
    <root>/<name>/manifest.json                   written LAST: no manifest, no checkpoint
    <root>/<key>                                  small artifacts (``put_file`` / ``put_json``), e.g. loo.json
    <root>/.tmp/                                  (local only) folders being written, renamed into place

The manifest lists every file (relative path, size, sha256), the digest of the config that produced the
checkpoint, the parent checkpoint, the creation time and free-form metadata. Its own digest
(``manifest_digest``) names the exact content of a checkpoint: downloads are cached under it and the
orchestration layer uses it in task cache keys.

Writes are crash-safe. Locally, files are copied into ``<root>/.tmp/<name>.<random>/``, the manifest is
written there last, and the folder is renamed to ``<root>/<name>`` in one step. In S3, the previous
manifest (if any) is deleted first, then the files are uploaded (multipart above a threshold), then stray
objects are removed, then the manifest is written. A reader that finds no parsable manifest reports no
checkpoint, so a writer that died half-way leaves nothing that looks finished, and putting the same name
again simply works.

S3 credentials come only from boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles), never from the pipeline config. The endpoint (MinIO or any S3 server) is
the ``endpoint_url`` argument, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

This module imports neither torch nor boto3 at import time: GPU jobs that use only local stores need
neither boto3 nor mlflow installed.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hybrid-distill.checkpoint/1"
DEFAULT_STORE_URI = "artifacts"  # relative to the working directory, resolved when the store is opened
DEFAULT_CACHE_DIR = ".cache/store"  # idem; only S3 stores download into it
_LOCAL_TMP_DIR = ".tmp"
# A checkpoint name is one path segment, so names never nest and `<root>/<name>/` is unambiguous.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MiB = 1024 * 1024

_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------------------
# Errors: every message is one line that names the object and says what to do.


class StoreError(RuntimeError):
    """Base class of every error raised by the store."""


class UnsupportedURIError(StoreError, ValueError):
    """The store URI has a scheme other than a plain path, ``file://`` or ``s3://``."""


class NotFoundError(StoreError, LookupError):
    """No committed checkpoint (no parsable manifest) or no file under that name."""


class IntegrityError(StoreError):
    """A file's size or sha256 differs from the manifest, or a manifest does not parse."""


class BucketNotFoundError(StoreError):
    """The S3 bucket does not exist at the endpoint."""


class AccessDeniedError(StoreError):
    """Missing, invalid or insufficient credentials."""


class EndpointUnreachableError(StoreError):
    """The S3 endpoint could not be reached (after retries)."""


# ----------------------------------------------------------------------------------------------------
# Digests


def _canonical(obj: Any) -> Any:
    """Turns a config-like object into plain JSON types, deterministically."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {field.name: _canonical(getattr(obj, field.name)) for field in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):  # includes omegaconf.DictConfig
        return {str(key): _canonical(value) for key, value in obj.items()}
    if isinstance(obj, set | frozenset):
        return sorted(_canonical(item) for item in obj)
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):  # includes ListConfig
        return [_canonical(item) for item in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"config_digest cannot serialise {type(obj).__name__} ({obj!r}); convert it to JSON types first")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal strings."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_digest(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of a config (dict, dataclass, DictConfig, ...)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """Digest of a parsed manifest; names the exact content of a checkpoint."""
    return config_digest(manifest)


def file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------------
# Values passed around


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint: enough to find it again and to key caches on its content."""

    name: str
    uri: str
    manifest_digest: str
    config_digest: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> CheckpointRef:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class S3TransferOptions:
    """Transfer tuning for S3 stores. Defaults suit multi-GB checkpoints; tests lower the thresholds."""

    multipart_threshold: int = 64 * _MiB  # files at least this big are uploaded/downloaded in parts
    multipart_chunksize: int = 64 * _MiB  # part size (S3 requires >= 5 MiB except for the last part)
    max_concurrency: int = 8  # parts in flight per file
    max_attempts: int = 5  # botocore attempts per request (retry mode "standard", exponential back-off)
    transfer_attempts: int = 3  # our attempts per whole-file transfer, on transient errors
    backoff_seconds: float = 1.0  # first wait between whole-file attempts; doubles each time
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.multipart_chunksize < 5 * _MiB:
            raise ValueError(f"multipart_chunksize={self.multipart_chunksize}: S3 parts must be at least 5 MiB")
        if self.max_attempts < 1 or self.transfer_attempts < 1:
            raise ValueError("max_attempts and transfer_attempts must be at least 1")


# ----------------------------------------------------------------------------------------------------
# Helpers shared by both backends


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid checkpoint name {name!r}: use one path segment of letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def _check_key(key: str) -> str:
    """A small-file key: a relative POSIX path without '.'/'..' segments or hidden first segment."""
    parts = key.split("/") if isinstance(key, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts) or parts[0].startswith(".") or "\\" in key:
        raise ValueError(f"invalid store key {key!r}: use a relative path like 'loo.json' or 'plots/loo.png'")
    return key


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _scan_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file under local_dir (symlinks followed), sorted."""
    if not local_dir.is_dir():
        raise NotADirectoryError(f"checkpoint folder {local_dir} does not exist or is not a folder")
    relative_paths = []
    for directory, _, filenames in os.walk(local_dir, followlinks=True):
        for filename in filenames:
            path = Path(directory, filename)
            if path.is_file():
                relative_paths.append(path.relative_to(local_dir).as_posix())
    if MANIFEST_NAME in relative_paths:
        raise StoreError(
            f"{local_dir / MANIFEST_NAME} exists, but '{MANIFEST_NAME}' at the top of a checkpoint is written by "
            "the store: rename or remove it before putting the folder"
        )
    return sorted(relative_paths)


def _file_entry(path: Path, relative_path: str) -> FileEntry:
    return FileEntry(path=relative_path, size=path.stat().st_size, sha256=file_sha256(path))


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        ok = (
            manifest.get("format") == MANIFEST_FORMAT
            and isinstance(manifest.get("config_digest"), str)
            and isinstance(files, list)
            and all(
                isinstance(entry.get("path"), str)
                and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)
                and len(entry["sha256"]) == 64
                for entry in files
            )
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise IntegrityError(
            f"manifest {where} does not parse ({_one_line(exc)}); delete it or re-put the checkpoint"
        ) from exc
    if not ok:
        raise IntegrityError(
            f"manifest {where} is not a '{MANIFEST_FORMAT}' manifest; delete it or re-put the checkpoint"
        )
    return manifest


def _verify_file(path: Path, entry: Mapping[str, Any], *, hashes: bool, where: str) -> None:
    hint = (
        "the stored copy is corrupt or was changed after it was written; "
        "re-run the stage that wrote it or delete the checkpoint"
    )
    if not path.is_file():
        raise IntegrityError(f"{where}: file '{entry['path']}' listed in the manifest is missing; {hint}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise IntegrityError(f"{where}: file '{entry['path']}' has size {size}, manifest says {entry['size']}; {hint}")
    if hashes:
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"{where}: file '{entry['path']}' has sha256 {digest[:16]}..., "
                f"manifest says {entry['sha256'][:16]}...; {hint}"
            )


def _write_bytes_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# The store interface


class Store(abc.ABC):
    """A place for checkpoints and small artifacts. Open one with :func:`open_store`."""

    def __init__(self, uri: str, cache_dir: Path) -> None:
        self.uri = uri  # the store root, e.g. file:///abs/artifacts or s3://bucket/prefix
        self.cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- backend primitives -------------------------------------------------------------------------

    @abc.abstractmethod
    def uri_for(self, name: str) -> str:
        """URI of a checkpoint folder (or of a small-file key)."""

    @abc.abstractmethod
    def _read_bytes(self, key: str) -> bytes:
        """Bytes of an object; raises NotFoundError if absent."""

    @abc.abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None:
        """Writes one object atomically (readers see the old or the new bytes, nothing else)."""

    @abc.abstractmethod
    def _delete_key(self, key: str) -> None:
        """Deletes one object; absent is fine."""

    @abc.abstractmethod
    def _upload_file(self, source: Path, key: str) -> None: ...

    @abc.abstractmethod
    def _download_file(self, key: str, destination: Path) -> None: ...

    @abc.abstractmethod
    def _write_checkpoint(
        self, local_dir: Path, name: str, relative_paths: list[str], make_manifest: Callable[[list[FileEntry]], dict]
    ) -> dict[str, Any]:
        """Copies the files, then calls ``_write_manifest`` last; returns the manifest written."""

    @abc.abstractmethod
    def _write_manifest(self, location: Any, manifest: Mapping[str, Any]) -> None:
        """The commit point of a put."""

    @abc.abstractmethod
    def get_checkpoint(self, name: str) -> Path:
        """Local folder holding the checkpoint's files and its manifest.

        Every file's size and sha256 is checked against the manifest once per content (an S3 download;
        a local folder whose files changed since they were last hashed); later calls check sizes only.
        Raises NotFoundError if the checkpoint is not committed, IntegrityError on a mismatch.
        """

    @abc.abstractmethod
    def list_checkpoints(self) -> list[str]:
        """Names of committed checkpoints (a parsable manifest), sorted."""

    @abc.abstractmethod
    def delete_checkpoint(self, name: str, *, missing_ok: bool = False) -> None:
        """Removes the manifest first (the checkpoint stops existing), then the files."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raises a clear StoreError if the store cannot be used (bucket missing, no access, ...)."""

    # -- checkpoints --------------------------------------------------------------------------------

    def put_checkpoint(
        self,
        local_dir: str | os.PathLike[str],
        name: str,
        *,
        config_digest: str,
        parent: CheckpointRef | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRef:
        """Stores every file under ``local_dir`` as checkpoint ``name``, manifest last; replaces any
        previous checkpoint or partial write of that name.

        ``parent`` is the checkpoint this one was derived from: a CheckpointRef, the name of a committed
        checkpoint in this store, or a URI elsewhere. ``metadata`` must be JSON-serialisable (resolved
        config, layer pattern, ...).
        """
        _check_name(name)
        local_dir = Path(local_dir)
        relative_paths = _scan_files(local_dir)
        parent_record = self._parent_record(parent)
        metadata = json.loads(json.dumps(dict(metadata or {})))  # fails early if not JSON-serialisable

        def make_manifest(entries: list[FileEntry]) -> dict[str, Any]:
            return {
                "format": MANIFEST_FORMAT,
                "name": name,
                "config_digest": config_digest,
                "parent": parent_record,
                "created": _utc_now(),
                "total_size": sum(entry.size for entry in entries),
                "files": [entry.to_dict() for entry in entries],
                "metadata": metadata,
            }

        manifest = self._write_checkpoint(local_dir, name, relative_paths, make_manifest)
        logger.info(
            "stored checkpoint %s (%d files, %d bytes)", self.uri_for(name), len(relative_paths), manifest["total_size"]
        )
        return CheckpointRef(name, self.uri_for(name), manifest_digest(manifest), config_digest)

    def manifest(self, name: str) -> dict[str, Any]:
        """The parsed manifest; NotFoundError if the checkpoint is not committed, IntegrityError if garbled."""
        _check_name(name)
        where = self.uri_for(f"{name}/{MANIFEST_NAME}")
        try:
            raw = self._read_bytes(f"{name}/{MANIFEST_NAME}")
        except NotFoundError:
            raise NotFoundError(
                f"no checkpoint '{name}' in {self.uri} (no {MANIFEST_NAME}: never written or not finished)"
            ) from None
        return _parse_manifest(raw, where)

    def has_checkpoint(self, name: str) -> bool:
        """True only for a committed checkpoint: its manifest exists and parses."""
        try:
            self.manifest(name)
        except (NotFoundError, IntegrityError):
            return False
        return True

    def manifest_digest(self, name: str) -> str:
        return manifest_digest(self.manifest(name))

    def ref(self, name: str) -> CheckpointRef:
        manifest = self.manifest(name)
        return CheckpointRef(name, self.uri_for(name), manifest_digest(manifest), manifest["config_digest"])

    def _parent_record(self, parent: CheckpointRef | str | None) -> dict[str, Any] | None:
        if parent is None:
            return None
        if isinstance(parent, CheckpointRef):
            return {"name": parent.name, "uri": parent.uri, "manifest_digest": parent.manifest_digest}
        if "://" in parent:  # a checkpoint elsewhere (another store, a hub model): recorded as given
            return {"name": parent.rstrip("/").rsplit("/", 1)[-1], "uri": parent, "manifest_digest": None}
        parent_ref = self.ref(parent)
        return {"name": parent_ref.name, "uri": parent_ref.uri, "manifest_digest": parent_ref.manifest_digest}

    # -- small files --------------------------------------------------------------------------------

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> str:
        """Stores one small artifact (a JSON table, a plot) under ``key``; returns its URI."""
        self._upload_file(Path(local_path), _check_key(key))
        return self.uri_for(key)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        self._download_file(_check_key(key), local_path)
        return local_path

    def put_json(self, key: str, obj: Any) -> str:
        self._write_bytes(_check_key(key), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return self.uri_for(key)

    def get_json(self, key: str) -> Any:
        return json.loads(self._read_bytes(_check_key(key)))

    def has_file(self, key: str) -> bool:
        try:
            self._read_bytes(_check_key(key))
        except NotFoundError:
            return False
        return True

    def delete_file(self, key: str) -> None:
        self._delete_key(_check_key(key))


# ----------------------------------------------------------------------------------------------------
# Local folder


class LocalStore(Store):
    """A folder on a local (or shared) file system. ``get_checkpoint`` returns the stored folder itself:
    treat it as read-only."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root
        super().__init__(root.as_uri(), cache_dir)

    def uri_for(self, name: str) -> str:
        return (self.root / name).as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"no file {self.uri_for(key)}") from None

    def _write_bytes(self, key: str, data: bytes) -> None:
        _write_bytes_atomically(self._path(key), data)

    def _delete_key(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _upload_file(self, source: Path, key: str) -> None:
        destination = self._path(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)

    def _download_file(self, key: str, destination: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFoundError(f"no file {self.uri_for(key)}")
        shutil.copyfile(source, destination)

    def _new_tmp_dir(self, label: str) -> Path:
        tmp_dir = self.root / _LOCAL_TMP_DIR / f"{label}.{uuid.uuid4().hex}"
        tmp_dir.mkdir(parents=True)
        return tmp_dir

    def _write_checkpoint(self, local_dir, name, relative_paths, make_manifest):
        staging = self._new_tmp_dir(name)
        try:
            entries = []
            for relative_path in relative_paths:
                destination = staging / relative_path
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_dir / relative_path, destination)
                entries.append(_file_entry(destination, relative_path))  # hash what was stored
            manifest = make_manifest(entries)
            self._write_manifest(staging, manifest)
            self._move_into_place(staging, self.root / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
        return manifest

    def _write_manifest(self, location: Path, manifest: Mapping[str, Any]) -> None:
        _write_bytes_atomically(location / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    def _move_into_place(self, staging: Path, target: Path) -> None:
        """Renames the finished staging folder to target; an older folder there (complete or partial)
        is first renamed away, so target is always either absent or whole."""
        for _ in range(5):  # another writer may slip a folder in between; try again
            if target.exists():
                retired = self.root / _LOCAL_TMP_DIR / f"{target.name}.old.{uuid.uuid4().hex}"
                try:
                    os.rename(target, retired)
                except FileNotFoundError:
                    pass
                else:
                    shutil.rmtree(retired, ignore_errors=True)
            try:
                os.rename(staging, target)
                return
            except OSError:
                if not target.exists():
                    raise
        raise StoreError(f"could not move {staging} to {target}: another writer keeps replacing it")

    def get_checkpoint(self, name: str) -> Path:
        """The stored folder itself. Files are hashed when their (size, mtime) differ from the last time
        they were hashed, recorded in ``cache_dir/verified/``; otherwise only sizes are checked."""
        manifest = self.manifest(name)
        folder = self.root / name
        where = f"checkpoint {self.uri_for(name)}"
        for entry in manifest["files"]:
            _verify_file(folder / entry["path"], entry, hashes=False, where=where)
        stat_signature = [
            [entry["path"], (folder / entry["path"]).stat().st_size, (folder / entry["path"]).stat().st_mtime_ns]
            for entry in manifest["files"]
        ]
        marker = self.cache_dir / "verified" / f"{name}-{manifest_digest(manifest)[:16]}.json"
        try:
            if json.loads(marker.read_text()) == stat_signature:
                return folder
        except (OSError, ValueError):
            pass
        for entry in manifest["files"]:
            _verify_file(folder / entry["path"], entry, hashes=True, where=where)
        _write_bytes_atomically(marker, json.dumps(stat_signature).encode("utf-8"))
        return folder

    def list_checkpoints(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = [
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and _NAME_PATTERN.match(entry.name) and (entry / MANIFEST_NAME).is_file()
        ]
        return sorted(name for name in names if self.has_checkpoint(name))

    def delete_checkpoint(self, name: str, *, missing_ok: bool = False) -> None:
        _check_name(name)
        folder = self.root / name
        if not folder.exists():
            if missing_ok:
                return
            raise NotFoundError(f"no checkpoint '{name}' in {self.uri}")
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        retired = self._new_tmp_dir(f"{name}.deleted")
        os.rename(folder, retired / name)
        shutil.rmtree(retired, ignore_errors=True)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise AccessDeniedError(f"store folder {self.root} is not writable")


# ----------------------------------------------------------------------------------------------------
# S3 (AWS, MinIO, any S3-compatible server)


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ImportError(
            "s3:// stores need boto3, which is not installed: pip install 'hybrid-distill[orchestration]' "
            "(or boto3), or use a local store path"
        ) from None
    return boto3


_ACCESS_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "403",
}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and the exceptions it wraps (boto3 wraps ClientError in S3UploadFailedError, s3transfer in
    RetriesExceededError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__


def _client_error(exc: BaseException) -> tuple[str, int, str] | None:
    """(code, http status, message) of the first botocore ClientError in the chain."""
    for item in _exception_chain(exc):
        response = getattr(item, "response", None)
        if isinstance(response, dict) and "Error" in response:
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return str(error.get("Code", status)), int(status or 0), str(error.get("Message", ""))
    return None


def _is_connection_error(exc: BaseException) -> bool:
    from botocore import exceptions as boto_errors

    connection_errors = (
        boto_errors.EndpointConnectionError,
        boto_errors.ConnectTimeoutError,
        boto_errors.ReadTimeoutError,
        boto_errors.ConnectionClosedError,
        boto_errors.ConnectionError,
        ConnectionError,
    )
    return any(isinstance(item, connection_errors) for item in _exception_chain(exc))


def _is_transient(exc: BaseException) -> bool:
    if _is_connection_error(exc):
        return True
    error = _client_error(exc)
    return error is not None and (error[0] in _TRANSIENT_CODES or error[1] >= 500)


class S3Store(Store):
    """``s3://bucket/prefix`` through boto3. Downloads go to ``cache_dir/<name>-<manifest digest>/`` once."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        cache_dir: Path,
        transfer: S3TransferOptions,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.transfer = transfer
        self._client: Any = None
        self._client_lock = threading.Lock()
        super().__init__(f"s3://{bucket}/{self.prefix}".rstrip("/"), cache_dir)

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; credentials from the standard AWS chain)."""
        with self._client_lock:
            if self._client is None:
                boto3 = _import_boto3()
                from botocore.config import Config

                options = self.transfer
                config = Config(
                    retries={"max_attempts": options.max_attempts, "mode": "standard"},
                    connect_timeout=options.connect_timeout,
                    read_timeout=options.read_timeout,
                    # Path-style addressing and checksums only when required: what MinIO and other
                    # S3 servers expect (virtual-host buckets need DNS they usually do not have).
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    request_checksum_calculation="when_required" if self.endpoint_url else "when_supported",
                    response_checksum_validation="when_required" if self.endpoint_url else "when_supported",
                    max_pool_connections=max(10, options.max_concurrency + 2),
                )
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=session.region_name or "us-east-1",
                    config=config,
                )
            return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.transfer.multipart_threshold,
            multipart_chunksize=self.transfer.multipart_chunksize,
            max_concurrency=self.transfer.max_concurrency,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    # -- error handling -----------------------------------------------------------------------------

    def _translate(self, exc: BaseException, action: str, key: str | None) -> StoreError | None:
        """A one-line StoreError for a boto3/botocore error, or None if it is not one we know."""
        from botocore import exceptions as boto_errors

        target = self.uri_for(key) if key is not None else f"s3://{self.bucket}"
        endpoint = self.endpoint_url or "the default AWS endpoint"
        credential_errors = (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)
        if any(isinstance(item, credential_errors) for item in _exception_chain(exc)):
            return AccessDeniedError(
                f"no AWS credentials found while {action} {target}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "or AWS_PROFILE (the pipeline config never holds credentials)"
            )
        if _is_connection_error(exc):
            return EndpointUnreachableError(
                f"cannot reach S3 endpoint {endpoint} while {action} {target} ({_one_line(exc)}); "
                "check endpoint_url / AWS_ENDPOINT_URL and that the server is running"
            )
        error = _client_error(exc)
        if error is None:
            return None
        code, status, message = error
        if code == "NoSuchBucket" or (status == 404 and key is None):
            return BucketNotFoundError(
                f"S3 bucket '{self.bucket}' does not exist at {endpoint} (while {action} {target}); "
                "create it or fix the store URI"
            )
        if code in ("NoSuchKey", "404") or status == 404:
            return NotFoundError(f"no object {target}")
        if code in _ACCESS_DENIED_CODES or status == 403:
            return AccessDeniedError(
                f"access denied ({code}) while {action} {target} at {endpoint}: check the AWS credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket policy"
            )
        return StoreError(f"S3 error {code} (HTTP {status}) while {action} {target}: {_one_line(message)}")

    def _call(self, action: str, key: str | None, operation: Callable[[], _T], *, attempts: int = 1) -> _T:
        """Runs one S3 operation; retries transient failures ``attempts`` times in all with exponential
        back-off (on top of botocore's own per-request retries) and translates errors."""
        for attempt in range(1, attempts + 1):
            try:
                return operation()
            except ImportError:  # boto3 missing: its message already says what to do
                raise
            except Exception as exc:
                if attempt < attempts and _is_transient(exc):
                    delay = self.transfer.backoff_seconds * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
                    logger.warning(
                        "%s %s failed (%s); retry %d/%d in %.1fs",
                        *(action, key, _one_line(exc), attempt, attempts - 1, delay),
                    )
                    time.sleep(delay)
                    continue
                error = self._translate(exc, action, key)
                if error is None:
                    raise
                raise error from exc
        raise AssertionError("unreachable")

    # -- primitives ---------------------------------------------------------------------------------

    def _read_bytes(self, key: str) -> bytes:
        response = self._call("reading", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return response["Body"].read()

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._call("writing", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def _delete_key(self, key: str) -> None:
        self._call("deleting", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def _upload_file(self, source: Path, key: str) -> None:
        if not source.is_file():
            raise FileNotFoundError(f"cannot upload {source}: no such file")
        self._call(
            "uploading",
            key,
            lambda: self.client.upload_file(str(source), self.bucket, self._key(key), Config=self._transfer_config()),
            attempts=self.transfer.transfer_attempts,
        )

    def _download_file(self, key: str, destination: Path) -> None:
        try:
            self._call(
                "downloading",
                key,
                lambda: self.client.download_file(
                    self.bucket, self._key(key), str(destination), Config=self._transfer_config()
                ),
                attempts=self.transfer.transfer_attempts,
            )
        except NotFoundError:
            self.check()  # a HEAD on a missing bucket also says 404: report the bucket if that is the cause
            raise

    def _list_keys(self, key_prefix: str) -> Iterator[str]:
        """Store-relative keys under a store-relative prefix."""
        full_prefix = self._key(key_prefix)
        strip = len(self._key(""))
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "listing", key_prefix or None, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix))
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    def _delete_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # S3 limit per DeleteObjects request
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            response = self._call(
                "deleting",
                None,
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreError(
                    f"could not delete {len(response['Errors'])} objects, e.g. {first.get('Key')}: {first.get('Code')}"
                )

    # -- checkpoints --------------------------------------------------------------------------------

    def _write_checkpoint(self, local_dir, name, relative_paths, make_manifest):
        entries = [_file_entry(local_dir / relative_path, relative_path) for relative_path in relative_paths]
        manifest = make_manifest(entries)
        # 1. Retract any previous manifest, so no reader pairs it with the new files while they upload.
        self._delete_key(f"{name}/{MANIFEST_NAME}")
        # 2. Upload the files.
        for entry in entries:
            self._upload_file(local_dir / entry.path, f"{name}/{entry.path}")
        # 3. Remove objects left by an older version or a crashed writer.
        wanted = {f"{name}/{entry.path}" for entry in entries}
        stray = [key for key in self._list_keys(f"{name}/") if key not in wanted]
        self._delete_keys(stray)
        # 4. Commit.
        self._write_manifest(name, manifest)
        return manifest

    def _write_manifest(self, location: str, manifest: Mapping[str, Any]) -> None:
        self._write_bytes(f"{location}/{MANIFEST_NAME}", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    def get_checkpoint(self, name: str) -> Path:
        """Downloads the checkpoint into ``cache_dir/<name>-<manifest digest>/`` once and returns that folder.

        A download is checked against the manifest's sizes and sha256 before the folder appears; a folder
        already in the cache is checked for sizes only, and downloaded again if they differ.
        """
        manifest = self.manifest(name)
        digest = manifest_digest(manifest)
        folder = self.cache_dir / f"{name}-{digest[:16]}"
        where = f"checkpoint {self.uri_for(name)}"
        if folder.is_dir():
            try:
                for entry in manifest["files"]:
                    _verify_file(folder / entry["path"], entry, hashes=False, where=f"cached copy {folder} of {where}")
                return folder
            except IntegrityError as exc:
                logger.warning("%s; downloading again", exc)
                shutil.rmtree(folder, ignore_errors=True)
        staging = self.cache_dir / ".partial" / f"{folder.name}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            for entry in manifest["files"]:
                destination = staging / entry["path"]
                destination.parent.mkdir(parents=True, exist_ok=True)
                self._download_file(f"{name}/{entry['path']}", destination)
                _verify_file(destination, entry, hashes=True, where=where)
            self._write_manifest_local(staging, manifest)
            try:
                os.rename(staging, folder)
            except OSError:
                if not folder.is_dir():  # another process finished the same download first: use theirs
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @staticmethod
    def _write_manifest_local(folder: Path, manifest: Mapping[str, Any]) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    def list_checkpoints(self) -> list[str]:
        suffix = f"/{MANIFEST_NAME}"
        names = [key[: -len(suffix)] for key in self._list_keys("") if key.endswith(suffix) and key.count("/") == 1]
        return sorted(name for name in names if _NAME_PATTERN.match(name) and self.has_checkpoint(name))

    def delete_checkpoint(self, name: str, *, missing_ok: bool = False) -> None:
        _check_name(name)
        keys = list(self._list_keys(f"{name}/"))
        if not keys:
            if missing_ok:
                return
            raise NotFoundError(f"no checkpoint '{name}' in {self.uri}")
        self._delete_key(f"{name}/{MANIFEST_NAME}")  # first: the checkpoint stops existing at once
        self._delete_keys(key for key in keys if key != f"{name}/{MANIFEST_NAME}")

    def check(self) -> None:
        self._call("checking", None, lambda: self.client.head_bucket(Bucket=self.bucket))


# ----------------------------------------------------------------------------------------------------
# Opening a store


def open_store(
    uri: str | os.PathLike[str] | None = None,
    *,
    endpoint_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    transfer: S3TransferOptions | None = None,
) -> Store:
    """Opens a store; touches neither the disk nor the network.

    uri: a local path or ``file://`` URI (default ``./artifacts``), or ``s3://bucket/prefix``.
    endpoint_url: S3 endpoint for MinIO or other S3 servers; default ``AWS_ENDPOINT_URL_S3`` /
        ``AWS_ENDPOINT_URL``, else AWS itself.
    cache_dir: where S3 checkpoints are downloaded (default ``./.cache/store``).
    transfer: S3 multipart and retry settings.
    """
    uri = os.fspath(uri) if uri is not None else DEFAULT_STORE_URI
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser().resolve()
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "" or len(scheme) == 1:  # a plain path (a one-letter scheme is a Windows drive)
        return LocalStore(Path(uri).expanduser().resolve(), cache)
    if scheme == "file":
        host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
        return LocalStore(Path(unquote(host + parsed.path)).expanduser().resolve(), cache)
    if scheme == "s3":
        if not parsed.netloc:
            raise UnsupportedURIError(f"store URI {uri!r} has no bucket: use s3://bucket/prefix")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        return S3Store(
            parsed.netloc, parsed.path, endpoint_url=endpoint, cache_dir=cache, transfer=transfer or S3TransferOptions()
        )
    raise UnsupportedURIError(
        f"unsupported store URI scheme '{scheme}' in {uri!r}: use a local path, file:///path or s3://bucket/prefix"
    )


def split_checkpoint_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/H-25`` -> (``s3://bucket/prefix``, ``H-25``); also for paths and file:// URIs."""
    head, _, name = str(uri).rstrip("/").rpartition("/")
    if not head or not name:
        raise ValueError(f"{uri!r} is not a checkpoint URI (<store URI>/<name>)")
    return head, _check_name(name)
