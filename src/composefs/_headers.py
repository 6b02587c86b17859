"""urllib3 connection pools whose responses must bring their status line
and headers within the read timeout, in total.

urllib3 (through http.client) reads a response's head line by line, and
its read timeout bounds each socket read, not the head: a server that
sends one header byte every few seconds keeps a request waiting forever.
Bodies are bounded by the clients themselves (`oci.registry._Deadline`,
`composefs.http.client`'s transfer deadline); this bounds what comes
before them.
The response's reader is wrapped so that every read until the head is
complete waits at most what is left of one read timeout; after that it
passes reads straight through. A head that does not arrive in time
fails like a read timeout (urllib3's ``ReadTimeoutError``).

Imported lazily (it imports urllib3), by `_net.bound_heads`.
"""

from __future__ import annotations

import http.client
import io
import socket
import time
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection


class _HeadBoundRaw(io.RawIOBase):
    """The socket's raw reader, with a deadline while `end` is set."""

    def __init__(self, raw: Any, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self._raw = raw
        self._sock = sock  # where `_net.socket_of` finds the socket
        self._timeout = seconds
        self.end: float | None = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def readinto(self, b: Any) -> int | None:
        end = self.end
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                raise self._late()
            self._sock.settimeout(min(self._timeout, left))
            try:
                n: int | None = self._raw.readinto(b)
            except TimeoutError:
                raise self._late() from None
            return n
        n = self._raw.readinto(b)
        return n

    def _late(self) -> TimeoutError:
        return TimeoutError(f"response headers not complete after {self._timeout:g} s")

    def disarm(self) -> None:
        """The head is in: reads wait the plain read timeout again."""
        if self.end is not None:
            self.end = None
            try:
                self._sock.settimeout(self._timeout)
            except OSError:
                pass

    def close(self) -> None:
        if not self.closed:
            # A proxy's CONNECT reply is read through this class without
            # `begin`: the TLS handshake that follows on the socket gets the
            # whole timeout again, not what the reply left of it.
            self.disarm()
            self._raw.close()  # drops the socket's makefile reference
        super().close()


class _HeadBoundResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        seconds = sock.gettimeout()  # urllib3 set it to the read timeout
        if seconds:
            # Nothing has been read yet: the buffered reader gives its raw
            # reader back without closing it.
            raw = self.fp.detach()
            self.fp = io.BufferedReader(_HeadBoundRaw(raw, sock, seconds))

    def begin(self) -> None:
        try:
            super().begin()
        finally:
            fp = self.fp
            if fp is not None and isinstance(fp.raw, _HeadBoundRaw):
                fp.raw.disarm()


class _Connection(HTTPConnection):
    response_class = _HeadBoundResponse


class _TLSConnection(HTTPSConnection):
    response_class = _HeadBoundResponse


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


POOL_CLASSES: dict[str, type[urllib3.HTTPConnectionPool]] = {"http": _Pool, "https": _TLSPool}
