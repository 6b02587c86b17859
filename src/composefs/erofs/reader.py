"""Read a composefs EROFS image back into a tree, validating it strictly.

IO-free: bytes in, `tree.Directory` out. Every image the writers produce
(C-compatible V0/V1 and composefs-rs V2) reads back into a tree that writes
the same image again. Anything else is a corrupt or hostile image and raises
`errors.ImageError` — never another exception, never a hang: every offset is
bounds-checked, every directory is visited once, and work and memory stay
proportional to the image size.

What is checked (composefs-rs `reader.rs` `restrict_to_composefs` and
`fsck_metadata`, plus the kernel's own structural rules):

* header and superblock: magics, versions, block size, feature flags, no
  compression, extra devices, extension slots, packed inode, metadata block
  address or custom xattr prefixes; image at most 1 GiB and not shorter
  than its block count;
* inodes: inside the inode table and the image, known on-disk layouts, known
  file types, a data layout that fits the type, nanoseconds below 10^9; data
  blocks inside the image; inline tails that do not cross a block boundary
  (nor, in V0/V1, a symlink's inode and target: kernels before 6.12);
  external files are holes (null chunk indexes inside the image);
* directories: well-formed dirent blocks, names sorted and unique, no `/` or
  NUL, `.` and `..` pointing where they must, dirent file types matching the
  inodes, link counts of 2 + subdirectories, no directory reached twice (no
  cycles, no directory hardlinks), paths of at most 2048 components
  (`limits.MAX_DEPTH`, the rule the writers share);
* xattrs: entries exactly filling a non-empty area, known prefixes, no duplicates,
  shared entries inside the image, the bloom filter admitting every name,
  well-formed overlay metacopy and redirect values on external files only;
* composefs rules: V0/V1 ("epoch 1") images have all 256 whiteout stubs
  `00`..`ff` in the root and no other native whiteout; V2 images have no
  escaped whiteouts; whiteouts are not hardlinked.

What reading undoes (as C `lcfs_load_node_from_image` does, so that
`composefs-info dump` prints what C prints):

* the 256 root whiteout stubs of V0/V1 images are dropped;
* escaped whiteouts (regular files with `trusted.overlay.overlay.whiteout`)
  become character devices 0:0 again;
* `trusted.overlay.metacopy` / `trusted.overlay.redirect` become the external
  file's digest and backing path (kept in `Regular.payload` only when it is
  not the digest-derived `xx/yyyy…` path);
* `trusted.overlay.overlay.X` is unescaped to `trusted.overlay.X`; other
  `trusted.overlay.*` xattrs and the whiteout markers
  `trusted.overlay.overlay.whiteouts`, `user.overlay.whiteout(s)` are
  dropped. Like C (unlike composefs-rs) the directory markers
  `trusted.overlay.opaque=x` and `user.overlay.opaque=x` that V1 puts next
  to whiteouts are kept: writing the tree again adds them anyway.

Work and memory are bounded by the image size: the bytes reading
materialises (file data, symlink targets, directory blocks, inline xattr
areas) may total at most `WORK_FACTOR` times the image size plus
`WORK_SLACK`. A valid image stores each of them once, so it stays far below;
a hostile one whose inodes all point at the same data block (or overlap)
would otherwise make a 10 MB image cost gigabytes. Readers that need no
file data (`collect_objects`, `composefs-info ls`/`objects`, fsck, gc) pass
``inline_data=False``: inline contents are then checked but not read.

Leaf link counts that differ from the number of names in the tree (C keeps
whatever NLINK a dumpfile gave) are kept in `Leaf.nlink`, so re-writing an
image reproduces it byte for byte.
"""

from __future__ import annotations

import functools
import operator
import re
import struct
from collections.abc import Collection
from itertools import pairwise

import xxhash

from .. import limits
from ..errors import ImageError
from ..tree import (
    Device,
    Directory,
    Fifo,
    Leaf,
    LeafContent,
    Regular,
    Socket,
    Stat,
    Symlink,
    iter_leaves,
    no_gc,
)
from . import format as fmt
from .format import FormatVersion

__all__ = [
    "MAX_DEPTH",
    "MAX_IMAGE_SIZE",
    "WORK_FACTOR",
    "WORK_SLACK",
    "ImageInfo",
    "ImageView",
    "RawInode",
    "collect_digests",
    "collect_objects",
    "image_info",
    "image_version",
    "read_image",
    "scan_references",
]

# composefs-rs refuses images above 1 GiB: they are metadata only.
MAX_IMAGE_SIZE = 1 << 30
# The work bound (see the module docstring).
WORK_FACTOR = 2
WORK_SLACK = 1 << 20
# The limits every writer shares (see composefs.limits).
MAX_DEPTH = limits.MAX_DEPTH
INLINE_CONTENT_MAX = limits.INLINE_CONTENT_MAX
SYMLINK_MAX = limits.SYMLINK_MAX
NAME_MAX = limits.NAME_MAX

_BLK = fmt.BLOCK_SIZE
_U16 = struct.Struct("<H")
_EXTENDED_INODE_UNPACK = fmt.EXTENDED_INODE.unpack_from
_COMPACT_INODE_UNPACK = fmt.COMPACT_INODE.unpack_from
_IBODY_HEADER = fmt.XATTR_IBODY_HEADER_SIZE
_IBODY_HEADER_UNPACK = fmt.XATTR_IBODY_HEADER.unpack_from
# Names that xattrs() treats specially all start with one of these.
_OVERLAY_PREFIXES = (fmt.XATTR_OVERLAY_PREFIX, b"user.overlay.")
_FIRST_NID = fmt.INODE_TABLE_OFFSET // fmt.INODE_SLOT_SIZE
_FORMAT_KNOWN_BITS = fmt.INODE_LAYOUT_MASK | fmt.DATALAYOUT_MASK
_DATALAYOUTS = (fmt.DATALAYOUT_FLAT_PLAIN, fmt.DATALAYOUT_FLAT_INLINE, fmt.DATALAYOUT_CHUNK_BASED)
_CHECKED_CHUNKS = 1000
# Both writers refuse files needing more than 1024 of the largest (8 TiB)
# chunks (C LCFS_MAX_NONINLINE_CHUNKS).
_MAX_EXTERNAL_SIZE = 1024 << (fmt.BLOCK_BITS + fmt.CHUNK_FORMAT_BLKBITS_MASK)
_NULL_CHUNKS = fmt.NULL_CHUNK_INDEX * _CHECKED_CHUNKS
_KERNEL_PREFIXES = (
    b"user.",
    b"trusted.",
    b"security.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
)
_REFS = [struct.Struct(f"<{n}I") for n in range(256)]
_lt = operator.lt
# Maps "/" and NUL elsewhere, every other byte to itself: a name area is
# valid when translating it changes nothing.
_NAME_BYTES = bytes(c ^ 1 if c in b"/\0" else c for c in range(256))
_HEX2 = frozenset(f"{i:02x}".encode() for i in range(256))


def _err(msg: str) -> ImageError:
    return ImageError(f"invalid composefs image: {msg}")


class ImageInfo:
    """Header and superblock facts of a validated image (immutable).

    A plain class rather than a frozen dataclass or a NamedTuple: importing
    `dataclasses` (and `inspect`) or `typing` cost milliseconds at every
    start of `composefs-info`.
    """

    _FIELDS = (
        "composefs_version",
        "version",
        "flags",
        "root_nid",
        "inodes",
        "blocks",
        "build_time",
        "build_time_nsec",
        "xattr_blkaddr",
        "feature_compat",
        "feature_incompat",
    )
    __slots__ = _FIELDS

    composefs_version: int
    version: FormatVersion
    flags: int
    root_nid: int
    inodes: int
    blocks: int
    build_time: int
    build_time_nsec: int
    xattr_blkaddr: int
    feature_compat: int
    feature_incompat: int

    def __init__(
        self,
        composefs_version: int,
        version: FormatVersion,
        flags: int,
        root_nid: int,
        inodes: int,
        blocks: int,
        build_time: int,
        build_time_nsec: int,
        xattr_blkaddr: int,
        feature_compat: int,
        feature_incompat: int,
    ) -> None:
        values = (
            composefs_version,
            version,
            flags,
            root_nid,
            inodes,
            blocks,
            build_time,
            build_time_nsec,
            xattr_blkaddr,
            feature_compat,
            feature_incompat,
        )
        for name, value in zip(self._FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ImageInfo is immutable (cannot set {name})")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageInfo) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"ImageInfo({fields})"

    @property
    def is_epoch1(self) -> bool:
        return self.composefs_version != 2


def image_info(data: bytes) -> ImageInfo:
    """Validate the composefs header and the EROFS superblock."""
    n = len(data)
    if n > MAX_IMAGE_SIZE:
        raise _err(f"image size {n} exceeds the maximum {MAX_IMAGE_SIZE}")
    if n < fmt.INODE_TABLE_OFFSET:
        raise _err(f"image too small ({n} bytes)")
    magic, version, flags, cfs_version = fmt.COMPOSEFS_HEADER.unpack_from(data, 0)
    if magic != fmt.COMPOSEFS_MAGIC:
        raise _err(f"bad composefs magic {magic:#x}")
    if version != fmt.COMPOSEFS_HEADER_VERSION:
        raise _err(f"unsupported composefs header version {version}")
    if cfs_version not in (0, 1, 2):
        raise _err(f"unknown composefs_version {cfs_version}")
    (
        sb_magic,
        _checksum,
        compat,
        blkszbits,
        extslots,
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        _uuid,
        _volume,
        incompat,
        compr_algs,
        extra_devices,
        _devt_slotoff,
        dirblkbits,
        prefix_count,
        _prefix_start,
        packed_nid,
        _filter_reserved,
    ) = fmt.SUPERBLOCK.unpack_from(data, fmt.SUPERBLOCK_OFFSET)
    if sb_magic != fmt.EROFS_MAGIC:
        raise _err(f"bad EROFS magic {sb_magic:#x}")
    if blkszbits != fmt.BLOCK_BITS:
        raise _err(f"block size bits {blkszbits}, composefs needs {fmt.BLOCK_BITS}")
    if compat & ~fmt.FEATURE_COMPAT_SUPPORTED:
        raise _err(f"unsupported feature_compat flags {compat & ~fmt.FEATURE_COMPAT_SUPPORTED:#x}")
    if incompat & ~fmt.FEATURE_INCOMPAT_SUPPORTED:
        raise _err(
            f"unsupported feature_incompat flags {incompat & ~fmt.FEATURE_INCOMPAT_SUPPORTED:#x}"
        )
    if compr_algs:
        raise _err("compression is not supported")
    if extra_devices:
        raise _err("extra devices are not supported")
    if extslots:
        raise _err("superblock extension slots are not supported")
    if packed_nid:
        raise _err("packed inodes are not supported")
    if meta_blkaddr:
        raise _err(f"meta_blkaddr must be 0, not {meta_blkaddr}")
    if prefix_count:
        raise _err("custom xattr prefixes are not supported")
    if dirblkbits:
        raise _err("directory block size must be the block size")
    if build_time_nsec >= 1_000_000_000:
        raise _err(f"build time nanoseconds {build_time_nsec} out of range")
    if blocks * _BLK > n:
        raise _err(f"image truncated: {n} bytes, the superblock says {blocks} blocks")
    if xattr_blkaddr * _BLK > n:
        raise _err(f"xattr block address {xattr_blkaddr} beyond the image")
    return ImageInfo(
        composefs_version=cfs_version,
        version=FormatVersion(cfs_version),
        flags=flags,
        root_nid=root_nid,
        inodes=inos,
        blocks=blocks,
        build_time=_signed64(build_time),
        build_time_nsec=build_time_nsec,
        xattr_blkaddr=xattr_blkaddr,
        feature_compat=compat,
        feature_incompat=incompat,
    )


def image_version(data: bytes) -> FormatVersion:
    """The image's format from its header: V0, V1 or V2 (composefs_version)."""
    return image_info(data).version


def _signed64(v: int) -> int:
    # Times are stored as u64 but mean i64 (C prints them with PRIi64).
    return v - (1 << 64) if v >= 1 << 63 else v


class _Inode:
    __slots__ = (
        "datalayout",
        "gid",
        "icount",
        "inline_end",
        "inline_start",
        "isize",
        "mode",
        "mtime",
        "mtime_nsec",
        "nid",
        "nlink",
        "pos",
        "size",
        "u",
        "uid",
    )

    nid: int
    pos: int
    isize: int
    datalayout: int
    icount: int
    mode: int
    nlink: int
    size: int
    u: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    inline_start: int  # end of header + xattrs
    inline_end: int

    @property
    def ftype(self) -> int:
        return self.mode & fmt.S_IFMT


class _Xattrs:
    """One inode's xattrs after C's read-side transformations."""

    __slots__ = ("metacopy", "redirect", "user", "whiteout")

    def __init__(self) -> None:
        self.user: dict[bytes, bytes] = {}
        self.metacopy: bytes | None = None
        self.redirect: bytes | None = None
        self.whiteout = False


class _Reader:
    def __init__(
        self, data: bytes, keep_opaque_markers: bool = True, inline_data: bool = True
    ) -> None:
        self.keep_opaque_markers = keep_opaque_markers
        self.inline_data = inline_data
        self.info = image_info(data)
        self.data = data
        self.n = len(data)
        self.budget = WORK_FACTOR * self.n + WORK_SLACK
        self.epoch1 = self.info.is_epoch1
        self.filter = bool(self.info.feature_compat & fmt.FEATURE_COMPAT_XATTR_FILTER)
        self.xattr_base = self.info.xattr_blkaddr * _BLK
        # Shared xattr entries parsed once each: inodes may all point at the
        # same large value and must not multiply memory.
        self._shared: dict[int, tuple[int, bytes, bytes, bytes]] = {}
        # Bloom filter bit per (prefix index, suffix): names repeat a lot.
        self._filter_bits: dict[tuple[int, bytes], int] = {}

    # -- inodes ------------------------------------------------------------
    def inode(self, nid: int) -> _Inode:
        # Hot (once per inode): locals, not attribute round trips.
        data, n = self.data, self.n
        if nid < _FIRST_NID or nid > (n - fmt.COMPACT_INODE_SIZE) // fmt.INODE_SLOT_SIZE:
            raise _err(f"inode number {nid} out of range")
        pos = nid * fmt.INODE_SLOT_SIZE
        (format_,) = _U16.unpack_from(data, pos)
        if format_ & ~_FORMAT_KNOWN_BITS:
            raise _err(f"inode {nid}: unsupported format {format_:#x}")
        datalayout = format_ & fmt.DATALAYOUT_MASK
        if datalayout not in _DATALAYOUTS:
            raise _err(f"inode {nid}: unsupported data layout {datalayout >> 1}")
        ino = _Inode()
        ino.nid = nid
        ino.pos = pos
        ino.datalayout = datalayout
        if format_ & fmt.INODE_LAYOUT_MASK:
            if pos + fmt.EXTENDED_INODE_SIZE > n:
                raise _err(f"inode {nid} extends beyond the image")
            (_, icount, mode, _, size, ino.u, _, ino.uid, ino.gid, mtime, nsec, ino.nlink) = (
                _EXTENDED_INODE_UNPACK(data, pos)
            )
            ino.mtime = mtime - (1 << 64) if mtime >= 1 << 63 else mtime  # _signed64
            if nsec >= 1_000_000_000:
                raise _err(f"inode {nid}: mtime nanoseconds {nsec} out of range")
            ino.mtime_nsec = nsec
            isize = fmt.EXTENDED_INODE_SIZE
        else:
            (_, icount, mode, ino.nlink, size, _, ino.u, _, ino.uid, ino.gid) = (
                _COMPACT_INODE_UNPACK(data, pos)
            )
            # Compact inodes carry no mtime: it is the image's build time.
            ino.mtime = self.info.build_time
            ino.mtime_nsec = self.info.build_time_nsec
            isize = fmt.COMPACT_INODE_SIZE
        ino.icount = icount
        ino.mode = mode
        ino.size = size
        ino.isize = isize
        # fmt.xattr_ibody_size, inlined
        inline_start = pos + isize + (_IBODY_HEADER + 4 * (icount - 1) if icount else 0)
        ino.inline_start = inline_start
        tail = size % _BLK if datalayout == fmt.DATALAYOUT_FLAT_INLINE else 0
        inline_end = ino.inline_end = inline_start + tail
        if inline_end > n:
            raise _err(f"inode {nid} extends beyond the image")
        if tail and (inline_start % _BLK) + tail > _BLK:
            raise _err(f"inode {nid}: inline data crosses a block boundary")
        if (mode & fmt.S_IFMT) not in fmt.MODE_TO_FT:
            raise _err(f"inode {nid}: unknown file type {mode:o}")
        return ino

    def blocks(self, ino: _Inode) -> tuple[int, int]:
        """(first block, block count) of a flat inode's out-of-line data."""
        if ino.size > self.n:
            raise _err(f"inode {ino.nid}: size {ino.size} exceeds the image size")
        if ino.datalayout == fmt.DATALAYOUT_FLAT_PLAIN:
            count = -(-ino.size // _BLK)
        else:
            count = ino.size // _BLK
        if count:
            if ino.u == 0 or (ino.u + count) * _BLK > self.n:
                raise _err(f"inode {ino.nid}: data blocks {ino.u}+{count} outside the image")
        return ino.u, count

    def charge(self, n: int) -> None:
        """Count `n` materialised bytes against the work bound."""
        self.budget -= n
        if self.budget < 0:
            raise _err(
                f"image refers to more data than it holds (over {WORK_FACTOR}x its size: "
                "inodes sharing or overlapping data)"
            )

    def content(self, ino: _Inode) -> bytes:
        """A flat inode's data: whole blocks, then the inline tail."""
        start, count = self.blocks(ino)
        self.charge(ino.size)
        if ino.datalayout == fmt.DATALAYOUT_FLAT_PLAIN:
            return self.data[start * _BLK : start * _BLK + ino.size]
        head = self.data[start * _BLK : (start + count) * _BLK] if count else b""
        return head + self.data[ino.inline_start : ino.inline_end]

    # -- xattrs ------------------------------------------------------------
    def _entry(self, pos: int, end: int) -> tuple[int, bytes, bytes, bytes, int]:
        """Parse one xattr entry at pos: (index, suffix, full name, value, next)."""
        if pos + fmt.XATTR_ENTRY_SIZE > end:
            raise _err("truncated xattr entry")
        name_len, index, value_size = fmt.XATTR_ENTRY.unpack_from(self.data, pos)
        body = pos + fmt.XATTR_ENTRY_SIZE
        nxt = body + ((name_len + value_size + 3) & ~3)
        if nxt > end:
            raise _err("xattr entry extends beyond its area")
        if index >= len(fmt.XATTR_PREFIXES):
            raise _err(f"unknown xattr name index {index}")
        suffix = self.data[body : body + name_len]
        name = fmt.XATTR_PREFIXES[index] + suffix
        if not name or b"\0" in name:
            raise _err(f"invalid xattr name {name!r}")
        if index == 0 and name.startswith(_KERNEL_PREFIXES):
            # Writers always use the prefix index; the kernel could not find
            # this entry by its name.
            raise _err(f"xattr {name!r} stored without its prefix index")
        value = self.data[body + name_len : body + name_len + value_size]
        return index, suffix, name, value, nxt

    def _shared_entry(self, ref: int) -> tuple[int, bytes, bytes, bytes]:
        got = self._shared.get(ref)
        if got is None:
            pos = self.xattr_base + ref * 4
            if pos >= self.n:
                raise _err(f"shared xattr {ref} outside the image")
            index, suffix, name, value, _ = self._entry(pos, self.n)
            got = self._shared[ref] = (index, suffix, name, value)
        return got

    def raw_xattrs(self, ino: _Inode) -> list[tuple[bytes, bytes]]:
        """(full name, value) pairs: inline entries first, then shared (C order)."""
        return list(self._xattr_dict(ino).items())

    def _xattr_dict(self, ino: _Inode) -> dict[bytes, bytes]:
        # Hot (once per inode with xattrs): one pass, each entry checked
        # (unique, admitted by the bloom filter) as it is parsed.
        if not ino.icount:
            return {}
        if ino.icount == 1:
            # A bare header: the kernel refuses it ("not supported yet").
            raise _err(f"inode {ino.nid}: empty xattr area")
        data = self.data
        start = ino.pos + ino.isize
        end = ino.inline_start
        self.charge(end - start)
        name_filter, shared_count = _IBODY_HEADER_UNPACK(data, start)
        pos = start + _IBODY_HEADER + 4 * shared_count
        if pos > end:
            raise _err(f"inode {ino.nid}: shared xattr references overflow the xattr area")
        out: dict[bytes, bytes] = {}
        bits = self._filter_bits if self.filter else None
        entry = self._entry
        while pos < end:
            index, suffix, name, value, pos = entry(pos, end)
            if name in out:
                raise _err(f"inode {ino.nid}: duplicate xattr {name!r}")
            out[name] = value
            if bits is not None:
                bit = bits.get((index, suffix))
                if bit is None:
                    bit = bits[(index, suffix)] = 1 << _filter_bit(index, suffix)
                if name_filter & bit:
                    # The kernel would answer ENODATA for this name.
                    raise _err(f"inode {ino.nid}: xattr bloom filter excludes {name!r}")
        if shared_count:
            shared = self._shared_entry
            for ref in _REFS[shared_count].unpack_from(data, start + _IBODY_HEADER):
                index, suffix, name, value = shared(ref)
                if name in out:
                    raise _err(f"inode {ino.nid}: duplicate xattr {name!r}")
                out[name] = value
                if bits is not None:
                    bit = bits.get((index, suffix))
                    if bit is None:
                        bit = bits[(index, suffix)] = 1 << _filter_bit(index, suffix)
                    if name_filter & bit:
                        raise _err(f"inode {ino.nid}: xattr bloom filter excludes {name!r}")
        return out

    def xattrs(self, ino: _Inode) -> _Xattrs:
        x = _Xattrs()
        is_reg = ino.ftype == fmt.S_IFREG
        for name, value in self._xattr_dict(ino).items():
            if not name.startswith(_OVERLAY_PREFIXES):
                x.user[name] = value  # the common case, by the last branch below
            elif name == fmt.XATTR_OVERLAY_METACOPY:
                x.metacopy = value
            elif name == fmt.XATTR_OVERLAY_REDIRECT:
                x.redirect = value
            elif name == fmt.XATTR_OVERLAY_WHITEOUT and is_reg:
                x.whiteout = True
            elif name in _DROPPED_MARKERS or (
                name in _OPAQUE_MARKERS and not self.keep_opaque_markers
            ):
                pass
            elif name.startswith(fmt.XATTR_OVERLAY_ESCAPED_PREFIX):
                x.user[fmt.XATTR_OVERLAY_PREFIX + name[len(fmt.XATTR_OVERLAY_ESCAPED_PREFIX) :]] = (
                    value
                )
            elif name.startswith(fmt.XATTR_OVERLAY_PREFIX):
                pass  # composefs-internal (e.g. the root's opaque marker)
            else:
                x.user[name] = value
        if (x.metacopy is not None or x.redirect is not None) and (
            not is_reg or ino.datalayout != fmt.DATALAYOUT_CHUNK_BASED
        ):
            raise _err(f"inode {ino.nid}: overlay metacopy/redirect on a non-external file")
        return x

    def stat(self, ino: _Inode, xattrs: dict[bytes, bytes]) -> Stat:
        return Stat(ino.mode & 0o7777, ino.uid, ino.gid, ino.mtime, ino.mtime_nsec, xattrs)

    # -- directories ---------------------------------------------------------
    def dirents(self, ino: _Inode) -> list[tuple[bytes, int, int]]:
        """All (name, nid, file_type) of a directory, validated and sorted."""
        return list(zip(*self.dirent_lists(ino), strict=True))

    def dirent_lists(self, ino: _Inode) -> tuple[list[bytes], list[int], list[int]]:
        """`dirents` as three lists: names, nids, file types."""
        if ino.datalayout == fmt.DATALAYOUT_CHUNK_BASED:
            raise _err(f"directory {ino.nid}: chunk-based layout")
        if ino.size == 0:
            raise _err(f"directory {ino.nid} is empty (no . and ..)")
        start, count = self.blocks(ino)
        self.charge(ino.size)
        return self._dirent_lists(ino.nid, start, count, ino.size, ino.inline_start)

    def _dirent_lists(
        self, nid: int, start: int, count: int, size: int, inline_start: int
    ) -> tuple[list[bytes], list[int], list[int]]:
        """The dirents of `count` blocks from block `start`, then the inline
        tail (`size` bytes in all), the blocks checked (`blocks`) and charged."""
        names: list[bytes] = []
        nids: list[int] = []
        types: list[int] = []
        remaining = size
        block = self._dirent_block
        for i in range(count):
            length = _BLK if remaining > _BLK else remaining
            block((start + i) * _BLK, length, nid, names, nids, types)
            remaining -= length
        if remaining:
            block(inline_start, remaining, nid, names, nids, types)
        # Strictly increasing names (sorted and unique), compared in C.
        if len(names) > 1 and not all(map(_lt, names, names[1:])):
            raise _err(f"directory {nid}: entries not sorted or duplicated")
        return names, nids, types

    def _dirent_block(
        self,
        off: int,
        length: int,
        nid: int,
        names: list[bytes],
        nids: list[int],
        types: list[int],
    ) -> None:
        # Hot (once per directory block): the block's checks run in bulk
        # (C-level slices, all() and one translate over the name area); only a
        # block that fails one is walked entry by entry, for its message.
        data = self.data
        if length < fmt.DIRENT_SIZE:
            raise _err(f"directory {nid}: truncated dirent block")
        first_nameoff = data[off + 8] | data[off + 9] << 8  # the first dirent's nameoff
        if first_nameoff % fmt.DIRENT_SIZE or not 0 < first_nameoff < length:
            raise _err(f"directory {nid}: bad dirent name offset {first_nameoff}")
        count = first_nameoff // fmt.DIRENT_SIZE
        # One unpack for the block's whole dirent table.
        flat = _dirent_table(count).unpack_from(data, off)
        offs = flat[1::3]
        last = offs[-1]
        block = data[off : off + length]
        # The last name runs to a NUL or the end of the block.
        tail = block[last:].split(b"\0", 1)[0]
        if tail:
            block_names = [block[a:b] for a, b in pairwise(offs)]
            block_names.append(tail)
            # No empty name: the offsets increase (and the last is inside the
            # block), so the names are back to back and `area` is all of them:
            # one pass over it finds any "/" or NUL.
            area = block[first_nameoff : last + len(tail)]
            if (
                all(block_names)
                and area.translate(_NAME_BYTES) == area
                and (len(area) <= NAME_MAX or max(map(len, block_names)) <= NAME_MAX)
            ):
                names += block_names
                nids += flat[0::3]
                types += flat[2::3]
                return
        self._dirent_block_slow(off, length, nid, flat, count, names, nids, types)

    def _dirent_block_slow(
        self,
        off: int,
        length: int,
        nid: int,
        flat: tuple[int, ...],
        count: int,
        names: list[bytes],
        nids: list[int],
        types: list[int],
    ) -> None:
        """The block entry by entry (it raises the first problem found)."""
        data = self.data
        ents = [flat[i : i + 3] for i in range(0, 3 * count, 3)]
        for i, (child, nameoff, ftype) in enumerate(ents):
            if i + 1 < count:
                end = ents[i + 1][1]
                if not nameoff < end <= length:
                    raise _err(f"directory {nid}: bad dirent name offset {end}")
                name = data[off + nameoff : off + end]
            else:
                if nameoff >= length:
                    raise _err(f"directory {nid}: bad dirent name offset {nameoff}")
                # The last name runs to a NUL or the end of the block.
                name = data[off + nameoff : off + length].split(b"\0", 1)[0]
                if not name:
                    raise _err(f"directory {nid}: empty name")
            if len(name) > NAME_MAX or b"/" in name or b"\0" in name:
                raise _err(f"directory {nid}: invalid name {name!r}")
            names.append(name)
            nids.append(child)
            types.append(ftype)


@functools.cache
def _dirent_table(count: int) -> struct.Struct:
    """`count` dirents (fmt.DIRENT) in one struct (at most 341 per block)."""
    return struct.Struct("<" + "QHBx" * count)


# The "directory has whiteouts" markers V1 adds (C keeps them when reading).
_OPAQUE_MARKERS = frozenset((fmt.XATTR_OVERLAY_OPAQUE, fmt.XATTR_USERXATTR_OPAQUE))
_DROPPED_MARKERS = frozenset(
    (
        fmt.XATTR_OVERLAY_WHITEOUTS,
        fmt.XATTR_USERXATTR_WHITEOUT,
        fmt.XATTR_USERXATTR_WHITEOUTS,
    )
)


def _filter_bit(index: int, suffix: bytes) -> int:
    return (
        int(xxhash.xxh32_intdigest(suffix, seed=fmt.XATTR_FILTER_SEED + index))
        % fmt.XATTR_FILTER_BITS
    )


def _metacopy_digest(nid: int, value: bytes) -> str | None:
    """The fs-verity digest in an overlay metacopy value (empty = none, as C writes)."""
    if not value:
        return None
    if len(value) < 4:
        raise _err(f"inode {nid}: malformed overlay metacopy")
    version, length, flags, algo = fmt.METACOPY_HEADER.unpack_from(value)
    hashlen = fmt.METACOPY_DIGEST_SIZES.get(algo)
    if (
        version != fmt.METACOPY_VERSION
        or flags
        or hashlen is None
        or length != len(value)
        or length != 4 + hashlen
    ):
        raise _err(f"inode {nid}: malformed overlay metacopy")
    return value[4:].hex()


def external_parts(r: _Reader, ino: _Inode, x: _Xattrs) -> tuple[str | None, bytes | None]:
    """(digest, payload) of an external (chunk-based) file, checked: the
    tree's `Regular.digest` and `.payload`. Shared by the tree builder and the
    streamed dump (`erofs.dump`), so both accept exactly the same images."""
    nid = ino.nid
    if ino.size == 0 and r.epoch1:
        # composefs-rs (V2) keeps empty files that have a digest external;
        # C never writes an empty external file.
        raise _err(f"inode {nid}: chunk-based file of size 0")
    if (ino.u & 0xFFFF) & ~fmt.CHUNK_FORMAT_BLKBITS_MASK:
        # Only the low 16 bits are the chunk format (C may leave a block
        # address in the high half).
        raise _err(f"inode {nid}: unsupported chunk format {ino.u & 0xFFFF:#x}")
    if ino.size > _MAX_EXTERNAL_SIZE:
        raise _err(f"inode {nid}: file size {ino.size} too large for composefs")
    # The kernel reads one 4-byte chunk index per chunk right after the
    # xattrs; the data lives elsewhere, so every chunk must be a hole.
    chunkbits = fmt.BLOCK_BITS + (ino.u & fmt.CHUNK_FORMAT_BLKBITS_MASK)
    chunks = -(-ino.size // (1 << chunkbits))
    if not r.epoch1:
        # composefs-rs writes a single index whatever the size (only
        # files beyond 8 TiB have more chunks): check what it writes.
        chunks = 1
    elif chunks > _CHECKED_CHUNKS:
        # C leaves out the indexes of files too large for them to fit
        # in a block (> 8 PiB).
        chunks = 0
    end = ino.inline_start + 4 * chunks
    r.charge(4 * chunks)
    if end > r.n:
        raise _err(f"inode {nid}: chunk indexes extend beyond the image")
    if r.data[ino.inline_start : end] != _NULL_CHUNKS[: 4 * chunks]:
        raise _err(f"inode {nid}: external file with data blocks in the image")
    if x.metacopy is None:
        raise _err(f"inode {nid}: external file without overlay metacopy")
    digest = _metacopy_digest(nid, x.metacopy)
    # No redirect beside a digest is C's "payload -" (kept as b"").
    payload: bytes | None = b"" if digest is not None else None
    if x.redirect is not None:
        v = x.redirect
        if len(v) < 2 or v[:1] != b"/" or b"\0" in v:
            raise _err(f"inode {nid}: malformed overlay redirect {v!r}")
        payload = v[1:]
        if digest is not None and payload == f"{digest[:2]}/{digest[2:]}".encode():
            payload = None  # derived from the digest: nothing to remember
    return digest, payload


class _Builder:
    def __init__(self, data: bytes, keep_opaque_markers: bool, inline_data: bool = True) -> None:
        self.r = _Reader(data, keep_opaque_markers, inline_data)
        # nid -> (leaf, on-disk nlink, dirent type); a hardlink is the same Leaf.
        self.leaves: dict[int, tuple[Leaf, int, int]] = {}
        self.whiteout_nids: set[int] = set()
        self.dirs_seen: set[int] = set()

    def build(self) -> Directory:
        r = self.r
        root_nid = r.info.root_nid
        root_ino = r.inode(root_nid)
        if root_ino.ftype != fmt.S_IFDIR:
            raise _err("root inode is not a directory")
        root = self._directory(root_ino)
        self.dirs_seen.add(root_nid)
        stack: list[tuple[Directory, _Inode, int, int]] = [(root, root_ino, root_nid, 0)]
        while stack:
            d, ino, parent_nid, depth = stack.pop()
            stack.extend(self._fill(d, ino, parent_nid, depth, ino.nid == root_nid))
        return root

    def _directory(self, ino: _Inode) -> Directory:
        x = self.r.xattrs(ino)
        d = Directory(self.r.stat(ino, x.user))
        d.size = ino.size
        return d

    def _fill(
        self, d: Directory, ino: _Inode, parent_nid: int, depth: int, is_root: bool
    ) -> list[tuple[Directory, _Inode, int, int]]:
        r = self.r
        nid = ino.nid
        subdirs: list[tuple[Directory, _Inode, int, int]] = []
        dot = dotdot = False
        hex_slots = 0
        for name, child_nid, ftype in r.dirents(ino):
            if name == b"." or name == b"..":
                want = nid if name == b"." else parent_nid
                if child_nid != want or ftype != fmt.FT_DIR:
                    raise _err(f"directory {nid}: {name.decode()} points to inode {child_nid}")
                if name == b".":
                    dot = True
                else:
                    dotdot = True
                continue
            if depth >= MAX_DEPTH:
                raise _err(f"paths nested deeper than {MAX_DEPTH} components")
            is_slot = is_root and name in _HEX2
            hex_slots += is_slot
            cached = self.leaves.get(child_nid)
            if cached is not None:
                leaf, _, disk_ft = cached
                if ftype != disk_ft:
                    raise _err(f"directory {nid}: dirent type of {name!r} does not match its inode")
                if child_nid in self.whiteout_nids:
                    raise _err(f"whiteout inode {child_nid} is hardlinked")
                d.entries[name] = leaf
                continue
            child = r.inode(child_nid)
            if ftype != fmt.MODE_TO_FT[child.ftype]:
                raise _err(f"directory {nid}: dirent type of {name!r} does not match its inode")
            if child.ftype == fmt.S_IFDIR:
                if child_nid in self.dirs_seen:
                    raise _err(f"directory inode {child_nid} reached twice (hardlink or cycle)")
                self.dirs_seen.add(child_nid)
                sub = self._directory(child)
                d.entries[name] = sub
                subdirs.append((sub, child, nid, depth + 1))
                continue
            if child.ftype == fmt.S_IFCHR and child.u == 0 and r.epoch1:
                # A native whiteout: in V0/V1 only the root's stubs are, and
                # reading drops them (they are the writer's, not the tree's).
                if not is_slot:
                    raise _err(f"native whiteout {name!r} outside the root stub table")
                if child_nid in self.whiteout_nids:
                    raise _err(f"whiteout inode {child_nid} is hardlinked")
                if child.datalayout != fmt.DATALAYOUT_FLAT_PLAIN or child.size:
                    raise _err(f"whiteout stub {name!r} has data")
                r.raw_xattrs(child)  # validated, then dropped with the stub
                self.whiteout_nids.add(child_nid)
                continue
            leaf = self._leaf(child, name)
            if leaf.is_whiteout():
                self.whiteout_nids.add(child_nid)
            self.leaves[child_nid] = (leaf, child.nlink, ftype)
            d.entries[name] = leaf
        if not (dot and dotdot):
            raise _err(f"directory {nid} lacks . or ..")
        if is_root and r.epoch1 and hex_slots != len(_HEX2):
            raise _err(f"root has {hex_slots} of the 256 whiteout stub entries 00..ff")
        if ino.nlink != 2 + len(subdirs):
            raise _err(f"directory {nid}: link count {ino.nlink}, expected {2 + len(subdirs)}")
        return subdirs

    def _leaf(self, ino: _Inode, name: bytes) -> Leaf:
        r = self.r
        x = r.xattrs(ino)
        t = ino.ftype
        content: LeafContent
        if t == fmt.S_IFREG:
            if x.whiteout:
                if not r.epoch1:
                    raise _err(f"escaped whiteout {name!r} in a V2 image")
                if ino.datalayout != fmt.DATALAYOUT_FLAT_PLAIN or ino.size:
                    raise _err(f"escaped whiteout {name!r} has data")
                content = Device(fmt.S_IFCHR, 0)
            elif ino.datalayout == fmt.DATALAYOUT_CHUNK_BASED:
                content = self._external(ino, x)
            else:
                if ino.size > INLINE_CONTENT_MAX:
                    raise _err(
                        f"inline file {name!r} of {ino.size} bytes (max {INLINE_CONTENT_MAX})"
                    )
                if not ino.size:
                    content = Regular(0)
                elif r.inline_data:
                    content = Regular(ino.size, data=r.content(ino))
                else:
                    r.blocks(ino)  # checked, not read
                    content = Regular(ino.size, data=b"")
        elif t == fmt.S_IFLNK:
            if ino.datalayout == fmt.DATALAYOUT_CHUNK_BASED:
                raise _err(f"symlink {name!r}: chunk-based layout")
            if not 0 < ino.size <= SYMLINK_MAX:
                raise _err(f"symlink {name!r}: target length {ino.size}")
            if (
                r.epoch1
                and ino.datalayout == fmt.DATALAYOUT_FLAT_INLINE
                and (ino.pos % _BLK + (ino.inline_end - ino.pos) > _BLK)
            ):
                # Kernels before 6.12 refuse these (EFSCORRUPTED).
                raise _err(f"symlink {name!r}: inode and target straddle a block")
            target = r.content(ino)
            if b"\0" in target:
                raise _err(f"symlink {name!r}: NUL in target")
            content = Symlink(target)
        else:
            if ino.datalayout != fmt.DATALAYOUT_FLAT_PLAIN or ino.size:
                raise _err(f"special file {name!r} has data")
            if t in (fmt.S_IFCHR, fmt.S_IFBLK):
                content = Device(t, ino.u)
            elif t == fmt.S_IFIFO:
                content = Fifo()
            else:
                content = Socket()
        return Leaf(r.stat(ino, x.user), content)

    def _external(self, ino: _Inode, x: _Xattrs) -> Regular:
        digest, payload = external_parts(self.r, ino, x)
        return Regular(ino.size, digest=digest, payload=payload)

    def finish(self, root: Directory) -> None:
        """Keep on-disk link counts that the names in the tree do not explain."""
        from ..tree import leaf_link_counts

        counts = leaf_link_counts(root)
        for leaf, nlink, _ in self.leaves.values():
            names = counts.get(id(leaf))
            if names is not None:
                leaf.nlink = None if nlink == names else nlink


def read_image(
    data: bytes,
    *,
    toplevel: Collection[bytes] | None = None,
    keep_opaque_markers: bool = True,
    inline_data: bool = True,
) -> Directory:
    """Read a composefs image into a tree; `errors.ImageError` if it is invalid.

    `toplevel` keeps only those names in the root (C `composefs-info
    --filter`); the whole image is still validated. With
    `keep_opaque_markers=False` the `trusted.overlay.opaque` /
    `user.overlay.opaque` directory xattrs are dropped as composefs-rs does
    (then also where a user had set them). With `inline_data=False` inline
    file contents are validated but not read: such files get ``data=b""``
    (their `size` stays the real one).
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    b = _Builder(data, keep_opaque_markers, inline_data)
    try:
        with no_gc():  # a big tree of new objects, no cycles: see no_gc
            root = b.build()
    except (struct.error, ValueError, IndexError, KeyError, OverflowError) as e:
        # Belt and braces: every access is bounds-checked above, so this is
        # a reader bug; still, a bad image must not crash the caller. (The
        # fuzz test fails on this message.)
        raise _err(f"unchecked structure ({type(e).__name__}: {e})") from None
    if toplevel is not None:
        keep = set(toplevel)
        root.entries = {k: v for k, v in root.entries.items() if k in keep}
    b.finish(root)
    return root


def collect_objects(data: bytes) -> set[str]:
    """Backing paths (`xx/yyyy…`, relative to the object store) of every
    external file: the redirect path, or the one derived from the digest.

    This is what C `composefs-info objects` lists.
    """
    out: set[str] = set()
    for leaf in _external_leaves(read_image(data, inline_data=False)):
        assert isinstance(leaf.content, Regular)
        path = leaf.content.backing_path()
        if path is not None:
            out.add(path.decode("utf-8", "surrogateescape"))
    return out


def collect_digests(data: bytes) -> set[str]:
    """fs-verity digests (lowercase hex) of every external file that has one
    (the object ids a repository keeps alive)."""
    out: set[str] = set()
    for leaf in _external_leaves(read_image(data, inline_data=False)):
        assert isinstance(leaf.content, Regular)
        if leaf.content.digest is not None:
            out.add(leaf.content.digest)
    return out


def _external_leaves(root: Directory) -> list[Leaf]:
    """Each leaf whose content is an external file, once (hardlinks too)."""
    seen: set[int] = set()
    out: list[Leaf] = []
    for leaf in iter_leaves(root):
        c = leaf.content
        if (
            isinstance(c, Regular)
            and c.data is None
            # V2 may hold empty files by digest too
            and (c.size or c.digest or c.payload)
            and id(leaf) not in seen
        ):
            seen.add(id(leaf))
            out.append(leaf)
    return out


# Per-inode access for servers that answer one request at a time (the FUSE
# filesystem): validate the whole image once with `read_image`, then read
# inodes, raw xattrs, dirents and inline data lazily, bounds-checked as above.
ImageView = _Reader
RawInode = _Inode


_REDIRECT_PATH = re.compile(rb"/([0-9a-f]{2})/([0-9a-f]{126}|[0-9a-f]{62})(?![0-9a-f])")
_METACOPY_HEADERS = ((b"\x00\x24\x00\x01", 32), (b"\x00\x44\x00\x02", 64))


def scan_references(data: bytes) -> set[str]:
    """Everything in the bytes of an image that looks like a reference to an
    object: ``/xx/yyyy…`` backing paths (as object ids) and the digests of
    overlay metacopy values. For images `read_image` refuses: a caller that
    must not lose what such an image needs (gc) keeps all of these alive.
    Linear in the image size; finds at least what a reader would."""
    out = {m.group(1).decode() + m.group(2).decode() for m in _REDIRECT_PATH.finditer(data)}
    for header, size in _METACOPY_HEADERS:
        pos = data.find(header)
        while pos >= 0:
            digest = data[pos + 4 : pos + 4 + size]
            if len(digest) == size:
                out.add(digest.hex())
            pos = data.find(header, pos + 1)
    return out
