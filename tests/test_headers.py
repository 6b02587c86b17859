"""composefs._headers: the response head deadline's own contract (the
registry and fetch tests cover it end to end)."""

from __future__ import annotations

import socket

import pytest

from composefs import _headers


def _pair(timeout: float) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)
    return ours, theirs


def test_tunnel_reply_gives_the_timeout_back() -> None:
    """http.client reads a proxy's CONNECT reply through the response class
    but not through `begin()`: once that reply is closed, the socket has its
    whole timeout again (the TLS handshake comes next), not what was left."""
    ours, theirs = _pair(5.0)
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        resp = _headers._HeadBoundResponse(ours, method="CONNECT")
        _version, status, _reason = resp._read_status()  # as http.client's _tunnel
        assert status == 200
        assert resp.fp.readline() == b"\r\n"
        assert ours.gettimeout() < 5.0  # the head's deadline was running
        resp.close()
        assert ours.gettimeout() == 5.0


def test_late_head_fails_and_complete_head_disarms() -> None:
    ours, theirs = _pair(0.3)
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\n")  # ... and the rest never comes
        resp = _headers._HeadBoundResponse(ours, method="GET")
        with pytest.raises(TimeoutError, match=r"response headers not complete after 0\.3 s"):
            resp.begin()
    ours, theirs = _pair(0.3)
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        resp = _headers._HeadBoundResponse(ours, method="GET")
        resp.begin()
        assert ours.gettimeout() == 0.3  # the body waits the plain read timeout
        assert resp.read() == b"ok"
