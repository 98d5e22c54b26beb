"""Manifests and digests: what a committed checkpoint is, and the names a store accepts.

A manifest lists every file of a checkpoint version (relative path, size, sha256), the version folder
the files live in, the digest of the config that produced it, the parent checkpoint, the creation time
and free-form metadata. Its own digest (``manifest_digest``) names the exact content of a checkpoint.

Every name that becomes part of a path or an object key is checked here, including the paths read back
from a manifest (a manifest is data from the bucket, not trusted code): no ``..``, no absolute paths, no
backslashes, control characters or percent-encoded dots, so nothing written or downloaded can land
outside the run's prefix or the local cache.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import unquote

from pipeline.store.errors import IntegrityError, InvalidKeyError, StoreError, one_line

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hybrid-distill.checkpoint/2"  # files under <name>/<version>/
LEGACY_MANIFEST_FORMAT = "hybrid-distill.checkpoint/1"  # files directly under <name>/ (read only)
# A checkpoint name is one path segment, so names never nest and `<root>/<name>/` is unambiguous.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LENGTH = 100  # a name (and "<name>/<version>/") stays far below file-name and object-key limits
VERSION_PATTERN = re.compile(r"^v-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


# ----------------------------------------------------------------------------------------------------
# Names and keys


def check_name(name: str) -> str:
    """A checkpoint name: one path segment of letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidKeyError(
            f"invalid checkpoint name {name!r}: use one path segment of letters, digits, '.', '_' or '-', "
            f"not starting with '.' or '-', at most {MAX_NAME_LENGTH} characters"
        )
    return name


def check_relative_path(path: str, what: str = "store key") -> str:
    """A relative POSIX path that stays below its folder: no '', '.', '..' segments (also percent-encoded),
    no leading '/', no backslash or control characters, no hidden first segment."""
    parts = path.split("/") if isinstance(path, str) else []
    bad = (
        not parts
        or _CONTROL.search(path) is not None
        or "\\" in path
        or parts[0].startswith((".", "~"))
        or any(part in ("", ".", "..") or unquote(part) in (".", "..") or "/" in unquote(part) for part in parts)
    )
    if bad:
        raise InvalidKeyError(
            f"invalid {what} {path!r}: use a relative path like 'loo.json' or 'plots/loo.png' "
            "(no '..', no leading '/' or '.', no backslashes or control characters)"
        )
    return path


def new_version() -> str:
    """A version folder name, sortable by creation time: v-20260101T120000-1a2b3c4d."""
    return f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------------
# Manifests


def build_manifest(
    name: str,
    version: str,
    entries: list[FileEntry],
    *,
    config_digest: str,
    parent: dict[str, Any] | None,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "config_digest": config_digest,
        "parent": parent,
        "created": utc_now(),
        "total_size": sum(entry.size for entry in entries),
        "files": [entry.to_dict() for entry in entries],
        "metadata": dict(metadata),
    }


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest, checked: format, types, and every path and the version safe to use as keys."""
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        version = manifest.get("version")
        ok = (
            manifest.get("format") in (MANIFEST_FORMAT, LEGACY_MANIFEST_FORMAT)
            and isinstance(manifest.get("config_digest"), str)
            and isinstance(files, list)
            and all(
                isinstance(entry.get("path"), str)
                and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)
                and len(entry["sha256"]) == 64
                for entry in files
            )
            and (manifest["format"] == LEGACY_MANIFEST_FORMAT or (isinstance(version, str) and VERSION_PATTERN.match(version)))
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise IntegrityError(
            f"manifest {where} does not parse ({one_line(exc)}); delete it or re-put the checkpoint"
        ) from exc
    if not ok:
        raise IntegrityError(f"manifest {where} is not a '{MANIFEST_FORMAT}' manifest; delete it or re-put the checkpoint")
    for entry in files:
        try:
            check_relative_path(entry["path"], "file path")
        except InvalidKeyError as exc:
            raise IntegrityError(f"manifest {where} lists an unsafe file path ({exc}); not using it") from None
    return manifest


def scan_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file under local_dir (symlinks followed), sorted."""
    if not local_dir.is_dir():
        raise NotADirectoryError(f"checkpoint folder {local_dir} does not exist or is not a folder")
    relative_paths = []
    for directory, _, filenames in os.walk(local_dir, followlinks=True):
        for filename in filenames:
            path = Path(directory, filename)
            if path.is_file():
                relative_paths.append(check_relative_path(path.relative_to(local_dir).as_posix(), "file name"))
    if MANIFEST_NAME in relative_paths:
        raise StoreError(
            f"{local_dir / MANIFEST_NAME} exists, but '{MANIFEST_NAME}' at the top of a checkpoint is written by "
            "the store: rename or remove it before putting the folder"
        )
    return sorted(relative_paths)


def file_entry(path: Path, relative_path: str) -> FileEntry:
    return FileEntry(path=relative_path, size=path.stat().st_size, sha256=file_sha256(path))


def verify_file(path: Path, entry: Mapping[str, Any], *, hashes: bool, where: str) -> None:
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


def write_bytes_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
