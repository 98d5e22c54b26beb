"""The store's errors: every message is one line that names the object and says what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Base class of every error raised by the store."""


class UnsupportedURIError(StoreError, ValueError):
    """The store URI has a scheme other than a plain path, ``file://`` or ``s3://``."""


class InvalidKeyError(StoreError, ValueError):
    """A checkpoint name, file path or key that could escape the store's prefix or is not allowed."""


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


class LeaseHeldError(StoreError):
    """Another run holds the write lease of a checkpoint name."""


class LeaseLostError(StoreError):
    """This run's write lease expired or was taken over before the commit."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())
