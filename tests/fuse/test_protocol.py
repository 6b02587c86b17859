"""FUSE messages: sizes and layouts of linux/fuse.h (ABI 7.40)."""

from __future__ import annotations

import struct

from composefs.fuse import protocol as p
from composefs.fuse.filesystem import Attr

A = Attr(ino=42, node_id=42, mode=0o100644, nlink=2, uid=1000, gid=1001, size=5000,
         rdev=0, mtime=-1, mtime_nsec=7)  # fmt: skip


def test_sizes_match_the_kernel_abi() -> None:
    assert p.IN_HEADER.size == 40  # struct fuse_in_header
    assert len(p.reply(1)) == 16  # struct fuse_out_header
    assert len(p.entry_out(A)) == 128  # struct fuse_entry_out
    assert len(p.attr_out(A)) == 104  # struct fuse_attr_out
    assert len(p.init_out(40, 131072, 0, 128)) == 64  # struct fuse_init_out
    assert len(p.open_out(1, 0)) == 16  # struct fuse_open_out
    assert len(p.statfs_out(1, 1)) == 80  # struct fuse_statfs_out
    assert len(p.xattr_size(3)) == 8  # struct fuse_getxattr_out


def test_reply_and_error_headers() -> None:
    assert p.reply(7, b"abc") == struct.pack("<IiQ", 19, 0, 7) + b"abc"
    assert p.error(7, 2) == struct.pack("<IiQ", 16, -2, 7)
    assert p.reply_header(9, 100) == struct.pack("<IiQ", 116, 0, 9)


def test_entry_carries_node_id_and_attributes() -> None:
    e = p.entry_out(A)
    nodeid, generation, entry_valid, attr_valid = struct.unpack_from("<QQQQ", e)
    assert (nodeid, generation) == (42, 0) and entry_valid == attr_valid == 3600
    ino, size, blocks, atime, mtime, ctime = struct.unpack_from("<QQQQQQ", e, 40)
    assert (ino, size, blocks) == (42, 5000, 10)
    # times before 1970 travel as two's complement
    assert atime == mtime == ctime == (1 << 64) - 1
    nsec, mode, nlink, uid, gid = struct.unpack_from("<I4xxxxxIIII", e, 88)[:5]
    assert (nsec, mode, nlink, uid, gid) == (7, 0o100644, 2, 1000, 1001)


def test_dirents_are_padded_to_eight_bytes() -> None:
    for name in (b"a", b"abcdefgh", b"x" * 255):
        d = p.dirent(A, name, 3)
        assert len(d) % 8 == 0 and d[24 : 24 + len(name)] == name
        ino, off, namelen, typ = struct.unpack_from("<QQII", d)
        assert (ino, off, namelen, typ) == (42, 3, len(name), 8)  # DT_REG
        plus = p.direntplus(A, name, 3)
        assert plus[:128] == p.entry_out(A) and plus[128:] == d


def test_init_negotiation_fields() -> None:
    body = (
        struct.pack("<IIII", 7, 41, 131072, p.INIT_EXT | p.ASYNC_READ)
        + struct.pack("<I", p.PASSTHROUGH2)
        + bytes(44)
    )
    assert p.parse_init(body) == (7, 41, 131072, p.INIT_EXT | p.ASYNC_READ, p.PASSTHROUGH2)
    # an old kernel: no flags2
    assert p.parse_init(struct.pack("<IIII", 7, 31, 65536, 1))[4] == 0
    out = p.init_out(40, 131072, p.INIT_EXT, 128, p.PASSTHROUGH2)
    fields = struct.unpack("<IIIIHHIIHHII6I", out)
    assert fields[:2] == (7, 40) and fields[8] == 128
    assert fields[10] == p.PASSTHROUGH2 and fields[11] == 1  # max_stack_depth
    assert struct.unpack("<QIi", p.open_out(5, p.FOPEN_PASSTHROUGH, 3)) == (5, 1 << 7, 3)
