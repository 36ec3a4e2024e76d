"""An HTTP mirror for tests that misbehaves on purpose: corrupt shards, one wrong byte, truncated files,
cut or stalled bodies, 5xx, ignored Range headers. Real sockets on a loopback address; every request
is recorded.

Built on http.server because the faults need control below what a production server allows (closing
a connection mid-body, sending wrong bytes under a correct Content-Length).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """What the mirror gets wrong. All off by default (a correct mirror that honours Range)."""

    corrupt: set[str] = field(default_factory=set)  # shards served with bytes flipped
    drop_after: int | None = None  # close the connection after this many body bytes of each response
    stall_after: int | None = None  # stop sending, connection open, after this many body bytes
    ignore_range: bool = False  # answer every GET with 200 and the whole file
    fail_first: int = 0  # answer the first N requests with 503
    missing: set[str] = field(default_factory=set)  # shards answered with 404
    rate: float | None = None  # bytes per second of each response body
    status: int | None = None  # answer every request with this status (e.g. 500)
    wrong_byte: dict[str, int] = field(default_factory=dict)  # shard -> offset of one byte served wrong
    truncate: dict[str, int] = field(default_factory=dict)  # shard -> length served (a truncated file)


@dataclass
class Request:
    path: str
    range: str | None
    status: int


class FaultyMirror:
    """Serves the files of `directory` by name (also as /<anything>/<name>, the web-seed layout)."""

    def __init__(self, directory: str | Path, faults: Faults | None = None, host: str = "127.0.0.1"):
        self.directory = Path(directory)
        self.faults = faults or Faults()
        self.requests: list[Request] = []
        self.closing = threading.Event()
        self._lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                mirror._answer(self, head=True)

            def do_GET(self):
                mirror._answer(self, head=False)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> FaultyMirror:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultyMirror:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def gets(self, name: str) -> list[Request]:
        """The GET/HEAD requests for one file name."""
        return [r for r in self.requests if r.path.rsplit("/", 1)[-1] == name]

    def _record(self, handler, status: int) -> int:
        with self._lock:
            self.requests.append(Request(handler.path, handler.headers.get("Range"), status))
            return len(self.requests)

    def _answer(self, handler: BaseHTTPRequestHandler, *, head: bool) -> None:
        name = handler.path.split("?", 1)[0].rsplit("/", 1)[-1]
        path = self.directory / name
        faults = self.faults
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path.is_file() or name in faults.missing:
            return self._status(handler, 404)
        with self._lock:
            failing = len(self.requests) < faults.fail_first
        if failing:
            return self._status(handler, 503)
        if faults.status is not None:
            return self._status(handler, faults.status)
        data = path.read_bytes()
        if name in faults.corrupt:
            data = bytes(b ^ 0xFF for b in data[:4096]) + data[4096:]
        if name in faults.wrong_byte:
            at = faults.wrong_byte[name]
            data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
        if name in faults.truncate:
            data = data[: faults.truncate[name]]
        start, end = 0, len(data)
        rng = handler.headers.get("Range")
        status = 200
        if rng and not faults.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m[1]) >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                self._record(handler, 416)
                return None
            start = int(m[1])
            end = min(len(data), int(m[2]) + 1) if m[2] else len(data)
            status = 206
        self._record(handler, status)
        handler.send_response(status)
        handler.send_header("Content-Length", str(end - start))
        handler.send_header("Accept-Ranges", "none" if faults.ignore_range else "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        handler.end_headers()
        if head:
            return None
        self._send_body(handler, memoryview(data)[start:end])
        return None

    def _send_body(self, handler, body: memoryview) -> None:
        faults = self.faults
        limit = len(body)
        for cut in (faults.drop_after, faults.stall_after):
            if cut is not None:
                limit = min(limit, cut)
        sent = 0
        began = time.monotonic()
        try:
            while sent < limit:
                step = min(64 << 10, limit - sent)
                handler.wfile.write(body[sent : sent + step])
                sent += step
                if faults.rate:
                    ahead = sent / faults.rate - (time.monotonic() - began)
                    if ahead > 0 and self.closing.wait(ahead):
                        break
            handler.wfile.flush()
            if sent < len(body) and faults.stall_after is not None:
                self.closing.wait(120)
        except OSError:
            pass
        if sent < len(body):
            handler.close_connection = True

    def _status(self, handler, status: int) -> None:
        self._record(handler, status)
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
