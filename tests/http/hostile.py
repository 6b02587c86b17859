"""A small HTTP/1.1 server of our own that serves a published tree (like
nginx) but misbehaves on chosen paths: wrong bytes, truncated bodies, wrong
Content-Length, endless bodies, 404s, redirect loops, hostile symlink
targets, slow answers, transient 503s. It records what it was asked."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from testlib import drip, wait_for_hangup

Fault = Callable[["Handler"], bool]  # True: answered; False: serve normally


@dataclass
class State:
    root: Path
    link_files: bool = False  # answer symlinks as text/x-symlink-target bodies
    faults: dict[str, Fault] = field(default_factory=dict)
    #: applied to every object path (after `faults`)
    object_fault: Fault | None = None
    delay: float = 0.0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    #: requests being answered now, and the most at once
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p.startswith(prefix))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def state(self) -> State:
        return self.server.state

    def send_body(self, body: bytes, ctype: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        from urllib.parse import unquote

        path = unquote(self.path.split("?")[0]).lstrip("/")
        st = self.state
        with st.lock:
            st.requests.append((path, self.headers.get("Authorization")))
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            self._answer(path)
        finally:
            with st.lock:
                st.inflight -= 1

    def _answer(self, path: str) -> None:
        st = self.state
        if st.delay:
            time.sleep(st.delay)
        fault = st.faults.get(path)
        if fault is not None and fault(self):
            return
        if path.startswith("objects/") and st.object_fault is not None and st.object_fault(self):
            return
        full = st.root / path
        if ".." in path.split("/") or not os.path.lexists(full):
            self.send_error(404)
            return
        if os.path.islink(full) and st.link_files:
            self.send_body(os.readlink(full).encode(), "text/x-symlink-target")
            return
        try:
            data = full.read_bytes()
        except (IsADirectoryError, FileNotFoundError):
            self.send_error(404)
            return
        self.send_body(data)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: State, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), Handler)
        self.state = state
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on endless bodies are expected here

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# ---------------------------------------------------------------- faults


def body(data: bytes, ctype: str = "application/octet-stream") -> Fault:
    def f(h: Handler) -> bool:
        h.send_body(data, ctype)
        return True

    return f


def status(code: int, headers: dict[str, str] | None = None) -> Fault:
    def f(h: Handler) -> bool:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()
        return True

    return f


def flip_bytes(h: Handler) -> bool:
    """The right length, one byte changed."""
    data = bytearray((h.state.root / h.path.lstrip("/")).read_bytes())
    data[len(data) // 2] ^= 0xFF
    h.send_body(bytes(data))
    return True


def _half(h: Handler) -> None:
    """The whole Content-Length announced, half the body sent."""
    data = (h.state.root / h.path.lstrip("/")).read_bytes()
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data[: len(data) // 2])
    h.wfile.flush()
    h.close_connection = True


def truncated(h: Handler) -> bool:
    _half(h)
    return True


def stalled(h: Handler) -> bool:
    """Half the body, then silence until the client hangs up (at most 60 s)."""
    _half(h)
    wait_for_hangup(h.connection)
    return True


def short_length(h: Handler) -> bool:
    """Content-Length one less than the body (the last byte is left over)."""
    data = (h.state.root / h.path.lstrip("/")).read_bytes()
    h.send_response(200)
    h.send_header("Content-Length", str(len(data) - 1))
    h.end_headers()
    h.wfile.write(data)
    h.close_connection = True
    return True


def endless(h: Handler) -> bool:
    """No Content-Length, bytes forever (until the client hangs up)."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    block = b"\0" * 65536
    try:
        while True:
            h.wfile.write(block)
    except OSError:
        pass
    return True


def dripping(h: Handler) -> bool:
    """A body that never ends, one byte per 50 ms (no read timeout fires)."""
    h.send_response(200)
    h.send_header("Content-Length", str(1 << 30))
    h.end_headers()
    h.close_connection = True
    drip(h.wfile, b"", b"x", 0.05)
    return True


def dripping_head(h: Handler) -> bool:
    """A header line that never ends, one byte per 50 ms."""
    h.close_connection = True
    drip(h.wfile, b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a", 0.05)
    return True


def fail_times(n: int, code: int = 503) -> Fault:
    """Answer `code` to the first `n` requests, then serve normally."""
    left = [n]
    lock = threading.Lock()

    def f(h: Handler) -> bool:
        with lock:
            if left[0] <= 0:
                return False
            left[0] -= 1
        return status(code)(h)

    return f
