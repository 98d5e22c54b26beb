"""Hugging Face hub ids as `teacher.path` / `start.path`: `org/name`, `org/name@revision`, and for a GGUF
repository `org/name/<file>.gguf` (or `org/name@revision/<file>.gguf`).

`hub_source` resolves an id to a `pipeline.executor.Source` without downloading weights: the commit sha
the revision points to (that sha is the input's digest, so a moved branch is a new input and a pinned
revision is stable; the Source's uri, which lineages record, is `hf://org/name@<sha>`), the repository's
file list and `config.json`. Its `fetch()` downloads, into the hub's
own cache (`HF_HOME` / `HF_HUB_CACHE`), only what a checkpoint needs: safetensors weights and index, config,
tokenizer and chat-template files (never `*.bin`, `*.pt` or `*.py`), or the one GGUF file.

With `HF_HUB_OFFLINE=1` everything is read from that cache (the layout `huggingface_hub` writes:
`models--org--name/refs/<revision>` -> sha, `snapshots/<sha>/...`), or the id is refused in one line. A
gated, missing or private repository is one line naming it (a token is never printed).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from pipeline.config import ConfigError

# What a checkpoint needs from a repository: weights as safetensors, config, tokenizer and template files.
CHECKPOINT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                       "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                       "mamba_config.json")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^/@\s]+))?(?:/(?P<file>[^/\s]+\.gguf))?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class HubError(ConfigError):
    """A hub id that cannot be resolved: one line naming the repository and what to do."""


def parse_hub_id(path: str) -> tuple[str, str, str | None] | None:
    """(repo, revision, gguf file or None) of `org/name[@revision][/file.gguf]`; None when `path` is not of
    that form or names something on this machine (a relative folder `models/llama` that exists)."""
    text = str(path)
    if "://" in text or text.startswith(("/", ".", "~")) or Path(text).expanduser().exists():
        return None
    found = _ID.match(text)
    if found is None or ".." in found.group("repo"):
        return None
    return found.group("repo"), found.group("revision") or "main", found.group("file")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    """The hub's cache folder, read when called ($HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def wanted(names, gguf: str | None) -> tuple[str, ...]:
    """The files of a repository a checkpoint is made of (`CHECKPOINT_PATTERNS`, or the one GGUF file)."""
    if gguf is not None:
        return tuple(name for name in names if name == gguf)
    return tuple(sorted(name for name in names if "/" not in name
                        and any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_PATTERNS)))


def _cached(repo: str, revision: str, where: str) -> tuple[str, Path]:
    """(sha, snapshot folder) of `repo` at `revision` in the local cache, or HubError."""
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    sha = revision if _SHA.match(revision) else None
    ref = folder / "refs" / revision
    if sha is None and ref.is_file():
        sha = ref.read_text().strip()
    if sha is None or not (folder / "snapshots" / sha).is_dir():
        raise HubError(f"{where}: hub repository {repo} (revision {revision}) is not in the local hub cache "
                       f"({hub_cache()}) and HF_HUB_OFFLINE is set: download it once with network access "
                       f"(unset HF_HUB_OFFLINE), or give a local folder")
    return sha, folder / "snapshots" / sha


def _hub_error(error: Exception, repo: str, revision: str, where: str) -> HubError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return HubError(f"{where}: hub repository {repo} is gated: accept its terms on huggingface.co with your "
                        "account and set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"{where}: no hub repository {repo} (or it is private: set HF_TOKEN to a token that can "
                        "read it)")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{where}: hub repository {repo} has no revision {revision!r}")
    return HubError(f"{where}: hub repository {repo} cannot be reached ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); with no network, set HF_HUB_OFFLINE=1 to "
                    "use the local hub cache")


def hub_source(path: str, key: str = "teacher.path"):
    """The Source of a hub id (see the module docstring); HubError in one line when it cannot be resolved."""
    from pipeline.executor import Source
    from pipeline.store import config_digest

    parsed = parse_hub_id(path)
    if parsed is None:
        raise HubError(f"{key}={path!r} is not a hub id (org/name[@revision][/file.gguf])")
    repo, revision, gguf = parsed
    where = f"{key}={path}"
    if _offline():
        sha, snapshot = _cached(repo, revision, where)
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file() or p.is_symlink()]
        files = wanted(names, gguf)
        fetch = (lambda: snapshot / gguf) if gguf else (lambda: snapshot)

        def read(name: str) -> bytes:
            return (snapshot / name).read_bytes()
    else:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download

        try:
            info = HfApi().model_info(repo, revision=revision)
        except Exception as error:  # huggingface_hub raises its own HTTP error types
            raise _hub_error(error, repo, revision, where) from None
        sha = info.sha
        files = wanted([sibling.rfilename for sibling in info.siblings or []], gguf)

        def fetch() -> Path:
            try:
                if gguf:
                    return Path(hf_hub_download(repo, gguf, revision=sha))
                return Path(snapshot_download(repo, revision=sha, allow_patterns=list(files)))
            except Exception as error:
                raise _hub_error(error, repo, revision, where) from None

        def read(name: str) -> bytes:
            try:
                return Path(hf_hub_download(repo, name, revision=sha)).read_bytes()
            except Exception as error:
                raise _hub_error(error, repo, revision, where) from None
    if gguf and not files:
        raise HubError(f"{where}: hub repository {repo} at {sha[:12]} has no file {gguf}")
    if not files:
        raise HubError(f"{where}: hub repository {repo} at {sha[:12]} has no checkpoint files (safetensors, "
                       "config, tokenizer)")
    digest = config_digest({"hub": repo, "sha": sha, "file": gguf})
    uri = f"hf://{repo}@{sha}" + (f"/{gguf}" if gguf else "")  # what the lineage records: the commit itself
    return Source(uri, digest, fetch, files, read)


__all__ = ["CHECKPOINT_PATTERNS", "HubError", "hub_cache", "hub_source", "parse_hub_id", "wanted"]
