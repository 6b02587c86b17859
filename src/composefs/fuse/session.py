"""A FUSE session on ``/dev/fuse``: mount, answer requests, unmount.

Mounting: as root mount(2) with ``fd=`` (libfuse does the same); otherwise
the setuid ``fusermount3`` mounts and passes the ``/dev/fuse`` descriptor back
over a socket (``_FUSE_COMMFD``), and ``fusermount3 -u`` unmounts.

Two threads read requests and answer them from an `ImageFilesystem` (the
kernel sends readahead requests in parallel). File data goes to the kernel
with splice(2) (object page cache -> pipe -> device), no copy through
Python; as root with FUSE passthrough, the kernel reads the object itself.
Opening a file whose object must be hashed first runs in a worker thread,
so a large object does not stall other requests.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import FuseError
from . import protocol as p
from .filesystem import FsError, ImageFilesystem, OpenFile

__all__ = ["Session", "fusermount", "mount_fuse", "privileged", "run_session", "unmount_fuse"]

log = logging.getLogger("composefs.fuse")

_CAP_SYS_ADMIN = 21
# Largest READ request we accept: 128 pages. Its reply (header + data) must
# fit in the splice pipe, which unprivileged users may grow to 1 MiB.
MAX_PAGES = 128
MAX_READ = MAX_PAGES * 4096
_BUFSIZE = MAX_READ + 64 * 1024
THREADS = 2
_F_SETPIPE_SZ = 1031
# FUSE_DEV_IOC_BACKING_OPEN / _CLOSE: _IOW(229, 1, struct fuse_backing_map),
# _IOW(229, 2, uint32_t)
_BACKING_MAP = struct.Struct("<iIQ")
_BACKING_OPEN = 0x4010E501
_BACKING_CLOSE = 0x4004E502
_MS_NOEXEC = 0x8
_MS_NOATIME = 0x400


def fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def _escape(value: str) -> str:
    # fusermount3 and the kernel split options at commas.
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_fuse(mountpoint: str, fsname: str, options: Iterable[str] = ()) -> tuple[int, bool]:
    """Mount a read-only FUSE filesystem at `mountpoint`; returns (the
    ``/dev/fuse`` fd, whether ``fusermount3`` mounted it)."""
    opts = ["ro", "nosuid", "nodev", "default_permissions", *options]
    if os.geteuid() == 0:
        from ..mount import MS_NODEV, MS_NOSUID, MS_RDONLY, sys_mount

        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        mode = os.stat(mountpoint).st_mode & 0o170000
        data = [f"fd={fd}", f"rootmode={mode:o}", "user_id=0", "group_id=0",
                "default_permissions"]  # fmt: skip
        data += [o for o in options if o == "allow_other"]
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        flags |= _MS_NOEXEC if "noexec" in options else 0
        flags |= _MS_NOATIME if "noatime" in options else 0
        try:
            sys_mount(fsname, mountpoint, "fuse.composefs", flags, ",".join(data))
        except OSError as e:
            os.close(fd)
            raise FuseError(f"cannot mount {mountpoint}: {e.strerror}") from None
        _set_readahead(mountpoint)
        return fd, False
    tool = fusermount()
    if tool is None:
        raise FuseError("fusermount3 not found (install Debian's fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        opts += [f"fsname={_escape(fsname)}", "subtype=composefs"]
        proc = subprocess.run(
            [tool, "-o", ",".join(opts), "--", mountpoint],
            env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
        theirs.close()
        fds: list[int] = []
        if proc.returncode == 0:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            why = msg[-1] if msg else f"exit status {proc.returncode}"
            raise FuseError(f"cannot mount {mountpoint}: {why}")
        os.set_inheritable(fds[0], False)
        return fds[0], True
    finally:
        ours.close()
        theirs.close()


def _set_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead a whole READ request's worth (root only; the
    default 128 KiB halves sequential throughput). Best effort."""
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == mountpoint:
                    dev = fields[2]  # the last one: ours, on top
        if dev is not None:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(MAX_READ // 1024))
    except OSError:
        pass


def unmount_fuse(mountpoint: str, via_fusermount: bool) -> None:
    if via_fusermount:
        tool = fusermount() or "fusermount3"
        subprocess.run([tool, "-u", "-q", "-z", "--", mountpoint], check=False,
                       stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    else:
        from ..mount import MNT_DETACH, sys_umount2

        try:
            sys_umount2(mountpoint, MNT_DETACH)
        except OSError:
            pass  # already unmounted


def privileged(pid: int, uid: int) -> bool:
    """Whether the calling process has CAP_SYS_ADMIN (sees trusted.* xattrs)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return uid == 0


_OP_NAMES = {v: k for k, v in vars(p.Op).items() if isinstance(v, int)}


class _Stop(Exception):
    """A signal asked the server to unmount and end."""


class Session:
    """Answers the requests of one mounted filesystem."""

    def __init__(
        self, fs: ImageFilesystem, fd: int, debug: bool = False, passthrough: bool = True
    ) -> None:
        self.fs = fs
        self.allow_passthrough = passthrough
        self.fd = fd
        self.debug = debug
        self.files: dict[int, OpenFile] = {}
        self.fhs = itertools.count(1)
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="cfs-fuse-open")
        # One splice pipe per request thread.
        self.local = threading.local()
        self.pipes: list[tuple[int, int]] = []
        self.threads: list[threading.Thread] = []
        self.passthrough = False
        # node id -> (backing id, open files using it)
        self.backing: dict[int, tuple[int, int]] = {}
        self.backing_lock = threading.Lock()
        self.handlers: dict[int, Callable[[int, int, bytes, Any], None]] = {
            p.Op.LOOKUP: self._lookup,
            p.Op.GETATTR: self._getattr,
            p.Op.READLINK: self._readlink,
            p.Op.OPEN: self._open,
            p.Op.READ: self._read,
            p.Op.RELEASE: self._release,
            p.Op.OPENDIR: self._opendir,
            p.Op.READDIR: self._readdir,
            p.Op.READDIRPLUS: self._readdirplus,
            p.Op.RELEASEDIR: self._ok,
            p.Op.STATFS: self._statfs,
            p.Op.GETXATTR: self._getxattr,
            p.Op.LISTXATTR: self._listxattr,
            p.Op.INIT: self._init,
            p.Op.DESTROY: self._ok,
        }

    # -- plumbing ------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError as e:
            # ENOENT: the request was interrupted (its caller died): fine.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def pipe(self) -> tuple[int, int] | None:
        pipe: tuple[int, int] | bool | None = getattr(self.local, "pipe", False)
        if pipe is False:
            pipe = None
            try:
                r, w = os.pipe2(os.O_CLOEXEC)
            except OSError:
                pass
            else:
                try:
                    fcntl.fcntl(w, _F_SETPIPE_SZ, MAX_READ + 4096)
                    pipe = (r, w)
                except OSError:
                    pass  # no big pipe: reads are copied instead of spliced
                self.pipes.append((r, w))
            self.local.pipe = pipe
        return pipe  # type: ignore[return-value]

    def serve(self, threads: int = THREADS) -> None:
        """Answer requests until the filesystem is unmounted (or `_Stop`
        interrupts this, the main, thread). The kernel sends readahead
        requests in parallel: more threads answer them (splice and IO
        release the GIL)."""
        for i in range(threads - 1):
            t = threading.Thread(target=self.loop, name=f"cfs-fuse-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        self.loop()

    def close(self) -> None:
        """After unmounting: wait for the other threads, free everything."""
        for t in self.threads:
            t.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for f in list(self.files.values()):
            self.fs.release(f)
        self.files.clear()
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes.clear()

    def loop(self) -> None:
        buf = bytearray(_BUFSIZE)
        view = memoryview(buf)
        hsize = p.IN_HEADER.size
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # an interrupted request; go on
                if e.errno == errno.ENODEV:
                    return  # unmounted
                raise
            _, opcode, unique, nodeid, uid, _, pid, _ = p.IN_HEADER.unpack_from(buf)
            body = bytes(view[hsize:n])
            if self.debug:
                sys.stderr.write(
                    f"unique: {unique}, opcode: {_OP_NAMES.get(opcode, '?')} ({opcode}), "
                    f"nodeid: {nodeid}, insize: {n}, pid: {pid}\n"
                )
            handler = self.handlers.get(opcode)
            try:
                if handler is not None:
                    handler(unique, nodeid, body, (uid, pid))
                elif opcode in p.NO_REPLY:
                    pass
                elif opcode in p.WRITE_OPS:
                    self.send(p.error(unique, errno.EROFS))
                else:
                    self.send(p.error(unique, errno.ENOSYS))
            except FsError as e:
                self.send(p.error(unique, e.errno))
            except (_Stop, KeyboardInterrupt):
                raise
            except Exception:
                # A bug must not take the whole mount down with it.
                log.exception("FUSE request %d failed", opcode)
                self.send(p.error(unique, errno.EIO))

    # -- requests ------------------------------------------------------------------
    def _ok(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        self.send(p.reply(unique))

    def _init(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        major, minor, readahead, kflags, kflags2 = p.parse_init(body)
        if major != p.MAJOR:
            self.send(p.error(unique, errno.EPROTO))
            return
        want = (
            p.ASYNC_READ | p.BIG_WRITES | p.DO_READDIRPLUS | p.PARALLEL_DIROPS | p.POSIX_ACL
            | p.MAX_PAGES | p.CACHE_SYMLINKS | p.SPLICE_WRITE | p.SPLICE_MOVE
        )  # fmt: skip
        flags = kflags & want
        flags2 = 0
        # Passthrough: the kernel reads external files itself, as fast as its
        # own composefs mount; registering a backing file needs CAP_SYS_ADMIN.
        if (
            self.allow_passthrough
            and kflags & p.INIT_EXT
            and kflags2 & p.PASSTHROUGH2
            and os.geteuid() == 0
        ):
            flags |= p.INIT_EXT
            flags2 = p.PASSTHROUGH2
            self.passthrough = True
        minor = min(minor, p.MINOR)
        self.send(p.reply(unique, p.init_out(minor, readahead, flags, MAX_PAGES, flags2)))

    def _lookup(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        name = body.rstrip(b"\0")
        self.send(p.reply(unique, p.entry_out(self.fs.lookup(nodeid, name))))

    def _getattr(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        self.send(p.reply(unique, p.attr_out(self.fs.getattr(nodeid))))

    def _readlink(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        self.send(p.reply(unique, self.fs.readlink(nodeid)))

    def _statfs(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        self.send(p.reply(unique, p.statfs_out(*self.fs.statfs())))

    def _opendir(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        if self.fs.getattr(nodeid).mode & 0o170000 != 0o040000:
            raise FsError(errno.ENOTDIR)
        self.send(p.reply(unique, p.open_out(0, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR)))

    def _readdir_common(self, unique: int, nodeid: int, body: bytes, plus: bool) -> None:
        _, offset, size = p.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        encode = p.direntplus if plus else p.dirent
        for name, attr, nxt in self.fs.readdir(nodeid, offset):
            rec = encode(attr, name, nxt)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        self.send(p.reply(unique, *out))

    def _readdir(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        self._readdir_common(unique, nodeid, body, False)

    def _readdirplus(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        self._readdir_common(unique, nodeid, body, True)

    def _listxattr(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        names = self.fs.listxattr(nodeid, privileged(who[1], who[0]))
        data = b"".join(n + b"\0" for n in names)
        self._xattr_reply(unique, size, data)

    def _getxattr(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        name = body[p.GETXATTR_IN.size :].split(b"\0", 1)[0]
        value = self.fs.getxattr(nodeid, name, privileged(who[1], who[0]))
        self._xattr_reply(unique, size, value)

    def _xattr_reply(self, unique: int, size: int, data: bytes) -> None:
        if size == 0:
            self.send(p.reply(unique, p.xattr_size(len(data))))
        elif len(data) > size:
            self.send(p.error(unique, errno.ERANGE))
        else:
            self.send(p.reply(unique, data))

    def _open(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        (flags,) = p.OPEN_IN.unpack_from(body)
        # Opening may hash a whole object: not on the request loop.
        self.pool.submit(self._open_job, unique, nodeid, flags)

    def _open_job(self, unique: int, nodeid: int, flags: int) -> None:
        try:
            f = self.fs.open(nodeid, flags)
        except FsError as e:
            self.send(p.error(unique, e.errno))
            return
        except Exception:
            self.send(p.error(unique, errno.EIO))
            return
        fh = next(self.fhs)
        self.files[fh] = f
        backing = self._backing(f) if self.passthrough and f.fd is not None else None
        if backing is not None:
            self.send(p.reply(unique, p.open_out(fh, p.FOPEN_PASSTHROUGH, backing)))
        else:
            self.send(p.reply(unique, p.open_out(fh, p.FOPEN_KEEP_CACHE)))

    def _backing(self, f: OpenFile) -> int | None:
        """The kernel's backing id for `f`'s object: one per inode while it
        is open (the kernel wants one backing file per inode)."""
        with self.backing_lock:
            got = self.backing.get(f.node_id)
            if got is not None:
                self.backing[f.node_id] = (got[0], got[1] + 1)
                return got[0]
            arg = bytearray(_BACKING_MAP.pack(f.fd, 0, 0))
            try:
                backing_id = int(fcntl.ioctl(self.fd, _BACKING_OPEN, arg))
            except OSError:
                self.passthrough = False  # not allowed after all: splice
                return None
            self.backing[f.node_id] = (backing_id, 1)
            return backing_id

    def _unbacking(self, f: OpenFile) -> None:
        with self.backing_lock:
            got = self.backing.get(f.node_id)
            if got is None:
                return
            if got[1] > 1:
                self.backing[f.node_id] = (got[0], got[1] - 1)
                return
            del self.backing[f.node_id]
            try:
                fcntl.ioctl(self.fd, _BACKING_CLOSE, struct.pack("<I", got[0]))
            except OSError:
                pass

    def _release(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        (fh,) = p.RELEASE_IN.unpack_from(body)
        f = self.files.pop(fh, None)
        if f is not None:
            if self.passthrough:
                self._unbacking(f)
            self.fs.release(f)
        self.send(p.reply(unique))

    def _read(self, unique: int, nodeid: int, body: bytes, who: Any) -> None:
        fh, offset, size = p.READ_IN.unpack_from(body)
        f = self.files.get(fh)
        if f is None:
            raise FsError(errno.EBADF)
        pipe = self.pipe() if f.fd is not None and size <= MAX_READ else None
        if pipe is None:
            self.send(p.reply(unique, self.fs.read(f, offset, size)))
            return
        n = max(0, min(size, f.size - offset))
        if n == 0:
            self.send(p.reply(unique))
            return
        r, w = pipe
        src = f.fd
        assert src is not None
        os.write(w, p.reply_header(unique, n))
        moved = 0
        try:
            while moved < n:
                got = os.splice(src, w, n - moved, offset_src=offset + moved)
                if got == 0:
                    break
                moved += got
        except OSError:
            pass
        if moved < n:
            # The object shrank under us: empty the pipe, answer EIO.
            left = 16 + moved  # the header and the data spliced so far
            while left > 0:
                left -= len(os.read(r, left))
            self.send(p.error(unique, errno.EIO))
            return
        total = 16 + n
        try:
            while total > 0:
                total -= os.splice(r, self.fd, total, flags=os.SPLICE_F_MOVE)
        except OSError as e:
            # The reader went away: drop what is left in the pipe.
            while total > 0:
                total -= len(os.read(r, total))
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise


def run_session(
    fs: ImageFilesystem,
    fd: int,
    mountpoint: str,
    via_fusermount: bool,
    debug: bool = False,
    passthrough: bool = True,
) -> int:
    """Serve until unmounted; a SIGINT/SIGTERM/SIGHUP unmounts first."""

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stopped = False
    session = Session(fs, fd, debug, passthrough)
    try:
        session.serve()
    except _Stop:
        stopped = True
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if stopped:
            unmount_fuse(mountpoint, via_fusermount)
        session.close()
        os.close(fd)
    return 0
