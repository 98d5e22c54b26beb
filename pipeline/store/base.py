"""The store interface and the write protocol both backends share.

A put never touches the version readers use until its commit:
1. take the name's write lease (a second run writing the same name waits or fails, naming the holder) and
   check that whatever already sits at the name was written by the store (else refuse, changing nothing);
2. write every file into a new version folder ``<name>/<version>/``, beside the committed one, marked as
   the store's own before the first file;
3. commit: switch ``<name>/manifest.json`` (S3: one conditional PUT, refused if another run committed
   meanwhile) or ``<name>`` (local: one symlink rename) to the new version, after checking the lease is
   still ours; the version it replaces is recorded as retired, with the time;
4. prune: remove what crashed writers left, and retired versions once they have been retired for
   ``retain_seconds`` and (local stores) no reader holds them (failures here only log).
A crash anywhere before 3 leaves the last good checkpoint as it was; after 3 the new one is complete.

The store only ever moves or deletes what it wrote: a version folder counts as its own when it carries the
store's marker (written before its first file) or a manifest of its own; anything else at a checkpoint's
place is refused in one line, never moved, never pruned.

Readers: ``get_checkpoint`` returns a folder that stays valid for at least ``retain_seconds`` after a newer
version is committed; ``hold`` keeps a version (local stores: reference-counted through a shared lock)
for as long as its block runs. A version can be asked for by its manifest digest (``digest=``): what a
stage's cache key was computed from, even once another run committed a newer one.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.redaction import redact
from pipeline.store.errors import IntegrityError, LeaseLostError, NotFoundError, StoreError
from pipeline.store.lease import Lease
from pipeline.store.manifest import (
    MANIFEST_NAME,
    CheckpointRef,
    FileEntry,
    build_manifest,
    check_name,
    check_relative_path,
    manifest_digest,
    new_version,
    parse_manifest,
    scan_files,
)

logger = logging.getLogger("pipeline.store")

DEFAULT_RETAIN_SECONDS = 6 * 3600.0


class Store(abc.ABC):
    """A place for checkpoints and small artifacts. Open one with :func:`pipeline.store.open_store`.

    lease_wait_seconds: how long a put (or :meth:`lease`) waits for another run's write lease of the same
        name before failing with LeaseHeldError (0: fail at once).
    """

    def __init__(self, uri: str, cache_dir: Path) -> None:
        self.uri = uri  # the store root, e.g. file:///abs/artifacts or s3://bucket/prefix
        self.cache_dir = cache_dir
        self.lease_wait_seconds = 0.0
        # a version replaced by a newer one stays readable at least this long (then the next put removes it)
        self.retain_seconds = DEFAULT_RETAIN_SECONDS
        self._leases: dict[str, Lease] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- backend primitives ---------------------------------------------------------------------------

    @abc.abstractmethod
    def uri_for(self, name: str) -> str:
        """URI of a checkpoint folder (or of a small-file key)."""

    @abc.abstractmethod
    def _read_bytes(self, key: str) -> bytes:
        """Bytes of an object; raises NotFoundError if absent."""

    @abc.abstractmethod
    def _upload_file(self, source: Path, key: str) -> None:
        """Copies one file to a key (readers see the whole file or nothing)."""

    @abc.abstractmethod
    def _new_lease(self, name: str) -> Lease:
        """An unacquired write lease for checkpoint ``name``."""

    @abc.abstractmethod
    def _write_version(self, local_dir: Path, name: str, version: str, relative_paths: list[str]) -> list[FileEntry]:
        """Writes the files into version folder ``<name>/<version>/``; returns their entries."""

    @abc.abstractmethod
    def _begin_put(self, name: str) -> None:
        """Under the lease, before anything is written: refuses (StoreError) when what sits at ``name`` was not
        written by the store, and notes what the commit must find unchanged."""

    @abc.abstractmethod
    def _commit(self, name: str, version: str, manifest: Mapping[str, Any]) -> None:
        """The commit point of a put: readers see ``version`` from now on (LeaseLostError, committing nothing,
        if another run committed ``name`` since ``_begin_put``). The version it replaces becomes retired."""

    @abc.abstractmethod
    def _prune(self, name: str, keep: str) -> None:
        """Removes what crashed writers of ``name`` left and its retired versions that are due (retired for
        ``retain_seconds``, held by no reader), never ``keep``, never what the store did not write."""

    def _discard_version(self, name: str, version: str) -> None:
        """Removes an uncommitted version after a failed put; failures only log (the next put prunes)."""
        try:
            self._prune_version(name, version)
        except (StoreError, OSError) as exc:
            logger.warning("could not remove the unfinished version %s of %s: %s", version, name, exc)

    @abc.abstractmethod
    def _prune_version(self, name: str, version: str) -> None:
        """Removes one version folder of ``name``."""

    @abc.abstractmethod
    def get_checkpoint(self, name: str, *, digest: str | None = None) -> Path:
        """Local folder holding the checkpoint's files and its manifest: the committed version, or with
        ``digest`` the version whose manifest has that digest (committed or retired, while it is kept).

        Every file's size and sha256 is checked against the manifest once per content (an S3 download;
        a local folder whose files changed since they were last hashed); later calls check sizes only.
        The folder stays valid for at least ``retain_seconds`` after a newer version is committed.
        Raises NotFoundError if the checkpoint is not committed (or the asked-for version is gone),
        IntegrityError on a mismatch.
        """

    def check_place(self, name: str) -> None:
        """StoreError (one line) if something the store did not write sits where checkpoint `name` goes
        (a folder store; in S3 the store's objects never collide with others')."""
        check_name(name)

    @contextmanager
    def hold(self, name: str, *, digest: str | None = None) -> Iterator[Path]:
        """``get_checkpoint``, with the version kept from pruning for as long as the block runs (local
        stores count their readers; an S3 checkpoint is read from this machine's download of it)."""
        yield self.get_checkpoint(name, digest=digest)

    @abc.abstractmethod
    def check(self) -> None:
        """Raises a clear StoreError if the store cannot be used (bucket missing, no access, ...)."""

    # -- leases ---------------------------------------------------------------------------------------

    @contextmanager
    def lease(self, name: str, *, wait_seconds: float | None = None) -> Iterator[Lease]:
        """Holds the write lease of checkpoint ``name`` for the block (re-entrant within this store object).

        Raises LeaseHeldError naming the holder if another run keeps it longer than ``wait_seconds``
        (default ``lease_wait_seconds``).
        """
        check_name(name)
        held = self._leases.get(name)
        if held is not None:
            yield held
            return
        lease = self._new_lease(name)
        lease.acquire(self.lease_wait_seconds if wait_seconds is None else wait_seconds)
        self._leases[name] = lease
        try:
            yield lease
        finally:
            del self._leases[name]
            lease.release()

    # -- checkpoints ----------------------------------------------------------------------------------

    def put_checkpoint(
        self,
        local_dir: str | os.PathLike[str],
        name: str,
        *,
        config_digest: str,
        parent: CheckpointRef | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointRef:
        """Stores every file under ``local_dir`` as a new version of checkpoint ``name``; the previous
        version stays the committed one until the new one is complete (see the module docstring).

        ``parent`` is the checkpoint this one was derived from: a CheckpointRef, the name of a committed
        checkpoint in this store, or a URI elsewhere. ``metadata`` must be JSON-serialisable (resolved
        config, layer pattern, ...).
        """
        check_name(name)
        local_dir = Path(local_dir)
        relative_paths = scan_files(local_dir)
        parent_record = redact(self._parent_record(parent), keys=False)
        # JSON types (fails early if not serialisable), no secret (a source URI's userinfo, ...)
        metadata = redact(json.loads(json.dumps(dict(metadata or {}))), keys=False)
        with self.lease(name) as lease:
            self._begin_put(name)  # refuses what the store did not write, before anything is written
            version = new_version()
            try:
                entries = self._write_version(local_dir, name, version, relative_paths)
                manifest = build_manifest(
                    name, version, entries, config_digest=config_digest, parent=parent_record, metadata=metadata
                )
                lease.check()  # a run that lost its lease must not commit over the new holder's work
            except BaseException:
                self._discard_version(name, version)  # nothing half-written stays behind (best effort)
                raise
            try:
                self._commit(name, version, manifest)
            except LeaseLostError:  # refused: another run committed meanwhile, so this version never will be
                self._discard_version(name, version)
                raise
            try:
                self._prune(name, keep=version)
            except (StoreError, OSError) as exc:  # the commit stands; leftovers go at the next put
                logger.warning("checkpoint %s committed, but removing older versions failed: %s", name, exc)
        logger.info(
            "stored checkpoint %s (%d files, %d bytes)", self.uri_for(name), len(entries), manifest["total_size"]
        )
        return CheckpointRef(name, self.uri_for(name), manifest_digest(manifest), config_digest)

    def _committed_version(self, name: str) -> str | None:
        """The committed version of ``name`` (None: none, or a manifest that does not parse); other errors
        (the store cannot be read now) propagate."""
        try:
            return self.manifest(name).get("version")
        except (NotFoundError, IntegrityError):
            return None

    def manifest(self, name: str) -> dict[str, Any]:
        """The parsed manifest; NotFoundError if the checkpoint is not committed, IntegrityError if garbled."""
        check_name(name)
        where = self.uri_for(f"{name}/{MANIFEST_NAME}")
        try:
            raw = self._read_bytes(f"{name}/{MANIFEST_NAME}")
        except NotFoundError:
            raise NotFoundError(
                f"no checkpoint '{name}' in {self.uri} (no {MANIFEST_NAME}: never written or not finished)"
            ) from None
        return parse_manifest(raw, where)

    def has_checkpoint(self, name: str) -> bool:
        """True only for a committed checkpoint: its manifest exists and parses."""
        try:
            self.manifest(name)
        except (NotFoundError, IntegrityError):
            return False
        return True

    def file_uri(self, name: str, path: str) -> str:
        """URI of one file of the committed version of checkpoint ``name``."""
        return self.uri_for(self._file_key(name, self.manifest(name), check_relative_path(path, "file path")))

    def _file_key(self, name: str, manifest: Mapping[str, Any], path: str) -> str:
        """The key of a file of the committed version (local stores reach it through the ``<name>`` link)."""
        return f"{name}/{path}"

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
