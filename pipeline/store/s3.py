"""A store in S3 (AWS, MinIO, any S3-compatible server) through boto3.

    <prefix>/<name>/manifest.json         the commit: names the version whose files make the checkpoint
    <prefix>/<name>/<version>/<path>      the files of one version (a new put uploads beside the old one)
    <prefix>/<name>/<version>/.writing    the store's marker, uploaded before the version's first file
    <prefix>/<name>/<version>/manifest.json   the version's manifest, uploaded just before the commit
    <prefix>/<name>/<version>/.retired    uploaded when a newer version is committed (Last-Modified: when)
    <prefix>/.leases/<name>.json          the write lease (see pipeline.store.lease)

The commit is a conditional PUT of ``<name>/manifest.json`` (``If-Match`` the manifest the put started from,
``If-None-Match: *`` when there was none): a run that lost its lease and would overwrite the new holder's
commit is refused by the server, whatever the timing. Pruning deletes only the store's own objects: a
version prefix with its marker and no manifest (a writer that crashed), or one with its manifest that has
been retired for ``retain_seconds``; objects of anyone else under the prefix are never touched.

Transfers retry: botocore retries each request (mode "standard"), and a whole-file transfer that still
fails on a transient error (connection dropped or reset, timeout, 5xx, SlowDown) is started again, a
bounded number of times with exponential back-off. Every download is checked against the manifest's size
and sha256 before it is used; a mismatching file is downloaded again, and reported if it stays wrong.

S3 credentials come only from boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles), never from the pipeline config. The endpoint (MinIO or any S3 server) is
the ``endpoint_url`` argument, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pipeline.store.base import Store
from pipeline.store.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    IntegrityError,
    LeaseLostError,
    NotFoundError,
    StoreError,
    one_line,
)
from pipeline.store.lease import Lease, S3Lease, server_age
from pipeline.store.manifest import (
    LEGACY_MANIFEST_FORMAT,
    MANIFEST_NAME,
    FileEntry,
    build_manifest,
    check_relative_path,
    config_digest,
    file_entry,
    manifest_bytes,
    manifest_digest,
    new_version,
    parse_manifest,
    verify_file,
)

logger = logging.getLogger("pipeline.store")

_T = TypeVar("_T")
_MiB = 1024 * 1024
LEASES_PREFIX = ".leases"
WRITING, RETIRED = ".writing", ".retired"


@dataclasses.dataclass(frozen=True)
class S3TransferOptions:
    """Transfer tuning for S3 stores. Defaults suit multi-GB checkpoints; tests lower the thresholds."""

    multipart_threshold: int = 64 * _MiB  # files at least this big are uploaded/downloaded in parts
    multipart_chunksize: int = 64 * _MiB  # part size (S3 requires >= 5 MiB except for the last part)
    max_concurrency: int = 8  # parts in flight per file
    max_attempts: int = 5  # botocore attempts per request (retry mode "standard", exponential back-off)
    transfer_attempts: int = 3  # our attempts per whole-file transfer, on transient errors
    integrity_attempts: int = 2  # downloads of a file whose size or sha256 does not match, before reporting it
    backoff_seconds: float = 1.0  # first wait between whole-file attempts; doubles each time
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    lease_ttl_seconds: float = 300.0  # a write lease not renewed for this long may be taken over

    def __post_init__(self) -> None:
        if self.multipart_chunksize < 5 * _MiB:
            raise ValueError(f"multipart_chunksize={self.multipart_chunksize}: S3 parts must be at least 5 MiB")
        if self.max_attempts < 1 or self.transfer_attempts < 1 or self.integrity_attempts < 1:
            raise ValueError("max_attempts, transfer_attempts and integrity_attempts must be at least 1")


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
        boto_errors.ResponseStreamingError,  # a body cut short (connection dropped mid-answer)
        boto_errors.IncompleteReadError,
        ConnectionError,
        TimeoutError,
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
        self._started_from: dict[str, tuple[str | None, dict[str, Any] | None]] = {}  # name -> (ETag, manifest)
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
                f"cannot reach S3 endpoint {endpoint} while {action} {target} ({one_line(exc)}); "
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
        return StoreError(f"S3 error {code} (HTTP {status}) while {action} {target}: {one_line(message)}")

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
                        *(action, key, one_line(exc), attempt, attempts - 1, delay),
                    )
                    time.sleep(delay)
                    continue
                error = self._translate(exc, action, key)
                if error is None:
                    raise
                raise error from exc
        raise AssertionError("unreachable")

    # -- primitives -----------------------------------------------------------------------------------

    def _read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()  # a body cut short raises inside the retried operation

        return self._call("reading", key, read, attempts=self.transfer.transfer_attempts)

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

    def _download_verified(self, key: str, destination: Path, entry: Mapping[str, Any], where: str) -> None:
        """Downloads one file and checks its size and sha256; a mismatch is downloaded again
        (``integrity_attempts`` in all) before it is reported."""
        for attempt in range(1, self.transfer.integrity_attempts + 1):
            self._download_file(key, destination)
            try:
                verify_file(destination, entry, hashes=True, where=where)
                return
            except IntegrityError as exc:
                if attempt == self.transfer.integrity_attempts:
                    raise IntegrityError(f"{exc} (downloaded {attempt} times)") from None
                logger.warning("%s; downloading it again", exc)

    def _list_objects(self, key_prefix: str) -> list[dict[str, Any]]:
        """Objects under a store-relative prefix: dicts with the store-relative "Key", "Size", "ETag"."""
        full_prefix = self._key(key_prefix)
        strip = len(self._key(""))
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "listing",
            key_prefix or None,
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix)),
            attempts=self.transfer.transfer_attempts,
        )
        return [{**item, "Key": item["Key"][strip:]} for page in pages for item in page.get("Contents", [])]

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
                attempts=self.transfer.transfer_attempts,
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreError(
                    f"could not delete {len(response['Errors'])} objects, e.g. {first.get('Key')}: {first.get('Code')}"
                )

    # -- leases ---------------------------------------------------------------------------------------

    def _new_lease(self, name: str) -> Lease:
        return S3Lease(
            name,
            self.uri_for(name),
            f"{LEASES_PREFIX}/{name}.json",
            get=self._lease_get,
            put=self._lease_put,
            delete=self._lease_delete,
            ttl_seconds=self.transfer.lease_ttl_seconds,
        )

    def _lease_get(self, key: str) -> tuple[bytes, float, str]:
        def read() -> tuple[bytes, float, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
            return response["Body"].read(), server_age(response["LastModified"], date), response["ETag"]

        return self._call("reading", key, read, attempts=self.transfer.transfer_attempts)

    def _lease_put(self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str | None:
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_none_match else {}
        try:
            response = self._call(
                "writing",
                key,
                lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **condition),
                attempts=self.transfer.transfer_attempts,
            )
        except (StoreError, NotFoundError) as exc:
            if _precondition_failed(exc) or (if_match and isinstance(exc, NotFoundError)):
                return None
            raise
        return response["ETag"]

    def _lease_delete(self, key: str, if_match: str | None) -> None:
        condition = {"IfMatch": if_match} if if_match else {}
        try:
            self._call(
                "deleting",
                key,
                lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **condition),
                attempts=self.transfer.transfer_attempts,
            )
        except (StoreError, NotFoundError) as exc:
            if not (_precondition_failed(exc) or isinstance(exc, NotFoundError)):
                raise

    # -- versions -------------------------------------------------------------------------------------

    def _read_manifest_object(self, key: str) -> tuple[str | None, dict[str, Any] | None]:
        """(ETag, parsed manifest or None if garbled) of a manifest object; (None, None) if there is none."""
        def read() -> tuple[str, bytes]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["ETag"], response["Body"].read()

        try:
            etag, raw = self._call("reading", key, read, attempts=self.transfer.transfer_attempts)
        except NotFoundError:
            return None, None
        try:
            return etag, parse_manifest(raw, self.uri_for(key))
        except IntegrityError:
            return etag, None

    def _begin_put(self, name: str) -> None:
        self._started_from[name] = self._read_manifest_object(f"{name}/{MANIFEST_NAME}")

    def _write_version(self, local_dir: Path, name: str, version: str, relative_paths: list[str]) -> list[FileEntry]:
        entries = [file_entry(local_dir / relative_path, relative_path) for relative_path in relative_paths]
        self._put_bytes(f"{name}/{version}/{WRITING}", b"")  # the store's marker, before any file
        for entry in entries:
            self._upload_file(local_dir / entry.path, f"{name}/{version}/{entry.path}")
        return entries

    def _put_bytes(self, key: str, data: bytes, **condition: str) -> None:
        self._call(
            "writing", key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition),
            attempts=self.transfer.transfer_attempts,
        )

    def _commit(self, name: str, version: str, manifest: Mapping[str, Any]) -> None:
        data = manifest_bytes(manifest)
        self._put_bytes(f"{name}/{version}/{MANIFEST_NAME}", data)  # readers can ask for this version later
        etag, previous = self._started_from.pop(name, (None, None))
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self._put_bytes(f"{name}/{MANIFEST_NAME}", data, **condition)
        except StoreError as error:
            if not _precondition_failed(error):
                raise
            _, current = self._read_manifest_object(f"{name}/{MANIFEST_NAME}")
            if current is None or current.get("version") != version:  # (ours: a retry after a lost answer)
                now = current.get("version") if current else "none readable"
                raise LeaseLostError(
                    f"checkpoint {self.uri_for(name)} was committed by another run while this one wrote it (now "
                    f"version {now}); not committing this version, the other run's work stands"
                ) from None
        if previous is not None and previous.get("version") != version:
            self._retire(name, previous)

    def _retire(self, name: str, previous: Mapping[str, Any]) -> None:
        """Records that `previous` (a manifest) was replaced (best effort: the next prune records it too)."""
        try:
            if previous.get("format") == LEGACY_MANIFEST_FORMAT:  # files right under <name>/: listed
                keys = [f"{name}/{entry['path']}" for entry in previous["files"]]
                self._put_bytes(f"{name}/legacy-{uuid.uuid4().hex[:8]}/{RETIRED}", json.dumps(keys).encode())
            else:
                self._put_bytes(f"{name}/{previous['version']}/{RETIRED}", b"")
        except StoreError as exc:
            logger.warning("could not record the previous version of %s as retired: %s", name, exc)

    def _versions(self, name: str) -> dict[str, dict[str, Any]]:
        """The version prefixes under <name>/: version -> {"keys": [...], "marker", "manifest", "retired": age}."""
        versions: dict[str, dict[str, Any]] = {}
        for item in self._list_objects(f"{name}/"):
            version, _, rest = item["Key"][len(name) + 1:].partition("/")
            if not rest:
                continue  # <name>/manifest.json, or an object of someone else's
            entry = versions.setdefault(version, {"keys": [], "marker": False, "manifest": False, "retired": None})
            entry["keys"].append(item["Key"])
            if rest == WRITING:
                entry["marker"] = True
            elif rest == MANIFEST_NAME:
                entry["manifest"] = True
            elif rest == RETIRED:
                entry["retired"] = max(0.0, time.time() - item["LastModified"].timestamp())
        return versions

    def _prune_version(self, name: str, version: str) -> None:
        found = self._versions(name).get(version)
        if found is not None and found["marker"]:  # only a version this store started writing
            self._delete_keys(found["keys"])

    def _prune(self, name: str, keep: str) -> None:
        committed = self._committed_version(name)
        for version, found in sorted(self._versions(name).items()):
            if version in (keep, committed):
                continue
            if found["manifest"] or found["retired"] is not None or version.startswith("legacy-"):
                self._remove_if_due(name, version, found)  # the store's own: its manifest or its record
            elif found["marker"]:  # a writer that crashed before its commit
                self._delete_keys(found["keys"])
        self.sweep(exclude=name)

    def _remove_if_due(self, name: str, version: str, found: Mapping[str, Any]) -> None:
        if found["retired"] is None:
            if found["manifest"]:  # a commit cut short before it recorded the old version: recorded now
                self._put_bytes(f"{name}/{version}/{RETIRED}", b"")
            return
        if found["retired"] < self.retain_seconds:
            return
        keys = list(found["keys"])
        if version.startswith("legacy-"):  # the older layout's files, as its record lists them
            listed = json.loads(self._read_bytes(f"{name}/{version}/{RETIRED}") or b"[]")
            keys = [key for key in listed if isinstance(key, str) and key.startswith(f"{name}/")
                    and key != f"{name}/{MANIFEST_NAME}"] + keys
        self._delete_keys(sorted(keys, key=lambda key: key.endswith(RETIRED)))  # the record last

    def sweep(self, exclude: str | None = None) -> None:
        """Removes the due retired versions of every checkpoint of this store (the store's own only)."""
        names = sorted({item["Key"].split("/", 1)[0] for item in self._list_objects("")
                        if item["Key"].endswith(f"/{RETIRED}") and not item["Key"].startswith(".")})
        for name in names:
            if name == exclude:
                continue
            committed = self._committed_version(name)
            for version, found in sorted(self._versions(name).items()):
                due = found["retired"] is not None and found["retired"] >= self.retain_seconds
                if version != committed and due:
                    self._remove_if_due(name, version, found)

    # -- reading --------------------------------------------------------------------------------------

    def _file_key(self, name: str, manifest: Mapping[str, Any], path: str) -> str:
        version = manifest.get("version")
        return f"{name}/{version}/{path}" if version else f"{name}/{path}"  # no version: the older layout

    def get_checkpoint(self, name: str, *, digest: str | None = None) -> Path:
        """Downloads the checkpoint into ``cache_dir/<name>-<manifest digest>/`` once and returns that folder.

        A download is checked against the manifest's sizes and sha256 before the folder appears; a folder
        already in the cache is checked for sizes only, and downloaded again if they differ. If a newer
        version is committed while the files download (the old ones vanish), the new one is fetched --
        unless ``digest`` asks for one version: then that one, from its own manifest, or NotFoundError.
        """
        if digest is not None:
            return self._get_version(name, digest)
        for _ in range(3):
            manifest = self.manifest(name)
            try:
                return self._fetch_version(name, manifest)
            except NotFoundError:
                if manifest_digest(self.manifest(name)) == manifest_digest(manifest):
                    raise
                logger.warning("checkpoint %s changed while downloading; fetching the new version", name)
        raise StoreError(f"checkpoint {self.uri_for(name)} keeps changing while it downloads; try again later")

    def _get_version(self, name: str, digest: str) -> Path:
        """The version of `name` whose manifest has `digest`: the committed one, or a retired one still kept."""
        cached = self.cache_dir / f"{name}-{digest[:16]}"
        manifest = self.manifest(name)
        if manifest_digest(manifest) != digest:
            if (cached / MANIFEST_NAME).is_file():
                try:
                    local = parse_manifest((cached / MANIFEST_NAME).read_bytes(), str(cached / MANIFEST_NAME))
                    if manifest_digest(local) == digest:
                        manifest = local
                except IntegrityError:
                    pass
        if manifest_digest(manifest) != digest:
            for version, found in sorted(self._versions(name).items(), reverse=True):
                if found["manifest"]:
                    _, candidate = self._read_manifest_object(f"{name}/{version}/{MANIFEST_NAME}")
                    if candidate is not None and manifest_digest(candidate) == digest:
                        manifest = candidate
                        break
            else:
                raise NotFoundError(
                    f"checkpoint {self.uri_for(name)} no longer holds the version with manifest digest "
                    f"{digest[:16]}... (another run replaced it and it was pruned); run again to compute from "
                    "the current one")
        return self._fetch_version(name, manifest)

    def _fetch_version(self, name: str, manifest: dict[str, Any]) -> Path:
        digest = manifest_digest(manifest)
        folder = self.cache_dir / f"{name}-{digest[:16]}"
        where = f"checkpoint {self.uri_for(name)}"
        if folder.is_dir():
            try:
                for entry in manifest["files"]:
                    verify_file(folder / entry["path"], entry, hashes=False, where=f"cached copy {folder} of {where}")
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
                self._download_verified(self._file_key(name, manifest, entry["path"]), destination, entry, where)
            (staging / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
            _rename_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def get_folder(self, key_prefix: str = "") -> Path:
        """Downloads every object under a plain prefix (a transformers checkpoint uploaded as files, no
        manifest of ours) into ``cache_dir/folders/<digest of the listing>/`` once, and returns it.

        Each object's size is checked against the listing and, where its ETag is a plain MD5 (not a
        multipart upload), its MD5 too, with one more download on a mismatch. The folder gets a
        ``manifest.json`` with every file's sha256, computed from what was downloaded.
        """
        if key_prefix:
            check_relative_path(key_prefix.rstrip("/"), "S3 prefix")
        prefix = f"{key_prefix.rstrip('/')}/" if key_prefix else ""
        objects = [item for item in self._list_objects(prefix) if not item["Key"].endswith("/")]
        if not objects:
            raise NotFoundError(f"nothing at {self.uri_for(prefix.rstrip('/')) if prefix else self.uri}")
        listing = sorted((item["Key"][len(prefix) :], item["Size"], item["ETag"].strip('"')) for item in objects)
        for relative_path, _, _ in listing:
            check_relative_path(relative_path, f"object name under {self.uri_for(prefix)}")
        folder = self.cache_dir / "folders" / config_digest(listing)[:16]
        if (folder / MANIFEST_NAME).is_file() and all(
            (folder / path).is_file() and (folder / path).stat().st_size == size for path, size, _ in listing
        ):
            return folder
        staging = self.cache_dir / ".partial" / f"{folder.name}.{uuid.uuid4().hex}"
        try:
            entries = []
            for relative_path, size, etag in listing:
                destination = staging / relative_path
                destination.parent.mkdir(parents=True, exist_ok=True)
                where = self.uri_for(prefix + relative_path)
                for attempt in range(1, self.transfer.integrity_attempts + 1):
                    self._download_file(prefix + relative_path, destination)
                    problem = _listing_mismatch(destination, size, etag)
                    if problem is None:
                        break
                    if attempt == self.transfer.integrity_attempts:
                        raise IntegrityError(f"{where}: {problem} (downloaded {attempt} times)")
                    logger.warning("%s: %s; downloading it again", where, problem)
                entries.append(file_entry(destination, relative_path))
            uri = self.uri_for(prefix.rstrip("/")) if prefix else self.uri
            manifest = build_manifest(
                "folder", new_version(), entries,
                config_digest=config_digest(listing), parent={"name": uri.rsplit("/", 1)[-1], "uri": uri,
                                                              "manifest_digest": None}, metadata={"source": uri},
            )
            (staging / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
            _rename_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def check(self) -> None:
        self._call("checking", None, lambda: self.client.head_bucket(Bucket=self.bucket))


def _rename_into_place(staging: Path, folder: Path) -> None:
    """Moves a complete download to its content-addressed place; if another process put the same content
    there first, theirs is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, folder)
    except OSError:
        if not folder.is_dir():
            raise


def _listing_mismatch(path: Path, size: int, etag: str) -> str | None:
    actual = path.stat().st_size
    if actual != size:
        return f"downloaded {actual} bytes, the listing says {size}"
    if len(etag) == 32 and "-" not in etag:  # a single-part upload's ETag is the MD5 of its bytes
        with open(path, "rb") as handle:
            md5 = hashlib.file_digest(handle, "md5").hexdigest()
        if md5 != etag:
            return f"MD5 {md5} differs from the ETag {etag}"
    return None


def _precondition_failed(exc: BaseException) -> bool:
    error = _client_error(exc)
    return error is not None and (error[0] in ("PreconditionFailed", "ConditionalRequestConflict") or error[1] in (409, 412))
