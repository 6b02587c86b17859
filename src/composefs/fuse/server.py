"""pyfuse3 glue: serve an `ImageFilesystem` at a mount point.

Mounting goes through libfuse (as C ``composefs-fuse`` does): mount(2) when
root, ``fusermount3`` otherwise. Not in the foreground, `serve` returns in
the parent once the mount exists while a detached child (its own session,
``/`` as working directory, stdio on ``/dev/null``) answers requests, as
libfuse's ``fuse_daemonize``. SIGINT, SIGTERM and SIGHUP unmount and end
the server; an external unmount (``umount``, ``fusermount3 -u``) ends it
too, leaving no process behind.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import FuseError
from .filesystem import ROOT_ID, Attr, FsError, ImageFilesystem, OpenFile

__all__ = ["available", "mount_image", "serve"]

log = logging.getLogger("composefs.fuse")

# The image never changes under a mount: the kernel may cache everything.
_TIMEOUT = 3600.0
_CAP_SYS_ADMIN = 21


def available() -> str | None:
    """None when FUSE mounts can work here, else why not (one line)."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "FUSE support needs pyfuse3: pip install 'composefs[fuse]'"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse kernel module)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible to this user"
    if os.geteuid() != 0 and not _which("fusermount3"):
        return "fusermount3 not found (install Debian's fuse3)"
    return None


def _which(name: str) -> bool:
    return any(
        os.access(os.path.join(d, name), os.X_OK)
        for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if d
    )


def _privileged(pid: int, uid: int) -> bool:
    """Whether the calling process has CAP_SYS_ADMIN (sees trusted.* xattrs)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return uid == 0


def _make_ops(fs: ImageFilesystem) -> Any:
    import pyfuse3
    import trio

    def entry(a: Attr) -> Any:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.node_id if a.node_id != ROOT_ID else a.ino
        e.generation = 0
        e.entry_timeout = _TIMEOUT
        e.attr_timeout = _TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 4096
        e.st_blocks = (a.size + 511) // 512
        ns = a.mtime_ns
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    def fail(e: FsError) -> Exception:
        return pyfuse3.FUSEError(e.errno)

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        # ".." is never looked up: its node id would have to be 1 for the root.
        supports_dot_lookup = False
        enable_acl = True

        def __init__(self) -> None:
            super().__init__()
            self._entries: dict[int, Any] = {}
            self._files: dict[int, OpenFile] = {}
            self._next_fh = 1

        def _entry(self, a: Attr) -> Any:
            e = self._entries.get(a.ino)
            if e is None:
                e = self._entries[a.ino] = entry(a)
            return e

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
            try:
                return self._entry(fs.lookup(parent_inode, name))
            except FsError as e:
                raise fail(e) from None

        async def getattr(self, inode: int, ctx: Any) -> Any:
            try:
                return self._entry(fs.getattr(inode))
            except FsError as e:
                raise fail(e) from None

        async def forget(self, inode_list: Any) -> None:
            pass  # nodes are image positions: nothing to free

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            try:
                return fs.readlink(inode)
            except FsError as e:
                raise fail(e) from None

        async def opendir(self, inode: int, ctx: Any) -> int:
            try:
                if fs.getattr(inode).mode & 0o170000 != 0o040000:
                    raise FsError(errno.ENOTDIR)
            except FsError as e:
                raise fail(e) from None
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            try:
                for name, a, nxt in fs.readdir(fh, start_id):
                    if not pyfuse3.readdir_reply(token, name, self._entry(a), nxt):
                        break
            except FsError as e:
                raise fail(e) from None

        async def releasedir(self, fh: int) -> None:
            pass

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            try:
                # Opening may hash a large object: keep answering others.
                f = await trio.to_thread.run_sync(fs.open, inode, flags)
            except FsError as e:
                raise fail(e) from None
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = f
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            try:
                return fs.read(self._files[fh], off, size)
            except FsError as e:
                raise fail(e) from None

        async def release(self, fh: int) -> None:
            f = self._files.pop(fh, None)
            if f is not None:
                fs.release(f)

        async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
            try:
                return fs.listxattr(inode, _privileged(ctx.pid, ctx.uid))
            except FsError as e:
                raise fail(e) from None

        async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
            try:
                return fs.getxattr(inode, name, _privileged(ctx.pid, ctx.uid))
            except FsError as e:
                raise fail(e) from None

        async def statfs(self, ctx: Any) -> Any:
            blocks, inodes = fs.statfs()
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = blocks
            s.f_bfree = s.f_bavail = 0
            s.f_files = inodes
            s.f_ffree = s.f_favail = 0
            s.f_namemax = 255
            return s

    return Ops()


def _escape(value: str) -> str:
    # libfuse splits -o values at unescaped commas.
    return value.replace("\\", "\\\\").replace(",", "\\,")


def serve(
    fs: ImageFilesystem,
    mountpoint: str,
    *,
    fsname: str = "composefs",
    options: Iterable[str] = (),
    foreground: bool = False,
    debug: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount `fs` read-only at `mountpoint` and serve it.

    In the foreground this returns after the filesystem is unmounted (or a
    signal ended it); otherwise it returns in the caller once mounted,
    leaving a daemon to serve. `options` are extra libfuse options
    (``allow_other``, ``max_read=N``, …).
    """
    why = available()
    if why is not None:
        raise FuseError(why)
    if not os.path.isdir(mountpoint):
        raise FuseError(f"mount point {mountpoint} is not a directory")
    import pyfuse3
    import trio

    opts = {"ro", "default_permissions", f"fsname={_escape(fsname)}", "subtype=composefs"}
    opts.update(options)
    if debug:
        opts.add("debug")
        foreground = True
    ops = _make_ops(fs)
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as e:
        # libfuse has printed its reason on stderr already.
        raise FuseError(f"cannot mount {mountpoint} with FUSE ({e})") from None

    if not foreground:
        r, w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(w)
            ok = os.read(r, 1)
            os.close(r)
            if ok != b"1":
                raise FuseError("the FUSE server failed to start")
            if on_ready is not None:
                on_ready()
            return
        os.close(r)
        try:
            os.setsid()
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            os.write(w, b"1")
            os.close(w)
            code = _run(pyfuse3, trio)
        except BaseException:
            code = 1
        os._exit(code)
    if on_ready is not None:
        on_ready()
    code = _run(pyfuse3, trio)
    if code:
        raise FuseError("the FUSE server failed")


def _run(pyfuse3: Any, trio: Any) -> int:
    """Serve until unmounted or signalled; always leave nothing mounted."""
    stopped = False

    async def watch_signals() -> None:
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            async for _ in sigs:
                stopped = True
                pyfuse3.terminate()
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    code = 0
    try:
        trio.run(main)
    except BaseException as e:  # keep the mount from being left dead
        log.error("FUSE server stopped: %s", e)
        stopped = True
        code = 1
    finally:
        # An external unmount already removed the mount; a signal did not.
        pyfuse3.close(unmount=stopped)
    sys.stdout.flush()
    return code


def mount_image(
    image: bytes,
    basedirs: Iterable[str],
    mountpoint: str,
    *,
    fsname: str = "composefs",
    options: Iterable[str] = (),
    foreground: bool = False,
    debug: bool = False,
    verify: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Validate `image` (one-line `ImageError` if corrupt) and `serve` it with
    external files taken from `basedirs` (tried in order)."""
    why = available()
    if why is not None:
        raise FuseError(why)
    fds: list[int] = []
    try:
        for d in basedirs:
            try:
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as e:
                raise FuseError(f"cannot open base directory {d}: {e.strerror}") from None
        fs = ImageFilesystem(image, fds, verify=verify)
        serve(
            fs, mountpoint, fsname=fsname, options=options, foreground=foreground,
            debug=debug, on_ready=on_ready,
        )  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)


def kernel_mount_allowed() -> bool:
    """Whether this process may mount EROFS + overlayfs (has CAP_SYS_ADMIN)."""
    return _privileged(os.getpid(), os.geteuid())


def want_fuse(mode: str) -> bool:
    """`--fuse auto|yes|no`: auto picks FUSE, and says so, when the kernel
    mount is not allowed (not root, no CAP_SYS_ADMIN)."""
    if mode == "yes":
        return True
    if mode == "no":
        return False
    if kernel_mount_allowed():
        return False
    sys.stderr.write("no CAP_SYS_ADMIN for a kernel composefs mount: mounting with FUSE\n")
    return True


def mount_from_repository(
    repo: Any, name: str, mountpoint: str, *, foreground: bool = False
) -> None:
    """Mount image `name` of `repo` (a `Repository`; the image's digest is
    checked as for a kernel mount) read-only through FUSE, its files from
    the repository's ``objects/``, each object's digest checked on open."""
    image = repo.read_image(name)
    mount_image(
        image, [repo.objects_dir], mountpoint, fsname=f"composefs:{name}", foreground=foreground
    )
