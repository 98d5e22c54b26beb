"""Write leases: at most one run writes a checkpoint name at a time.

A second run that wants the same name waits (up to its wait time) or fails with one line naming the
holder (who, on which host, process id, since when, until when).

- Local stores: ``fcntl.flock`` on ``<root>/.leases/<name>.lock`` (the kernel drops it when the holder
  dies, even by SIGKILL); the holder's description is written into the file.
- S3 stores: a lease object ``<prefix>/.leases/<name>.json`` created with ``If-None-Match: *`` (a
  conditional put: only one creator wins), holding a random token and a time to live. A daemon thread
  renews it every third of its life; ``check()`` before the commit reads it back and fails if the token
  is no longer ours. Expiry is judged on the server's clock (the object's Last-Modified against the Date
  of the response), so machines with skewed clocks agree. A lease whose holder is a dead process on this
  host is taken over at once; any other is taken over only after it expired. Servers that ignore
  ``If-None-Match`` are covered by reading the lease back after writing it.
"""

from __future__ import annotations

import abc
import getpass
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from pipeline.store.errors import LeaseHeldError, LeaseLostError, NotFoundError, StoreError
from pipeline.store.manifest import utc_now

logger = logging.getLogger("pipeline.store")

POLL_SECONDS = 1.0
# Tokens of S3 leases this process held but could not delete (the network was gone at release): they are
# ours and no longer in use, so this process takes them over at once instead of waiting for their expiry.
_ABANDONED_TOKENS: set[str] = set()


def holder_record(ttl_seconds: float | None) -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {
        "token": secrets.token_hex(16),
        "user": user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": utc_now(),
        "ttl_seconds": ttl_seconds,
    }


def describe_holder(record: dict[str, Any]) -> str:
    return (
        f"{record.get('user', '?')}@{record.get('host', '?')} pid {record.get('pid', '?')} "
        f"since {record.get('since', '?')}"
    )


def holder_is_dead(record: dict[str, Any]) -> bool:
    """True if the holder ran on this host and its process is gone."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if record["pid"] == os.getpid():
        return False  # this process: another store object of ours holds it
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease(abc.ABC):
    """The write lease of one checkpoint name; acquire, check before the commit, release."""

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where  # the checkpoint's URI, for messages

    def acquire(self, wait_seconds: float) -> None:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        announced = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                return
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"checkpoint {self.where} is being written by another run ({describe_holder(holder)}"
                    f"{self._expiry_text(holder)}); wait for it to finish or stop it, then run again"
                )
            if not announced:
                logger.warning("waiting for %s, held by %s", self.where, describe_holder(holder))
                announced = True
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    @abc.abstractmethod
    def _try_acquire(self) -> dict[str, Any] | None:
        """None if acquired, else the current holder's record."""

    def _expiry_text(self, holder: dict[str, Any]) -> str:
        return ""

    @abc.abstractmethod
    def check(self) -> None:
        """Raises LeaseLostError if this lease is no longer ours."""

    @abc.abstractmethod
    def release(self) -> None: ...


class LocalLease(Lease):
    """flock on a lock file: released by the kernel when the process exits, however it exits."""

    def __init__(self, name: str, where: str, lock_path: Path) -> None:
        super().__init__(name, where)
        self.lock_path = lock_path
        self._fd: int | None = None

    def _try_acquire(self) -> dict[str, Any] | None:
        import fcntl

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                return json.loads(self.lock_path.read_text() or "{}")
            except (OSError, ValueError):
                return {}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record(None)).encode(), 0)
        self._fd = fd
        return None

    def check(self) -> None:
        if self._fd is None:
            raise LeaseLostError(f"the write lease of {self.where} is not held; not committing")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (removing it would race with new holders)
            self._fd = None


class S3Lease(Lease):
    """A lease object in the bucket, created with a conditional put and renewed by a daemon thread.

    The store passes its raw object operations, each with its retries and error translation:
    ``get(key) -> (bytes, age seconds on the server's clock, etag)`` (NotFoundError if absent),
    ``put(key, body, if_match=None, if_none_match=False) -> etag or None`` (None: precondition failed),
    ``delete(key, if_match) -> None``.
    """

    def __init__(
        self,
        name: str,
        where: str,
        key: str,
        *,
        get: Callable[[str], tuple[bytes, float, str]],
        put: Callable[..., str | None],
        delete: Callable[[str, str | None], None],
        ttl_seconds: float,
    ) -> None:
        super().__init__(name, where)
        self.key = key
        self._get, self._put, self._delete = get, put, delete
        self.ttl_seconds = ttl_seconds
        self._record: dict[str, Any] | None = None
        self._etag: str | None = None
        self._renewed_at = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict[str, Any], float, str] | None:
        """(record, age in seconds on the server's clock, etag), or None if there is no lease object."""
        try:
            raw, age, etag = self._get(self.key)
        except NotFoundError:
            return None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            record = {}
        return record, age, etag

    def _expiry_text(self, holder: dict[str, Any]) -> str:
        left = holder.get("_expires_in")
        return f", lease expires in {left:.0f}s unless renewed" if isinstance(left, float | int) else ""

    def _try_acquire(self) -> dict[str, Any] | None:
        record = holder_record(self.ttl_seconds)
        try:
            return self._try_acquire_as(record)
        except StoreError:  # the lease object may have been written before the failure: never wait for it
            _ABANDONED_TOKENS.add(record["token"])
            raise

    def _try_acquire_as(self, record: dict[str, Any]) -> dict[str, Any] | None:
        body = json.dumps(record).encode()
        mine = lambda current: current is not None and current[0].get("token") == record["token"]  # noqa: E731
        if self._put(self.key, body, if_none_match=True) is None:
            current = self._read()  # (ours if our put landed but its answer was lost and the retry was refused)
            if current is None:  # released in between
                if self._put(self.key, body, if_none_match=True) is None and not mine(current := self._read()):
                    return current[0] if current is not None else {}
            elif not mine(current):
                holder, age, etag = current
                ttl = holder.get("ttl_seconds") if isinstance(holder.get("ttl_seconds"), int | float) else 0
                abandoned = holder.get("token") in _ABANDONED_TOKENS
                if age < ttl and not holder_is_dead(holder) and not abandoned:
                    return {**holder, "_expires_in": ttl - age}
                logger.warning(
                    "taking over the write lease of %s from %s (%s)",
                    self.where,
                    describe_holder(holder),
                    "it was not released" if abandoned else "its process is gone" if age < ttl
                    else f"expired {age - ttl:.0f}s ago",
                )
                if self._put(self.key, body, if_match=etag) is None and not mine(current := self._read()):
                    return current[0] if current is not None else {}  # another run took it over first
        # Read back: a server that ignored the precondition let the last writer win; only it continues.
        current = self._read()
        if not mine(current):
            return current[0] if current is not None else {}
        self._record, self._etag = record, current[2]
        self._renewed_at = time.monotonic()
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 3):
            try:
                self._renew()
            except StoreError as exc:  # transient: the next round tries again; check() judges the age
                logger.warning("renewing the write lease of %s failed: %s", self.where, exc)
            if self._lost:
                return

    def _renew(self) -> None:
        assert self._record is not None
        etag = self._put(self.key, json.dumps(self._record).encode(), if_match=self._etag)
        if etag is None:
            current = self._read()
            self._lost = describe_holder(current[0]) if current else "nobody (the lease object was deleted)"
            return
        self._etag = etag
        self._renewed_at = time.monotonic()

    def check(self) -> None:
        if self._record is None:
            raise LeaseLostError(f"the write lease of {self.where} is not held; not committing")
        if not self._lost:
            current = self._read()
            if current is None or current[0].get("token") != self._record["token"]:
                self._lost = describe_holder(current[0]) if current else "nobody (the lease object was deleted)"
        if not self._lost and time.monotonic() - self._renewed_at > self.ttl_seconds:
            self._lost = "nobody yet, but it was not renewed within its time to live"
        if self._lost:
            raise LeaseLostError(
                f"lost the write lease of {self.where} (now held by {self._lost}); not committing this version, "
                "the other run's work stands"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        record, self._record = self._record, None
        if record is None or self._lost:
            return
        try:
            self._delete(self.key, self._etag)
        except StoreError as exc:  # it expires by itself; this process may take it over at once
            _ABANDONED_TOKENS.add(record["token"])
            logger.warning("could not release the write lease of %s: %s", self.where, exc)


def server_age(last_modified: Any, date_header: str | None) -> float:
    """Seconds between an object's Last-Modified and the server's Date (falls back to the local clock)."""
    try:
        now = parsedate_to_datetime(date_header).timestamp() if date_header else time.time()
    except (TypeError, ValueError):
        now = time.time()
    return max(0.0, now - last_modified.timestamp())
