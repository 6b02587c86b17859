"""EROFS / composefs on-disk format: constants and struct layouts.

IO-free and shared by the writer and the reader. Everything is little-endian;
the block size is 4096. Layouts follow the Linux ``erofs_fs.h`` structures as
used by C composefs 1.0.8 (``lcfs-erofs.h``) and composefs-rs 0.7.0
(``erofs/format.rs``).

Image layout::

    0       composefs header (32 B), zero padded to 1024
    1024    EROFS superblock (128 B)
    1152    inode table (32-byte slots; nid = offset / 32)
            [shared xattr table]            (padded to 4096)
            directory / data blocks
"""

from __future__ import annotations

import struct
from enum import IntEnum


class FormatVersion(IntEnum):
    """Composefs image format.

    V0: C mkcomposefs default (composefs_version 0, bumped to 1 when the tree
    has user whiteouts). V1: C ``--min-version=1`` (composefs_version always 1).
    V0 and V1 share one layout ("epoch 1": compact inodes, BFS order, 256
    whiteout stubs in the root). V2: composefs-rs native (extended inodes,
    DFS order, no stubs, composefs_version 2).
    """

    V0 = 0
    V1 = 1
    V2 = 2

    @property
    def is_epoch1(self) -> bool:
        return self is not FormatVersion.V2


# -- blocks -------------------------------------------------------------
BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS

# -- composefs header (offset 0) -----------------------------------------
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1  # "version" field of the header
COMPOSEFS_FLAGS_HAS_ACL = 1 << 0
# magic, version, flags, composefs_version, unused[4]
COMPOSEFS_HEADER = struct.Struct("<IIII16x")
COMPOSEFS_HEADER_SIZE = 32  # COMPOSEFS_HEADER.size

# -- superblock (offset 1024) -------------------------------------------
SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
FEATURE_COMPAT_SUPPORTED = (
    FEATURE_COMPAT_SB_CHKSUM | FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER
)
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_SUPPORTED = FEATURE_INCOMPAT_CHUNKED_FILE
# magic, checksum, feature_compat, blkszbits, extslots, root_nid,
# inos, build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr,
# uuid[16], volume_name[16],
# feature_incompat, available_compr_algs, extra_devices, devt_slotoff,
# dirblkbits, xattr_prefix_count, xattr_prefix_start, packed_nid,
# xattr_filter_reserved, reserved2[23]
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
SUPERBLOCK_SIZE = 128  # SUPERBLOCK.size

# The inode table starts right after the superblock; nids count 32-byte slots.
INODE_SLOT_SIZE = 32
INODE_TABLE_OFFSET = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE  # 1152, nid 36

# -- inodes --------------------------------------------------------------
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
INODE_LAYOUT_MASK = 0x1
DATALAYOUT_FLAT_PLAIN = 0 << 1
DATALAYOUT_FLAT_INLINE = 2 << 1
DATALAYOUT_CHUNK_BASED = 4 << 1
DATALAYOUT_MASK = 0x0E

# compact (32 B): format, xattr_icount, mode, nlink, size, reserved, u, ino,
# uid, gid, reserved2[4]
COMPACT_INODE = struct.Struct("<HHHHIIIIHH4x")
COMPACT_INODE_SIZE = 32
# extended (64 B): format, xattr_icount, mode, reserved, size, u, ino, uid,
# gid, mtime, mtime_nsec, nlink, reserved2[16]
EXTENDED_INODE = struct.Struct("<HHHHQIIIIQII16x")
EXTENDED_INODE_SIZE = 64
# Just the leading fields common to both layouts (format, xattr_icount, mode).
INODE_PREFIX = struct.Struct("<HHH")

# Chunk-based files: `u` holds the chunk format; chunkbits = BLOCK_BITS + (u & mask).
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_CHUNK_INDEX = b"\xff\xff\xff\xff"  # 4-byte block map entry "no block"
EROFS_NULL_ADDR = 0xFFFFFFFF

# -- directories ---------------------------------------------------------
# nid u64, nameoff u16, file_type u8, reserved u8
DIRENT = struct.Struct("<QHBx")
DIRENT_SIZE = 12
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000

# st_mode type bits -> dirent file_type
MODE_TO_FT = {
    S_IFREG: FT_REG_FILE,
    S_IFDIR: FT_DIR,
    S_IFCHR: FT_CHRDEV,
    S_IFBLK: FT_BLKDEV,
    S_IFIFO: FT_FIFO,
    S_IFSOCK: FT_SOCK,
    S_IFLNK: FT_SYMLINK,
}
FT_TO_MODE = {v: k for k, v in MODE_TO_FT.items()}

# -- xattrs --------------------------------------------------------------
# Inode xattr header (12 B): name_filter u32, shared_count u8, reserved[7]
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
XATTR_IBODY_HEADER_SIZE = 12
# Xattr entry header (4 B): name_len u8, name_index u8, value_size u16;
# followed by the name suffix and the value, padded to 4.
XATTR_ENTRY = struct.Struct("<BBH")
XATTR_ENTRY_SIZE = 4
XATTR_ALIGN = 4
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_FILTER_BITS = 32

XATTR_INDEX_NONE = 0
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6

# Prefixes by name_index. C mkcomposefs (epoch 1) never uses "lustre." (5).
XATTR_PREFIXES: tuple[bytes, ...] = (
    b"",
    b"user.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"trusted.",
    b"lustre.",
    b"security.",
)


def xattr_icount(xattr_bytes: int) -> int:
    """The inode's xattr_icount for an xattr area of `xattr_bytes` (0 = none)."""
    return 0 if xattr_bytes == 0 else 1 + (xattr_bytes - XATTR_IBODY_HEADER_SIZE) // 4


def xattr_ibody_size(icount: int) -> int:
    """Inverse of `xattr_icount`: the size of the inode's xattr area."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER_SIZE + (icount - 1) * 4


# -- overlayfs xattrs that composefs synthesises -----------------------
XATTR_OVERLAY_PREFIX = b"trusted.overlay."
XATTR_OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
XATTR_OVERLAY_METACOPY = b"trusted.overlay.metacopy"
XATTR_OVERLAY_REDIRECT = b"trusted.overlay.redirect"
XATTR_OVERLAY_WHITEOUT = b"trusted.overlay.overlay.whiteout"
XATTR_USERXATTR_WHITEOUT = b"user.overlay.whiteout"
XATTR_OVERLAY_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
XATTR_USERXATTR_WHITEOUTS = b"user.overlay.whiteouts"
XATTR_OVERLAY_OPAQUE = b"trusted.overlay.overlay.opaque"
XATTR_USERXATTR_OPAQUE = b"user.overlay.opaque"
XATTR_OVERLAY_OPAQUE_ROOT = b"trusted.overlay.opaque"
XATTR_SECURITY_SELINUX = b"security.selinux"
XATTR_POSIX_ACL_ACCESS = b"system.posix_acl_access"
XATTR_POSIX_ACL_DEFAULT = b"system.posix_acl_default"

# Overlay metacopy value: version u8 (0), len u8 (4 + digest len), flags u8 (0),
# digest_algo u8, digest bytes.
METACOPY_HEADER = struct.Struct("<BBBB")
METACOPY_VERSION = 0
METACOPY_ALGO_SHA256 = 1
METACOPY_ALGO_SHA512 = 2
METACOPY_DIGEST_SIZES = {METACOPY_ALGO_SHA256: 32, METACOPY_ALGO_SHA512: 64}

# Epoch 1: 256 whiteout stubs "00".."ff" in the root.
WHITEOUT_STUB_COUNT = 256
