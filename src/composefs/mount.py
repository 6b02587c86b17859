"""Mount composefs images with the kernel: EROFS metadata + overlayfs.

A composefs mount is two kernel mounts: the EROFS image (read-only; the
image file itself on kernels with file-backed EROFS, >= 6.12, otherwise
through an auto-clearing loop device) and an overlayfs with
``metacopy=on,redirect_dir=on`` whose only regular lower layer is that EROFS
mount and whose data-only lower layers are the object directories. Files in
the image carry ``trusted.overlay.redirect``/``metacopy`` xattrs that point
overlayfs at their content in the object store.

The new mount API (``fsopen``/``fsconfig``/``fsmount``/``move_mount``) is
used through ``syscall(2)``; how much of it the kernel supports is probed
once and cached:

* ``"fd"``     (>= 6.15): the EROFS mount stays detached and is handed to
  overlayfs as a file descriptor; nothing appears in the filesystem.
* ``"tmpdir"`` (6.7 - 6.14): overlayfs refuses detached layers, so the EROFS
  mount is attached to a private temporary directory for the duration of
  the overlay setup, then detached and the directory removed.
* ``"legacy"`` (older, or no new mount API): ``mount(2)`` with an option
  string ``lowerdir=IMG::OBJ1::OBJ2`` (falling back to ``:`` separators for
  kernels without data-only layers, like C composefs does).

Either way nothing is left behind: once the overlay exists it holds its
own private reference to the EROFS mount, so unmounting the overlay frees
the EROFS superblock and (``LO_FLAGS_AUTOCLEAR``) the loop device.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

from .erofs.format import COMPOSEFS_FLAGS_HAS_ACL, COMPOSEFS_HEADER, COMPOSEFS_MAGIC
from .errors import MountError, VerityError, VerityNotEnabled, VerityNotSupported

__all__ = [
    "FsContext",
    "KernelSupport",
    "composefs_fsmount",
    "erofs_fsmount",
    "kernel_support",
    "mount_at",
    "mount_composefs",
    "parse_digest",
    "unmount",
    "verify_image_digest",
]

# -- kernel ABI ---------------------------------------------------------------

# The mount API syscalls arrived after the syscall table unification, so
# every architecture with the generic table (x86_64, aarch64, riscv64, ...)
# shares these numbers; mips/alpha/ia64 use offsets and are not listed (we
# then behave as if the API were missing and use mount(2)).
_SYSCALLS_GENERIC = {
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}
_ARCHES = {
    "x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "armv7l", "armv8l",
    "riscv64", "ppc64le", "ppc64", "s390x", "loongarch64",
}  # fmt: skip
SYSCALLS: dict[str, int] = _SYSCALLS_GENERIC if platform.machine().lower() in _ARCHES else {}

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_BINARY = 2
FSCONFIG_SET_PATH = 3
FSCONFIG_SET_PATH_EMPTY = 4
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
OPEN_TREE_CLONE = 0x1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_SILENT = 0x8000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# Generic per-mount options accepted in `attributes` (the subset of
# mount(8)'s fs-independent flags that make sense for a composefs mount):
# name -> (MOUNT_ATTR_* for fsmount, MS_* for mount(2)).
MOUNT_ATTRIBUTES: dict[str, tuple[int, int]] = {
    "nosuid": (MOUNT_ATTR_NOSUID, MS_NOSUID),
    "nodev": (MOUNT_ATTR_NODEV, MS_NODEV),
    "noexec": (MOUNT_ATTR_NOEXEC, MS_NOEXEC),
    "noatime": (MOUNT_ATTR_NOATIME, MS_NOATIME),
    "relatime": (MOUNT_ATTR_RELATIME, MS_RELATIME),
    "strictatime": (MOUNT_ATTR_STRICTATIME, MS_STRICTATIME),
    "nodiratime": (MOUNT_ATTR_NODIRATIME, MS_NODIRATIME),
    "nosymfollow": (MOUNT_ATTR_NOSYMFOLLOW, MS_NOSYMFOLLOW),
}

# <linux/loop.h>
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# loop_info64: 5 x u64, 4 x u32 (number, encrypt_type, encrypt_key_size,
# flags), file_name[64], crypt_name[64], encrypt_key[32], u64 init[2].
_LOOP_CONFIG = struct.Struct("<II" + "5Q4I64s64s32s2Q" + "64x")

# Overlay "source" shown in /proc/self/mountinfo (C uses the same).
MOUNT_SOURCE = "composefs"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int

_Arg = int | bytes | str | None


def _carg(a: _Arg) -> ctypes.c_long | ctypes.c_char_p | None:
    if a is None:
        return None
    if isinstance(a, int):
        return ctypes.c_long(a)
    return ctypes.c_char_p(os.fsencode(a))


def _syscall(name: str, *args: _Arg) -> int:
    """Call a mount-API syscall; raise OSError(errno) on failure."""
    nr = SYSCALLS.get(name)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{name}: not available on {platform.machine()}")
    res = int(_libc.syscall(ctypes.c_long(nr), *(_carg(a) for a in args)))
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return _syscall("fsopen", fstype, flags)


def fsconfig(fd: int, cmd: int, key: str | None = None, value: _Arg = None, aux: int = 0) -> None:
    _syscall("fsconfig", fd, cmd, key, value, aux)


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return _syscall("fsmount", fd, flags, attr_flags)


def move_mount(
    from_dfd: int, from_path: str | bytes, to_dfd: int, to_path: str | bytes, flags: int
) -> None:
    _syscall("move_mount", from_dfd, from_path, to_dfd, to_path, flags)


def open_tree(dfd: int, path: str | bytes, flags: int) -> int:
    return _syscall("open_tree", dfd, path, flags)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr_idmap(mnt_fd: int, userns_fd: int) -> None:
    """Make a detached mount idmapped with the user namespace `userns_fd`."""
    nr = SYSCALLS.get("mount_setattr")
    if nr is None:
        raise OSError(errno.ENOSYS, "mount_setattr not available")
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    res = int(
        _libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_long(mnt_fd),
            ctypes.c_char_p(b""),
            ctypes.c_long(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_long(ctypes.sizeof(attr)),
        )
    )
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    """mount(2)."""
    res = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode(),
        flags,
        None if data is None else os.fsencode(data),
    )
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sys_umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FsContext:
    """A filesystem context from fsopen(), closed on exit.

    The kernel queues human-readable diagnostics on the context fd (e.g.
    ``e overlayfs: failed to resolve 'x'``); `messages()` drains them so
    errors can quote the kernel's reason.
    """

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype
        self.fd = fsopen(fstype)

    def __enter__(self) -> FsContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_flag(self, key: str) -> None:
        fsconfig(self.fd, FSCONFIG_SET_FLAG, key)

    def set_string(self, key: str, value: str | bytes) -> None:
        fsconfig(self.fd, FSCONFIG_SET_STRING, key, value)

    def set_fd(self, key: str, fd: int) -> None:
        fsconfig(self.fd, FSCONFIG_SET_FD, key, None, fd)

    def create(self) -> None:
        fsconfig(self.fd, FSCONFIG_CMD_CREATE)

    def mount(self, attr_flags: int = 0) -> int:
        """fsmount(): a detached mount fd (close-on-exec)."""
        return fsmount(self.fd, FSMOUNT_CLOEXEC, attr_flags)

    def messages(self) -> list[str]:
        out: list[str] = []
        while self.fd >= 0:
            try:
                b = os.read(self.fd, 1024)
            except OSError:
                break
            if not b:
                break
            out.append(b.decode(errors="replace").strip())
        return out


def mount_at(mnt_fd: int, target: str, dirfd: int = -100) -> None:
    """Attach a detached mount (from fsmount/open_tree) at `target`."""
    move_mount(mnt_fd, "", dirfd, target, MOVE_MOUNT_F_EMPTY_PATH)


# -- errors -------------------------------------------------------------------


def _why(e: OSError, ctx: FsContext | None = None) -> str:
    """A short reason: the kernel's own message when it gave one."""
    msgs = ctx.messages() if ctx is not None else []
    reason = os.strerror(e.errno) if e.errno else str(e)
    # Kernel messages look like "e overlayfs: reason"; keep the last error.
    errs = [m[2:] for m in msgs if m.startswith("e ")]
    if errs:
        reason += f" ({errs[-1]})"
    elif e.errno == errno.EINVAL and ctx is not None and ctx.fstype == "overlay":
        # overlayfs logs most of its reasons only to the kernel log.
        reason += " (see the kernel log, dmesg, for overlayfs's reason)"
    return reason


def _mount_error(what: str, e: OSError, ctx: FsContext | None = None) -> MountError:
    if e.errno == errno.EPERM:
        return MountError(f"{what}: permission denied (mounting needs root / CAP_SYS_ADMIN)")
    if e.errno == errno.ENODEV and ctx is None:
        return MountError(f"{what}: the kernel does not support this filesystem")
    return MountError(f"{what}: {_why(e, ctx)}")


# -- kernel feature probing --------------------------------------------------


@dataclass
class KernelSupport:
    """What this kernel supports, probed once (see `kernel_support`).

    `overlay_mode` is "fd", "tmpdir" or "legacy" (module docstring);
    `erofs_file_backed` is None until the first EROFS mount has shown
    whether image files can be mounted directly (else loop devices).
    """

    overlay_mode: str
    new_api: bool = True
    erofs_file_backed: bool | None = None
    notes: list[str] = field(default_factory=list)


_support: KernelSupport | None = None
_support_lock = threading.Lock()


def _probe_overlay_mode(notes: list[str]) -> str:
    """Find the most capable way to build the overlay without side effects.

    Uses throwaway detached tmpfs mounts as layers: nothing is attached to
    the filesystem tree, and everything is released when the fds close.
    """
    try:
        ovl = FsContext("overlay")
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise MountError("the kernel does not support overlayfs (modprobe overlay)") from None
        if e.errno == errno.EPERM:
            raise MountError(
                "permission denied: mounting composefs needs root (CAP_SYS_ADMIN)"
            ) from None
        notes.append(f"fsopen(overlay): {os.strerror(e.errno or 0)}")
        return "none"
    with ExitStack() as stack:
        stack.enter_context(ovl)
        try:
            ovl.set_string("unsupported", "unsupported")
        except OSError:
            pass
        else:
            # Overlay only emulates the new API (pre-5.x parameter parsing):
            # options are not validated, so use mount(2) directly.
            notes.append("overlayfs accepts unknown options via fsconfig")
            return "legacy"
        try:
            ovl.set_string("lowerdir+", "/")
            ovl.set_string("datadir+", "/")
        except OSError as e:
            notes.append(f"overlay lowerdir+/datadir+: {os.strerror(e.errno or 0)}")
            return "legacy"
    # Can detached mounts be overlay layers (>= 6.15)?
    try:
        with ExitStack() as stack:
            fds = []
            for _ in range(2):
                with FsContext("tmpfs") as t:
                    t.create()
                    fd = t.mount(MOUNT_ATTR_RDONLY)
                stack.callback(os.close, fd)
                fds.append(fd)
            with FsContext("overlay") as o:
                o.set_fd("lowerdir+", fds[0])
                o.set_fd("datadir+", fds[1])
                o.create()
                os.close(o.mount(MOUNT_ATTR_RDONLY))
        return "fd"
    except OSError as e:
        notes.append(f"detached overlay layers: {os.strerror(e.errno or 0)}")
        return "tmpdir"


def kernel_support(refresh: bool = False) -> KernelSupport:
    """Probe (once; cached) how this kernel can build a composefs mount."""
    global _support
    with _support_lock:
        if _support is None or refresh:
            notes: list[str] = []
            mode = _probe_overlay_mode(notes)
            if mode == "none":
                _support = KernelSupport("legacy", new_api=False, notes=notes)
            else:
                _support = KernelSupport(mode, notes=notes)
        return _support


# -- loop devices -------------------------------------------------------------


def _loop_attach(image_fd: int, name: str | None) -> tuple[int, str]:
    """Bind `image_fd` to a free loop device (read-only, auto-clearing).

    Returns (loop fd, /dev/loopN). The device detaches itself when its last
    user (our fd, then the EROFS superblock) goes away.
    """
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot set up a loop device: /dev/loop-control: {e.strerror}") from None
    try:
        fname = os.fsencode(name or "")[: LO_NAME_SIZE - 1]
        flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO
        last: OSError | None = None
        for _ in range(16):  # another process may grab "our" free device
            nr = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{nr}"
            lfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            cfg = _LOOP_CONFIG.pack(
                image_fd, 4096, 0, 0, 0, 0, 0, 0, 0, 0, flags, fname, b"", b"", 0, 0
            )
            try:
                fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
            except OSError as e:
                os.close(lfd)
                last = e
                if e.errno == errno.EBUSY:
                    continue
                if e.errno == errno.EINVAL and flags & LO_FLAGS_DIRECT_IO:
                    # Backing filesystem without O_DIRECT on older kernels.
                    flags &= ~LO_FLAGS_DIRECT_IO
                    continue
                break
            return lfd, path
        assert last is not None
        raise MountError(f"cannot set up a loop device: {last.strerror}")
    finally:
        os.close(ctl)


# -- EROFS --------------------------------------------------------------------


class _ErofsFailed(Exception):
    def __init__(self, error: OSError, messages: list[str]) -> None:
        super().__init__(error.strerror)
        self.error = error
        self.messages = messages


def _erofs_context(source: str, acl: bool) -> FsContext:
    """A created EROFS context for `source`, or _ErofsFailed."""
    try:
        ctx = FsContext("erofs")
    except OSError as e:
        raise _ErofsFailed(e, []) from None
    try:
        ctx.set_string("source", source)
        ctx.set_flag("ro")
        if not acl:
            # Images without ACLs skip ACL lookups (as C does); some builds
            # lack ACL support entirely, which is harmless here.
            try:
                ctx.set_flag("noacl")
            except OSError:
                ctx.messages()
        ctx.create()
    except OSError as e:
        msgs = ctx.messages()
        ctx.close()
        raise _ErofsFailed(e, msgs) from None
    return ctx


def _erofs_error(what: str, f: _ErofsFailed) -> MountError:
    e = f.error
    if e.errno == errno.EPERM:
        return MountError(f"{what}: permission denied (mounting needs root / CAP_SYS_ADMIN)")
    if e.errno == errno.ENODEV:
        return MountError(f"{what}: the kernel does not support EROFS (modprobe erofs)")
    reason = os.strerror(e.errno) if e.errno else str(e)
    errs = [m[2:] for m in f.messages if m.startswith("e ")]
    if errs:
        reason += f" ({errs[-1]})"
    return MountError(f"{what}: {reason}")


def erofs_fsmount(
    image_fd: int,
    *,
    acl: bool = True,
    idmap_fd: int | None = None,
    name: str | None = None,
) -> int:
    """Mount an EROFS image read-only as a detached mount; return its fd.

    Tries the image file itself first (kernel >= 6.12 with file-backed
    EROFS); on ENOTBLK falls back to an auto-clearing loop device and
    remembers that for later mounts.
    """
    support = kernel_support()
    what = f"cannot mount EROFS image {name or f'fd {image_fd}'}"
    loop_fd = -1
    try:
        if support.erofs_file_backed is False:
            loop_fd, source = _loop_attach(image_fd, name)
        else:
            source = f"/proc/self/fd/{image_fd}"
        try:
            ctx = _erofs_context(source, acl)
        except _ErofsFailed as f:
            if f.error.errno != errno.ENOTBLK or loop_fd >= 0:
                raise _erofs_error(what, f) from None
            # No file-backed EROFS in this kernel (< 6.12): use a loop device.
            loop_fd, source = _loop_attach(image_fd, name)
            try:
                ctx = _erofs_context(source, acl)
            except _ErofsFailed as f2:
                raise _erofs_error(what, f2) from None
            support.erofs_file_backed = False
        else:
            if loop_fd < 0:
                support.erofs_file_backed = True
        with ctx:
            try:
                mnt = ctx.mount(MOUNT_ATTR_RDONLY)
            except OSError as e:
                raise _mount_error(what, e, ctx) from None
        if idmap_fd is not None:
            try:
                mount_setattr_idmap(mnt, idmap_fd)
            except OSError as e:
                os.close(mnt)
                raise MountError(f"cannot idmap the image mount: {e.strerror}") from None
        return mnt
    finally:
        if loop_fd >= 0:
            os.close(loop_fd)


@contextmanager
def _temp_mountpoint(attach: Callable[[str], None]) -> Iterator[str]:
    """A fresh temporary directory with `attach(dir)` mounting something on
    it for the duration of the block; then the mount is detached and the
    directory removed. `attach` raises (MountError) if nothing got mounted."""
    tmp = tempfile.mkdtemp(prefix=".composefs.")
    try:
        attach(tmp)
        try:
            yield tmp
        finally:
            try:
                sys_umount2(tmp, MNT_DETACH)
            except OSError:
                pass
    finally:
        try:
            os.rmdir(tmp)
        except OSError:
            pass


def _attached(mnt_fd: int) -> AbstractContextManager[str]:
    """Attach a detached mount to a fresh temporary directory for the
    duration of the block; then detach it and remove the directory."""

    def attach(tmp: str) -> None:
        try:
            mount_at(mnt_fd, tmp)
        except OSError as e:
            raise MountError(f"cannot attach the image mount: {e.strerror}") from None

    return _temp_mountpoint(attach)


def _legacy_erofs(image_fd: int, acl: bool, name: str | None) -> AbstractContextManager[str]:
    """EROFS via mount(2) on a temporary directory (no new mount API)."""
    what = f"cannot mount EROFS image {name or f'fd {image_fd}'}"
    support = kernel_support()
    data = None if acl else "noacl"

    def attach(tmp: str) -> None:
        loop_fd = -1
        try:
            if support.erofs_file_backed is False:
                loop_fd, source = _loop_attach(image_fd, name)
                sys_mount(source, tmp, "erofs", MS_RDONLY, data)
            else:
                try:
                    sys_mount(f"/proc/self/fd/{image_fd}", tmp, "erofs", MS_RDONLY, data)
                    support.erofs_file_backed = True
                except OSError as e:
                    if e.errno != errno.ENOTBLK:
                        raise
                    # No file-backed EROFS (< 6.12): use a loop device.
                    loop_fd, source = _loop_attach(image_fd, name)
                    sys_mount(source, tmp, "erofs", MS_RDONLY, data)
                    support.erofs_file_backed = False
        except OSError as e:
            raise _mount_error(what, e) from None
        finally:
            if loop_fd >= 0:
                os.close(loop_fd)

    return _temp_mountpoint(attach)


# -- overlay ------------------------------------------------------------------


@dataclass
class _Overlay:
    datadirs: list[str]
    upperdir: str | None
    workdir: str | None
    require_verity: bool
    try_verity: bool
    readonly: bool
    attributes: tuple[str, ...]

    def attr_flags(self) -> int:
        f = MOUNT_ATTR_RDONLY if self.readonly else 0
        for a in self.attributes:
            f |= MOUNT_ATTRIBUTES[a][0]
        return f

    def ms_flags(self) -> int:
        f = MS_RDONLY if self.readonly else 0
        for a in self.attributes:
            f |= MOUNT_ATTRIBUTES[a][1]
        return f

    def fsmount(self, lower: int | str) -> int:
        """Build the overlay with the new API; `lower` is the EROFS mount
        as an fd (detached, >= 6.15) or a path. Returns a detached mount."""
        what = "cannot mount overlayfs"
        try:
            ctx = FsContext("overlay")
        except OSError as e:
            raise _mount_error(what, e) from None
        with ctx:
            try:
                ctx.set_string("source", MOUNT_SOURCE)
                ctx.set_string("metacopy", "on")
                ctx.set_string("redirect_dir", "on")
                if self.require_verity or self.try_verity:
                    try:
                        ctx.set_string("verity", "require")
                    except OSError:
                        if self.require_verity:
                            raise MountError(
                                "the kernel's overlayfs does not support verity=require "
                                "(needs Linux >= 6.6)"
                            ) from None
                        ctx.messages()  # drop the complaint about the option
                if isinstance(lower, int):
                    ctx.set_fd("lowerdir+", lower)
                else:
                    ctx.set_string("lowerdir+", lower)
                for d in self.datadirs:
                    ctx.set_string("datadir+", d)
                if self.upperdir is not None and self.workdir is not None:
                    ctx.set_string("upperdir", self.upperdir)
                    ctx.set_string("workdir", self.workdir)
                ctx.create()
                return ctx.mount(self.attr_flags())
            except OSError as e:
                raise _mount_error(what, e, ctx) from None

    def legacy_mount(self, lower: str, target: str) -> None:
        """mount(2) with an option string; `::` marks data-only layers,
        retried with `:` for kernels that predate them (as C does)."""

        def esc(p: str) -> str:
            return p.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")

        extra = ""
        if self.upperdir is not None and self.workdir is not None:
            extra += f",upperdir={esc(self.upperdir)},workdir={esc(self.workdir)}"
        if self.require_verity:
            extra += ",verity=require"
        err: OSError | None = None
        for sep in ("::", ":"):
            lowers = sep.join([esc(lower), *(esc(d) for d in self.datadirs)])
            opts = f"metacopy=on,redirect_dir=on,lowerdir={lowers}{extra}"
            flags = self.ms_flags() | (MS_SILENT if sep == "::" else 0)
            try:
                sys_mount(MOUNT_SOURCE, target, "overlay", flags, opts)
                return
            except OSError as e:
                err = e
                if e.errno != errno.EINVAL:
                    break
        assert err is not None
        if err.errno == errno.EINVAL:
            raise MountError(
                "cannot mount overlayfs: Invalid argument "
                "(see the kernel log, dmesg, for overlayfs's reason)"
            )
        raise _mount_error("cannot mount overlayfs", err)


# -- digests ------------------------------------------------------------------


def parse_digest(digest: str) -> tuple[str, bytes]:
    """Hex fs-verity digest -> (algorithm, raw bytes); sha256 or sha512."""
    d = digest.strip().lower()
    algorithm = {64: "sha256", 128: "sha512"}.get(len(d))
    try:
        raw = bytes.fromhex(d)
    except ValueError:
        algorithm = None
    if algorithm is None:
        raise MountError(f"invalid digest {digest!r}: expected 64 or 128 hex digits")
    return algorithm, raw


def verify_image_digest(
    image_fd: int, digest: str, name: str | None = None, *, insecure: bool = False
) -> bool:
    """Check that the image's fs-verity digest is `digest` (hex).

    The image must have fs-verity and the kernel's measurement must match
    (C `digest=`). Only with `insecure`, where the kernel or the image's
    filesystem has no fs-verity at all, is the digest computed in userspace
    instead (as composefs-rs's insecure repositories do).
    Returns True if the kernel measured it, False for the userspace check.
    Raises MountError on mismatch or when the kernel cannot measure it.
    """
    from . import fsverity

    algorithm, expected = parse_digest(digest)
    label = name or f"fd {image_fd}"
    try:
        alg, found = fsverity.measure_verity(image_fd)
        kernel = True
    except VerityNotSupported:
        if not insecure:
            raise MountError(
                f"image {label} has no fs-verity (this kernel or filesystem cannot measure"
                " it); the insecure option checks the digest in userspace instead"
            ) from None
        found = fsverity.digest_file(image_fd, algorithm)
        alg, kernel = algorithm, False
    except VerityNotEnabled:
        raise MountError(f"image {label} has no fs-verity") from None
    except VerityError as e:
        raise MountError(f"image {label}: {e}") from None
    if alg != algorithm or found != expected:
        raise MountError(
            f"image {label} has wrong fs-verity digest "
            f"(expected {digest.lower()}, found {alg}:{found.hex()})"
        )
    return kernel


# -- the composefs mount ------------------------------------------------------


def _fs_has_verity(directory: str) -> bool:
    """Whether the filesystem holding `directory` supports fs-verity.

    `tryverity` means "if the kernel supports it": beyond overlayfs knowing
    the option (C's only test), the objects' filesystem must be able to
    carry fs-verity, or verity=require would fail every file read.
    """
    from . import fsverity

    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fsverity.measure_verity(fd)
    except VerityNotSupported:
        return False
    except VerityError:
        pass  # e.g. ENODATA: supported, just not on a directory
    finally:
        os.close(fd)
    return True


def _check_dir(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise MountError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{what} {path}: not a directory")
    return os.path.abspath(path)


def _check_upper_work(upperdir: str, workdir: str) -> tuple[str, str]:
    """Catch the common upperdir/workdir mistakes before the kernel does:
    overlayfs reports them only as EINVAL plus a line in the kernel log."""
    upper = _check_dir(upperdir, "upperdir")
    work = _check_dir(workdir, "workdir")
    ru, rw = os.path.realpath(upper), os.path.realpath(work)
    if ru == rw or rw.startswith(ru.rstrip("/") + "/") or ru.startswith(rw.rstrip("/") + "/"):
        raise MountError("upperdir and workdir must be separate subtrees")
    if os.stat(ru).st_dev != os.stat(rw).st_dev:
        raise MountError("upperdir and workdir must be on the same filesystem")
    if os.statvfs(ru).f_flag & os.ST_RDONLY:
        raise MountError(f"upperdir {upperdir} is on a read-only filesystem")
    return upper, work


def _image_flags(fd: int, label: str) -> int:
    try:
        hdr = os.pread(fd, COMPOSEFS_HEADER.size, 0)
    except OSError as e:
        raise MountError(f"cannot read image {label}: {e.strerror}") from None
    if len(hdr) < COMPOSEFS_HEADER.size:
        raise MountError(f"{label} is not a composefs image (too short)")
    magic, _version, flags, _cfs_version = COMPOSEFS_HEADER.unpack(hdr)
    if magic != COMPOSEFS_MAGIC:
        raise MountError(f"{label} is not a composefs image (bad magic)")
    return int(flags)


@dataclass
class _Prepared:
    image_fd: int
    label: str
    acl: bool
    idmap_fd: int | None
    overlay: _Overlay


def _prepare(
    stack: ExitStack,
    image: str | int,
    basedirs: Sequence[str],
    digest: str | None,
    verity: bool,
    try_verity: bool,
    upperdir: str | None,
    workdir: str | None,
    readonly: bool,
    idmap: str | int | None,
    attributes: Iterable[str],
    insecure: bool = False,
) -> _Prepared:
    attrs = tuple(attributes)
    for a in attrs:
        if a not in MOUNT_ATTRIBUTES:
            raise MountError(f"unsupported mount attribute {a!r}")
    if not basedirs:
        raise MountError("no object directories given (basedir)")
    if (upperdir is None) != (workdir is None):
        raise MountError("upperdir and workdir must be given together")
    datadirs = [_check_dir(d, "object directory") for d in basedirs]
    if upperdir is not None and workdir is not None:
        upperdir, workdir = _check_upper_work(upperdir, workdir)
    if digest is not None:
        parse_digest(digest)

    if isinstance(image, int):
        fd, label = image, f"fd {image}"
    else:
        label = os.fspath(image)
        try:
            fd = os.open(label, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise MountError(f"cannot open image {label}: {e.strerror}") from None
        stack.callback(os.close, fd)
    flags = _image_flags(fd, label)

    require_verity = verity
    if digest is not None:
        # digest= implies verity (C). Without kernel fs-verity that is
        # refused unless the user asked for less (insecure, or tryverity):
        # then the digest is checked in userspace and verity=require, which
        # would fail every file read, is not set.
        kernel_measured = verify_image_digest(
            fd, digest, label, insecure=insecure or try_verity
        )
        require_verity = verity or kernel_measured

    idmap_fd: int | None = None
    if isinstance(idmap, int):
        idmap_fd = idmap
    elif idmap is not None:
        try:
            idmap_fd = os.open(idmap, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise MountError(f"cannot open user namespace {idmap}: {e.strerror}") from None
        stack.callback(os.close, idmap_fd)

    return _Prepared(
        image_fd=fd,
        label=label,
        acl=bool(flags & COMPOSEFS_FLAGS_HAS_ACL),
        idmap_fd=idmap_fd,
        overlay=_Overlay(
            datadirs=datadirs,
            upperdir=upperdir,
            workdir=workdir,
            require_verity=require_verity,
            try_verity=try_verity and not require_verity and _fs_has_verity(datadirs[0]),
            readonly=readonly,
            attributes=attrs,
        ),
    )


def _fsmount_prepared(stack: ExitStack, p: _Prepared, mode: str) -> int:
    erofs = erofs_fsmount(p.image_fd, acl=p.acl, idmap_fd=p.idmap_fd, name=p.label)
    stack.callback(os.close, erofs)
    if mode == "fd":
        return p.overlay.fsmount(erofs)
    lower = stack.enter_context(_attached(erofs))
    return p.overlay.fsmount(lower)


def composefs_fsmount(
    image: str | int,
    basedirs: Sequence[str],
    *,
    digest: str | None = None,
    verity: bool = False,
    try_verity: bool = False,
    upperdir: str | None = None,
    workdir: str | None = None,
    readonly: bool = True,
    idmap: str | int | None = None,
    attributes: Iterable[str] = (),
    insecure: bool = False,
) -> int:
    """Build a composefs mount as a detached mount fd (new mount API only).

    The caller attaches it with `mount_at` (or uses it via the fd) and must
    close the fd. Raises MountError on kernels without the new mount API
    (use `mount_composefs`, which falls back to mount(2)).
    """
    with ExitStack() as stack:
        p = _prepare(
            stack, image, basedirs, digest, verity, try_verity, upperdir, workdir,
            readonly, idmap, attributes, insecure,
        )  # fmt: skip
        support = kernel_support()
        if support.overlay_mode == "legacy":
            raise MountError("detached composefs mounts need the new mount API (Linux >= 6.7)")
        return _fsmount_prepared(stack, p, support.overlay_mode)


def mount_composefs(
    image: str | int,
    target: str,
    basedirs: Sequence[str],
    *,
    digest: str | None = None,
    verity: bool = False,
    try_verity: bool = False,
    upperdir: str | None = None,
    workdir: str | None = None,
    readonly: bool = True,
    idmap: str | int | None = None,
    attributes: Iterable[str] = (),
    insecure: bool = False,
) -> None:
    """Mount the composefs `image` (path or open fd) at `target`.

    `basedirs` are the object directories (data-only lower layers, searched
    in order). `digest` (hex) is the expected fs-verity digest of the image,
    measured by the kernel, and implies `verity` (as C). Where the kernel
    cannot measure it the mount is refused, unless `insecure` or
    `try_verity` asks for less: then the digest is checked in userspace and
    verity is not required (see `verify_image_digest`). `verity` makes
    overlayfs require fs-verity digests on every backing file; `try_verity`
    does so only where overlayfs knows the option and the objects'
    filesystem has fs-verity. `upperdir`/`workdir` (both or neither) add a
    writable layer; `readonly=False` makes the mount writable. `idmap` is a
    user namespace (path like ``/proc/PID/ns/user``, or an fd) whose ID
    mapping is applied to the image. `attributes` are generic mount flags
    such as ``nosuid``, ``nodev``, ``noatime`` (see MOUNT_ATTRIBUTES).
    """
    target_abs = _check_dir(target, "mount target")
    with ExitStack() as stack:
        # Input errors first, then what the kernel can (or lets us) do.
        p = _prepare(
            stack, image, basedirs, digest, verity, try_verity, upperdir, workdir,
            readonly, idmap, attributes, insecure,
        )  # fmt: skip
        support = kernel_support()
        if support.overlay_mode != "legacy":
            mnt = _fsmount_prepared(stack, p, support.overlay_mode)
            try:
                mount_at(mnt, target_abs)
            except OSError as e:
                raise _mount_error(f"cannot attach the mount at {target}", e) from None
            finally:
                os.close(mnt)
            return
        # mount(2) path: EROFS on a temporary directory, overlay by options.
        if p.idmap_fd is not None:
            raise MountError("idmapped composefs mounts need the new mount API")
        if support.new_api:
            erofs = erofs_fsmount(p.image_fd, acl=p.acl, name=p.label)
            stack.callback(os.close, erofs)
            lower = stack.enter_context(_attached(erofs))
        else:
            lower = stack.enter_context(_legacy_erofs(p.image_fd, p.acl, p.label))
        p.overlay.legacy_mount(lower, target_abs)


def unmount(target: str, *, detach: bool = False) -> None:
    """Unmount a composefs mount (or any mount) at `target`.

    The EROFS mount and any loop device go away with the overlay. `detach`
    is a lazy unmount (MNT_DETACH) for busy mounts.
    """
    try:
        sys_umount2(os.fspath(target), MNT_DETACH if detach else 0)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise MountError(f"cannot unmount {target}: not a mount point") from None
        if e.errno == errno.EBUSY:
            raise MountError(f"cannot unmount {target}: target is busy") from None
        raise _mount_error(f"cannot unmount {target}", e) from None
