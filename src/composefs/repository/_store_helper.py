"""A helper process that stores small objects for a splitstream writer.

Storing thousands of small objects from a thread does not scale: hashing
releases the GIL per 4 KiB block and every syscall re-acquires it, so the
store thread and the thread parsing the layer spend their time handing the
GIL back and forth. `StoreHelper` runs the same code
(`ObjectStore.store_bytes_counted`) in a child process instead: this same
Python with this process's ``sys.path``, given the repository directory fd.

Protocol over an AF_UNIX stream socket pair: request = ``<I`` length +
the object's bytes; reply = status byte (0 new, 1 already present) + the
raw object id, or status 2 + ``<i`` errno, or status 3 + ``<I`` length +
a UTF-8 message (a `RepositoryError`). Replies come in request order,
in batches; the helper stops after its first error.

The helper only ever writes complete objects (``O_TMPFILE`` + ``linkat``,
as in-process), so killing either side at any moment leaves a clean
repository; it dies with its parent (``PR_SET_PDEATHSIG``) and exits when
its socket closes. `close` waits for it: nothing is written after.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

from ..errors import RepositoryError

if TYPE_CHECKING:
    import subprocess

_LEN = struct.Struct("<I")
_ERRNO = struct.Struct("<i")
_START_TIMEOUT = 30.0
_POLL_EVERY = 8
_REPLY_BATCH = 32
_SOCKET_BUFFER = 4 << 20
_RECV_BUFFER = 1 << 20
_SEND_BATCH_BYTES = 256 << 10
_SEND_BATCH_COUNT = 32
# Linux's SO_SNDBUFFORCE (root may exceed net.core.wmem_max): Python's
# socket module does not define it.
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32 if sys.platform == "linux" else None)

# Once `_serve` returns, everything asked was written and answered: the
# helper leaves at once (the writer's `close` waits for it) instead of
# tearing the interpreter down (~0.015 s, at the end of every import).
_SCRIPT = """
import sys, json, os
sys.path[:] = json.loads(sys.argv[1])
from composefs.repository._store_helper import _serve
_serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] == "1")
os._exit(0)
"""


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _serve(sockfd: int, dirfd: int, path: str, algorithm: str, insecure: bool) -> None:
    """The helper's loop (in the child)."""
    from .objects import ObjectStore

    _die_with_parent(int(os.environ.get("COMPOSEFS_STORE_HELPER_PARENT", "0")))
    sock = socket.socket(fileno=sockfd)
    store = ObjectStore(path, dirfd, algorithm, insecure, [])
    store._writable = True  # the parent checked
    sock.sendall(b"R")
    # Requests are read in bulk (the writer sends them in batches): one
    # recv for many small objects instead of two each. buf[start:end] is
    # what has been received and not yet handled.
    buf = bytearray(_RECV_BUFFER)
    view = memoryview(buf)
    start = end = 0
    replies = bytearray()
    pending = 0
    unpack_len = _LEN.unpack_from
    store_bytes = store.store_bytes_counted
    while True:
        have = end - start
        size = unpack_len(buf, start)[0] if have >= _LEN.size else -1
        if size < 0 or have < _LEN.size + size:
            # Not a whole request yet. Replies go out when none is waiting
            # (the writer may be waiting for them) or after _REPLY_BATCH:
            # every wake-up of the other side costs more than the reply.
            if replies and (pending >= _REPLY_BATCH or not select.select([sock], [], [], 0)[0]):
                sock.sendall(replies)
                replies.clear()
                pending = 0
            need = _LEN.size + max(size, 0)
            if need > len(buf):
                # A request larger than the buffer: a bigger one, with what we have.
                bigger = bytearray(need)
                bigger[:have] = view[start:end]
                view.release()
                buf, view = bigger, memoryview(bigger)
                start, end = 0, have
            elif start and (start + need > len(buf) or have == 0):
                buf[:have] = buf[start:end]
                start, end = 0, have
            n = sock.recv_into(view[end:])
            if not n:
                break
            end += n
            continue
        body = view[start + _LEN.size : start + _LEN.size + size]
        start += _LEN.size + size
        try:
            object_id, new = store_bytes(body, check_writable=False)
        except Exception as e:
            # The first error ends the helper (the writer fails at it; the
            # requests after it are answered by "helper died"), so replies
            # stay small and never fill the socket.
            if isinstance(e, OSError):
                replies += b"\2" + _ERRNO.pack(e.errno or 5)
            else:  # RepositoryError and anything unforeseen
                msg = str(e).encode("utf-8", "replace")[:4096]
                replies += b"\3" + _LEN.pack(len(msg)) + msg
            sock.sendall(replies)
            return
        finally:
            body.release()
        replies += (b"\0" if new else b"\1") + bytes.fromhex(object_id)
        pending += 1


class HelperUnavailable(Exception):
    """The helper did not start (internal: the writer stores in-process)."""


class HelperResult:
    """The future id of one object the helper stores (Future-like:
    ``done``, ``result``, ``cancel``); results are read in request order."""

    __slots__ = ("_helper", "_value")

    def __init__(self, helper: StoreHelper) -> None:
        self._helper = helper
        self._value: tuple[str, bool] | BaseException | None = None

    def done(self) -> bool:
        if self._value is None:
            self._helper.poll(cheap=True)
        return self._value is not None

    def result(self) -> tuple[str, bool]:
        while self._value is None:
            self._helper.read_one()
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value

    def cancel(self) -> bool:
        return False


class StoreHelper:
    """The parent's end: `submit` sends an object, its `HelperResult` is
    answered in order."""

    def __init__(self, store: Any) -> None:
        if not sys.executable:
            raise HelperUnavailable("no Python executable to run")
        self._digest_size = 64 if store.algorithm == "sha512" else 32
        import subprocess  # here: the helper itself imports this module

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Not -S: an editable install may put its import hook in a .pth file.
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [
                    sys.executable, "-I", "-c", _SCRIPT, json.dumps(sys.path),
                    str(theirs.fileno()), str(store.dirfd), store.abspath, store.algorithm,
                    "1" if store.insecure else "0",
                ],
                pass_fds=(theirs.fileno(), store.dirfd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "COMPOSEFS_STORE_HELPER_PARENT": str(os.getpid())},
            )  # fmt: skip
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        # Room for a few MiB of requests in the socket: we run ahead of the
        # helper instead of waiting for it object by object (each wake-up
        # is slow on a busy machine). Capped by net.core.wmem_max unless
        # we may force it.
        for opt in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
            if opt is None:
                continue
            try:
                mine.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
                break
            except OSError:
                continue
        self._started = time.monotonic()
        self._ready = False
        self._pending: list[HelperResult] = []
        self._head = 0
        self._buf = bytearray()
        self._sent_since_poll = 0
        self._error: BaseException | None = None
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._eof = False

    def _check_ready(self) -> None:
        if self._ready:
            return
        self.sock.settimeout(_START_TIMEOUT)
        try:
            if self.sock.recv(1) != b"R":
                raise HelperUnavailable("the helper did not start")
        except OSError:
            raise HelperUnavailable("the helper did not start") from None
        finally:
            self.sock.settimeout(None)
        self._ready = True

    def _died(self) -> RepositoryError:
        return RepositoryError("the object store helper process died")

    def ready(self) -> bool:
        """Whether the helper has started (without waiting); a helper that
        failed to start, or is still not up after `_START_TIMEOUT`, raises
        `HelperUnavailable`."""
        if self._ready:
            return True
        try:
            got = self.sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic() - self._started > _START_TIMEOUT:
                raise HelperUnavailable("the helper did not start") from None
            return False
        except OSError:
            raise HelperUnavailable("the helper did not start") from None
        if got != b"R":
            raise HelperUnavailable("the helper did not start")
        self._ready = True
        return True

    def submit(self, data: bytes) -> HelperResult:
        """Send an object (small ones are batched: see `flush`)."""
        self._check_ready()
        fut = HelperResult(self)
        self._pending.append(fut)
        self._sent_since_poll += 1
        self._out.append(_LEN.pack(len(data)))
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _SEND_BATCH_BYTES or len(self._out) >= 2 * _SEND_BATCH_COUNT:
            self.flush()
        return fut

    def flush(self) -> None:
        """Send the batched requests: one syscall for many small objects
        (each send may wake the helper, which costs more than the copy)."""
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        try:
            # a blocking stream socket sends it all unless a signal cuts it short
            sent = self.sock.sendmsg(out)
            total = sum(map(len, out))
            if sent < total:
                self.sock.sendall(b"".join(out)[sent:])
        except OSError:
            raise self._failure() from None

    def _failure(self) -> BaseException:
        """Why the helper went away: the error it reported, if any (read
        to the end of its replies), else "died"."""
        while True:
            while self._parse():
                pass
            if not self._recv(block=True):
                break
        return self._error or self._died()

    def _parse(self) -> bool:
        """Answer the oldest pending result from the buffer, if complete."""
        buf = self._buf
        if not buf:
            return False
        status = buf[0]
        if status in (0, 1):
            need = 1 + self._digest_size
            if len(buf) < need:
                return False
            value: tuple[str, bool] | BaseException = (bytes(buf[1:need]).hex(), status == 0)
        elif status == 2:
            need = 1 + _ERRNO.size
            if len(buf) < need:
                return False
            (err,) = _ERRNO.unpack_from(buf, 1)
            value = OSError(err, os.strerror(err))
        elif status == 3:
            if len(buf) < 1 + _LEN.size:
                return False
            need = 1 + _LEN.size + _LEN.unpack_from(buf, 1)[0]
            if len(buf) < need:
                return False
            value = RepositoryError(bytes(buf[1 + _LEN.size : need]).decode("utf-8", "replace"))
        else:
            raise self._died()
        del buf[:need]
        if self._head >= len(self._pending):
            raise self._died()
        fut = self._pending[self._head]
        self._pending[self._head] = None  # type: ignore[call-overload]
        self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._pending):
            del self._pending[: self._head]
            self._head = 0
        fut._value = value
        if isinstance(value, BaseException) and self._error is None:
            self._error = value
        return True

    def _recv(self, block: bool) -> bool:
        """Read replies; False when none are there (or the helper is gone:
        `_eof`; the replies it sent before are still answered)."""
        if self._eof:
            return False
        try:
            data = self.sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def poll(self, cheap: bool = False) -> None:
        """Take whatever replies have arrived, without waiting; `cheap`
        skips the syscall unless a few requests were sent since the last
        look (the writer asks after every record it appends)."""
        if cheap:
            if self._sent_since_poll < _POLL_EVERY:
                return
            self._sent_since_poll = 0
        while self._parse():
            pass
        while self._recv(block=False):
            while self._parse():
                pass

    def read_one(self) -> None:
        """Wait for (at least) the next reply."""
        if self._parse():
            return
        self.flush()
        while True:
            if not self._recv(block=True):
                raise self._died()  # (a reply it sent before is answered first)
            if self._parse():
                return

    def discard(self) -> None:
        """Stop a helper that was never given an object: killed (it has
        nothing to finish and wrote nothing), not waited for to start."""
        if self._pending:
            self.close()
            return
        self.sock.close()
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Stop the helper and wait for it (it finishes what it was sent)."""
        import subprocess

        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
