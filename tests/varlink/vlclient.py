"""A raw-socket varlink client for the tests, independent of both the
server's library (asyncvarlink) and the `varlink` package: it writes and
reads the wire format itself (one JSON object per message, each ended by a
NUL byte) and passes file descriptors with SCM_RIGHTS."""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any


class RawClient:
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        self._fds: list[int] = []

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = self.sock.sendmsg([data], anc)
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def send(
        self, method: str, parameters: dict[str, Any] | None = None, *,
        more: bool = False, oneway: bool = False, fds: list[int] | None = None,
    ) -> None:  # fmt: skip
        msg: dict[str, Any] = {"method": method}
        if parameters is not None:
            msg["parameters"] = parameters
        if more:
            msg["more"] = True
        if oneway:
            msg["oneway"] = True
        self.send_raw(json.dumps(msg).encode() + b"\0", fds)

    def recv_raw(self) -> bytes:
        """One message, without its terminating NUL (b"" on EOF)."""
        while b"\0" not in self._buf:
            data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                return b""
            self._buf += data
        msg, _, self._buf = self._buf.partition(b"\0")
        return msg

    def recv(self) -> dict[str, Any]:
        raw = self.recv_raw()
        assert raw, "connection closed by the service"
        obj = json.loads(raw)
        assert isinstance(obj, dict)
        return obj

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def call(
        self, method: str, parameters: dict[str, Any] | None = None, *,
        fds: list[int] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Parameters of the reply; raises `CallError` on an error reply."""
        self.send(method, parameters, fds=fds)
        reply = self.recv()
        if "error" in reply:
            raise CallError(reply["error"], reply.get("parameters", {}))
        params: dict[str, Any] = reply.get("parameters", {})
        return params

    def call_more(self, method: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        self.send(method, parameters, more=True)
        frames = []
        while True:
            reply = self.recv()
            if "error" in reply:
                raise CallError(reply["error"], reply.get("parameters", {}))
            frames.append(reply.get("parameters", {}))
            if not reply.get("continues"):
                return frames


class CallError(Exception):
    def __init__(self, error: str, parameters: dict[str, Any]) -> None:
        super().__init__(f"{error} {parameters}")
        self.error = error
        self.parameters = parameters
