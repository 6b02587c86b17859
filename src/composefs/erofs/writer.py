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

from collections import deque

import xxhash

from ..errors import TreeError
from ..tree import Device, Directory, Fifo, Leaf, Regular, Socket, Symlink
from . import format as F
from .format import FormatVersion

__all__ = ["FormatVersion", "mkfs"]

BLOCK = F.BLOCK_SIZE
HALF_BLOCK = BLOCK // 2
PATH_MAX = 4096
NAME_MAX = 255
MAX_NONINLINE_CHUNKS = 1024  # C: LCFS_MAX_NONINLINE_CHUNKS
MAX_SHARED_PER_INODE = 0x80  # C: EROFS_XATTR_LONG_PREFIX caps shared refs per inode

_pack_compact = F.COMPACT_INODE.pack
_pack_extended = F.EXTENDED_INODE.pack
_pack_dirent = F.DIRENT.pack
_pack_xattr_entry = F.XATTR_ENTRY.pack
_pack_ibody = F.XATTR_IBODY_HEADER.pack
_xxh32 = xxhash.xxh32_intdigest

_ZEROS = bytes(BLOCK)
_NULL_CHUNKS_BLOCK = b"\xff" * BLOCK

_FT = F.MODE_TO_FT

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

    def split(self, key: bytes) -> tuple[int, bytes, int]:
        """(name_index, suffix, filter bit) of a full key."""
        r = self._split.get(key)
        if r is None:
            index, suffix = _split_key(key, self.prefixes)
            if not key:
                raise TreeError("empty xattr name")
            if len(suffix) > 255:
                raise TreeError(f"xattr name too long: {key[:64]!r}")
            bit = 1 << (_xxh32(suffix, F.XATTR_FILTER_SEED + index) & (F.XATTR_FILTER_BITS - 1))
            r = self._split[key] = (index, suffix, bit)
        return r

    def entry(self, key: bytes, value: bytes) -> bytes:
        kv = (key, value)
        e = self._entries.get(kv)
        if e is None:
            if len(value) > 0xFFFF:
                raise TreeError(f"xattr value too long for {key!r}")
            index, suffix, _bit = self.split(key)
            e = _pack_xattr_entry(len(suffix), index, len(value)) + suffix + value
            pad = -len(e) & 3
            if pad:
                e += _ZEROS[:pad]
            self._entries[kv] = e
        return e


class _Inode:
    """One inode to write, with the layout facts the two passes share."""

    __slots__ = (
        "blkaddr",
        "block_data",
        "chunk_count",
        "chunk_format",
        "compact",
        "data",
        "entries",
        "external",
        "ftype",
        "gid",
        "ino",
        "ipad",
        "mode",
        "mtime",
        "n_blocks",
        "nid",
        "nlink",
        "nsec",
        "rdev",
        "shared",
        "size",
        "tail",
        "uid",
        "xattr_local",
        "xattr_size",
        "xattrs",
        "xfilter",
    )

    def __init__(self) -> None:
        self.ftype = 0
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.mtime = 0
        self.nsec = 0
        self.nlink = 1
        self.size = 0
        self.rdev = 0
        self.data: bytes | None = None  # inline file content or symlink target
        self.external = False
        self.chunk_format = 0
        self.chunk_count = 0
        self.xattrs: dict[bytes, bytes] = {}
        # directory entries including "." and "..", sorted by name
        self.entries: list[tuple[bytes, _Inode]] = []
        self.shared: list[int] = []
        self.xattr_local = b""
        self.xattr_size = 0
        self.xfilter = 0
        self.n_blocks = 0
        self.tail = 0
        self.compact = False
        self.nid = 0
        self.ipad = 0
        self.ino = 0
        self.blkaddr = 0
        self.block_data: bytes | None = None


# --------------------------------------------------------------------------
# tree checks shared by both epochs


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise TreeError(f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise TreeError(f"file name too long: {name[:64]!r}...")


def _scan(root: Directory) -> tuple[dict[int, int], dict[int, tuple[int, bytes]]]:
    """Depth-first sorted walk: name count per leaf (by id) and, for every
    leaf, the (directory id, name) of its first occurrence. Rejects
    hardlinked directories and invalid names."""
    counts: dict[int, int] = {}
    first: dict[int, tuple[int, bytes]] = {}
    seen_dirs = {id(root)}
    stack = [root]
    while stack:
        d = stack.pop()
        did = id(d)
        subdirs = []
        for name, child in sorted(d.entries.items()):
            _check_name(name)
            if isinstance(child, Directory):
                if id(child) in seen_dirs:
                    raise TreeError(f"directory {name!r} is hardlinked or part of a cycle")
                seen_dirs.add(id(child))
                subdirs.append(child)
            else:
                lid = id(child)
                n = counts.get(lid)
                if n is None:
                    counts[lid] = 1
                    first[lid] = (did, name)
                else:
                    counts[lid] = n + 1
        # depth-first in sorted order: the first subdirectory is visited next
        stack.extend(reversed(subdirs))
    return counts, first


def _check_leaf(leaf: Leaf, path_name: bytes, names: int) -> None:
    c = leaf.content
    if isinstance(c, Symlink):
        if not c.target:
            raise TreeError(f"symlink {path_name!r} has an empty target")
        if len(c.target) >= PATH_MAX or b"\0" in c.target:
            raise TreeError(f"invalid symlink target for {path_name!r}")
    elif isinstance(c, Device):
        if c.kind == F.S_IFCHR and c.rdev == 0 and names > 1:
            raise TreeError(f"whiteout {path_name!r} is hardlinked")
        if not 0 <= c.rdev <= 0xFFFFFFFF:
            raise TreeError(f"device number of {path_name!r} does not fit in 32 bits")
    elif isinstance(c, Regular):
        if c.data is None and c.size < 0:
            raise TreeError(f"negative size for {path_name!r}")
    st = leaf.stat
    if not (0 <= st.uid <= 0xFFFFFFFF and 0 <= st.gid <= 0xFFFFFFFF):
        raise TreeError(f"uid/gid of {path_name!r} out of range")


def _metacopy(digest: str | None) -> bytes:
    if digest is None:
        return b""
    raw = bytes.fromhex(digest)
    algo = F.METACOPY_ALGO_SHA256 if len(raw) == 32 else F.METACOPY_ALGO_SHA512
    if len(raw) not in (32, 64):
        raise TreeError(f"invalid fs-verity digest {digest!r}")
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


def _escape_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """User `trusted.overlay.X` becomes `trusted.overlay.overlay.X` (both epochs)."""
    out: dict[bytes, bytes] = {}
    for k, v in xattrs.items():
        if k.startswith(F.XATTR_OVERLAY_PREFIX):
            k = F.XATTR_OVERLAY_ESCAPED_PREFIX + k[len(F.XATTR_OVERLAY_PREFIX) :]
        out[k] = v
    return out


def _fill_leaf(ino: _Inode, leaf: Leaf, epoch1: bool) -> None:
    st = leaf.stat
    c = leaf.content
    ino.uid = st.uid
    ino.gid = st.gid
    ino.mtime = st.mtime
    ino.nsec = st.mtime_nsec
    perm = st.mode & 0o7777
    if isinstance(c, Regular):
        ino.ftype = F.S_IFREG
        if c.data is not None:
            ino.data = c.data
            ino.size = len(c.data)
        else:
            ino.size = c.size
            # C: any non-empty file without content is external; composefs-rs
            # also treats a digest-named empty file as external.
            ino.external = c.size > 0 or (
                not epoch1 and (c.digest is not None or c.payload is not None)
            )
    elif isinstance(c, Symlink):
        ino.ftype = F.S_IFLNK
        ino.data = c.target
        ino.size = len(c.target)
    elif isinstance(c, Device):
        ino.ftype = c.kind
        ino.rdev = c.rdev
    elif isinstance(c, Fifo):
        ino.ftype = F.S_IFIFO
    elif isinstance(c, Socket):
        ino.ftype = F.S_IFSOCK
    else:  # pragma: no cover - exhaustive over LeafContent
        raise TreeError(f"unknown leaf content {c!r}")
    ino.mode = ino.ftype | perm


# --------------------------------------------------------------------------
# epoch 1 (C mkcomposefs)


def _collect_epoch1(root: Directory, mark_opaque: bool) -> tuple[list[_Inode], bool]:
    """Breadth-first inode list as C `lcfs_compute_tree` builds it, after the
    C rewrites (overlay xattrs, escaped whiteouts, root stubs). Returns the
    inodes and whether the tree had user whiteouts."""
    counts, first = _scan(root)
    leaf_inode: dict[int, _Inode] = {}
    has_whiteout = False

    r = _Inode()
    r.ftype = F.S_IFDIR
    st = root.stat
    r.mode = F.S_IFDIR | (st.mode & 0o7777)
    r.uid, r.gid, r.mtime, r.nsec = st.uid, st.gid, st.mtime, st.mtime_nsec
    if not (0 <= st.uid <= 0xFFFFFFFF and 0 <= st.gid <= 0xFFFFFFFF):
        raise TreeError("uid/gid of / out of range")
    r.xattrs = _escape_xattrs(st.xattrs)
    inodes = [r]
    pending: list[tuple[_Inode, list[tuple[bytes, Directory | Leaf | _Inode]]]] = []
    queue: deque[tuple[Directory, _Inode, _Inode]] = deque([(root, r, r)])
    while queue:
        d, me, parent = queue.popleft()
        did = id(d)
        raw: list[tuple[bytes, Directory | Leaf | _Inode]] = [(b".", me), (b"..", parent)]
        subdirs = 0
        for name, child in sorted(d.entries.items()):
            if isinstance(child, Directory):
                subdirs += 1
                ci = _Inode()
                cst = child.stat
                ci.ftype = F.S_IFDIR
                ci.mode = F.S_IFDIR | (cst.mode & 0o7777)
                ci.uid, ci.gid, ci.mtime, ci.nsec = cst.uid, cst.gid, cst.mtime, cst.mtime_nsec
                if not (0 <= cst.uid <= 0xFFFFFFFF and 0 <= cst.gid <= 0xFFFFFFFF):
                    raise TreeError(f"uid/gid of {name!r} out of range")
                ci.xattrs = _escape_xattrs(cst.xattrs)
                inodes.append(ci)
                queue.append((child, ci, me))
                raw.append((name, ci))
                continue
            lid = id(child)
            n = counts[lid]
            if n > 1 and first[lid] != (did, name):
                # a later name of a hardlinked leaf: resolved once all inodes exist
                raw.append((name, child))
                continue
            _check_leaf(child, name, n)
            li = _Inode()
            _fill_leaf(li, child, True)
            li.nlink = child.nlink if child.nlink is not None else n
            xa = _escape_xattrs(child.stat.xattrs)
            if li.external:
                c = child.content
                assert isinstance(c, Regular)
                xa[F.XATTR_OVERLAY_METACOPY] = _metacopy(c.digest)
                path = c.backing_path()
                if path:
                    xa[F.XATTR_OVERLAY_REDIRECT] = b"/" + path
            elif li.ftype == F.S_IFCHR and li.rdev == 0:
                # user whiteout: C stores it as an empty regular file with markers
                has_whiteout = True
                li.ftype = F.S_IFREG
                li.mode = F.S_IFREG | (li.mode & 0o7777)
                li.size = 0
                xa[F.XATTR_OVERLAY_WHITEOUT] = b""
                xa[F.XATTR_USERXATTR_WHITEOUT] = b""
                me.xattrs[F.XATTR_OVERLAY_WHITEOUTS] = b""
                me.xattrs[F.XATTR_USERXATTR_WHITEOUTS] = b""
                if mark_opaque:
                    # composefs_version >= 1 marks such directories opaque too
                    me.xattrs[F.XATTR_OVERLAY_OPAQUE] = b"x"
                    me.xattrs[F.XATTR_USERXATTR_OPAQUE] = b"x"
            li.xattrs = xa
            leaf_inode[lid] = li
            inodes.append(li)
            raw.append((name, li))
        me.nlink = 2 + subdirs
        if me is r:
            _add_stubs(r, root, raw, inodes)
        pending.append((me, raw))

    for me, raw in pending:
        ents: list[tuple[bytes, _Inode]] = []
        for name, obj in raw:
            if isinstance(obj, _Inode):
                ents.append((name, obj))
            else:
                ents.append((name, leaf_inode[id(obj)]))
        ents.sort(key=_first)
        me.entries = ents
    r.xattrs[F.XATTR_OVERLAY_OPAQUE_ROOT] = b"y"
    return inodes, has_whiteout


def _first(t: tuple[bytes, object]) -> bytes:
    return t[0]


def _add_stubs(
    r: _Inode,
    root: Directory,
    raw: list[tuple[bytes, Directory | Leaf | _Inode]],
    inodes: list[_Inode],
) -> None:
    """The 256 whiteout stubs `00`..`ff` (C `add_overlay_whiteouts`). C adds
    them as root children before numbering, so in BFS order they interleave
    with the root's own children by name."""
    selinux = root.stat.xattrs.get(F.XATTR_SECURITY_SELINUX)
    # inodes[1:] are exactly the root's children numbered so far, in raw's order
    merged = [(n, o) for n, o in raw[2:] if isinstance(o, _Inode)]
    assert len(merged) == len(inodes) - 1
    for i in range(F.WHITEOUT_STUB_COUNT):
        name = b"%02x" % i
        if name in root.entries:
            continue
        s = _Inode()
        s.ftype = F.S_IFCHR
        s.mode = F.S_IFCHR | 0o644
        s.uid, s.gid, s.mtime, s.nsec = r.uid, r.gid, r.mtime, r.nsec
        if selinux is not None:
            s.xattrs = {F.XATTR_SECURITY_SELINUX: selinux}
        merged.append((name, s))
        raw.append((name, s))
    merged.sort(key=_first)
    del inodes[1:]
    inodes.extend(i for _, i in merged)


def _share_epoch1(inodes: list[_Inode], codec: _XattrCodec) -> list[bytes]:
    """C `compute_erofs_shared_xattrs`: (key, value) pairs used more than once
    go to the shared table, written in descending (key, len(value), value)
    order; each inode refers to at most 128 of them."""
    counts: dict[tuple[bytes, bytes], int] = {}
    get = counts.get
    for ino in inodes:
        for kv in ino.xattrs.items():
            counts[kv] = get(kv, 0) + 1
    multi = [kv for kv, n in counts.items() if n > 1]
    multi.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
    offsets: dict[tuple[bytes, bytes], int] = {}
    table: list[bytes] = []
    off = 0
    for kv in multi:
        e = codec.entry(*kv)
        offsets[kv] = off
        table.append(e)
        off += len(e)
    split = codec.split
    entry = codec.entry
    for ino in inodes:
        xa = ino.xattrs
        if not xa:
            continue
        shared: list[int] = []
        local: list[bytes] = []
        filt = 0
        for kv in sorted(xa.items(), key=_first):
            filt |= split(kv[0])[2]
            o = offsets.get(kv) if len(shared) < MAX_SHARED_PER_INODE else None
            if o is not None:
                shared.append(o)
            else:
                local.append(entry(*kv))
        ino.shared = shared
        ino.xattr_local = b"".join(local)
        ino.xattr_size = F.XATTR_IBODY_HEADER_SIZE + 4 * len(shared) + len(ino.xattr_local)
        ino.xfilter = filt
    return table


def _dir_split(entries: list[tuple[bytes, _Inode]]) -> tuple[list[int], int]:
    """Greedy packing of dirents into blocks: start index of each block
    (plus the trailing remainder) and the remainder's byte size."""
    starts = [0]
    block_size = 0
    for i, (name, _) in enumerate(entries):
        ln = F.DIRENT_SIZE + len(name)
        if block_size + ln > BLOCK:
            starts.append(i)
            block_size = 0
        block_size += ln
    return starts, block_size


def _dirent_chunk(entries: list[tuple[bytes, _Inode]]) -> bytes:
    nameoff = F.DIRENT_SIZE * len(entries)
    heads: list[bytes] = []
    for name, target in entries:
        heads.append(_pack_dirent(target.nid, nameoff, _FT[target.ftype & F.S_IFMT]))
        nameoff += len(name)
    heads.extend(name for name, _ in entries)
    return b"".join(heads)


def _dir_chunks(ino: _Inode) -> tuple[list[bytes], bytes]:
    """(full-block chunks, inline tail) of a directory whose n_blocks/tail are final."""
    entries = ino.entries
    starts, _ = _dir_split(entries)
    bounds = [*starts, len(entries)]
    chunks = [entries[bounds[i] : bounds[i + 1]] for i in range(len(starts))]
    full = chunks[:-1]
    rest = chunks[-1]
    blocks = [_dirent_chunk(c) for c in full]
    if len(blocks) < ino.n_blocks:
        blocks.append(_dirent_chunk(rest))
        rest = []
    tail = _dirent_chunk(rest) if rest and ino.tail else b""
    return blocks, tail


def _layout_epoch1(inodes: list[_Inode], min_mtime: tuple[int, int]) -> int:
    """C `compute_erofs_inodes`: assign nids and padding; returns inodes_end."""
    pos = F.INODE_TABLE_OFFSET
    min_sec, min_nsec = min_mtime
    for idx, ino in enumerate(inodes):
        ino.ino = idx
        ft = ino.ftype
        # data size: n_blocks out of line plus an inline tail
        if ft == F.S_IFDIR:
            starts, tail = _dir_split(ino.entries)
            nb = len(starts) - 1
            if tail > HALF_BLOCK:
                nb += 1
                tail = 0
            ino.n_blocks, ino.tail = nb, tail
            size = nb * BLOCK + tail
        elif ft == F.S_IFLNK:
            ino.n_blocks, ino.tail = 0, ino.size
            size = ino.size
        elif ft == F.S_IFREG and ino.size > 0:
            size = ino.size
            if not ino.external:
                nb, tail = divmod(size, BLOCK)
                if tail > HALF_BLOCK:
                    nb += 1
                    tail = 0
                ino.n_blocks, ino.tail = nb, tail
            else:
                fmt, count = _chunking(size)
                if count > MAX_NONINLINE_CHUNKS:
                    raise TreeError(f"file too large for composefs ({size} bytes)")
                ino.chunk_format, ino.chunk_count = fmt, count
                ino.n_blocks, ino.tail = 0, count * 4
        else:
            size = ino.size  # C compares st_size even for devices
            ino.n_blocks, ino.tail = 0, 0
        ino.compact = (
            ino.mtime == min_sec
            and ino.nsec == min_nsec
            and ino.nlink <= 0xFFFF
            and ino.uid <= 0xFFFF
            and ino.gid <= 0xFFFF
            and size <= 0xFFFFFFFF
        )
        isz = 32 if ino.compact else 64
        ppos = pos
        pos = (pos + 31) & ~31
        non_tail = isz + ino.xattr_size
        tail = ino.tail
        extra = 0
        if ft == F.S_IFLNK:
            total = non_tail + tail
            if total >= BLOCK:
                ino.n_blocks += 1
                ino.tail = 0
            if pos // BLOCK != (pos + total - 1) // BLOCK:
                extra = -pos % BLOCK
        elif tail:
            rem = BLOCK - (pos + non_tail) % BLOCK
            if rem < tail:
                extra = (rem + 31) & ~31
                rem2 = BLOCK - (pos + non_tail + extra) % BLOCK
                if tail > rem2:
                    # does not fit even so: move the tail out of line
                    ino.n_blocks += 1
                    ino.tail = 0
                    extra = -pos % BLOCK
        ino.ipad = pos - ppos + extra
        pos += extra
        ino.nid = pos // 32
        pos += non_tail + ino.tail
    return (pos + 31) & ~31


def _emit_epoch1(
    inodes: list[_Inode],
    shared_table: list[bytes],
    inodes_end: int,
    header: bytes,
    sb_args: dict[str, int],
) -> bytes:
    shared_size = sum(len(e) for e in shared_table)
    data_start = (inodes_end + shared_size + BLOCK - 1) & ~(BLOCK - 1)
    n_data_blocks = sum(i.n_blocks for i in inodes)
    out: list[bytes] = [header, bytes(F.SUPERBLOCK_OFFSET - len(header))]
    out.append(
        F.SUPERBLOCK.pack(
            F.EROFS_MAGIC,
            0,
            F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER,
            F.BLOCK_BITS,
            0,
            inodes[0].nid,
            len(inodes),
            sb_args["build_time"] & 0xFFFFFFFFFFFFFFFF,
            sb_args["build_time_nsec"],
            data_start // BLOCK + n_data_blocks,
            F.INODE_TABLE_OFFSET // BLOCK,
            inodes_end // BLOCK,
            b"",
            b"",
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
    )
    blocks: list[bytes] = []
    cur = data_start // BLOCK
    xbase = inodes_end % BLOCK
    ibody = _pack_ibody
    for ino in inodes:
        if ino.ipad:
            out.append(_zeros(ino.ipad))
        ft = ino.ftype
        tail_bytes = b""
        u = 0
        if ft == F.S_IFDIR:
            size = ino.n_blocks * BLOCK + ino.tail
            full, tail_bytes = _dir_chunks(ino)
            if ino.n_blocks:
                u = cur
                cur += ino.n_blocks
                for b in full:
                    blocks.append(b)
                    blocks.append(_zeros(-len(b) % BLOCK))
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
        elif ft == F.S_IFCHR or ft == F.S_IFBLK:
            size = 0
            u = ino.rdev
            layout = F.DATALAYOUT_FLAT_PLAIN
        elif ft == F.S_IFREG or ft == F.S_IFLNK:
            size = ino.size
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
            if ino.n_blocks:
                u = cur
                cur += ino.n_blocks
                if ino.external:
                    # C writes one block of null chunk indexes
                    blocks.append(_NULL_CHUNKS_BLOCK)
                else:
                    data = ino.data
                    assert data is not None
                    oob = data[: ino.n_blocks * BLOCK] if ino.tail else data
                    blocks.append(oob)
                    blocks.append(_zeros(-len(oob) % BLOCK))
            if ino.external:
                layout = F.DATALAYOUT_CHUNK_BASED
                # C sets the chunk format through a u16 in the i_u union
                u = (u & 0xFFFF0000) | ino.chunk_format
                if ino.tail:
                    tail_bytes = b"\xff" * ino.tail
            elif ino.tail:
                data = ino.data
                assert data is not None
                tail_bytes = data[len(data) - ino.tail :]
            if ft == F.S_IFLNK and ino.n_blocks == 0:
                size = ino.tail
        else:
            size = 0
            layout = F.DATALAYOUT_FLAT_PLAIN
        xsize = ino.xattr_size
        icount = 0 if xsize == 0 else 1 + (xsize - 12) // 4
        if icount > 0xFFFF:
            raise TreeError("too many xattrs on one inode")
        if ino.compact:
            out.append(
                _pack_compact(
                    layout, icount, ino.mode, ino.nlink, size, 0, u, ino.ino, ino.uid, ino.gid
                )
            )
        else:
            out.append(
                _pack_extended(
                    layout | 1,
                    icount,
                    ino.mode,
                    0,
                    size,
                    u,
                    ino.ino,
                    ino.uid,
                    ino.gid,
                    ino.mtime & 0xFFFFFFFFFFFFFFFF,
                    ino.nsec,
                    ino.nlink & 0xFFFFFFFF,
                )
            )
        if xsize:
            out.append(ibody(0xFFFFFFFF & ~ino.xfilter, len(ino.shared)))
            if ino.shared:
                out.append(b"".join([((xbase + o) // 4).to_bytes(4, "little") for o in ino.shared]))
            out.append(ino.xattr_local)
        if tail_bytes:
            out.append(tail_bytes)
    img = b"".join(out)
    pad = -len(img) % 32
    assert len(img) + pad == inodes_end, (len(img), inodes_end)
    parts = [img, _zeros(pad), *shared_table]
    tot = inodes_end + shared_size
    parts.append(_zeros(data_start - tot))
    parts.extend(blocks)
    result = b"".join(parts)
    assert len(result) == data_start + n_data_blocks * BLOCK
    return result


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= BLOCK else bytes(n)


def _mkfs_epoch1(root: Directory, version: FormatVersion, max_version: FormatVersion) -> bytes:
    # C bumps composefs_version 0 to 1 for trees with whiteouts unless
    # --max-version=0; version 1 also marks directories holding whiteouts opaque.
    may_bump = max_version >= FormatVersion.V1
    inodes, has_whiteout = _collect_epoch1(root, version >= FormatVersion.V1 or may_bump)
    codec = _XattrCodec(_PREFIXES_EPOCH1)
    has_acl = False
    min_sec, min_nsec = inodes[0].mtime, inodes[0].nsec
    for ino in inodes:
        if ino.mtime < min_sec or (ino.mtime == min_sec and ino.nsec < min_nsec):
            min_sec, min_nsec = ino.mtime, ino.nsec
        xa = ino.xattrs
        if xa and (F.XATTR_POSIX_ACL_ACCESS in xa or F.XATTR_POSIX_ACL_DEFAULT in xa):
            has_acl = True
    table = _share_epoch1(inodes, codec)
    inodes_end = _layout_epoch1(inodes, (min_sec, min_nsec))
    cfs_version = 1 if (version == FormatVersion.V1 or (has_whiteout and may_bump)) else 0
    header = F.COMPOSEFS_HEADER.pack(
        F.COMPOSEFS_MAGIC,
        F.COMPOSEFS_HEADER_VERSION,
        F.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0,
        cfs_version,
    )
    return _emit_epoch1(
        inodes, table, inodes_end, header, {"build_time": min_sec, "build_time_nsec": min_nsec}
    )


# --------------------------------------------------------------------------
# epoch 2 (composefs-rs native)


def _collect_epoch2(root: Directory) -> list[_Inode]:
    """Depth-first inode list (composefs-rs `collect_dir`): a directory comes
    before its children; a hardlinked leaf gets the inode of its first name."""
    counts, _first_occ = _scan(root)
    leaf_inode: dict[int, _Inode] = {}
    inodes: list[_Inode] = []

    def new_dir(d: Directory) -> _Inode:
        st = d.stat
        if not (0 <= st.uid <= 0xFFFFFFFF and 0 <= st.gid <= 0xFFFFFFFF):
            raise TreeError("directory uid/gid out of range")
        di = _Inode()
        di.ftype = F.S_IFDIR
        di.mode = F.S_IFDIR | (st.mode & 0o7777)
        di.uid, di.gid, di.mtime, di.nsec = st.uid, st.gid, st.mtime, st.mtime_nsec
        di.xattrs = _escape_xattrs(dict(sorted(st.xattrs.items())))
        inodes.append(di)
        return di

    r = new_dir(root)
    # explicit stack of (directory, its inode, parent inode, sorted items, position)
    stack: list[tuple[Directory, _Inode, _Inode, list[tuple[bytes, Directory | Leaf]]]] = [
        (root, r, r, sorted(root.entries.items()))
    ]
    idx = [0]
    ents_stack: list[list[tuple[bytes, _Inode]]] = [[(b".", r), (b"..", r)]]
    while stack:
        _d, me, _parent, items = stack[-1]
        i = idx[-1]
        ents = ents_stack[-1]
        if i == len(items):
            stack.pop()
            idx.pop()
            ents_stack.pop()
            ents.sort(key=_first)
            me.entries = ents
            me.nlink = 2 + sum(1 for _, c in items if isinstance(c, Directory))
            continue
        idx[-1] = i + 1
        name, child = items[i]
        if isinstance(child, Directory):
            ci = new_dir(child)
            ents.append((name, ci))
            stack.append((child, ci, me, sorted(child.entries.items())))
            idx.append(0)
            ents_stack.append([(b".", ci), (b"..", me)])
            continue
        lid = id(child)
        li = leaf_inode.get(lid)
        if li is None:
            n = counts[lid]
            _check_leaf(child, name, n)
            li = _Inode()
            _fill_leaf(li, child, False)
            li.nlink = n
            xa: dict[bytes, bytes] = {}
            if li.external:
                c = child.content
                assert isinstance(c, Regular)
                xa[F.XATTR_OVERLAY_METACOPY] = _metacopy(c.digest)
                path = c.backing_path()
                if path:
                    xa[F.XATTR_OVERLAY_REDIRECT] = b"/" + path
            for k, v in _escape_xattrs(dict(sorted(child.stat.xattrs.items()))).items():
                xa[k] = v
            li.xattrs = xa
            leaf_inode[lid] = li
            inodes.append(li)
        ents.append((name, li))
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


def _mkfs_epoch2(root: Directory) -> bytes:
    inodes = _collect_epoch2(root)
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
    entry = codec.entry
    for ino in inodes:
        if not ino.xattrs:
            continue
        shared: list[int] = []
        local: list[bytes] = []
        filt = 0
        for kv in ino.xattrs.items():
            filt |= split(kv[0])[2]
            t = table_index.get(kv)
            if t is not None:
                shared.append(t)
            else:
                local.append(entry(*kv))
        ino.shared = shared
        ino.xattr_local = b"".join(local)
        ino.xattr_size = F.XATTR_IBODY_HEADER_SIZE + 4 * len(shared) + len(ino.xattr_local)
        ino.xfilter = filt

    # sizes: composefs-rs keeps inline data inline; data that could never fit
    # in a block's tail (beyond what composefs-rs accepts) goes out of line.
    for ino in inodes:
        ft = ino.ftype
        if ino.external:
            # composefs-rs always uses 2^43-byte chunks and writes one null
            # index; files beyond 8 TiB get the indexes they need.
            count = max(1, -(-ino.size >> (F.BLOCK_BITS + F.CHUNK_FORMAT_BLKBITS_MASK)))
            if count > MAX_NONINLINE_CHUNKS:
                raise TreeError(f"file too large for composefs ({ino.size} bytes)")
            ino.chunk_count = count
        if ft == F.S_IFDIR:
            starts, tail = _dir_split(ino.entries)
            nb = len(starts) - 1
            if tail > HALF_BLOCK:
                nb += 1
                tail = 0
            ino.n_blocks, ino.tail = nb, tail
            ino.size = nb * BLOCK + tail
        elif (ft == F.S_IFREG and not ino.external) or ft == F.S_IFLNK:
            nb, tail = divmod(ino.size, BLOCK)
            if tail > HALF_BLOCK:
                nb += 1
                tail = 0
            ino.n_blocks, ino.tail = nb, tail

    # pass 1: positions
    pos = F.INODE_TABLE_OFFSET
    for ino in inodes:
        pos = (pos + 31) & ~31
        ppos = pos
        inline = ino.tail > 0 and not ino.external
        if inline:
            inline_start = pos + 64 + ino.xattr_size
            end_meta = inline_start - 1
            inline_end = inline_start + ino.tail
            if end_meta // BLOCK != inline_end // BLOCK:
                pos += BLOCK - end_meta % BLOCK
                pos = (pos + 31) & ~31
        ino.ipad = pos - ppos
        ino.nid = pos // 32
        pos += 64 + ino.xattr_size
        if ino.external:
            pos += 4 * ino.chunk_count
        elif inline:
            pos += ino.tail
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

    # pass 2: bytes
    header = F.COMPOSEFS_HEADER.pack(F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION, 0, 2)
    out: list[bytes] = [header, bytes(F.SUPERBLOCK_OFFSET - len(header))]
    out.append(
        F.SUPERBLOCK.pack(
            F.EROFS_MAGIC,
            0,
            F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER,
            F.BLOCK_BITS,
            0,
            inodes[0].nid,
            len(inodes),
            0,
            0,
            end // BLOCK,
            0,
            0,
            b"",
            b"",
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
    )
    blocks: list[bytes] = []
    ibody = _pack_ibody
    filled = F.INODE_TABLE_OFFSET
    for ino in inodes:
        lead = -filled % 32 + ino.ipad
        if lead:
            out.append(_zeros(lead))
            filled += lead
        ft = ino.ftype
        tail_bytes = b""
        u = 0
        size = ino.size
        if ft == F.S_IFDIR:
            full, tail_bytes = _dir_chunks(ino)
            for b in full:
                blocks.append(b)
                blocks.append(_zeros(-len(b) % BLOCK))
            if ino.n_blocks:
                u = ino.blkaddr
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
        elif ft == F.S_IFCHR or ft == F.S_IFBLK:
            u = ino.rdev
            size = 0
            layout = F.DATALAYOUT_FLAT_PLAIN
        elif ino.external:
            layout = F.DATALAYOUT_CHUNK_BASED
            u = F.CHUNK_FORMAT_BLKBITS_MASK
            tail_bytes = F.NULL_CHUNK_INDEX * ino.chunk_count
        elif ft == F.S_IFREG or ft == F.S_IFLNK:
            data = ino.data or b""
            layout = F.DATALAYOUT_FLAT_INLINE if ino.tail else F.DATALAYOUT_FLAT_PLAIN
            if ino.n_blocks:
                u = ino.blkaddr
                oob = data[: ino.n_blocks * BLOCK]
                blocks.append(oob)
                blocks.append(_zeros(-len(oob) % BLOCK))
            if ino.tail:
                tail_bytes = data[len(data) - ino.tail :]
        else:
            size = 0
            layout = F.DATALAYOUT_FLAT_PLAIN
        xsize = ino.xattr_size
        icount = 0 if xsize == 0 else 1 + (xsize - 12) // 4
        if icount > 0xFFFF:
            raise TreeError("too many xattrs on one inode")
        out.append(
            _pack_extended(
                layout | 1,
                icount,
                ino.mode,
                0,
                size,
                u,
                ino.nid & 0xFFFFFFFF,
                ino.uid,
                ino.gid,
                ino.mtime & 0xFFFFFFFFFFFFFFFF,
                0,
                ino.nlink & 0xFFFFFFFF,
            )
        )
        filled += 64
        if xsize:
            out.append(ibody(0xFFFFFFFF & ~ino.xfilter, len(ino.shared) & 0xFF))
            if ino.shared:
                out.append(
                    b"".join([(xattr_offsets[s] // 4).to_bytes(4, "little") for s in ino.shared])
                )
            out.append(ino.xattr_local)
            filled += xsize
        if tail_bytes:
            out.append(tail_bytes)
            filled += len(tail_bytes)
    out.append(_zeros(inodes_end - filled))
    out.extend(table_entries)
    out.append(_zeros(data_start - off))
    out.extend(blocks)
    result = b"".join(out)
    assert len(result) == end, (len(result), end)
    return result


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
    if not isinstance(root, Directory):
        raise TreeError("the root of a composefs image must be a directory")
    version = FormatVersion(version)
    if version == FormatVersion.V2:
        return _mkfs_epoch2(root)
    top = FormatVersion.V1 if max_version is None else FormatVersion(max_version)
    return _mkfs_epoch1(root, version, max(top, version))
