"""A store in a local (or shared) folder.

    <root>/<name>                               symlink to .versions/<name>/<version> (the commit switches it)
    <root>/.versions/<name>/<version>/          the files of one version, and its manifest.json written last
    <root>/.marks/<name>/<version>.writing      the store's marker: made before the version folder, removed
                                                once the version is committed
    <root>/.marks/<name>/<version>.retired      made when a newer version is committed (its mtime: when)
    <root>/.marks/<name>/<version>.readers      readers of the version hold a shared flock on it
    <root>/.leases/<name>.lock                  the write lease (flock)

``<root>/<name>/model.safetensors`` and ``<root>/<name>/manifest.json`` read as before; a put writes a
new version folder beside the committed one and replaces the symlink in one rename, so a crash at any
moment leaves either the old or the new version whole.

What the store deletes or moves is only ever its own: a version folder with its ``.writing`` marker (a
writer that crashed) or with a manifest of the store naming that version; a real folder at ``<root>/<name>``
only when it holds a manifest of the store (the older layout, kept as a retired version). Anything else
there -- a user's folder, file or link -- makes a put fail in one line before it writes anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.store.base import Store
from pipeline.store.errors import AccessDeniedError, IntegrityError, NotFoundError, StoreError
from pipeline.store.lease import Lease, LocalLease
from pipeline.store.manifest import (
    MANIFEST_NAME,
    VERSION_PATTERN,
    FileEntry,
    check_name,
    file_entry,
    manifest_bytes,
    manifest_digest,
    parse_manifest,
    verify_file,
    write_bytes_atomically,
)

logger = logging.getLogger("pipeline.store")

VERSIONS_DIR = ".versions"
MARKS_DIR = ".marks"
LEASES_DIR = ".leases"
WRITING, RETIRED, READERS = ".writing", ".retired", ".readers"
LEGACY_VERSION = re.compile(r"^legacy-[0-9a-f]{8}$")  # an older-layout folder kept as a version
_STRAY_LINK = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.link$")


class LocalStore(Store):
    """A folder on a local (or shared) file system. ``get_checkpoint`` returns the stored version folder
    itself: treat it as read-only."""

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

    def _upload_file(self, source: Path, key: str) -> None:
        destination = self._path(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)

    def _new_lease(self, name: str) -> Lease:
        return LocalLease(name, self.uri_for(name), self.root / LEASES_DIR / f"{name}.lock")

    # -- what is the store's own ------------------------------------------------------------------------

    def _version_dir(self, name: str, version: str) -> Path:
        return self.root / VERSIONS_DIR / name / version

    def _mark(self, name: str, version: str, kind: str) -> Path:
        return self.root / MARKS_DIR / name / f"{version}{kind}"

    def _own_manifest(self, folder: Path, version: str | None) -> dict[str, Any] | None:
        """The store's manifest in `folder` (naming `version`, when given), or None."""
        try:
            manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
        except (OSError, IntegrityError):
            return None
        if version is not None and manifest.get("version") not in (version, None):
            return None
        return manifest

    def _linked_version(self, name: str) -> str | None:
        """The version the link `<root>/<name>` points at (None: no link); StoreError for anything at that
        place the store did not make."""
        link = self.root / name
        if link.is_symlink():
            target = Path(os.readlink(link))
            if target.parts[:2] == (VERSIONS_DIR, name) and len(target.parts) == 3:
                return target.parts[2]
            raise StoreError(self._foreign(name, f"a link to {target} that the store did not make"))
        if not link.exists():
            return None
        if link.is_dir() and self._own_manifest(link, None) is not None:
            return None  # a checkpoint of the older layout: the commit keeps it as a retired version
        what = "a folder without a manifest of the store" if link.is_dir() else "a file"
        raise StoreError(self._foreign(name, what))

    def _foreign(self, name: str, what: str) -> str:
        return (f"{self.root / name} is {what}: the store writes checkpoint '{name}' there and never moves or "
                "deletes what it did not write; move it away, or choose another storage.uri or run_name "
                "(nothing was changed)")

    # -- versions -------------------------------------------------------------------------------------

    def _begin_put(self, name: str) -> None:
        self._linked_version(name)

    def check_place(self, name: str) -> None:
        """StoreError (one line) if something the store did not write sits where checkpoint `name` goes."""
        check_name(name)
        self._linked_version(name)

    def _write_version(self, local_dir: Path, name: str, version: str, relative_paths: list[str]) -> list[FileEntry]:
        folder = self._version_dir(name, version)
        entries = []
        try:
            marker = self._mark(name, version, WRITING)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()  # before the folder: whatever the writer leaves is recognisably the store's
        except OSError as exc:
            raise self._write_error(name, exc, "the version marker") from exc
        for relative_path in relative_paths:
            destination = folder / relative_path
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_dir / relative_path, destination)
            except OSError as exc:  # a full disk, a quota, permissions: one line, the put is abandoned
                raise self._write_error(name, exc, f"'{relative_path}'") from exc
            entries.append(file_entry(destination, relative_path))  # hash what was stored
        return entries

    def _write_error(self, name: str, exc: OSError, what: str) -> StoreError:
        return StoreError(
            f"could not write checkpoint {self.uri_for(name)}: {exc.strerror or exc} while writing "
            f"{what} into {self.root}; free space (or fix permissions) and run again"
        )

    def _prune_version(self, name: str, version: str) -> None:
        if self._mark(name, version, WRITING).exists():  # only a version this store started writing
            shutil.rmtree(self._version_dir(name, version), ignore_errors=True)
            self._mark(name, version, WRITING).unlink(missing_ok=True)

    def _commit(self, name: str, version: str, manifest: Mapping[str, Any]) -> None:
        folder = self._version_dir(name, version)
        try:
            write_bytes_atomically(folder / MANIFEST_NAME, manifest_bytes(manifest))
        except OSError as exc:
            raise self._write_error(name, exc, MANIFEST_NAME) from exc
        link = self.root / name
        previous = self._linked_version(name)  # checked again: nothing foreign appeared meanwhile
        if link.is_dir() and not link.is_symlink():  # a checkpoint of the older layout: kept as a version
            previous = f"legacy-{uuid.uuid4().hex[:8]}"
            os.rename(link, self._version_dir(name, previous))
        temporary = self.root / f".{name}.{uuid.uuid4().hex}.link"
        os.symlink(Path(VERSIONS_DIR, name, version), temporary)
        os.replace(temporary, link)  # the commit: one rename
        if previous is not None and previous != version:
            self._retire(name, previous)
        self._mark(name, version, WRITING).unlink(missing_ok=True)

    def _retire(self, name: str, version: str) -> None:
        """Records that `version` was replaced, now (best effort: a missing record is made by the next prune)."""
        marker = self._mark(name, version, RETIRED)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                marker.touch()
        except OSError as exc:
            logger.warning("could not record %s of %s as retired: %s", version, name, exc)

    def _prune(self, name: str, keep: str) -> None:
        committed = self._linked_version(name) if (self.root / name).is_symlink() else None
        versions = self.root / VERSIONS_DIR / name
        for folder in sorted(versions.iterdir()) if versions.is_dir() else []:
            version = folder.name
            if version in (keep, committed) or not folder.is_dir() or folder.is_symlink():
                continue
            if self._own_manifest(folder, version) is None:
                if self._mark(name, version, WRITING).exists():  # a writer crashed before its commit
                    shutil.rmtree(folder, ignore_errors=True)
                    self._mark(name, version, WRITING).unlink(missing_ok=True)
                continue  # not the store's: left alone
            self._remove_if_due(name, version)
        for stray in self.root.iterdir():  # links a crashed commit left
            match = _STRAY_LINK.match(stray.name)
            if match and match.group("name") == name and stray.is_symlink():
                stray.unlink(missing_ok=True)
        self.sweep(exclude=name)

    def _remove_if_due(self, name: str, version: str) -> bool:
        """Removes a retired version of the store's own once it has been retired for retain_seconds and no
        reader holds it; a version with a manifest but no record (a commit cut short) is recorded now."""
        retired = self._mark(name, version, RETIRED)
        try:
            age = time.time() - retired.stat().st_mtime
        except FileNotFoundError:
            self._retire(name, version)
            age = 0.0
        if age < self.retain_seconds:
            return False
        readers = self._mark(name, version, READERS)
        readers.parent.mkdir(parents=True, exist_ok=True)
        import fcntl

        fd = os.open(readers, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("keeping %s of %s: a reader holds it", version, name)
                return False
            shutil.rmtree(self._version_dir(name, version), ignore_errors=True)
            for kind in (RETIRED, WRITING, READERS):
                self._mark(name, version, kind).unlink(missing_ok=True)
        finally:
            os.close(fd)
        return True

    def sweep(self, exclude: str | None = None) -> None:
        """Removes the due retired versions of every checkpoint (those of the store's own only)."""
        marks = self.root / MARKS_DIR
        for folder in sorted(marks.iterdir()) if marks.is_dir() else []:
            name = folder.name
            if name == exclude or not folder.is_dir():
                continue
            for record in sorted(folder.glob(f"*{RETIRED}")):
                version = record.name[: -len(RETIRED)]
                if (self.root / name).is_symlink() and os.readlink(self.root / name) == str(
                        Path(VERSIONS_DIR, name, version)):
                    continue
                if self._own_manifest(self._version_dir(name, version), version) is not None:
                    self._remove_if_due(name, version)

    # -- reading --------------------------------------------------------------------------------------

    def _version_folder(self, name: str, digest: str | None) -> Path:
        """The folder of the committed version, or of the version whose manifest has `digest`."""
        check_name(name)
        folder = (self.root / name).resolve()  # this version, even if a later put switches the link
        if digest is None:
            return folder
        manifest = self._own_manifest(folder, None)
        if manifest is not None and manifest_digest(manifest) == digest:
            return folder
        versions = self.root / VERSIONS_DIR / name
        for candidate in sorted(versions.iterdir(), reverse=True) if versions.is_dir() else []:
            if VERSION_PATTERN.match(candidate.name) or LEGACY_VERSION.match(candidate.name):
                manifest = self._own_manifest(candidate, None)
                if manifest is not None and manifest_digest(manifest) == digest:
                    return candidate
        self.manifest(name)  # not committed at all: the usual NotFoundError
        raise NotFoundError(
            f"checkpoint {self.uri_for(name)} no longer holds the version with manifest digest {digest[:16]}... "
            "(another run replaced it and it was pruned); run again to compute from the current one"
        )

    def get_checkpoint(self, name: str, *, digest: str | None = None) -> Path:
        """The stored version folder itself. Files are hashed when their (size, mtime) differ from the
        last time they were hashed, recorded in ``cache_dir/verified/``; otherwise only sizes are checked."""
        folder = self._version_folder(name, digest)
        try:
            raw = (folder / MANIFEST_NAME).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self.manifest(name)  # raises the usual NotFoundError
            raise
        manifest = parse_manifest(raw, self.uri_for(f"{name}/{MANIFEST_NAME}"))
        where = f"checkpoint {self.uri_for(name)}"
        for entry in manifest["files"]:
            verify_file(folder / entry["path"], entry, hashes=False, where=where)
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
            verify_file(folder / entry["path"], entry, hashes=True, where=where)
        write_bytes_atomically(marker, json.dumps(stat_signature).encode("utf-8"))
        return folder

    @contextlib.contextmanager
    def hold(self, name: str, *, digest: str | None = None) -> Iterator[Path]:
        """The version, with a shared lock on its readers file for the block: no prune removes it meanwhile."""
        import fcntl

        for _ in range(3):
            folder = self._version_folder(name, digest)
            readers = self._mark(name, folder.name, READERS)
            readers.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(readers, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                manifest = self._own_manifest(folder, None)
                if manifest is None:  # pruned between finding and locking it
                    continue
                yield self.get_checkpoint(name, digest=manifest_digest(manifest))
                return
            finally:
                os.close(fd)
        raise StoreError(f"checkpoint {self.uri_for(name)} keeps changing while it is opened; try again later")

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise AccessDeniedError(f"store folder {self.root} is not writable")
