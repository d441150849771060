"""A local HTTP server for tests: serves one bytes payload at one path on 127.0.0.1.

It can misbehave on purpose, the way real mirrors do: answer the first N
requests with an error status, close the connection mid-body once, or ignore
`Range` headers. It records every request so a test can assert what the client
asked for and how many bytes it was sent.

    with PayloadServer(payload, path="/cifar-10-python.tar.gz", fail_first=1) as server:
        fetch(server.url, md5, tmp_path)
        assert len(server.requests) == 2
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None  # the Range header as sent, e.g. "bytes=1024-"
    status: int  # status the server answered with
    body_bytes: int  # payload bytes actually written to the socket


class PayloadServer:
    """Serve `payload` at `path`; any other path answers 404.

    ranges:       honour `Range: bytes=N-` with 206 (False: ignore it and send 200 + everything)
    fail_first:   answer the first N requests to `path` with `fail_status` and no body
    cut_after:    on the first body sent, close the connection after this many bytes
                  while the Content-Length still promises the whole body
    """

    def __init__(
        self,
        payload: bytes,
        path: str = "/payload.bin",
        *,
        ranges: bool = True,
        fail_first: int = 0,
        fail_status: int = 500,
        cut_after: int | None = None,
    ) -> None:
        self.payload = payload
        self.path = path
        self.ranges = ranges
        self.fail_status = fail_status
        self.requests: list[Request] = []
        self._failures_left = fail_first
        self._cut_after = cut_after
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # Poll every 10 ms so stop() returns at once, not after the default 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def start(self) -> PayloadServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> PayloadServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        """Answer one GET; runs on the server's worker thread."""
        range_header = handler.headers.get("Range")
        with self._lock:
            failing = handler.path == self.path and self._failures_left > 0
            if failing:
                self._failures_left -= 1
        if handler.path != self.path or failing:
            status = 404 if handler.path != self.path else self.fail_status
            # Recorded before answering, so the client never finishes before the record exists.
            self._record(handler.path, range_header, status, 0)
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return

        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if self.ranges and match:
            start = int(match.group(1))
            if start >= len(self.payload):
                self._record(handler.path, range_header, 416, 0)
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(self.payload)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
        body = self.payload[start:]
        status = 206 if start else 200
        with self._lock:
            cut, self._cut_after = self._cut_after, None  # only the first body is cut
        sent = body if cut is None else body[:cut]
        self._record(handler.path, range_header, status, len(sent))
        handler.send_response(status)
        if status == 206:
            end = len(self.payload) - 1
            handler.send_header("Content-Range", f"bytes {start}-{end}/{len(self.payload)}")
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))  # the full body, even when cut
        handler.end_headers()
        handler.wfile.write(sent)
        handler.wfile.flush()
        handler.close_connection = True  # cut or not, HTTP/1.0: one response per connection

    def _record(self, path: str, range_header: str | None, status: int, body_bytes: int) -> None:
        with self._lock:
            self.requests.append(Request(path, range_header, status, body_bytes))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._respond(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest output clean

        return Handler
