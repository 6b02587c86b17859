"""The varlink transport for `composefs.varlink.service`: asyncvarlink's
framing (NUL-terminated JSON) and SCM_RIGHTS fd passing, plus what the
service needs on top — ``org.varlink.service`` with the pinned interface
descriptions, parameter validation, optional ``more`` for ``Pull``, a
message size cap, protocol-error replies that never end the service, and
cancellation of a call whose client disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import stat
from importlib import resources
from typing import Any

from asyncvarlink import (
    FileDescriptorArray,
    GenericVarlinkErrorReply,
    VarlinkErrorReply,
    VarlinkMethodCall,
    VarlinkMethodReply,
    VarlinkServerProtocol,
    VarlinkTransport,
    create_unix_server,
)

from .. import __version__
from ..errors import ComposefsError, VarlinkCallError
from .service import (
    OCI,
    PRODUCT,
    REPO,
    SIGNATURES,
    STREAMING,
    URL,
    VENDOR,
    Call,
    Service,
    validate_parameters,
)

_log = logging.getLogger("composefs.varlink")

SERVICE = "org.varlink.service"

# Bigger requests (without a NUL) are refused and the connection closed.
MAX_MESSAGE = 8 << 20
# How long a connection hung up for a protocol violation still drains input.
LINGER = 10.0

SERVICE_IDL = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""

PROTOCOL_VIOLATION = "invalid.asyncvarlink.ProtocolViolation"


def interface_description(name: str) -> str:
    """The pinned IDL text of `name` (shipped next to this module)."""
    if name == SERVICE:
        return SERVICE_IDL
    return resources.files(__package__).joinpath(f"{name}.varlink").read_text()


def _error(name: str, **params: Any) -> GenericVarlinkErrorReply:
    return GenericVarlinkErrorReply(name, params)


class Connection(VarlinkServerProtocol):
    """One client connection. Requests are answered in order."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self._service = service
        self._calls: set[Call] = set()
        self._pending = 0  # bytes received since the last NUL
        self._fileno = -1
        self._overflowed = False

    # -- protocol-level robustness ---------------------------------------------
    def message_received(self, data: bytes, fds: FileDescriptorArray | None) -> None:
        if self._overflowed:
            return  # hanging up; the rest of the oversized message is dropped
        nul = data.rfind(b"\0")
        self._pending = self._pending + len(data) if nul < 0 else len(data) - nul - 1
        if self._pending > MAX_MESSAGE:
            # No way to find the next message: answer and hang up.
            if fds:
                for fd in fds:
                    fd.close()
            self._overflowed = True
            sent = self.send_error(_error(PROTOCOL_VIOLATION, reason="message too large"))
            sent.add_done_callback(lambda _f: self._hang_up())
            return
        super().message_received(data, fds)

    def _hang_up(self) -> None:
        """After the error reply: shut down writing and drop what the client
        still sends until it closes (or LINGER seconds). Closing with its data
        unread would reset the connection, and the client could lose the
        reply (seen on Linux 6.18)."""
        if self._fileno < 0:
            self.close()
            return
        try:
            # A dup: shutting it down shuts down the transport's socket.
            with socket.socket(fileno=os.dup(self._fileno)) as s:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        asyncio.get_running_loop().call_later(LINGER, self.close)

    def eof_received(self) -> None:
        if self._overflowed:
            self.close()  # the client read the error and hung up
        super().eof_received()

    def error_received(self, err: Exception, data: bytes, fds: FileDescriptorArray | None) -> None:
        # Malformed JSON: the framing is intact, so answer and carry on.
        self.send_error(_error(PROTOCOL_VIOLATION, reason=str(err)))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The transport stops reading while a call runs (requests are answered
        # in order), so a hang-up during a long call is noticed by polling.
        sock = getattr(transport, "_recvfd", None)
        self._fileno = sock.fileno() if isinstance(sock, socket.socket) else -1

    def _peer_gone(self) -> bool:
        """The client closed its socket. (POLLHUP needs both directions shut:
        a client that only shut down writing still waits for the reply.)"""
        if self._fileno < 0:
            return False
        p = select.poll()
        p.register(self._fileno, 0)  # POLLHUP/POLLERR are always reported
        try:
            return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in p.poll(0))
        except OSError:
            return True

    async def _watch(self, call: Call) -> None:
        while not call.cancelled.is_set():
            await asyncio.sleep(0.2)
            if self._peer_gone():
                call.cancelled.set()

    def connection_lost(self, exc: Exception | None) -> None:
        for call in self._calls:
            call.cancelled.set()
        super().connection_lost(exc)

    # -- dispatch -----------------------------------------------------------------
    def call_received(
        self, call: VarlinkMethodCall, fds: FileDescriptorArray | None
    ) -> asyncio.Future[None] | None:
        interface = call.method_interface
        if interface == SERVICE:
            self._introspect(call)
            return None
        if interface not in (REPO, OCI):
            raise _error(f"{SERVICE}.InterfaceNotFound", interface=interface)
        if call.method not in SIGNATURES:
            raise _error(f"{SERVICE}.MethodNotFound", method=call.method)
        params = _validate(call)
        received = [os.dup(fd.fileno()) for fd in fds] if fds else []
        c = Call(call.method, params, received, more=call.more)
        if call.method in STREAMING:
            return asyncio.ensure_future(self._run_stream(c, call.oneway))
        return asyncio.ensure_future(self._run(c, call.oneway))

    def _introspect(self, call: VarlinkMethodCall) -> None:
        reply: dict[str, Any]
        if call.method_name == "GetInfo":
            reply = {
                "vendor": VENDOR,
                "product": PRODUCT,
                "version": __version__,
                "url": URL,
                "interfaces": [OCI, REPO, SERVICE],
            }
        elif call.method_name == "GetInterfaceDescription":
            name = call.parameters.get("interface")
            if not isinstance(name, str):
                raise _error(f"{SERVICE}.InvalidParameter", parameter="interface")
            if name not in (OCI, REPO, SERVICE):
                raise _error(f"{SERVICE}.InterfaceNotFound", interface=name)
            reply = {"description": interface_description(name)}
        else:
            raise _error(f"{SERVICE}.MethodNotFound", method=call.method)
        if not call.oneway:
            self.send_reply(VarlinkMethodReply(reply))

    async def _run(self, call: Call, oneway: bool) -> None:
        self._calls.add(call)
        try:
            params, fds = await self._service.call(call)
        except VarlinkCallError as e:
            raise _error(e.error, **e.parameters) from None
        finally:
            self._calls.discard(call)
        if oneway:
            for fd in fds:
                os.close(fd)
            return
        # autoclose: the mount fd is ours to close once it is sent.
        self.send_reply(VarlinkMethodReply(params), fds or None, autoclose=True)

    async def _run_stream(self, call: Call, oneway: bool) -> None:
        self._calls.add(call)
        frames = self._service.stream(call)
        watcher = asyncio.ensure_future(self._watch(call))
        try:
            async for frame in frames:
                final = "completed" in frame
                if oneway:
                    continue
                if not call.more and not final:
                    continue
                sent = self.send_reply(VarlinkMethodReply(frame, continues=not final))
                if call.more:
                    try:
                        await sent  # backpressure: a slow client slows the frames
                    except OSError:
                        call.cancelled.set()
                        return
        except VarlinkCallError as e:
            raise _error(e.error, **e.parameters) from None
        finally:
            watcher.cancel()
            call.close_fds()  # Pull takes none
            self._calls.discard(call)
            await frames.aclose()  # type: ignore[attr-defined]


def _validate(call: VarlinkMethodCall) -> dict[str, Any]:
    result = validate_parameters(call.method, call.parameters)
    if isinstance(result, str):
        raise _error(f"{SERVICE}.InvalidParameter", parameter=result)
    return result


# -- serving ---------------------------------------------------------------------


def _activation_socket() -> socket.socket | None:
    """The first socket passed by systemd socket activation, if any."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        nfds = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    if pid != os.getpid() or nfds < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    for extra in range(4, 3 + nfds):
        os.close(extra)
    os.set_inheritable(3, False)
    return socket.socket(fileno=3)


def _bind(path: str, mode: int) -> socket.socket:
    """A Unix socket bound at `path` with permissions `mode` from the start
    (no window in which others could connect)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ComposefsError(f"cannot bind varlink socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


def parse_address(address: str) -> str:
    """``unix:PATH`` (varlink address syntax) or a bare path."""
    if address.startswith("unix:"):
        path = address[len("unix:") :].split(";", 1)[0]
    elif ":" in address.split("/", 1)[0]:
        raise ComposefsError(f"unsupported varlink address {address!r} (use unix:PATH)")
    else:
        path = address
    if not path:
        raise ComposefsError("empty varlink socket path")
    return path


async def serve(
    service: Service,
    address: str | None = None,
    *,
    socket_mode: int = 0o600,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT: the socket-activation socket if there is
    one, else a new socket at `address` created with `socket_mode`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def factory() -> Connection:
        return Connection(service)

    sock = _activation_socket()
    path: str | None = None
    transport: VarlinkTransport | None = None
    server = None
    if sock is not None and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        # Accept=yes (or an exec: transport): one connected client.
        sock.setblocking(False)
        transport = VarlinkTransport(loop, sock, sock, factory())
        transport.closed_future.add_done_callback(lambda _f: stop.set())
    else:
        if sock is None:
            if address is None:
                raise ComposefsError("no --address given and not socket-activated")
            path = parse_address(address)
            sock = _bind(path, socket_mode)
        server = await create_unix_server(factory, sock=sock)
        # asyncvarlink listens with a backlog of 1: concurrent clients would
        # get EAGAIN from connect(). Listening again raises the backlog.
        sock.listen(socket.SOMAXCONN)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if server is not None:
            server.close()
            server.close_clients()
        if transport is not None:
            transport.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        await loop.run_in_executor(None, service.close)


def run(address: str | None, *, socket_mode: int = 0o600, **options: Any) -> None:
    """`serve` in a new event loop (``cfsctl varlink``)."""
    service = Service(**options)
    asyncio.run(serve(service, address, socket_mode=socket_mode))


__all__ = [
    "Connection",
    "VarlinkErrorReply",
    "interface_description",
    "parse_address",
    "run",
    "serve",
]
