"""Secrets out of everything a person or a server sees: one place, used by every output.

The console (progress lines, plan problems, one-line errors, tracebacks, log records), MLflow (params, tags,
dicts, texts, dataset sources, text artifacts), Prefect (log lines, markdown artifacts, failure messages),
each checkpoint's `run_config.json` and `stage.json`, and the store's manifests all pass through
`redact` / `redact_text`. What is masked:

- the userinfo of any URI (`https://user:password@host`, a token used as the user name
  `https://ghp_...@host`, passwords that contain `/`): `https://<redacted>@host`;
- query-string credentials (`?token=`, `access_token=`, `X-Amz-Signature=`, `X-Amz-Credential=`,
  `X-Amz-Security-Token=`, `sig=`, `password=`, any parameter whose name looks like a secret): the value;
- `Authorization: Bearer ...` / `Basic ...` headers, and tokens of well-known shapes (AWS access key ids,
  GitHub, Hugging Face, OpenAI-style and Slack tokens, JWTs) wherever they appear;
- the value of every environment variable whose name looks like a secret (AWS_SECRET_ACCESS_KEY,
  MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...), wherever it appears (values of 8 characters or more);
- in nested configs, the whole value of a key that looks like a secret (`password`, `api_key`, ...).

Pure Python (no torch, mlflow, prefect), so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

# A key names a secret if it contains secret/password/credential/signature/api key/access key/private key,
# or its last word is token/key/auth/sig/pwd. Words are split on non-alphanumerics and camelCase, so
# `num_key_value_heads`, `tokenizer` and `max_new_tokens` are not secrets, while `AWS_SECRET_ACCESS_KEY`,
# `aws_session_token`, `hfToken`, `X-Amz-Signature` and `db.password` are.
_SECRET_KEY_PATTERN = re.compile(
    r"secret|passw(or)?d|passphrase|credential|signature|private_?key|access_?key|api_?key"
    r"|(^|[^a-z0-9])(token|key|auth|authorization|sig|pwd|pass)$"
)
# scheme://userinfo@ : the userinfo without '/' (a plain user or a token), or user:password where the
# password may hold '/', '?' or '#' (written unencoded by people); never across whitespace or quotes.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<userinfo>[^\s/?#@'\"<>]+:[^\s@'\"<>]*|[^\s/?#@:'\"<>]+)@"
)
_QUERY_PARAMETER = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#\s'\"<>]*)")
_AUTH_HEADER = re.compile(r"(?i)\b(?P<head>(?:authorization|proxy-authorization)\s*[:=]\s*(?:bearer|basic|token)?\s*)"
                          r"(?P<value>[^\s'\",]+)")
_BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})")
_TOKEN_SHAPES = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style keys
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
    r")"
)
MIN_ENVIRONMENT_SECRET = 8  # shorter values ("test", "1") would mask ordinary words


def is_secret_key(key: Any) -> bool:
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key)).lower()
    return bool(_SECRET_KEY_PATTERN.search(words))


# the shell's working directories: `pwd` names a password in a query string, not in the environment
NOT_SECRET_ENVIRONMENT = frozenset({"PWD", "OLDPWD"})


def environment_secrets() -> list[str]:
    """Values of the environment variables whose names look like secrets, longest first."""
    for _ in range(5):
        try:  # another thread (MLflow's telemetry, ...) may change the environment while it is read
            items = list(os.environ.items())
            break
        except (KeyError, RuntimeError):
            continue
    else:
        items = []
    values = {value for name, value in items if len(value) >= MIN_ENVIRONMENT_SECRET
              and name not in NOT_SECRET_ENVIRONMENT and is_secret_key(name)}
    return sorted(values, key=len, reverse=True)


def redact_text(text: Any) -> str:
    """`text` with every secret shape above masked."""
    text = str(text)
    for value in environment_secrets():
        if value in text:
            text = text.replace(value, REDACTED)
    text = _USERINFO.sub(lambda match: f"{match.group('scheme')}{REDACTED}@", text)
    text = _QUERY_PARAMETER.sub(
        lambda match: match.group("head") + (REDACTED if is_secret_key(match.group("name")) and match.group("value")
                                             else match.group("value")), text)
    text = _AUTH_HEADER.sub(lambda match: f"{match.group('head')}{REDACTED}", text)
    text = _BEARER.sub(lambda match: f"{match.group('head')}{REDACTED}", text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact(obj: Any, key: Any = None, *, keys: bool = True) -> Any:
    """A copy of a (nested) config or record with every string passed through `redact_text` and, with
    `keys`, the values of secret-looking keys replaced by REDACTED (records whose keys are the project's own
    names, like a manifest's `cache_key`, pass keys=False). Dataclasses become dicts; other objects are
    returned as they are."""
    if keys and key is not None and is_secret_key(key) and not _empty(obj):
        return REDACTED
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {name: redact(value, name, keys=keys) for name, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(item, keys=keys) for item in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _empty(obj: Any) -> bool:
    return obj is None or (isinstance(obj, str | list | tuple | dict) and not obj)


def redacted_exception(error: BaseException) -> BaseException:
    """`error` itself when its message holds no secret, else a copy of the same type whose message is
    redacted (for errors that leave through Prefect or a console); its cause is kept, its context dropped."""
    message = str(error)
    clean = redact_text(message)
    if clean == message:
        return error
    import copy

    try:
        twin = copy.copy(error)
        if isinstance(error, OSError) and error.strerror is not None:  # formatted from errno, strerror, names
            twin.strerror = redact_text(error.strerror)
            for name in ("filename", "filename2"):
                if getattr(error, name) is not None:
                    setattr(twin, name, redact_text(getattr(error, name)))
        else:
            twin.args = (clean,)
        if redact_text(str(twin)) != str(twin):
            raise TypeError("the type formats its message from other fields")
    except Exception:  # a type that cannot be copied or re-messaged: the plain RuntimeError says it all
        twin = RuntimeError(f"{type(error).__name__}: {clean}")
    twin.__cause__ = None
    twin.__suppress_context__ = True
    twin.__traceback__ = error.__traceback__
    return twin


__all__ = ["REDACTED", "environment_secrets", "is_secret_key", "redact", "redact_text", "redacted_exception"]
