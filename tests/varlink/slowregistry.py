"""A minimal read-only OCI registry (distribution API v2, plain HTTP on
127.0.0.1) serving one OCI layout, whose blob downloads can be held back:
a pull can be caught, deterministically, in the middle of a layer."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from testlib import hung_up

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class SlowRegistry:
    def __init__(self, layout: Path) -> None:
        self.layout = layout
        self.release = threading.Event()  # set: send the rest of held blobs
        self.hold_after = 1 << 20  # bytes of a big blob sent before waiting
        self.chunk_delay = 0.02  # seconds between 64 KiB chunks after release
        self.sent: dict[str, int] = {}
        self.aborted: set[str] = set()  # the client hung up mid-blob (or while held)
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.handle_get(head=True)

            def do_GET(self) -> None:
                self.handle_get(head=False)

            def handle_get(self, head: bool) -> None:
                if self.path.rstrip("/") == "/v2":
                    self.reply(200, b"{}", "application/json", head)
                    return
                m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", self.path)
                if m is None:
                    self.reply(404, b"{}", "application/json", head)
                    return
                kind, ref = m.group(2), m.group(3)
                if kind == "manifests" and not ref.startswith("sha256:"):
                    index = json.loads((state.layout / "index.json").read_text())
                    names = [
                        d["digest"] for d in index["manifests"]
                        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
                    ]  # fmt: skip
                    if not names:
                        self.reply(404, b"{}", "application/json", head)
                        return
                    ref = names[0]
                blob = state.layout / "blobs" / "sha256" / ref.split(":", 1)[-1]
                if not blob.is_file():
                    self.reply(404, b"{}", "application/json", head)
                    return
                data = blob.read_bytes()
                ctype = MANIFEST if kind == "manifests" else "application/octet-stream"
                if head or len(data) <= state.hold_after:
                    self.reply(200, data, ctype, head, digest=ref)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Docker-Content-Digest", ref)
                self.end_headers()
                try:
                    self.wfile.write(data[: state.hold_after])
                    self.wfile.flush()
                    state.set_sent(ref, state.hold_after)
                    # Held: silent, but watching for the client to hang up.
                    deadline = time.monotonic() + 60
                    while not state.release.wait(0.05) and time.monotonic() < deadline:
                        if hung_up(self.connection):
                            with state.lock:
                                state.aborted.add(ref)
                            self.close_connection = True
                            return
                    for off in range(state.hold_after, len(data), 1 << 16):
                        # Pause before each chunk, not after the last: the
                        # blob counts as finished as soon as its last byte is out.
                        time.sleep(state.chunk_delay)
                        self.wfile.write(data[off : off + (1 << 16)])
                        self.wfile.flush()
                        state.set_sent(ref, min(off + (1 << 16), len(data)))
                    with state.lock:
                        state.finished.add(ref)
                except (BrokenPipeError, ConnectionResetError):
                    with state.lock:
                        state.aborted.add(ref)
                    self.close_connection = True

            def reply(self, code: int, body: bytes, ctype: str, head: bool,
                      digest: str | None = None) -> None:  # fmt: skip
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if digest is not None:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_sent(self, digest: str, n: int) -> None:
        with self.lock:
            self.sent[digest] = n

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
