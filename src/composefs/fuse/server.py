"""Serve an `ImageFilesystem` at a mount point (C ``composefs-fuse``'s way).

The binding is our own FUSE protocol implementation (`fuse.session`):
libfuse through pyfuse3 copies every byte of file data through Python twice
and cannot splice, which measured 7-20% of the kernel mount's sequential
read throughput. Splicing object pages straight to ``/dev/fuse`` (what C's
``composefs-fuse`` does) and, as root, FUSE passthrough do better
(``bench/bench_fuse.py`` has the figures; passthrough matches the kernel).

Not in the foreground, `serve` returns in the caller once the mount exists
while a detached child (its own session, ``/`` as working directory, stdio
on ``/dev/null``) answers requests, as libfuse's ``fuse_daemonize``.
SIGINT, SIGTERM and SIGHUP unmount and end the server; an external unmount
(``umount``, ``fusermount3 -u``) ends it too, leaving no process behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import FuseError
from .filesystem import ImageFilesystem
from .session import fusermount, mount_fuse, privileged, run_session

__all__ = ["available", "kernel_mount_allowed", "mount_from_repository", "mount_image", "serve",
           "want_fuse"]  # fmt: skip


def available() -> str | None:
    """None when FUSE mounts can work here, else why not (one line)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse kernel module)"
    if os.geteuid() == 0:
        return None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible to this user"
    if fusermount() is None:
        return "fusermount3 not found (install Debian's fuse3)"
    return None


def serve(
    fs: ImageFilesystem,
    mountpoint: str,
    *,
    fsname: str = "composefs",
    options: Iterable[str] = (),
    foreground: bool = False,
    debug: bool = False,
    passthrough: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount `fs` read-only at `mountpoint` and serve it.

    In the foreground this returns after the filesystem is unmounted (or a
    signal ended it); otherwise it returns in the caller once mounted,
    leaving a daemon to serve. `options` are extra mount options
    (``allow_other``). `passthrough=False` keeps the kernel's FUSE
    passthrough off (file data then always goes through this process).
    """
    why = available()
    if why is not None:
        raise FuseError(why)
    if not os.path.isdir(mountpoint):
        raise FuseError(f"mount point {mountpoint} is not a directory")
    mountpoint = os.path.abspath(mountpoint)
    foreground = foreground or debug
    fd, via_fusermount = mount_fuse(mountpoint, fsname, options)
    if foreground:
        if on_ready is not None:
            on_ready()
        run_session(fs, fd, mountpoint, via_fusermount, debug, passthrough)
        return
    pid = os.fork()
    if pid:
        os.close(fd)
        if on_ready is not None:
            on_ready()
        return
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        code = run_session(fs, fd, mountpoint, via_fusermount, False, passthrough)
    finally:
        os._exit(code)


def mount_image(
    image: bytes,
    basedirs: Iterable[str],
    mountpoint: str,
    *,
    fsname: str = "composefs",
    options: Iterable[str] = (),
    foreground: bool = False,
    debug: bool = False,
    passthrough: bool = True,
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
            debug=debug, passthrough=passthrough, on_ready=on_ready,
        )  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)


def kernel_mount_allowed() -> bool:
    """Whether this process may mount EROFS + overlayfs (has CAP_SYS_ADMIN)."""
    return privileged(os.getpid(), os.geteuid())


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
    the repository's ``objects/``, each object's digest checked on open.
    Closes `repo` (releasing its lock) before mounting."""
    image = repo.read_image(name)
    objects = repo.objects_dir
    # The server must not hold the repository's lock for the life of the
    # mount (gc would wait for it), no more than a kernel mount does.
    repo.close()
    mount_image(image, [objects], mountpoint, fsname=f"composefs:{name}", foreground=foreground)
