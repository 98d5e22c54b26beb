"""A store in a local (or shared) folder.

    <root>/<name>                         symlink to .versions/<name>/<version> (the commit switches it)
    <root>/.versions/<name>/<version>/    the files of one version, and its manifest.json written last
    <root>/.leases/<name>.lock            the write lease (flock)

``<root>/<name>/model.safetensors`` and ``<root>/<name>/manifest.json`` read as before; a put writes a
new version folder beside the committed one and replaces the symlink in one rename, so a crash at any
moment leaves either the old or the new version whole.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.store.base import Store
from pipeline.store.errors import AccessDeniedError, NotFoundError, StoreError
from pipeline.store.lease import Lease, LocalLease
from pipeline.store.manifest import (
    MANIFEST_NAME,
    FileEntry,
    check_name,
    file_entry,
    manifest_bytes,
    manifest_digest,
    parse_manifest,
    verify_file,
    write_bytes_atomically,
)

VERSIONS_DIR = ".versions"
LEASES_DIR = ".leases"


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

    # -- versions -------------------------------------------------------------------------------------

    def _version_dir(self, name: str, version: str) -> Path:
        return self.root / VERSIONS_DIR / name / version

    def _write_version(self, local_dir: Path, name: str, version: str, relative_paths: list[str]) -> list[FileEntry]:
        folder = self._version_dir(name, version)
        entries = []
        for relative_path in relative_paths:
            destination = folder / relative_path
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_dir / relative_path, destination)
            except OSError as exc:  # a full disk, a quota, permissions: one line, the put is abandoned
                raise StoreError(
                    f"could not write checkpoint {self.uri_for(name)}: {exc.strerror or exc} while writing "
                    f"'{relative_path}' into {self.root}; free space (or fix permissions) and run again"
                ) from exc
            entries.append(file_entry(destination, relative_path))  # hash what was stored
        return entries

    def _prune_version(self, name: str, version: str) -> None:
        shutil.rmtree(self._version_dir(name, version), ignore_errors=True)

    def _commit(self, name: str, version: str, manifest: Mapping[str, Any]) -> None:
        folder = self._version_dir(name, version)
        write_bytes_atomically(folder / MANIFEST_NAME, manifest_bytes(manifest))
        link = self.root / name
        if link.is_dir() and not link.is_symlink():  # a folder in the older layout: keep it as a version
            os.rename(link, self.root / VERSIONS_DIR / name / f"legacy-{uuid.uuid4().hex[:8]}")
        temporary = self.root / f".{name}.{uuid.uuid4().hex}.link"
        os.symlink(Path(VERSIONS_DIR, name, version), temporary)
        os.replace(temporary, link)  # the commit: one rename

    def _prune(self, name: str, keep: str) -> None:
        versions = self.root / VERSIONS_DIR / name
        for folder in versions.iterdir():
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)
        for stray in self.root.glob(f".{name}.*.link"):  # links a crashed commit left
            stray.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------------

    def get_checkpoint(self, name: str) -> Path:
        """The stored version folder itself. Files are hashed when their (size, mtime) differ from the
        last time they were hashed, recorded in ``cache_dir/verified/``; otherwise only sizes are checked."""
        check_name(name)
        folder = (self.root / name).resolve()  # this version, even if a later put switches the link
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

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise AccessDeniedError(f"store folder {self.root} is not writable")

