"""Build composefs EROFS images from a `tree.Directory` (IO-free: tree in, bytes out).

Three formats (see `format.FormatVersion`):

* V0 / V1 ("epoch 1") reproduce C mkcomposefs 1.0.8 byte for byte: inodes in
  breadth-first order, 256 whiteout stubs in the root, user whiteouts escaped
  as regular files, compact inodes where they fit, build_time = minimum mtime,
  shared xattrs in descending key order.
* V2 reproduces composefs-rs 0.7.0: depth-first order, extended inodes only,
  native whiteouts, build_time 0, ascending shared-xattr table.

The layout is computed in one pass over the collected inodes (positions,
nids, block addresses) and emitted in a second, because directory entries
refer to inodes that come later in the table.
"""

from __future__ import annotations

import gc
import struct
from collections import Counter, deque
from collections.abc import Callable, Sequence
from itertools import chain
from operator import attrgetter, itemgetter

import xxhash

from .. import limits
from ..errors import TreeError
from ..tree import Device, Directory, Fifo, Leaf, Regular, Socket, Stat, Symlink
from . import format as F
from .format import FormatVersion

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing

if TYPE_CHECKING:  # typing costs milliseconds at every CLI start
    from typing import Any

__all__ = ["FormatVersion", "mkfs", "mkfs_buffer"]

BLOCK = F.BLOCK_SIZE
HALF_BLOCK = BLOCK // 2
PATH_MAX = limits.PATH_MAX
NAME_MAX = limits.NAME_MAX
MAX_DEPTH = limits.MAX_DEPTH  # what the reader accepts back
MAX_NONINLINE_CHUNKS = 1024  # C: LCFS_MAX_NONINLINE_CHUNKS
MAX_SHARED_PER_INODE = 0x80  # C: EROFS_XATTR_LONG_PREFIX caps shared refs per inode

_pack_dirent = F.DIRENT.pack
_pack_xattr_entry = F.XATTR_ENTRY.pack
_pack_ibody = F.XATTR_IBODY_HEADER.pack
_xxh32 = xxhash.xxh32_intdigest

_ZEROS = bytes(BLOCK)
_ONE_START = (0,)  # dir_starts of a directory whose dirents fit one block
_first = itemgetter(0)
_PADS = tuple(bytes(i) for i in range(32))  # slot-alignment padding, reused
_NULL_CHUNKS_BLOCK = b"\xff" * BLOCK

_FT = F.MODE_TO_FT
S_IFDIR = F.S_IFDIR
S_IFREG = F.S_IFREG
S_IFLNK = F.S_IFLNK
S_IFCHR = F.S_IFCHR
S_IFBLK = F.S_IFBLK
S_IFIFO = F.S_IFIFO
S_IFSOCK = F.S_IFSOCK

# Prefix matching order. C (epoch 1) has no "lustre." entry; composefs-rs
# matches the longest index first, which is equivalent for these prefixes.
_PREFIXES_EPOCH1: tuple[tuple[bytes, int], ...] = (
    (b"user.", F.XATTR_INDEX_USER),
    (b"system.posix_acl_access", F.XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", F.XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", F.XATTR_INDEX_TRUSTED),
    (b"security.", F.XATTR_INDEX_SECURITY),
)
_PREFIXES_EPOCH2: tuple[tuple[bytes, int], ...] = (
    *_PREFIXES_EPOCH1,
    (b"lustre.", F.XATTR_INDEX_LUSTRE),
)


def _split_key(key: bytes, prefixes: tuple[tuple[bytes, int], ...]) -> tuple[int, bytes]:
    for prefix, index in prefixes:
        if key.startswith(prefix):
            return index, key[len(prefix) :]
    return 0, key


class _XattrCodec:
    """Caches the on-disk encoding and filter bit of each distinct xattr."""

    def __init__(self, prefixes: tuple[tuple[bytes, int], ...]) -> None:
        self.prefixes = prefixes
        self._split: dict[bytes, tuple[int, bytes, int]] = {}
        self._entries: dict[tuple[bytes, bytes], bytes] = {}
        self._heads: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}

    def split(self, key: bytes) -> tuple[int, bytes, int]:
        """(name_index, suffix, filter bit) of a full key."""
        r = self._split.get(key)
        if r is None:
            index, suffix = _split_key(key, self.prefixes)
            if not key or 0 in key:
                # the reader (and the kernel) see names as C strings
                raise TreeError(limits.xattr_problem(key, b"", False) or "")
            if len(suffix) > 255:
                raise TreeError(f"xattr name too long: {key[:64]!r}")
            bit = 1 << (_xxh32(suffix, F.XATTR_FILTER_SEED + index) & (F.XATTR_FILTER_BITS - 1))
            r = self._split[key] = (index, suffix, bit)
        return r

    def entry(self, key: bytes, value: bytes) -> bytes:
        kv = (key, value)
        e = self._entries.get(kv)
        if e is None:
            e = self._entries[kv] = self.encode(key, value)
        return e

    def encode(self, key: bytes, value: bytes) -> bytes:
        """`entry` without caching the pair, for a pair written once (V2
        keeps in an inode only the pairs no other inode has): what precedes
        the value and the padding depend on the key and the value's length
        only, and those repeat (overlay metacopy and redirect of each file)."""
        n = len(value)
        fix = self._heads.get((key, n))
        if fix is None:
            if n > 0xFFFF:
                raise TreeError(f"xattr value too long for {key!r}")
            index, suffix, _bit = self.split(key)
            head = _pack_xattr_entry(len(suffix), index, n) + suffix
            fix = self._heads[(key, n)] = (head, _ZEROS[: -(len(head) + n) & 3])
        return fix[0] + value + fix[1]


class _Inode:
    """One inode to write, with the layout facts the two passes share.

    Slots, not a per-instance dict: a dict grown attribute by attribute
    through the passes ends at ~830 bytes an inode (plus the resizes on the
    way); the slots take ~290 (about 60 MB less at the peak of a 112k-entry
    image, and a faster layout pass).
    """

    __slots__ = (
        "blkaddr",
        "chunk_count",
        "chunk_format",
        "compact",
        "data",
        "dir_starts",
        "entries",
        "external",
        "ftype",
        "gid",
        "metacopy",
        "mode",
        "mtime",
        "n_blocks",
        "nid",
        "nlink",
        "nsec",
        "plain",
        "rdev",
        "redirect",
        "shared",
        "size",
        "tail",
        "uid",
        "xattr_local",
        "xattr_size",
        "xattrs",
        "xfilter",
    )
    ftype: int
    mode: int
    uid: int
    gid: int
    mtime: int
    nsec: int
    xattrs: dict[bytes, bytes]
    size: int
    rdev: int
    data: bytes | None  # inline file content or symlink target
    external: bool
    chunk_format: int
    chunk_count: int
    nlink: int
    # directory entries including "." and "..", sorted by name
    entries: Sequence[tuple[bytes, _Inode]]
    dir_starts: Sequence[int]  # index of the first entry of each dirent block
    shared: Sequence[int]
    # epoch 1, an external file with no xattrs of its own: its overlay
    # metacopy value and redirect path (without the leading "/" the xattr
    # value has) are kept here instead of in `xattrs` (the common case,
    # handled in bulk by _share_epoch1)
    plain: bool
    metacopy: bytes
    redirect: bytes | None
    xattr_local: bytes
    xattr_size: int
    xfilter: int
    n_blocks: int
    tail: int
    compact: bool
    nid: int
    blkaddr: int

    def __init__(self, ftype: int, mode: int, st: Stat, xattrs: dict[bytes, bytes]) -> None:
        self.ftype = ftype
        self.mode = mode
        self.uid = st.uid
        self.gid = st.gid
        self.mtime = st.mtime
        self.nsec = st.mtime_nsec
        self.xattrs = xattrs
        # Only what every pass reads is set here (this runs once per inode):
        # the other slots are set by the pass that decides them, before any
        # read (entries/dir_starts of directories, chunk_format/chunk_count
        # of external files, shared/xattr_local/xfilter when xattr_size is
        # set, metacopy/redirect of plain files, compact/nid/blkaddr by the
        # layout). The collection builds plain inodes without calling this:
        # a slot set here must be set there too.
        self.size = 0
        self.rdev = 0
        self.data = None
        self.external = False
        self.nlink = 1
        self.plain = False
        self.xattr_size = 0
        self.n_blocks = 0
        self.tail = 0


# --------------------------------------------------------------------------
# tree checks shared by both epochs

_BAD_NAMES = frozenset((b"", b".", b".."))


def _bad_name(name: bytes) -> TreeError:
    if len(name) > NAME_MAX:
        return TreeError(f"file name too long: {name[:64]!r}...")
    return TreeError(f"invalid file name {name!r}")


def _scan(root: Directory) -> tuple[dict[int, int], dict[int, tuple[int, bytes]]]:
    """Name count of every leaf (by id) and, for leaves with several names,
    the (directory id, name) where C places the inode: the leaf's `primary`
    path when it still names the leaf, else the first name in depth-first
    sorted order. Rejects hardlinked directories, cycles and invalid names."""
    counts: dict[int, int] = {}
    get = counts.get
    seen_dirs = {id(root)}
    stack = [root]
    multi = False
    while stack:
        d = stack.pop()
        for name, child in d.entries.items():
            if name in _BAD_NAMES or len(name) > NAME_MAX or b"/" in name or b"\0" in name:
                raise _bad_name(name)
            if isinstance(child, Directory):
                if id(child) in seen_dirs:
                    raise TreeError(f"directory {name!r} is hardlinked or part of a cycle")
                seen_dirs.add(id(child))
                stack.append(child)
            else:
                lid = id(child)
                n = get(lid)
                if n is None:
                    counts[lid] = 1
                else:
                    counts[lid] = n + 1
                    multi = True
    first: dict[int, tuple[int, bytes]] = {}
    if multi:
        # only hardlinks need the (slower) depth-first sorted walk
        at_primary: set[int] = set()
        dstack: list[tuple[Directory, bytes]] = [(root, b"")]
        while dstack:
            d, dpath = dstack.pop()
            did = id(d)
            subdirs = []
            for name, child in sorted(d.entries.items()):
                if isinstance(child, Directory):
                    subdirs.append((child, dpath + b"/" + name))
                    continue
                lid = id(child)
                if counts[lid] < 2 or lid in at_primary:
                    continue
                primary = child.primary
                if primary is not None and primary == dpath + b"/" + name:
                    first[lid] = (did, name)
                    at_primary.add(lid)
                elif lid not in first:
                    first[lid] = (did, name)
            dstack.extend(reversed(subdirs))
    return counts, first


def _too_large(inodes: Sequence[_Inode], target: _Inode, size: int) -> TreeError:
    """The error for a file with more chunks than composefs can index, naming
    one of its paths. Inodes carry no names, so on this (rare) path the
    directory entries are searched from the root (inodes[0])."""
    todo: list[tuple[bytes, _Inode]] = [(b"", inodes[0])]
    path = b"?"
    while todo:
        prefix, d = todo.pop()
        for name, child in d.entries:
            if name == b"." or name == b"..":
                continue
            if child is target:
                path = prefix + b"/" + name
                todo.clear()
                break
            if child.ftype == S_IFDIR:
                todo.append((prefix + b"/" + name, child))
    shown = path.decode("utf-8", "backslashreplace")
    return TreeError(f"{shown}: file too large for composefs ({size} bytes)")


def _metacopy(digest: str | None) -> bytes:
    if digest is None:
        return b""
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raise TreeError(f"invalid fs-verity digest {digest!r}") from None
    if len(raw) not in (32, 64):
        raise TreeError(f"invalid fs-verity digest {digest!r}")
    algo = F.METACOPY_ALGO_SHA256 if len(raw) == 32 else F.METACOPY_ALGO_SHA512
    return F.METACOPY_HEADER.pack(F.METACOPY_VERSION, 4 + len(raw), 0, algo) + raw


def _chunking(size: int) -> tuple[int, int]:
    """C erofs_compute_chunking: (chunk format = chunkbits - 12, chunk count)."""
    chunkbits = (size - 1).bit_length() if size > 1 else 1
    if chunkbits < F.BLOCK_BITS:
        chunkbits = F.BLOCK_BITS
    if chunkbits - F.BLOCK_BITS > F.CHUNK_FORMAT_BLKBITS_MASK:
        chunkbits = F.CHUNK_FORMAT_BLKBITS_MASK + F.BLOCK_BITS
    chunksize = 1 << chunkbits
    return chunkbits - F.BLOCK_BITS, (size + chunksize - 1) // chunksize


def _head(
    header: bytes,
    root_nid: int,
    inos: int,
    build_time: int,
    build_time_nsec: int,
    blocks: int,
    xattr_blkaddr: int,
) -> list[bytes]:
    """Composefs header, padding and EROFS superblock: the image's first
    1152 bytes, as the start of the output list. Only these fields differ
    between formats; every other superblock field is zero."""
    sb = F.SUPERBLOCK.pack(
        F.EROFS_MAGIC,
        0,  # checksum
        F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER,
        F.BLOCK_BITS,
        0,  # extslots
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        F.INODE_TABLE_OFFSET // BLOCK,  # meta_blkaddr (0: the table is in block 0)
        xattr_blkaddr,
        b"",
        b"",
        0, 0, 0, 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    return [header, bytes(F.SUPERBLOCK_OFFSET - len(header)), sb]


_OVL = F.XATTR_OVERLAY_PREFIX
_OVL_LEN = len(_OVL)
_OVL_ESC = F.XATTR_OVERLAY_ESCAPED_PREFIX


def _own_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A fresh copy with user `trusted.overlay.X` renamed to
    `trusted.overlay.overlay.X` (the escaping both references do)."""
    out: dict[bytes, bytes] = {}
    for k, v in xattrs.items():
        if k.startswith(_OVL):
            k = _OVL_ESC + k[_OVL_LEN:]
        out[k] = v
    return out


def _dir_inode(d: Directory, epoch1: bool) -> _Inode:
    st = d.stat
    xa = st.xattrs
    if xa:
        xa = _own_xattrs(xa if epoch1 else dict(sorted(xa.items())))
    else:
        xa = {}
    return _Inode(S_IFDIR, S_IFDIR | (st.mode & 0o7777), st, xa)


def _leaf_inode(leaf: Leaf, name: bytes, names: int, epoch1: bool) -> _Inode:
    """The inode of a leaf (before whiteout escaping), with its overlay
    xattrs: metacopy and redirect first for external files, as composefs-rs
    orders them (C sorts all xattrs by name later anyway)."""
    st = leaf.stat
    c = leaf.content
    perm = st.mode & 0o7777
    ct = type(c)
    xa: dict[bytes, bytes] = {}
    if ct is Regular:
        assert isinstance(c, Regular)
        ino = _Inode(S_IFREG, S_IFREG | perm, st, xa)
        data = c.data
        if data is not None:
            ino.data = data
            ino.size = len(data)
        else:
            size = c.size
            if size < 0:
                raise TreeError(f"negative size for {name!r}")
            ino.size = size
            # C: any non-empty file without content is external; composefs-rs
            # also treats a digest-named empty file as external.
            if size > 0 or (not epoch1 and (c.digest is not None or c.payload is not None)):
                ino.external = True
                mc = _metacopy(c.digest) if c.digest is not None else b""
                path = c.payload
                if path is None and c.digest is not None:
                    dg = c.digest
                    path = f"{dg[:2]}/{dg[2:]}".encode()
                if epoch1 and not st.xattrs:
                    ino.plain = True
                    ino.metacopy = mc
                    ino.redirect = path or None
                    return ino
                xa[F.XATTR_OVERLAY_METACOPY] = mc
                if path:
                    xa[F.XATTR_OVERLAY_REDIRECT] = b"/" + path
    elif ct is Symlink:
        assert isinstance(c, Symlink)
        target = c.target
        if not target:
            raise TreeError(f"symlink {name!r} has an empty target")
        if len(target) >= PATH_MAX or b"\0" in target:
            raise TreeError(f"invalid symlink target for {name!r}")
        ino = _Inode(S_IFLNK, S_IFLNK | perm, st, xa)
        ino.data = target
        ino.size = len(target)
    elif ct is Device:
        assert isinstance(c, Device)
        if c.kind not in (S_IFCHR, S_IFBLK):
            raise TreeError(f"invalid device type for {name!r}")
        if c.kind == S_IFCHR and c.rdev == 0 and names > 1:
            raise TreeError(f"whiteout {name!r} is hardlinked")
        if not 0 <= c.rdev <= 0xFFFFFFFF:
            raise TreeError(f"device number of {name!r} does not fit in 32 bits")
        ino = _Inode(c.kind, c.kind | perm, st, xa)
        ino.rdev = c.rdev
    elif ct is Fifo:
        ino = _Inode(S_IFIFO, S_IFIFO | perm, st, xa)
    elif ct is Socket:
        ino = _Inode(S_IFSOCK, S_IFSOCK | perm, st, xa)
    else:
        raise TreeError(f"unknown content for {name!r}: {c!r}")
    own = st.xattrs
    if own:
        _add_own_xattrs(xa, own, name, ct is Regular and (not epoch1 or ino.size > 0), epoch1)
    return ino


def _add_own_xattrs(
    xa: dict[bytes, bytes], own: dict[bytes, bytes], name: bytes, no_marker: bool, epoch1: bool
) -> None:
    """Add a leaf's own xattrs to `xa` (after its overlay xattrs), with user
    `trusted.overlay.X` escaped; V2 (not `epoch1`) adds them sorted.
    `no_marker`: refuse the escaped-whiteout marker (see below)."""
    if no_marker and limits.WHITEOUT_XATTR in own:
        # It is escaped into the escaped-whiteout marker. C's formats
        # (V0/V1) write an empty such file exactly as a whiteout (C's own
        # FUSE test rebuilds images from mounts that show whiteouts that
        # way), and it reads back as one; V2 has no escaped whiteouts and
        # a whiteout has no data, so the reader would refuse those.
        problem = limits.xattr_problem(limits.WHITEOUT_XATTR, b"", True)
        raise TreeError(f"{limits.show(name)}: {problem}")
    for k, v in own.items() if epoch1 else sorted(own.items()):
        if k.startswith(_OVL):
            k = _OVL_ESC + k[_OVL_LEN:]
        xa[k] = v


# --------------------------------------------------------------------------
# epoch 1 (C mkcomposefs)


# The xattrs of every "plain" inode (never written to: `plain` inodes keep
# their overlay xattrs in `metacopy`/`redirect`), one dict for all of them.
_NO_XATTRS: dict[bytes, bytes] = {}


class _HasHardlinks(Exception):
    """The optimistic single-pass collection met a leaf with several names."""


def _collect_epoch1(root: Directory, mark_opaque: bool) -> tuple[list[_Inode], bool]:
    """Breadth-first inode list as C `lcfs_compute_tree` builds it, after the
    C rewrites (overlay xattrs, escaped whiteouts, root stubs). Returns the
    inodes and whether the tree had user whiteouts.

    Most trees have no hardlinks: one pass validates and collects them; a
    tree with hardlinks is scanned first to find each leaf's first name."""
    try:
        return _collect_epoch1_pass(root, mark_opaque, None, {})
    except _HasHardlinks:
        return _collect_epoch1_pass(root, mark_opaque, *_scan(root))


def _collect_epoch1_pass(
    root: Directory,
    mark_opaque: bool,
    counts: dict[int, int] | None,
    first: dict[int, tuple[int, bytes]],
) -> tuple[list[_Inode], bool]:
    leaf_inodes: dict[int, _Inode] = {}
    has_whiteout = False
    deferred = False
    # (leaves by identity: Leaf has no __eq__, and no id() int to make)
    seen_leaves: set[Leaf] = set()
    seen_dirs = {id(root)}

    r = _dir_inode(root, True)
    inodes = [r]
    append = inodes.append
    new = object.__new__
    pending: list[tuple[_Inode, list[tuple[bytes, Any]]]] = []
    queue: deque[tuple[Directory, _Inode, _Inode, int]] = deque([(root, r, r, 0)])
    popleft = queue.popleft
    while queue:
        d, me, parent, depth = popleft()
        if depth >= MAX_DEPTH and d.entries:
            raise TreeError(limits.depth_error())
        did = id(d)
        raw: list[tuple[bytes, Any]] = [(b".", me), (b"..", parent)]
        subdirs = 0
        entries = d.entries
        names = sorted(entries)
        for name in names:
            child = entries[name]
            # (`int in bytes` is a cheap byte search: 47 is "/")
            if counts is None and (
                len(name) > NAME_MAX or name in _BAD_NAMES or 47 in name or 0 in name
            ):
                raise _bad_name(name)
            if isinstance(child, Directory):
                if counts is None:
                    if id(child) in seen_dirs:
                        raise TreeError(f"directory {name!r} is hardlinked or part of a cycle")
                    seen_dirs.add(id(child))
                subdirs += 1
                ci = _dir_inode(child, True)
                append(ci)
                queue.append((child, ci, me, depth + 1))
                raw.append((name, ci))
                continue
            if counts is None:
                if child in seen_leaves:
                    raise _HasHardlinks
                seen_leaves.add(child)
                n = 1
            else:
                lid = id(child)
                n = counts[lid]
                if n > 1 and first[lid] != (did, name):
                    # a later name of a hardlinked leaf: resolved at the end
                    raw.append((name, child))
                    deferred = True
                    continue
            nl = child.nlink
            c = child.content
            st = child.stat
            if type(c) is Regular and c.data is None and c.size > 0 and not st.xattrs:
                # The most common leaf by far: external content and no xattrs
                # of its own (what `_leaf_inode` does, without its branches).
                digest = c.digest
                path = c.payload
                if path is None and digest is not None:
                    path = f"{digest[:2]}/{digest[2:]}".encode()
                # _Inode(...) without the class call, setting what the
                # passes read of a plain inode (rdev and data they do not)
                li = new(_Inode)
                li.ftype = S_IFREG
                li.mode = S_IFREG | (st.mode & 0o7777)
                li.uid = st.uid
                li.gid = st.gid
                li.mtime = st.mtime
                li.nsec = st.mtime_nsec
                li.xattrs = _NO_XATTRS
                li.size = c.size
                li.external = True
                li.nlink = nl if nl is not None else n
                li.plain = True
                li.metacopy = b"" if digest is None else _metacopy(digest)
                li.redirect = path or None
                li.xattr_size = 0
                li.n_blocks = 0
                li.tail = 0
                if n > 1:
                    leaf_inodes[lid] = li
                append(li)
                raw.append((name, li))
                continue
            li = _leaf_inode(child, name, n, True)
            li.nlink = nl if nl is not None else n
            if li.ftype == S_IFCHR and li.rdev == 0:
                # user whiteout: C stores it as an empty regular file with markers
                has_whiteout = True
                li.ftype = S_IFREG
                li.mode = S_IFREG | (li.mode & 0o7777)
                xa = li.xattrs
                xa[F.XATTR_OVERLAY_WHITEOUT] = b""
                xa[F.XATTR_USERXATTR_WHITEOUT] = b""
                mx = me.xattrs
                mx[F.XATTR_OVERLAY_WHITEOUTS] = b""
                mx[F.XATTR_USERXATTR_WHITEOUTS] = b""
                if mark_opaque:
                    # composefs_version >= 1 marks such directories opaque too
                    mx[F.XATTR_OVERLAY_OPAQUE] = b"x"
                    mx[F.XATTR_USERXATTR_OPAQUE] = b"x"
            if n > 1:
                leaf_inodes[lid] = li
            append(li)
            raw.append((name, li))
        me.nlink = 2 + subdirs
        if me is r:
            _add_stubs(r, root, raw, inodes)  # (entries re-sorted below)
        elif not names or names[0] > b"..":
            # the entries are "." and ".." then the names in this order: the
            # names joined, for the dirents (a directory has no other data)
            me.data = b"..." + b"".join(names)
        pending.append((me, raw))

    for me, raw in pending:
        if deferred:
            raw = [
                (name, obj if type(obj) is _Inode else leaf_inodes[id(obj)]) for name, obj in raw
            ]
        # Already sorted ("." and ".." then the sorted names, and their
        # joined names kept in data) unless a name sorts before ".." or the
        # root's stubs were added; names are unique within a directory, so
        # tuples compare by name only.
        if me.data is None:
            raw.sort()
        me.entries = raw
    r.xattrs[F.XATTR_OVERLAY_OPAQUE_ROOT] = b"y"
    return inodes, has_whiteout


def _add_stubs(
    r: _Inode, root: Directory, raw: list[tuple[bytes, Any]], inodes: list[_Inode]
) -> None:
    """The 256 whiteout stubs `00`..`ff` (C `add_overlay_whiteouts`). C adds
    them as root children before numbering, so in BFS order they interleave
    with the root's own children by name."""
    selinux = root.stat.xattrs.get(F.XATTR_SECURITY_SELINUX)
    # inodes[1:] are exactly the root's children numbered so far, in raw's order
    merged = [(n, o) for n, o in raw[2:] if type(o) is _Inode]
    assert len(merged) == len(inodes) - 1
    st = Stat(0o644, r.uid, r.gid, r.mtime, r.nsec)
    for i in range(F.WHITEOUT_STUB_COUNT):
        name = b"%02x" % i
        if name in root.entries:
            continue
        xa = {F.XATTR_SECURITY_SELINUX: selinux} if selinux is not None else {}
        s = _Inode(S_IFCHR, S_IFCHR | 0o644, st, xa)
        merged.append((name, s))
        raw.append((name, s))
    merged.sort()
    del inodes[1:]
    inodes.extend(i for _, i in merged)


_mtime_of = attrgetter("mtime")


def _share_epoch1(inodes: list[_Inode], codec: _XattrCodec) -> tuple[list[bytes], set[bytes]]:
    """C `compute_erofs_shared_xattrs`: (key, value) pairs used more than once
    go to the shared table, written in descending (key, len(value), value)
    order; each inode refers to at most 128 of them. Local xattrs are
    sorted by name (C `cmp_xattr`). Returns the table and every xattr name
    used.

    "Plain" external files (metacopy and maybe redirect, nothing else) are
    most of a real tree and are handled in bulk."""
    MC, RD = F.XATTR_OVERLAY_METACOPY, F.XATTR_OVERLAY_REDIRECT
    general = [ino for ino in inodes if ino.xattrs]
    plain = [ino for ino in inodes if ino.plain]
    counts = Counter(chain.from_iterable(ino.xattrs.items() for ino in general))
    mc_counts = Counter([ino.metacopy for ino in plain])
    rd_counts = Counter([ino.redirect for ino in plain if ino.redirect is not None])
    multi = {kv for kv, n in counts.items() if n > 1}
    multi.update((MC, m) for m, n in mc_counts.items() if n > 1 or (MC, m) in counts)
    # (plain redirects are stored without the "/" that every value has)
    rd_general = {v[1:] for k, v in counts if k == RD and v[:1] == b"/"}
    multi.update((RD, b"/" + r) for r, n in rd_counts.items() if n > 1 or r in rd_general)
    ordered = sorted(multi, key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
    offsets: dict[tuple[bytes, bytes], int] = {}
    table: list[bytes] = []
    off = 0
    entry = codec.entry
    for kv in ordered:
        e = entry(*kv)
        offsets[kv] = off
        table.append(e)
        off += len(e)
    # (name index, suffix, filter bit) of every distinct name, looked up inline below
    names = {k for k, _ in counts}
    names.update((MC, RD))
    info = {k: codec.split(k) for k in names}
    oget = offsets.get
    pack = _pack_xattr_entry
    zeros = _ZEROS
    for ino in general:
        xa = ino.xattrs
        items = sorted(xa.items()) if len(xa) > 1 else xa.items()
        shared: list[int] = []
        local: list[bytes] = []
        filt = 0
        for kv in items:
            k, v = kv
            index, suffix, bit = info[k]
            filt |= bit
            o = oget(kv)
            if o is not None and len(shared) < MAX_SHARED_PER_INODE:
                shared.append(o)
            else:
                if len(v) > 0xFFFF:
                    raise TreeError(f"xattr value too long for {k!r}")
                e = pack(len(suffix), index, len(v)) + suffix + v
                pad = -len(e) & 3
                local.append(e + zeros[:pad] if pad else e)
        ino.shared = tuple(shared)
        loc = ino.xattr_local = b"".join(local)
        ino.xattr_size = 12 + 4 * len(shared) + len(loc)
        ino.xfilter = filt

    # plain external files: metacopy sorts before redirect
    mc_off = {v: o for (k, v), o in offsets.items() if k == MC}
    rd_off = {v[1:]: o for (k, v), o in offsets.items() if k == RD and v[:1] == b"/"}
    mc_get, rd_get = mc_off.get, rd_off.get
    mc_index, mc_suffix, mc_bit = info[MC]
    rd_index, rd_suffix, rd_bit = info[RD]
    # entry header (for the redirect with its "/") and padding, by value length
    mc_heads: dict[int, tuple[bytes, bytes]] = {}
    rd_heads: dict[int, tuple[bytes, bytes]] = {}
    mc_rd_bit = mc_bit | rd_bit
    for ino in plain:
        m = ino.metacopy
        r = ino.redirect
        o = mc_get(m)
        if o is not None:
            sh: tuple[int, ...] = (o,)
            mh = mpad = m = b""
        else:
            sh = ()
            hp = mc_heads.get(len(m))
            if hp is None:
                h = pack(len(mc_suffix), mc_index, len(m)) + mc_suffix
                hp = mc_heads[len(m)] = (h, zeros[: -(len(h) + len(m)) & 3])
            mh, mpad = hp
        filt = mc_bit
        rh = rpad = b""
        if r is not None:
            filt = mc_rd_bit
            o = rd_get(r)
            if o is not None:
                sh += (o,)
                r = b""
            else:
                n = len(r) + 1
                hp = rd_heads.get(n)
                if hp is None:
                    if n > 0xFFFF:
                        raise TreeError("backing path too long")
                    h = pack(len(rd_suffix), rd_index, n) + rd_suffix + b"/"
                    hp = rd_heads[n] = (h, zeros[: -(len(h) + n - 1) & 3])
                rh, rpad = hp
        else:
            r = b""
        loc = b"".join((mh, m, mpad, rh, r, rpad))
        ino.shared = sh
        ino.xattr_local = loc
        ino.xattr_size = 12 + 4 * len(sh) + len(loc)
        ino.xfilter = filt
    return table, names


def _dir_split(ino: _Inode) -> int:
    """Greedy packing of a directory's dirents into 4096-byte blocks: sets
    `dir_starts` (first entry of each block plus the remainder) and returns
    the remainder's byte size."""
    entries = ino.entries
    names = ino.data  # see _dirent_chunk
    total = 12 * len(entries) + (
        len(names) if names is not None else sum(map(len, map(_first, entries)))
    )
    if total <= BLOCK:  # the common case: one block (or an inline tail)
        ino.dir_starts = _ONE_START
        return total
    starts = [0]
    block_size = 0
    i = 0
    for name, _ in entries:
        ln = 12 + len(name)
        if block_size + ln > BLOCK:
            starts.append(i)
            block_size = 0
        block_size += ln
        i += 1
    ino.dir_starts = starts
    return block_size


def _dirent_chunk(entries: Sequence[tuple[bytes, _Inode]], names: bytes | None = None) -> bytes:
    """The dirents of `entries`, then their names (`names`, when given, is
    those names joined: epoch 1 keeps them so in a directory inode's `data`
    when its entries are "." and ".." then the names in collection order)."""
    nameoff = 12 * len(entries)
    heads: list[bytes] = []
    ft = _FT
    for name, target in entries:
        heads.append(_pack_dirent(target.nid, nameoff, ft[target.ftype]))
        nameoff += len(name)
    if names is not None:
        heads.append(names)
    else:
        heads.extend(map(_first, entries))
    return b"".join(heads)


def _dir_chunks(ino: _Inode) -> tuple[list[bytes], bytes]:
    """(full-block chunks, inline tail) of a directory whose n_blocks/tail are final."""
    entries = ino.entries
    starts = ino.dir_starts
    if len(starts) == 1 and ino.tail:  # the common case: everything inline
        return [], _dirent_chunk(entries, ino.data)
    bounds = [*starts, len(entries)]
    chunks = [entries[bounds[i] : bounds[i + 1]] for i in range(len(starts))]
    rest = chunks.pop()
    blocks = [_dirent_chunk(c) for c in chunks]
    if len(blocks) < ino.n_blocks:
        blocks.append(_dirent_chunk(rest))
        rest = ()
    tail = _dirent_chunk(rest) if rest and ino.tail else b""
    return blocks, tail


def _layout_epoch1(inodes: list[_Inode], min_mtime: tuple[int, int]) -> tuple[int, int]:
    """C `compute_erofs_inodes`: data sizes, compact or extended, padding
    that keeps inline tails inside one block, nids; returns inodes_end and
    the number of data blocks."""
    pos = F.INODE_TABLE_OFFSET
    min_sec, min_nsec = min_mtime
    blocks = 0
    for ino in inodes:
        ft = ino.ftype
        # data size: nb blocks out of line plus an inline tail
        nb = tail = 0
        if ft == S_IFREG:
            size = ino.size
            if size > 0:
                if ino.external:
                    fmt = (size - 1).bit_length() - F.BLOCK_BITS
                    if fmt <= F.CHUNK_FORMAT_BLKBITS_MASK:
                        # _chunking's answer for all but huge files: one chunk
                        ino.chunk_format = fmt if fmt > 0 else 0
                        tail = 4
                    else:
                        fmt, count = _chunking(size)
                        if count > MAX_NONINLINE_CHUNKS:
                            raise _too_large(inodes, ino, size)
                        ino.chunk_format = fmt
                        tail = count * 4
                else:
                    nb, tail = divmod(size, BLOCK)
                    if tail > HALF_BLOCK:
                        nb += 1
                        tail = 0
        elif ft == S_IFDIR:
            tail = _dir_split(ino)
            nb = len(ino.dir_starts) - 1
            if tail > HALF_BLOCK:
                nb += 1
                tail = 0
            size = nb * BLOCK + tail
        else:
            size = ino.size
            if ft == S_IFLNK:
                tail = size
        uid, gid = ino.uid, ino.gid
        if uid > 0xFFFF or gid > 0xFFFF or uid < 0 or gid < 0:
            if not (0 <= uid <= 0xFFFFFFFF and 0 <= gid <= 0xFFFFFFFF):
                raise TreeError(f"uid/gid {uid}/{gid} out of range")
            compact = False
        else:
            compact = (
                ino.mtime == min_sec
                and ino.nsec == min_nsec
                and ino.nlink <= 0xFFFF
                and size <= 0xFFFFFFFF
            )
        ino.compact = compact
        pos = (pos + 31) & ~31
        non_tail = (32 if compact else 64) + ino.xattr_size
        extra = 0
        if ft == S_IFLNK:
            total = non_tail + tail
            if total >= BLOCK:
                nb += 1
                tail = 0
            if pos // BLOCK != (pos + total - 1) // BLOCK:
                extra = -pos % BLOCK
        elif tail:
            rem = BLOCK - (pos + non_tail) % BLOCK
            if rem < tail:
                extra = (rem + 31) & ~31
                rem2 = BLOCK - (pos + non_tail + extra) % BLOCK
                if tail > rem2:
                    # does not fit even so: move the tail out of line
                    nb += 1
                    tail = 0
                    extra = -pos % BLOCK
        if nb:
            ino.n_blocks = nb
            blocks += nb
        ino.tail = tail
        pos += extra
        ino.nid = pos >> 5
        pos += non_tail + tail
    return (pos + 31) & ~31, blocks


def _inode_writer(
    buf: bytearray, ref: Callable[[int], bytes]
) -> Callable[[int, _Inode, int, int, int, int, int, bool, bytes], int]:
    """How both formats end an inode: the inode itself (compact or
    extended) at `p` in `buf`, then its xattr header, shared references
    (`ref` encodes one) and local entries, then its tail; returns where
    it ends. The header with its references, and the struct of each
    shape, are cached: there are few distinct ones."""
    ibody = _pack_ibody
    heads: dict[tuple[int, Sequence[int]], bytes] = {}
    structs: dict[int, struct.Struct] = {}

    def write(
        p: int,
        ino: _Inode,
        layout: int,
        size: int,
        u: int,
        idx: int,
        nsec: int,
        compact: bool,
        tail_bytes: bytes,
    ) -> int:
        xsize = ino.xattr_size
        if xsize:
            icount = 1 + (xsize - 12) // 4
            if icount > 0xFFFF:
                raise TreeError("too many xattrs on one inode")
            hk = (ino.xfilter, ino.shared)
            head = heads.get(hk)
            if head is None:
                shared = hk[1]
                # (a u8 count: V1 caps it at MAX_SHARED_PER_INODE, V2
                # truncates as composefs-rs does)
                head = heads[hk] = ibody(0xFFFFFFFF & ~hk[0], len(shared) & 0xFF) + b"".join(
                    [ref(x) for x in shared]
                )
            loc = ino.xattr_local
        else:
            icount = 0
            head = loc = b""
        # The inode, its xattrs and a short tail (a chunk index) in one
        # pack_into: a slice write into the bytearray costs as much as the
        # whole pack. Longer tails (dirents, inline data) are written apart,
        # so there are few distinct formats.
        t = len(tail_bytes)
        if t > 4:
            late = tail_bytes
            tail_bytes = b""
            t = 0
        else:
            late = b""
        key = (len(head) << 32) | (len(loc) << 4) | (t << 1) | compact
        st = structs.get(key)
        if st is None:
            fmt = (F.COMPACT_INODE if compact else F.EXTENDED_INODE).format
            st = structs[key] = struct.Struct(f"{fmt}{len(head)}s{len(loc)}s{t}s")
        if compact:
            st.pack_into(
                buf, p, layout, icount, ino.mode, ino.nlink, size, 0, u, idx, ino.uid, ino.gid,
                head, loc, tail_bytes,
            )  # fmt: skip
        else:
            st.pack_into(
                buf, p, layout | 1, icount, ino.mode, 0, size, u, idx, ino.uid, ino.gid,
                ino.mtime & 0xFFFFFFFFFFFFFFFF, nsec, ino.nlink & 0xFFFFFFFF,
                head, loc, tail_bytes,
            )  # fmt: skip
        p += st.size
        if late:
            n = p + len(late)
            buf[p:n] = late
            p = n
        return p

    return write


def _emit_epoch1(
    inodes: list[_Inode],
    shared_table: list[bytes],
    inodes_end: int,
    n_data_blocks: int,
    header: bytes,
    sb_args: dict[str, int],
) -> bytearray:
    """The image, written in place into one zero-filled buffer: padding costs
    nothing, and no list of pieces or joined copies of the image is made."""
    shared_size = sum(len(e) for e in shared_table)
    data_start = (inodes_end + shared_size + BLOCK - 1) & ~(BLOCK - 1)
    buf = bytearray(data_start + n_data_blocks * BLOCK)
    p = 0
    for part in _head(
        header,
        inodes[0].nid,
        len(inodes),
        sb_args["build_time"] & 0xFFFFFFFFFFFFFFFF,
        sb_args["build_time_nsec"],
        data_start // BLOCK + n_data_blocks,
        inodes_end // BLOCK,
    ):
        buf[p : p + len(part)] = part
        p += len(part)
    # (every slice assignment below replaces exactly as many bytes as it
    # writes: a bytearray would otherwise grow or shrink)
    cur = data_start // BLOCK
    xbase = inodes_end % BLOCK
    # V1 inodes keep their shared xattrs' offsets in the table
    write_inode = _inode_writer(buf, lambda o: ((xbase + o) >> 2).to_bytes(4, "little"))
    nulls = _NULL_CHUNKS_BLOCK
    null_chunk = nulls[:4]
    chunk_based = F.DATALAYOUT_CHUNK_BASED
    for idx, ino in enumerate(inodes):
        p = ino.nid << 5
        ft = ino.ftype
        tail_bytes = b""
        u = 0
        if ft == S_IFREG and ino.external and not ino.n_blocks:
            # the common case first: an external file with its chunk index inline
            size = ino.size
            layout = chunk_based
            u = ino.chunk_format
            t = ino.tail
            tail_bytes = null_chunk if t == 4 else nulls[:t]
        elif ft == S_IFDIR:
            size = ino.n_blocks * BLOCK + ino.tail
            full, tail_bytes = _dir_chunks(ino)
            ino.entries = ()  # see _unlink
            if ino.n_blocks:
                u = cur
                o = cur * BLOCK
                cur += ino.n_blocks
                for b in full:
                    buf[o : o + len(b)] = b
                    o += BLOCK
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
        elif ft == S_IFCHR or ft == S_IFBLK:
            size = 0
            u = ino.rdev
            layout = F.DATALAYOUT_FLAT_PLAIN
        elif ft == S_IFREG or ft == S_IFLNK:
            size = ino.size
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
            nb = ino.n_blocks
            if nb:
                u = cur
                o = cur * BLOCK
                cur += nb
                if ino.external:
                    # C writes one block of null chunk indexes
                    buf[o : o + BLOCK] = nulls
                else:
                    data = ino.data
                    assert data is not None
                    oob = data[: nb * BLOCK] if ino.tail else data
                    buf[o : o + len(oob)] = oob
            if ino.external:
                layout = F.DATALAYOUT_CHUNK_BASED
                # C sets the chunk format through a u16 in the i_u union
                u = (u & 0xFFFF0000) | ino.chunk_format
                if ino.tail:
                    tail_bytes = nulls[: ino.tail]
            elif ino.tail:
                data = ino.data
                assert data is not None
                tail_bytes = data[len(data) - ino.tail :]
            if ft == F.S_IFLNK and nb == 0:
                size = ino.tail
        else:
            size = 0
            layout = F.DATALAYOUT_FLAT_PLAIN
        p = write_inode(p, ino, layout, size, u, idx, ino.nsec, ino.compact, tail_bytes)
    assert p <= inodes_end, (p, inodes_end)
    for e in shared_table:
        buf[inodes_end : inodes_end + len(e)] = e
        inodes_end += len(e)
    assert len(buf) == data_start + n_data_blocks * BLOCK
    return buf


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= BLOCK else bytes(n)


def _mkfs_epoch1(root: Directory, version: FormatVersion, max_version: FormatVersion) -> bytearray:
    # C bumps composefs_version 0 to 1 for trees with whiteouts unless
    # --max-version=0; version 1 also marks directories holding whiteouts opaque.
    may_bump = max_version >= FormatVersion.V1
    inodes, has_whiteout = _collect_epoch1(root, version >= FormatVersion.V1 or may_bump)
    try:
        return _build_epoch1(inodes, has_whiteout, version, may_bump)
    except BaseException:
        _unlink(inodes)
        raise


def _unlink(inodes: list[_Inode]) -> None:
    """Drop the directory entries: a directory inode lists itself as "."
    (and its parent as ".."), so without this every inode stays alive in
    reference cycles until the cyclic collector runs, and traversing them
    then costs more than building them (~0.2 s at the exit of a CLI that
    keeps the collector paused, for a 112k-entry image). The emit passes
    drop each directory's entries once written; this is for errors."""
    for ino in inodes:
        if ino.ftype == S_IFDIR:
            ino.entries = ()


def _build_epoch1(
    inodes: list[_Inode], has_whiteout: bool, version: FormatVersion, may_bump: bool
) -> bytearray:
    codec = _XattrCodec(_PREFIXES_EPOCH1)
    # the earliest (mtime, nsec), without a tuple per inode
    min_sec = min(map(_mtime_of, inodes))
    min_nsec = min([ino.nsec for ino in inodes if ino.mtime == min_sec])
    table, names = _share_epoch1(inodes, codec)
    has_acl = F.XATTR_POSIX_ACL_ACCESS in names or F.XATTR_POSIX_ACL_DEFAULT in names
    inodes_end, n_data_blocks = _layout_epoch1(inodes, (min_sec, min_nsec))
    cfs_version = 1 if (version == FormatVersion.V1 or (has_whiteout and may_bump)) else 0
    header = F.COMPOSEFS_HEADER.pack(
        F.COMPOSEFS_MAGIC,
        F.COMPOSEFS_HEADER_VERSION,
        F.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0,
        cfs_version,
    )
    return _emit_epoch1(
        inodes,
        table,
        inodes_end,
        n_data_blocks,
        header,
        {"build_time": min_sec, "build_time_nsec": min_nsec},
    )


# --------------------------------------------------------------------------
# epoch 2 (composefs-rs native)


def _collect_epoch2(root: Directory) -> list[_Inode]:
    """Depth-first inode list (composefs-rs `collect_dir`): a directory comes
    before its children; a hardlinked leaf gets the inode of its first name
    and an nlink counting its names."""
    leaf_inodes: dict[int, _Inode] = {}
    seen_dirs = {id(root)}
    r = _dir_inode(root, False)
    inodes = [r]
    append = inodes.append
    new = object.__new__
    metacopy_key = F.XATTR_OVERLAY_METACOPY
    redirect_key = F.XATTR_OVERLAY_REDIRECT
    hardlinked = False
    # explicit stack (trees may be deeper than Python's recursion limit):
    # (directory inode, its sorted items, next position, entries so far)
    stack: list[tuple[_Inode, list[tuple[bytes, Directory | Leaf]], list[int], list[Any]]] = [
        (r, sorted(root.entries.items()), [0], [(b".", r), (b"..", r)])
    ]
    while stack:
        me, items, at, ents = stack[-1]
        i = at[0]
        n_items = len(items)
        while i < n_items:
            name, child = items[i]
            i += 1
            # (`int in bytes` is a cheap byte search: 47 is "/")
            if len(name) > NAME_MAX or name in _BAD_NAMES or 47 in name or 0 in name:
                raise _bad_name(name)
            if isinstance(child, Directory):
                if id(child) in seen_dirs:
                    raise TreeError(f"directory {name!r} is hardlinked or part of a cycle")
                seen_dirs.add(id(child))
                ci = _dir_inode(child, False)
                append(ci)
                ents.append((name, ci))
                at[0] = i
                if len(stack) >= MAX_DEPTH and child.entries:
                    raise TreeError(limits.depth_error())
                stack.append((ci, sorted(child.entries.items()), [0], [(b".", ci), (b"..", me)]))
                break
            lid = id(child)
            li = leaf_inodes.get(lid)
            if li is not None:
                li.nlink += 1
                hardlinked = True
            else:
                c = child.content
                if type(c) is Regular and c.data is None and c.size > 0:
                    # The most common leaf by far, external content: what
                    # `_leaf_inode` does, without its branches and class call.
                    digest = c.digest
                    path = c.payload
                    if path is None and digest is not None:
                        path = f"{digest[:2]}/{digest[2:]}".encode()
                    xa = {metacopy_key: b"" if digest is None else _metacopy(digest)}
                    if path:
                        xa[redirect_key] = b"/" + path
                    st = child.stat
                    if st.xattrs:
                        _add_own_xattrs(xa, st.xattrs, name, True, False)
                    # the slots `_Inode.__init__` sets
                    li = new(_Inode)
                    li.ftype = S_IFREG
                    li.mode = S_IFREG | (st.mode & 0o7777)
                    li.uid = st.uid
                    li.gid = st.gid
                    li.mtime = st.mtime
                    li.nsec = st.mtime_nsec
                    li.xattrs = xa
                    li.size = c.size
                    li.rdev = 0
                    li.data = None
                    li.external = True
                    li.nlink = 1
                    li.plain = False
                    li.xattr_size = 0
                    li.n_blocks = 0
                    li.tail = 0
                else:
                    li = _leaf_inode(child, name, 1, False)
                leaf_inodes[lid] = li
                append(li)
            ents.append((name, li))
        else:
            stack.pop()
            if not items or items[0][0] > b"..":
                # "." and ".." then the sorted names: in order already; the
                # names joined, for the dirents (see _dirent_chunk)
                me.data = b"..." + b"".join([n for n, _ in items])
            else:
                ents.sort()
            me.entries = ents
            me.nlink = 2 + sum(1 for _, c in items if isinstance(c, Directory))
    if hardlinked:
        for li in leaf_inodes.values():
            if li.nlink > 1 and li.ftype == S_IFCHR and li.rdev == 0:
                raise TreeError("a whiteout is hardlinked")
    return inodes


def _share_epoch2(inodes: list[_Inode], codec: _XattrCodec) -> list[tuple[int, bytes, bytes]]:
    """composefs-rs `share_xattrs`: pairs used more than once, ascending by
    (prefix index, suffix, value)."""
    counts: dict[tuple[bytes, bytes], int] = {}
    get = counts.get
    for ino in inodes:
        for kv in ino.xattrs.items():
            counts[kv] = get(kv, 0) + 1
    split = codec.split
    keyed = []
    for (k, v), n in counts.items():
        if n > 1:
            index, suffix, _ = split(k)
            keyed.append((index, suffix, v, k))
    keyed.sort()
    return [(i, s, v) for i, s, v, _ in keyed]


def _mkfs_epoch2(root: Directory) -> bytearray:
    inodes = _collect_epoch2(root)
    try:
        return _build_epoch2(inodes)
    except BaseException:
        _unlink(inodes)
        raise


def _build_epoch2(inodes: list[_Inode]) -> bytearray:
    codec = _XattrCodec(_PREFIXES_EPOCH2)
    table = _share_epoch2(inodes, codec)
    table_index: dict[tuple[bytes, bytes], int] = {}
    prefixes = F.XATTR_PREFIXES
    table_entries: list[bytes] = []
    for n, (i, s, v) in enumerate(table):
        k = prefixes[i] + s
        table_index[(k, v)] = n
        table_entries.append(codec.entry(k, v))
    split = codec.split
    # A pair outside the table belongs to this one inode: encoded, not cached.
    encode = codec.encode
    tget = table_index.get
    chunk_shift = F.BLOCK_BITS + F.CHUNK_FORMAT_BLKBITS_MASK
    pos = F.INODE_TABLE_OFFSET
    for ino in inodes:
        xa = ino.xattrs
        xsize = 0
        if xa:
            shared: list[int] = []
            local: list[bytes] = []
            filt = 0
            for kv in xa.items():
                filt |= split(kv[0])[2]
                t = tget(kv)
                if t is not None:
                    shared.append(t)
                else:
                    local.append(encode(*kv))
            ino.shared = tuple(shared)
            loc = ino.xattr_local = b"".join(local)
            xsize = ino.xattr_size = 12 + 4 * len(shared) + len(loc)
            ino.xfilter = filt
        uid, gid = ino.uid, ino.gid
        if uid < 0 or gid < 0 or uid > 0xFFFFFFFF or gid > 0xFFFFFFFF:
            raise TreeError(f"uid/gid {uid}/{gid} out of range")

        # sizes: composefs-rs keeps inline data inline; data that could never
        # fit in a block's tail (beyond what composefs-rs accepts) goes out of line.
        ft = ino.ftype
        tail = 0
        if ino.external:
            # composefs-rs always uses 2^43-byte chunks and writes one null
            # index; files beyond 8 TiB get the indexes they need.
            count = max(1, -(-ino.size >> chunk_shift))
            if count > MAX_NONINLINE_CHUNKS:
                raise _too_large(inodes, ino, ino.size)
            ino.chunk_count = count
            pos = (pos + 31) & ~31
            ino.nid = pos >> 5
            pos += 64 + xsize + 4 * count
            continue
        if ft == S_IFDIR:
            tail = _dir_split(ino)
            nb = len(ino.dir_starts) - 1
            if tail > HALF_BLOCK:
                nb += 1
                tail = 0
            if nb:
                ino.n_blocks = nb
            ino.tail = tail
            ino.size = nb * BLOCK + tail
        elif ft == S_IFREG or ft == S_IFLNK:
            nb, tail = divmod(ino.size, BLOCK)
            if tail > HALF_BLOCK:
                nb += 1
                tail = 0
            if nb:
                ino.n_blocks = nb
            ino.tail = tail

        # position, with composefs-rs' padding so an inline tail stays in one block
        pos = (pos + 31) & ~31
        if tail:
            inline_start = pos + 64 + xsize
            end_meta = inline_start - 1
            if end_meta // BLOCK != (inline_start + tail) // BLOCK:
                pos += BLOCK - end_meta % BLOCK
                pos = (pos + 31) & ~31
        ino.nid = pos >> 5
        pos += 64 + xsize + tail
    inodes_end = (pos + 31) & ~31
    xattr_offsets: list[int] = []
    off = inodes_end
    for e in table_entries:
        xattr_offsets.append(off)
        off += len(e)
    data_start = (off + BLOCK - 1) & ~(BLOCK - 1)
    cur = data_start
    for ino in inodes:
        if ino.n_blocks:
            ino.blkaddr = cur // BLOCK
            cur += ino.n_blocks * BLOCK
    end = cur

    # pass 2: bytes, written in place into one zero-filled buffer (as
    # _emit_epoch1: no list of pieces, no joined copy)
    buf = bytearray(end)
    header = F.COMPOSEFS_HEADER.pack(F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION, 0, 2)
    p = 0
    for part in _head(header, inodes[0].nid, len(inodes), 0, 0, end // BLOCK, 0):
        buf[p : p + len(part)] = part
        p += len(part)
    # V2 inodes keep their shared xattrs' indexes in the table
    refs = [(o >> 2).to_bytes(4, "little") for o in xattr_offsets]
    write_inode = _inode_writer(buf, refs.__getitem__)
    nulls = _NULL_CHUNKS_BLOCK
    chunk_based = F.DATALAYOUT_CHUNK_BASED
    blkbits_mask = F.CHUNK_FORMAT_BLKBITS_MASK
    for ino in inodes:
        p = ino.nid << 5
        ft = ino.ftype
        tail_bytes = b""
        u = 0
        size = ino.size
        if ino.external:
            layout = chunk_based
            u = blkbits_mask
            tail_bytes = nulls[: 4 * ino.chunk_count]
        elif ft == S_IFDIR:
            full, tail_bytes = _dir_chunks(ino)
            ino.entries = ()  # see _unlink
            if ino.n_blocks:
                u = ino.blkaddr
                o = u * BLOCK
                for b in full:
                    buf[o : o + len(b)] = b
                    o += BLOCK
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
        elif ft == S_IFCHR or ft == S_IFBLK:
            u = ino.rdev
            size = 0
            layout = F.DATALAYOUT_FLAT_PLAIN
        elif ft == S_IFREG or ft == S_IFLNK:
            data = ino.data or b""
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
            if ino.n_blocks:
                u = ino.blkaddr
                o = u * BLOCK
                n = ino.n_blocks * BLOCK
                oob = data if len(data) <= n else data[:n]
                buf[o : o + len(oob)] = oob
            if ino.tail:
                tail_bytes = data[len(data) - ino.tail :]
        else:
            size = 0
            layout = F.DATALAYOUT_FLAT_PLAIN
        # (V2 inodes are all extended, with no nanoseconds)
        p = write_inode(p, ino, layout, size, u, ino.nid & 0xFFFFFFFF, 0, False, tail_bytes)
    assert p <= inodes_end, (p, inodes_end)
    o = inodes_end
    for e in table_entries:
        buf[o : o + len(e)] = e
        o += len(e)
    assert len(buf) == end, (len(buf), end)
    return buf


def mkfs(
    root: Directory,
    version: FormatVersion = FormatVersion.V0,
    *,
    max_version: FormatVersion | None = None,
) -> bytes:
    """The complete composefs EROFS image of `root` in format `version`.

    `max_version` mirrors C `--max-version`: with V0 the image is bumped to
    composefs_version 1 when the tree has whiteouts, unless `max_version`
    is V0 (then whiteouts are written the version-0 way). Ignored for V2.

    Raises `errors.TreeError` for trees composefs cannot represent
    (hardlinked directories or whiteouts, invalid names, oversized values).
    """
    image = mkfs_buffer(root, version, max_version=max_version)
    return image if type(image) is bytes else bytes(image)


def mkfs_buffer(
    root: Directory,
    version: FormatVersion = FormatVersion.V0,
    *,
    max_version: FormatVersion | None = None,
) -> bytes | bytearray:
    """`mkfs`, without the copy into an immutable `bytes`: for a caller
    that only writes or hashes the image (the CLI)."""
    if not isinstance(root, Directory):
        raise TreeError("the root of a composefs image must be a directory")
    version = FormatVersion(version)
    top = FormatVersion.V1 if max_version is None else FormatVersion(max_version)
    # Tens of thousands of short-lived, acyclic objects: the cyclic collector
    # would only rescan them (about half the run time), so pause it.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if version == FormatVersion.V2:
            return _mkfs_epoch2(root)
        return _mkfs_epoch1(root, version, max(top, version))
    except (struct.error, OverflowError) as e:
        # e.g. a negative or >32-bit nanosecond count, mode or link count
        raise TreeError(f"a value in the tree does not fit the EROFS format: {e}") from None
    finally:
        if was_enabled:
            gc.enable()
