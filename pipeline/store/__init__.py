"""Checkpoint store: a checkpoint is a folder of files plus ``manifest.json``, on local disk or in S3.

One logical layout for both backends, under the store root ``<root>`` (a local folder, or
``s3://bucket/prefix``): ``<root>/<name>/manifest.json`` names the committed version of checkpoint
``<name>`` and lists its files (relative path, size, sha256); the files of each version live apart
(``local.py`` and ``s3.py`` show where), so a new put is uploaded beside the committed version and the
switch to it is the commit: no manifest, no checkpoint, and a failed re-put never loses the last good one.
A write lease (``lease.py``) keeps two runs from writing the same name at once.

Parts: ``manifest.py`` (digests, manifests, the names and keys a store accepts), ``base.py`` (the Store
interface and the write protocol), ``local.py``, ``s3.py``, ``lease.py``, ``errors.py``.

This package imports neither torch nor boto3 at import time: GPU jobs that use only local stores need
neither boto3 nor mlflow installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.store.base import DEFAULT_RETAIN_SECONDS, Store
from pipeline.store.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    IntegrityError,
    InvalidKeyError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    StoreError,
    UnsupportedURIError,
)
from pipeline.store.local import LocalStore
from pipeline.store.manifest import (
    MANIFEST_NAME,
    CheckpointRef,
    check_name,
    check_relative_path,
    config_digest,
    manifest_digest,
)
from pipeline.store.s3 import S3Store, S3TransferOptions

DEFAULT_STORE_URI = "artifacts"  # relative to the working directory, resolved when the store is opened
DEFAULT_CACHE_DIR = ".cache/store"  # idem; only S3 stores download into it


def open_store(
    uri: str | os.PathLike[str] | None = None,
    *,
    endpoint_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    transfer: S3TransferOptions | None = None,
    retain_seconds: float | None = None,
) -> Store:
    """Opens a store; touches neither the disk nor the network.

    uri: a local path or ``file://`` URI (default ``./artifacts``), or ``s3://bucket/prefix``.
    endpoint_url: S3 endpoint for MinIO or other S3 servers; default ``AWS_ENDPOINT_URL_S3`` /
        ``AWS_ENDPOINT_URL``, else AWS itself.
    cache_dir: where S3 checkpoints are downloaded (default ``./.cache/store``).
    transfer: S3 multipart, retry and lease settings.
    retain_seconds: how long a replaced version stays readable (default DEFAULT_RETAIN_SECONDS).
    """
    store = _open(uri, endpoint_url, cache_dir, transfer)
    if retain_seconds is not None:
        if retain_seconds < 0:
            raise ValueError(f"retain_seconds must be >= 0, got {retain_seconds}")
        store.retain_seconds = float(retain_seconds)
    return store


def _open(uri: str | os.PathLike[str] | None, endpoint_url: str | None, cache_dir: str | os.PathLike[str] | None,
          transfer: S3TransferOptions | None) -> Store:
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
        if parsed.query or parsed.fragment or parsed.params:
            raise UnsupportedURIError(f"store URI {uri!r} has a '?', ';' or '#' part: use s3://bucket/prefix")
        prefix = parsed.path.strip("/")
        if prefix:
            try:
                check_relative_path(prefix, "S3 prefix")
            except InvalidKeyError as exc:
                raise UnsupportedURIError(f"store URI {uri!r}: {exc}") from None
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        return S3Store(
            parsed.netloc, prefix, endpoint_url=endpoint, cache_dir=cache, transfer=transfer or S3TransferOptions()
        )
    raise UnsupportedURIError(
        f"unsupported store URI scheme '{scheme}' in {uri!r}: use a local path, file:///path or s3://bucket/prefix"
    )


def split_checkpoint_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/H-25`` -> (``s3://bucket/prefix``, ``H-25``); also for paths and file:// URIs."""
    head, _, name = str(uri).rstrip("/").rpartition("/")
    if not head or not name:
        raise ValueError(f"{uri!r} is not a checkpoint URI (<store URI>/<name>)")
    return head, check_name(name)


__all__ = [
    "DEFAULT_RETAIN_SECONDS",
    "MANIFEST_NAME",
    "AccessDeniedError",
    "BucketNotFoundError",
    "CheckpointRef",
    "EndpointUnreachableError",
    "IntegrityError",
    "InvalidKeyError",
    "LeaseHeldError",
    "LeaseLostError",
    "LocalStore",
    "NotFoundError",
    "S3Store",
    "S3TransferOptions",
    "Store",
    "StoreError",
    "UnsupportedURIError",
    "config_digest",
    "manifest_digest",
    "open_store",
    "split_checkpoint_uri",
]
