"""A fault-injecting HTTP proxy on 127.0.0.1, in front of the moto S3 server, for tests.

``with FaultProxy(server.endpoint, fail_rate=0.25, seed=1) as proxy:`` -> point s3fs at
``proxy.endpoint`` (``proxy.storage_options``). Each request is either forwarded unchanged or
failed with one of the configured faults:

- ``"500"``: answered at once with ``500 InternalError`` (an S3 XML error body), not forwarded;
- ``"503"``: answered at once with ``503 SlowDown`` (S3's throttling answer), not forwarded;
- ``"403"``: answered at once with ``403 AccessDenied`` (a permanent error), not forwarded;
- ``"reset"``: the connection is closed without an answer, not forwarded;
- ``"drop"``: forwarded (the server acts on it), then the answer is cut off: status and headers
  and half the body are sent and the connection is closed (with no body: closed unanswered).

Which requests fail is deterministic: ``fail_every=N`` fails every Nth request; ``fail_rate``
fails that share, drawn from ``random.Random(seed)``; ``fail_rate=1.0`` fails every request.
``match(method, path, query)`` limits faults to the requests it accepts (e.g. only
``POST ...?uploadId=...``, S3's CompleteMultipartUpload). ``max_failures_per_request``
(default 2) caps how often one request (method, path, query and ``Range``) fails, so that a
client retrying a few times always gets through whatever the thread interleaving: which
requests fail may vary with timing, whether a job succeeds does not. ``None`` lifts the cap.

Bounded: daemon threads, a socket timeout on idle connections, and the proxy stops itself after
``lifetime`` seconds if the test forgets to. Only 127.0.0.1, both sides.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

__all__ = ["FaultProxy"]

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade",
}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>faultproxy</RequestId></Error>"
)
_STATUS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_FAULTS = ("500", "503", "403", "reset", "drop")


class FaultProxy:
    """A proxy to ``upstream`` (``http://127.0.0.1:PORT``) that fails a share of requests."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_rate: float = 0.0,
        fail_every: int = 0,
        seed: int = 0,
        faults: tuple[str, ...] = ("500", "503", "reset", "drop"),
        max_failures_per_request: int | None = 2,
        match: Callable[[str, str, str], bool] | None = None,
        lifetime: float = 120.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1":
            raise ValueError(f"FaultProxy forwards to 127.0.0.1 only, not {upstream!r}")
        for f in faults:
            if f not in _FAULTS:
                raise ValueError(f"unknown fault {f!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults = tuple(faults)
        self.match = match
        self.lifetime = lifetime
        self.requests = 0
        self.failed: Counter[str] = Counter()  # fault -> count
        # (method, path, query, Range header, fault or None) of the latest requests
        self.log: deque[tuple[str, str, str, str | None, str | None]] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._per_request: Counter[tuple] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.configure(fail_rate=fail_rate, fail_every=fail_every, seed=seed,
                       max_failures_per_request=max_failures_per_request)

    # ----- configuration -------------------------------------------------------------------

    def configure(
        self,
        *,
        fail_rate: float | None = None,
        fail_every: int | None = None,
        seed: int | None = None,
        max_failures_per_request: int | None | str = "keep",
    ) -> None:
        """Change the failure pattern while running (e.g. fail everything after a setup)."""
        with self._lock:
            if fail_rate is not None:
                if not 0.0 <= fail_rate <= 1.0:
                    raise ValueError(f"fail_rate must be in [0, 1], got {fail_rate}")
                self.fail_rate = fail_rate
            if fail_every is not None:
                self.fail_every = fail_every
            if seed is not None:
                self._rng = random.Random(seed)
                self._fault_cycle = 0
            if max_failures_per_request != "keep":
                self.max_failures_per_request = max_failures_per_request
            self._per_request.clear()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    def _decide(self, key: tuple) -> str | None:
        """The fault for this request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            if self.match is not None and not self.match(key[0], key[1], key[2]):
                self.log.append((*key, None))
                return None
            if self.fail_rate >= 1.0:
                fail = True
            elif self.fail_every:
                fail = self.requests % self.fail_every == 0
            else:
                fail = self.fail_rate > 0 and self._rng.random() < self.fail_rate
            cap = self.max_failures_per_request
            if fail and cap is not None and self.fail_rate < 1.0 and self._per_request[key] >= cap:
                fail = False
            fault = None
            if fail:
                self._per_request[key] += 1
                fault = self.faults[self._fault_cycle % len(self.faults)]
                self._fault_cycle += 1
                self.failed[fault] += 1
            self.log.append((*key, fault))
            return fault

    # ----- life cycle ----------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="faultproxy", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint
    timeout = 30  # idle keep-alive connections do not hold a thread forever

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        query = urlsplit(self.path).query
        key = (self.command, urlsplit(self.path).path, query, self.headers.get("Range"))
        fault = self.owner._decide(key)
        if fault in _STATUS:
            status, code, message = _STATUS[fault]
            payload = _ERROR_BODY.format(code=code, message=message).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        if fault == "reset":
            self._cut()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or "Content-Length" in self.headers or self.headers.get("Transfer-Encoding"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, out_headers = resp.status, resp.reason, resp.getheaders()
        except OSError:
            self._cut()
            return
        finally:
            conn.close()
        if fault == "drop" and (not data or self.command == "HEAD"):
            self._cut()  # the server acted; the client never hears of it
            return
        self.send_response(status, reason)
        for k, v in out_headers:
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in out_headers).get("content-length", "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._cut()
            return
        self.wfile.write(data)

    def _cut(self) -> None:
        """Close the connection abruptly (an RST where the OS allows: SO_LINGER 0)."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
