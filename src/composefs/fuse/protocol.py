"""The FUSE kernel protocol (``linux/fuse.h``), the part a read-only server
speaks: request headers in, reply messages out. IO-free: bytes in, bytes out.

We speak protocol 7.40 (kernel 6.9: passthrough); the kernel adapts to the
smaller of its own minor and ours, and what we send is valid from 7.31 on
(kernel 5.4) when it does not offer passthrough.
"""

from __future__ import annotations

import struct

from .filesystem import Attr

__all__ = [
    "IN_HEADER",
    "MAJOR",
    "MINOR",
    "Op",
    "attr_out",
    "direntplus",
    "entry_out",
    "error",
    "init_out",
    "open_out",
    "reply",
    "statfs_out",
    "xattr_size",
]

MAJOR = 7
MINOR = 40


class Op:
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    TMPFILE = 51


# Requests that would change the filesystem: EROFS, whatever the mount flags.
WRITE_OPS = frozenset(
    (Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK,
     Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE, Op.RENAME2,
     Op.COPY_FILE_RANGE, Op.TMPFILE)
)  # fmt: skip
# Requests the kernel expects no reply to.
NO_REPLY = frozenset((Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT))

# INIT flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
DO_READDIRPLUS = 1 << 13
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
# flags2 (the high 32 bits of the 64-bit flags)
PASSTHROUGH2 = 1 << (37 - 32)

# open_out flags
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding
IN_HEADER = struct.Struct("<IIQQIIII")
_OUT_HEADER = struct.Struct("<IiQ")
# struct fuse_attr
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_HEAD = struct.Struct("<QQQQII")
_ATTR_OUT_HEAD = struct.Struct("<QII")
_INIT_IN = struct.Struct("<IIII")
_INIT_IN_FLAGS2 = struct.Struct("<I")  # at offset 16, from 7.36 on
_INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
_OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
_DIRENT = struct.Struct("<QQII")
_STATFS = struct.Struct("<QQQQQIIII6I")
_XATTR_OUT = struct.Struct("<II")
# Request bodies (after the in header)
READ_IN = struct.Struct("<QQI")  # fh, offset, size (then flags we ignore)
OPEN_IN = struct.Struct("<I")  # flags
RELEASE_IN = struct.Struct("<Q")  # fh
GETXATTR_IN = struct.Struct("<II")  # size, padding; then the name

_TIMEOUT = 3600  # seconds: the image never changes under a mount


def reply(unique: int, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return _OUT_HEADER.pack(_OUT_HEADER.size + len(body), 0, unique) + body


def reply_header(unique: int, size: int) -> bytes:
    """The header of a reply whose `size` payload bytes follow separately."""
    return _OUT_HEADER.pack(_OUT_HEADER.size + size, 0, unique)


def error(unique: int, errno_: int) -> bytes:
    return _OUT_HEADER.pack(_OUT_HEADER.size, -errno_, unique)


def _attr(a: Attr) -> bytes:
    t = a.mtime if a.mtime >= 0 else a.mtime + (1 << 64)
    return _ATTR.pack(
        a.ino, a.size, (a.size + 511) // 512, t, t, t, a.mtime_nsec, a.mtime_nsec,
        a.mtime_nsec, a.mode, a.nlink, a.uid, a.gid, a.rdev, 4096, 0,
    )  # fmt: skip


def entry_out(a: Attr) -> bytes:
    return _ENTRY_HEAD.pack(a.node_id, 0, _TIMEOUT, _TIMEOUT, 0, 0) + _attr(a)


def attr_out(a: Attr) -> bytes:
    return _ATTR_OUT_HEAD.pack(_TIMEOUT, 0, 0) + _attr(a)


def parse_init(body: bytes) -> tuple[int, int, int, int, int]:
    """(major, minor, max_readahead, flags, flags2) of an INIT request."""
    major, minor, readahead, flags = _INIT_IN.unpack_from(body)
    flags2 = 0
    if flags & INIT_EXT and len(body) >= _INIT_IN.size + 4:
        (flags2,) = _INIT_IN_FLAGS2.unpack_from(body, _INIT_IN.size)
    return major, minor, readahead, flags, flags2


def init_out(minor: int, max_readahead: int, flags: int, max_pages: int, flags2: int = 0) -> bytes:
    # max_stack_depth 1: passthrough files live on a plain filesystem
    stack = 1 if flags2 & PASSTHROUGH2 else 0
    return _INIT_OUT.pack(
        MAJOR, minor, max_readahead, flags, 16, 12, 128 * 1024, 1, max_pages, 0, flags2,
        stack, 0, 0, 0, 0, 0, 0,
    )  # fmt: skip


def open_out(fh: int, flags: int, backing_id: int = 0) -> bytes:
    return _OPEN_OUT.pack(fh, flags, backing_id)


def direntplus(a: Attr, name: bytes, next_off: int) -> bytes:
    """One READDIRPLUS record (entry, then dirent padded to 8 bytes)."""
    rec = _DIRENT.pack(a.ino, next_off, len(name), (a.mode >> 12) & 0o17) + name
    return entry_out(a) + rec + b"\0" * (-len(rec) % 8)


def dirent(a: Attr, name: bytes, next_off: int) -> bytes:
    rec = _DIRENT.pack(a.ino, next_off, len(name), (a.mode >> 12) & 0o17) + name
    return rec + b"\0" * (-len(rec) % 8)


def statfs_out(blocks: int, files: int) -> bytes:
    return _STATFS.pack(blocks, 0, 0, files, 0, 4096, 255, 4096, 0, 0, 0, 0, 0, 0, 0)


def xattr_size(size: int) -> bytes:
    return _XATTR_OUT.pack(size, 0)
