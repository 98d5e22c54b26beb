"""A fault-injecting HTTP proxy between boto3 and a real S3 server (moto's), on loopback.

boto3 talks to the proxy as its endpoint; the proxy forwards each request to the server and, on a
seeded-random share of requests, injects one fault instead of (or into) the answer:

    drop       close the connection without answering (before forwarding: the server never sees it)
    stall      wait `stall_seconds` (longer than the client's read timeout), then close
    500/503    an InternalError / ServiceUnavailable error answer (not forwarded)
    slowdown   a 503 SlowDown error answer (not forwarded)
    truncate   forward, then send the full Content-Length header but only half the body, and close
    corrupt    forward, then flip one byte of the body of a GET (same size, wrong content)

`corrupt_keys` corrupts GETs of chosen object keys a given number of times (a bad disk or cache on the
server side), independent of the random faults. Every request and fault is counted in `stats`.
Only 127.0.0.1 is used; each fault is bounded in time (no loops waiting on the network).
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("drop", "stall", "500", "503", "slowdown", "truncate", "corrupt")
_ERROR_ANSWERS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


@dataclasses.dataclass
class FaultPlan:
    rate: float = 0.0  # share of requests that get a fault
    faults: tuple[str, ...] = ("drop", "stall", "500", "503", "slowdown", "truncate")  # drawn at random
    # ("corrupt" is not drawn by default: it would also garble listings and manifests, which TCP and S3
    # checksums protect in practice; corrupted objects are injected per key with `corrupt_keys`)
    stall_seconds: float = 1.5
    seed: int = 0


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.plan = plan or FaultPlan()
        self.random = random.Random(self.plan.seed)
        self.corrupt_keys: dict[str, int] = {}  # "/bucket/key" path -> GETs still to corrupt
        self.stats: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault or "ok")
        self.fail_all = False  # every request is dropped (the network is gone)
        self.fail_after: int | None = None  # from this many requests on, every request is dropped
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats["requests"] += 1
            if self.fail_all or (self.fail_after is not None and self.stats["requests"] > self.fail_after):
                fault = "drop"
            elif self.corrupt_keys.get(path.split("?")[0], 0) > 0 and method == "GET":
                self.corrupt_keys[path.split("?")[0]] -= 1
                fault = "corrupt"
            elif self.random.random() < self.plan.rate:
                choices = [f for f in self.plan.faults if f != "corrupt" or method == "GET"]
                fault = self.random.choice(choices)
            else:
                fault = None
            if fault:
                self.stats["faults"] += 1
                self.stats[f"fault.{fault}"] += 1
            self.log.append((method, path, fault or "ok"))
            return fault

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_request_body(handler)
        fault = self._draw(handler.command, handler.path)
        if fault == "drop":
            _abort(handler)
            return
        if fault == "stall":
            time.sleep(self.plan.stall_seconds)
            _abort(handler)
            return
        if fault in _ERROR_ANSWERS:
            status, code, message = _ERROR_ANSWERS[fault]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            response_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
            status = response.status
        finally:
            connection.close()
        sent = payload
        if fault == "truncate" and len(payload) > 1:
            sent = payload[: len(payload) // 2]
        elif fault == "corrupt" and payload and 200 <= status < 300:
            sent = bytes([payload[0] ^ 0xFF]) + payload[1:]
        handler.send_response(status)
        for key, value in response_headers:
            if key.lower() != "content-length":
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(sent)
        if len(sent) != len(payload):
            _abort(handler)


def _read_request_body(handler: BaseHTTPRequestHandler) -> bytes | None:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        return b"".join(chunks)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else (b"" if handler.command in ("PUT", "POST") else None)


def _abort(handler: BaseHTTPRequestHandler) -> None:
    """Closes the client's connection at once (RST), as a crashed server or a broken network would."""
    handler.close_connection = True
    try:
        handler.wfile.flush()
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
