"""C `composefs-info dump` of an image, streamed from the image.

IO-free: image bytes in, dumpfile bytes out. The result is byte for byte
what `read_image` followed by `dumpfile.dumps(style="c")` gives (the tests
compare both), but no tree is built: lines are formatted while the image
is walked in the dump's own order (depth first, names sorted, which is the
on-disk dirent order). Building the tree and then walking it again cost
about twice as much.

Every check of the hardened reader still runs, with the same tree rules
as `reader._Builder` (`.`/`..`, dirent types, directories reached once,
link counts, whiteout stubs, depth). Common regular files, symlinks and
directories go through fused readers (`_fast_readers`: the inode, its
xattrs, its data or dirent blocks and the work bound, checked in one
function with local variables and small caches, about three times faster);
anything they do not handle or would refuse goes through the general path,
the same `_Reader` methods as `read_image` (inode, xattrs, dirents, inline
data), which raises the reader's own error. The tests dump every image,
and every mutated image of the fuzzer, both ways. Nothing is returned
before the whole image is validated: a bad image gives an `ImageError` and
no partial dump.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Callable, Collection

from .. import limits
from ..dumpfile import _SAME, _escape_optional, escape
from ..errors import ImageError
from ..tree import no_gc
from . import format as fmt
from .reader import (
    _BLK,
    _CHECKED_CHUNKS,
    _FIRST_NID,
    _HEX2,
    _KERNEL_PREFIXES,
    _MAX_EXTERNAL_SIZE,
    _NULL_CHUNKS,
    _OVERLAY_PREFIXES,
    _REFS,
    _err,
    _filter_bit,
    _Inode,
    _metacopy_digest,
    _Reader,
    _Xattrs,
    external_parts,
)

__all__ = ["dump_image", "dump_lines"]

_S_IFMT = fmt.S_IFMT
_S_IFDIR = fmt.S_IFDIR
_S_IFREG = fmt.S_IFREG
_S_IFLNK = fmt.S_IFLNK
_S_IFCHR = fmt.S_IFCHR
_S_IFBLK = fmt.S_IFBLK
_FT_DIR = fmt.FT_DIR
_MODE_TO_FT = fmt.MODE_TO_FT
_FLAT_PLAIN = fmt.DATALAYOUT_FLAT_PLAIN
_FLAT_INLINE = fmt.DATALAYOUT_FLAT_INLINE
_CHUNK_BASED = fmt.DATALAYOUT_CHUNK_BASED
_MAX_DEPTH = limits.MAX_DEPTH
# dumpfile._iter_lines' C-style leaf lines: path size mode nlink uid gid
# rdev mtime.nsec payload content digest xattrs; a hardlink has "@" before
# the mode and the first name's path as payload. A leaf's line is its path
# and its _LEAF_TAIL (which no escaped field puts a space in).
_LEAF_TAIL = b" %d %s %s %s %s%s\n"
# The part from the mode to the mtime (mode nlink uid gid rdev mtime.nsec),
# formatted once per distinct value (most files share a few): formatting
# the numbers was the dump's largest single cost.
_MID = b"%o %d %d %d %d %d.%d"
# dumpfile._iter_lines' directory lines: path size mode nlink uid gid mtime.nsec xattrs
_DIR_LINE = b"%s %d %s - - -%s\n"
# _DIR_LINE values after the path: size, _MID, xattrs
_DirValues = tuple[int, bytes, bytes]


def _hardlink_line(epath: bytes, tail: bytes, first: bytes) -> bytes:
    """A hardlink's line from its first name's _LEAF_TAIL and path."""
    # "", size, mode, nlink, uid, gid, rdev, mtime, payload, the rest
    f = tail.split(b" ", 9)
    return b"%s %s @%s %s %s" % (epath, f[1], b" ".join(f[2:8]), first, f[9])


class _Frame:
    """A directory being dumped: its entries (without . and ..) and how far
    it got."""

    __slots__ = ("clean", "filter", "it", "names", "nid", "nlink", "prefix", "shown", "subdirs")

    def __init__(
        self,
        names: list[bytes],
        nids: list[int],
        types: list[int],
        nid: int,
        nlink: int,
        prefix: bytes,
        shown: bool,
        filter: frozenset[bytes] | None,
    ) -> None:
        self.names = names
        self.it = zip(names, nids, types, strict=True)  # resumed after a subdirectory
        self.nid = nid
        self.nlink = nlink
        self.prefix = prefix  # escaped path + "/"
        self.shown = shown  # printed (not left out by the top-level filter)
        self.filter = filter  # the top-level filter (root only)
        # No name needs escaping: one search for the whole directory.
        joined = b"".join(names)
        self.clean = joined.translate(_SAME) == joined
        self.subdirs = 0


class _Dumper:
    def __init__(self, data: bytes, toplevel: Collection[bytes] | None, fast: bool = True) -> None:
        self.r = _Reader(data, keep_opaque_markers=True, inline_data=True)
        self.keep = None if toplevel is None else frozenset(toplevel)
        # nid -> (dirent type, line, length of its path) of every leaf read
        # (hardlinks print it again, with the first name as payload); a
        # leaf not printed yet (the top-level filter) has its _LEAF_TAIL and 0.
        self.leaves: dict[int, tuple[int, bytes, int]] = {}
        self.whiteout_nids: set[int] = set()
        self.dirs_seen: set[int] = set()
        # (name, value) -> its escaped " name=value" field: labels repeat.
        self.xattr_fields: dict[tuple[bytes, bytes], bytes] = {}
        # The fused readers (see _fast_readers); without them every inode
        # takes the general path (the tests compare both).
        self.fast: _FastLeaf | None = None
        self.fast_dir: _FastDir | None = None
        if fast:
            self.fast, self.fast_dir = _fast_readers(self)

    def _xattrs(self, user: dict[bytes, bytes]) -> bytes:
        if not user:
            return b""
        cache = self.xattr_fields
        parts = []
        for item in user.items():
            f = cache.get(item)
            if f is None:
                k, v = item
                f = cache[item] = _xattr_field(k, v)
            parts.append(f)
        return b"".join(parts)

    def _dir_line(self, epath: bytes, ino: _Inode, x: _Xattrs, nlink: int) -> bytes:
        mid = _MID % (
            _S_IFDIR | (ino.mode & 0o7777),
            nlink,
            ino.uid,
            ino.gid,
            0,
            ino.mtime,
            ino.mtime_nsec,
        )
        return _DIR_LINE % (epath, ino.size, mid, self._xattrs(x.user))

    @staticmethod
    def _frame(
        nid: int,
        nlink: int,
        ents: tuple[list[bytes], list[int], list[int]],
        parent_nid: int,
        depth: int,
        prefix: bytes,
        shown: bool,
        filter: frozenset[bytes] | None,
    ) -> _Frame:
        """A directory's frame, its . and .. checked (reader._Builder's
        checks) and left out."""
        names, nids, types = ents
        _check_dots(nid, parent_nid, names, nids, types)
        if names and depth >= _MAX_DEPTH:
            raise _err(f"paths nested deeper than {_MAX_DEPTH} components")
        return _Frame(names, nids, types, nid, nlink, prefix, shown, filter)

    def dump(self, limit: float) -> list[bytes] | None:
        """The dump's lines, or None once they pass `limit` bytes."""
        r = self.r
        root_nid = r.info.root_nid
        root_ino = r.inode(root_nid)
        if root_ino.ftype != _S_IFDIR:
            raise _err("root inode is not a directory")
        root_x = r.xattrs(root_ino)
        self.dirs_seen.add(root_nid)
        out: list[bytes] = [b""]  # the root's line, once its link count is known
        append = out.append
        total = 0
        leaves = self.leaves
        dirs_seen = self.dirs_seen
        whiteout_nids = self.whiteout_nids
        epoch1 = r.epoch1
        root_subdirs = 0
        same = _SAME
        fast = self.fast
        fast_dir = self.fast_dir
        root = self._frame(
            root_nid, root_ino.nlink, r.dirent_lists(root_ino), root_nid, 0, b"/", True, self.keep
        )
        stack = [root]
        while stack:
            frame = stack[-1]
            nid = frame.nid
            depth = len(stack) - 1
            prefix = frame.prefix
            shown = frame.shown
            clean = frame.clean
            filt = frame.filter
            is_root = frame is root
            descended = False
            for name, child_nid, ftype in frame.it:
                show = shown if filt is None else shown and name in filt
                cached = leaves.get(child_nid)
                if cached is not None:
                    disk_ft, text, first_len = cached
                    if ftype != disk_ft:
                        raise _err(
                            f"directory {nid}: dirent type of {name!r} does not match its inode"
                        )
                    if child_nid in whiteout_nids:
                        raise _err(f"whiteout inode {child_nid} is hardlinked")
                    if show:
                        epath = prefix + (
                            name if clean or name.translate(same) == name else escape(name)
                        )
                        if first_len:
                            line = _hardlink_line(epath, text[first_len:], text[:first_len])
                        else:
                            line = epath + text
                            leaves[child_nid] = (disk_ft, line, len(epath))
                        append(line)
                        total += len(line)
                        if total > limit:
                            return None
                    continue
                # A leaf's line tail: from the fast reader, else the general path below.
                tail: bytes | None = None
                # A subdirectory to enter: (its nlink, dirents, escaped path, line if shown).
                sub: tuple[int, _Dirents, bytes, bytes | None] | None = None
                if ftype == _FT_DIR:
                    if fast_dir is not None and child_nid not in dirs_seen:
                        got = fast_dir(child_nid)
                        if got is not None:
                            dirs_seen.add(child_nid)
                            dvals, dnlink, ents = got
                            epath = prefix + (
                                name if clean or name.translate(same) == name else escape(name)
                            )
                            sub = (dnlink, ents, epath, _DIR_LINE % (epath, *dvals) if show else None)
                elif fast is not None:
                    tail = fast(child_nid, ftype)
                if tail is None and sub is None:
                    child = r.inode(child_nid)
                    ctype = child.mode & _S_IFMT
                    if ftype != _MODE_TO_FT[ctype]:
                        raise _err(f"directory {nid}: dirent type of {name!r} does not match its inode")
                    if ctype == _S_IFDIR:
                        if child_nid in dirs_seen:
                            raise _err(f"directory inode {child_nid} reached twice (hardlink or cycle)")
                        dirs_seen.add(child_nid)
                        cx = r.xattrs(child)
                        epath = prefix + (
                            name if clean or name.translate(same) == name else escape(name)
                        )
                        # Its link count is checked against its subdirectories
                        # when the frame is done (before anything is returned).
                        sub = (
                            child.nlink,
                            r.dirent_lists(child),
                            epath,
                            self._dir_line(epath, child, cx, child.nlink) if show else None,
                        )
                    elif ctype == _S_IFCHR and child.u == 0 and epoch1:
                        # A native whiteout: in V0/V1 only the root's stubs are,
                        # and reading drops them (as reader._Builder does).
                        if not (is_root and name in _HEX2):
                            raise _err(f"native whiteout {name!r} outside the root stub table")
                        if child_nid in whiteout_nids:
                            raise _err(f"whiteout inode {child_nid} is hardlinked")
                        if child.datalayout != _FLAT_PLAIN or child.size:
                            raise _err(f"whiteout stub {name!r} has data")
                        r.raw_xattrs(child)
                        whiteout_nids.add(child_nid)
                        continue
                    else:
                        tail, whiteout = self._leaf(child, name)
                        if whiteout:
                            whiteout_nids.add(child_nid)
                if sub is not None:
                    dnlink, ents, epath, dline = sub
                    frame.subdirs += 1
                    if is_root and show:
                        root_subdirs += 1
                    if dline is not None:
                        append(dline)
                        total += len(dline)
                        if total > limit:
                            return None
                    stack.append(
                        self._frame(child_nid, dnlink, ents, nid, depth + 1, epath + b"/", show, None)
                    )
                    descended = True
                    break
                assert tail is not None  # a leaf: the fast reader's or _leaf's
                if show:
                    epath = prefix + (
                        name if clean or name.translate(same) == name else escape(name)
                    )
                    line = epath + tail
                    leaves[child_nid] = (ftype, line, len(epath))
                    append(line)
                    total += len(line)
                    if total > limit:
                        return None
                else:
                    leaves[child_nid] = (ftype, tail, 0)
            if descended:
                continue
            stack.pop()
            if frame.nlink != 2 + frame.subdirs:
                raise _err(
                    f"directory {nid}: link count {frame.nlink}, expected {2 + frame.subdirs}"
                )
            if is_root and epoch1:
                hex_slots = sum(1 for name in frame.names if name in _HEX2)
                if hex_slots != len(_HEX2):
                    raise _err(f"root has {hex_slots} of the 256 whiteout stub entries 00..ff")
        out[0] = self._dir_line(b"/", root_ino, root_x, 2 + root_subdirs)
        return out

    def _leaf(self, ino: _Inode, name: bytes) -> tuple[bytes, bool]:
        """(_LEAF_TAIL, whiteout?), with
        reader._Builder._leaf's checks and dumpfile._leaf_fields' values."""
        r = self.r
        x = r.xattrs(ino)
        t = ino.mode & _S_IFMT
        size = rdev = 0
        payload: bytes | None = None
        content: bytes | None = None
        digest: str | None = None
        whiteout = False
        if t == _S_IFREG:
            if x.whiteout:
                if not r.epoch1:
                    raise _err(f"escaped whiteout {name!r} in a V2 image")
                if ino.datalayout != _FLAT_PLAIN or ino.size:
                    raise _err(f"escaped whiteout {name!r} has data")
                t = _S_IFCHR
                whiteout = True
            elif ino.datalayout == _CHUNK_BASED:
                size = ino.size
                digest, payload = self._external(ino, x)
            else:
                if ino.size > limits.INLINE_CONTENT_MAX:
                    raise _err(
                        f"inline file {name!r} of {ino.size} bytes "
                        f"(max {limits.INLINE_CONTENT_MAX})"
                    )
                size = ino.size
                if size:
                    content = r.content(ino)
        elif t == _S_IFLNK:
            if ino.datalayout == _CHUNK_BASED:
                raise _err(f"symlink {name!r}: chunk-based layout")
            if not 0 < ino.size <= limits.SYMLINK_MAX:
                raise _err(f"symlink {name!r}: target length {ino.size}")
            if (
                r.epoch1
                and ino.datalayout == _FLAT_INLINE
                and (ino.pos % _BLK + (ino.inline_end - ino.pos) > _BLK)
            ):
                raise _err(f"symlink {name!r}: inode and target straddle a block")
            payload = r.content(ino)
            if b"\0" in payload:
                raise _err(f"symlink {name!r}: NUL in target")
            size = len(payload)
        else:
            if ino.datalayout != _FLAT_PLAIN or ino.size:
                raise _err(f"special file {name!r} has data")
            if t == _S_IFCHR or t == _S_IFBLK:
                rdev = ino.u
                whiteout = t == _S_IFCHR and rdev == 0
        tail = _LEAF_TAIL % (
            size,
            _MID
            % (
                t | (ino.mode & 0o7777),
                ino.nlink,
                ino.uid,
                ino.gid,
                rdev,
                ino.mtime,
                ino.mtime_nsec,
            ),
            _escape_optional(payload),
            _escape_optional(content),
            digest.encode() if digest else b"-",
            self._xattrs(x.user),
        )
        return tail, whiteout

    def _external(self, ino: _Inode, x: _Xattrs) -> tuple[str | None, bytes | None]:
        """(digest, payload field) of an external file, checked as the reader does."""
        digest, payload = external_parts(self.r, ino, x)
        if ino.size:
            # Regular.backing_path(): "" means none, None the digest's path.
            if payload is not None:
                return digest, payload or None
            if digest is not None:
                return digest, f"{digest[:2]}/{digest[2:]}".encode()
            return digest, None
        return digest, payload


_FastLeaf = Callable[[int, int], "bytes | None"]
_Dirents = tuple[list[bytes], list[int], list[int]]
_Head = tuple[int, int, int, int, int, int, int, int, int, int, int, bytes]
_FastDir = Callable[[int], "tuple[_DirValues, int, _Dirents] | None"]
_SharedXattr = tuple[bytes, int, int, bytes, bytes]  # name, filter bit, kind, value, field
_X_USER, _X_METACOPY, _X_REDIRECT, _X_OTHER = range(4)
# An inode, the xattr header after it and the 4 bytes after that (the
# first shared xattr reference) in one unpack; only used where that much
# of the image follows the inode (else the general path reads it).
_EXT_X = struct.Struct(
    "<" + fmt.EXTENDED_INODE.format[1:] + fmt.XATTR_IBODY_HEADER.format[1:] + "I"
).unpack_from
_COMPACT_X = struct.Struct(
    "<" + fmt.COMPACT_INODE.format[1:] + fmt.XATTR_IBODY_HEADER.format[1:] + "I"
).unpack_from
_EXT_X_SIZE = fmt.EXTENDED_INODE_SIZE + fmt.XATTR_IBODY_HEADER_SIZE + 4
_COMPACT_X_SIZE = fmt.COMPACT_INODE_SIZE + fmt.XATTR_IBODY_HEADER_SIZE + 4
_INLINE_MAX = limits.INLINE_CONTENT_MAX
_ENTRY_UNPACK = fmt.XATTR_ENTRY.unpack_from
_N_PREFIXES = len(fmt.XATTR_PREFIXES)
_HOLES = [_NULL_CHUNKS[: 4 * n] for n in range(16)]  # the indexes of small files


def _xattr_field(name: bytes, value: bytes) -> bytes:
    """The escaped " name=value" field of a dump line."""
    return b" " + escape(name, escape_equal=True) + b"=" + escape(value, escape_equal=True)


_SYMLINK_MAX = limits.SYMLINK_MAX


def _fast_readers(d: _Dumper) -> tuple[_FastLeaf, _FastDir]:
    """Fused readers for the common inodes, unpacked and checked in one go
    (no _Inode/_Xattrs objects): `leaf(nid, dirent type)` gives the
    _LEAF_TAIL of a regular file or symlink, `directory(nid)` the
    _DIR_LINE values (link count third) and the dirent lists of a directory.
    Either gives None instead, and the caller then takes the general path
    (r.inode, _Dumper._leaf, r.dirent_lists), which reads the inode again
    and raises the reader's own error if it is bad, or handles the rarer
    shape.

    None is given for anything the general path would refuse (the same
    checks, in any order) and for what these do not handle: whiteouts,
    devices, fifos, sockets, overlay xattrs other than metacopy/redirect
    (and those on anything but an external file), empty external files.
    Nothing is changed before a value is returned (the work bound is
    charged last, with what the general path charges), so the fallback
    starts afresh; only a directory's dirent blocks are parsed after the
    charge, by the reader's own code, whose error then is the general
    path's too.
    """
    r = d.r
    data = r.data
    n = r.n
    max_nid = (n - fmt.COMPACT_INODE_SIZE) // fmt.INODE_SLOT_SIZE
    epoch1 = r.epoch1
    use_filter = r.filter
    build_time = r.info.build_time
    build_nsec = r.info.build_time_nsec
    xattr_fields = d.xattr_fields
    # shared xattr reference -> _SharedXattr (valid entries only)
    shared: dict[int, _SharedXattr] = {}
    # metacopy value -> digest field (valid values only)
    digests: dict[bytes, bytes] = {}
    # (mode, nlink, uid, gid, mtime, nsec) -> _MID with rdev 0
    mids: dict[tuple[int, int, int, int, int, int], bytes] = {}
    same = _SAME

    # per prefix index: name suffix -> (name, filter bit, kind), valid names only
    by_prefix: list[dict[bytes, tuple[bytes, int, int]]] = [{} for _ in range(_N_PREFIXES)]

    def xattr_name(index: int, suffix: bytes) -> tuple[bytes, int, int] | None:
        # reader._Reader._entry's name checks; xattrs()'s classification
        name = fmt.XATTR_PREFIXES[index] + suffix
        if not name or b"\0" in name or (index == 0 and name.startswith(_KERNEL_PREFIXES)):
            return None
        bit = 1 << _filter_bit(index, suffix) if use_filter else 0
        if not name.startswith(_OVERLAY_PREFIXES):
            kind = _X_USER
        elif name == fmt.XATTR_OVERLAY_METACOPY:
            kind = _X_METACOPY
        elif name == fmt.XATTR_OVERLAY_REDIRECT:
            kind = _X_REDIRECT
        else:
            kind = _X_OTHER
        got = by_prefix[index][suffix] = (name, bit, kind)
        return got

    # An inline entry's header and name -> (value start, value end, entry
    # size, name, filter bit, kind), valid names only.
    entries: dict[bytes, tuple[int, int, int, bytes, int, int]] = {}

    def entry_head(head: bytes) -> tuple[int, int, int, bytes, int, int] | None:
        # reader._Reader._entry: a known prefix index, a valid name
        if len(head) < 4 or len(head) != 4 + head[0]:
            return None  # beyond the image: the entry is refused
        name_len, index, value_size = _ENTRY_UNPACK(head, 0)
        if index >= _N_PREFIXES:
            return None
        known = by_prefix[index].get(head[4:]) or xattr_name(index, head[4:])
        if known is None:
            return None
        xname, bit, kind = known
        step = 4 + ((name_len + value_size + 3) & ~3)
        got = entries[head] = (4 + name_len, 4 + name_len + value_size, step, xname, bit, kind)
        return got

    def shared_xattr(ref: int) -> _SharedXattr | None:
        try:
            index, suffix, name, value = r._shared_entry(ref)
        except ImageError:
            return None
        known = by_prefix[index].get(suffix) or xattr_name(index, suffix)
        if known is None:  # pragma: no cover - _shared_entry checked the name
            return None
        _, bit, kind = known
        field = _xattr_field(name, value) if kind == _X_USER else b""
        got = shared[ref] = (name, bit, kind, value, field)
        return got

    def metacopy_digest(metacopy: bytes) -> bytes | None:
        """The digest field of a metacopy value, or None if it is invalid."""
        try:
            digest = _metacopy_digest(0, metacopy)
        except ImageError:
            return None
        got = digests[metacopy] = digest.encode() if digest else b"-"
        return got

    def inode_head(nid: int) -> _Head | None:
        """reader._Reader.inode's fields (and checks) with the xattr header
        after it, in one unpack: (pos, format, icount, mode, nlink, size, u,
        xattr filter, shared count, first ref, end of the inode, the line's
        mode..mtime part)."""
        if nid < _FIRST_NID or nid > max_nid:
            return None
        pos = nid * 32  # fmt.INODE_SLOT_SIZE
        if data[pos] & 1:
            if pos + _EXT_X_SIZE > n:
                return None
            (
                f,
                icount,
                mode,
                _,
                size,
                u,
                _,
                uid,
                gid,
                mtime,
                nsec,
                nlink,
                xfilter,
                xcount,
                xref,
            ) = _EXT_X(data, pos)
            if nsec >= 1_000_000_000:
                return None
            if mtime >= 1 << 63:
                mtime -= 1 << 64
            start = pos + 64  # fmt.EXTENDED_INODE_SIZE
        else:
            if pos + _COMPACT_X_SIZE > n:
                return None
            (f, icount, mode, nlink, size, _, u, _, uid, gid, xfilter, xcount, xref) = _COMPACT_X(
                data, pos
            )
            mtime = build_time
            nsec = build_nsec
            start = pos + 32  # fmt.COMPACT_INODE_SIZE
        # The line's mode..mtime part, formatted once per distinct value.
        key = (mode, nlink, uid, gid, mtime, nsec)
        mid = mids.get(key)
        if mid is None:
            mid = mids[key] = _MID % (mode, nlink, uid, gid, 0, mtime, nsec)
        return pos, f, icount, mode, nlink, size, u, xfilter, xcount, xref, start, mid

    def leaf(nid: int, ftype: int) -> bytes | None:
        head = inode_head(nid)
        if head is None:
            return None
        pos, f, icount, mode, _, size, u, xfilter, xcount, xref, start, mid = head
        t = mode & _S_IFMT
        if f > 0xF or ftype != (1 if t == _S_IFREG else 7 if t == _S_IFLNK else -1):
            return None  # unknown format bits; a dirent type mismatch; other types
        layout = f & 0xE  # fmt.DATALAYOUT_MASK
        if icount:
            if icount == 1:
                return None
            inline_start = start + 8 + 4 * icount  # the header, 4 * (icount - 1)
        else:
            inline_start = start
        if layout == _FLAT_INLINE:
            tail = size % _BLK
            inline_end = inline_start + tail
            if tail and (inline_start % _BLK) + tail > _BLK:
                return None
        elif layout == _FLAT_PLAIN or layout == _CHUNK_BASED:
            inline_end = inline_start
        else:
            return None
        if inline_end > n:
            return None
        charge = inline_start - start
        user = b""
        metacopy = redirect = None
        if icount:
            x = xattrs(start, inline_start, xfilter, xcount, xref)
            if x is None:
                return None
            user, metacopy, redirect = x
        if t == _S_IFREG and layout == _CHUNK_BASED:
            if not size or size > _MAX_EXTERNAL_SIZE or u & 0xFFE0:  # (u & 0xFFFF) & ~0x1F
                return None
            if epoch1:
                chunks = -(-size >> (fmt.BLOCK_BITS + (u & fmt.CHUNK_FORMAT_BLKBITS_MASK)))
                if chunks > _CHECKED_CHUNKS:
                    chunks = 0
            else:
                chunks = 1
            # Inside the image and all holes (no copy of the image's bytes).
            holes = _HOLES[chunks] if chunks < 16 else _NULL_CHUNKS[: 4 * chunks]
            if not data.startswith(holes, inline_start):
                return None
            charge += 4 * chunks
            # reader.external_parts' xattr checks, _Dumper._external's fields
            if metacopy is None:
                return None
            digest = digests.get(metacopy)
            if digest is None:
                digest = metacopy_digest(metacopy)
                if digest is None:
                    return None
            if redirect is None:
                payload = b"-"  # with a digest: C's "payload -"; without: none
            else:
                # The redirect path, also when it is the one the digest gives.
                payload = redirect[1:]
                if not payload or redirect[0] != 0x2F:  # "/"
                    return None
                if payload.translate(same) != payload:  # (NUL among them)
                    if b"\0" in payload:
                        return None
                    payload = _escape_optional(payload)
                elif payload == b"-":
                    payload = b"\\x2d"
            left = r.budget - charge
            if left < 0:
                return None
            r.budget = left
            return _LEAF_TAIL % (size, mid, payload, b"-", digest, user)
        if metacopy is not None or redirect is not None:
            return None
        if t == _S_IFREG:
            if size > _INLINE_MAX:
                return None
        elif (
            layout == _CHUNK_BASED
            or not 0 < size <= _SYMLINK_MAX
            or (epoch1 and layout == _FLAT_INLINE and pos % _BLK + (inline_end - pos) > _BLK)
        ):
            return None
        content = None
        if size:
            # reader._Reader.blocks and .content
            if size > n:
                return None
            count = -(-size // _BLK) if layout == _FLAT_PLAIN else size // _BLK
            if count and (u == 0 or (u + count) * _BLK > n):
                return None
            charge += size
            if layout == _FLAT_PLAIN:
                content = data[u * _BLK : u * _BLK + size]
            elif count:
                content = data[u * _BLK : (u + count) * _BLK] + data[inline_start:inline_end]
            else:
                content = data[inline_start:inline_end]
        left = r.budget - charge
        if left < 0:
            return None
        if t == _S_IFLNK:
            assert content is not None
            if content.find(b"\0") >= 0:  # (find: see reader._dirent_block)
                return None
        r.budget = left
        if t == _S_IFREG:
            return _LEAF_TAIL % (size, mid, b"-", _escape_optional(content), b"-", user)
        return _LEAF_TAIL % (size, mid, _escape_optional(content), b"-", b"-", user)

    def xattrs(
        start: int, inline_start: int, name_filter: int, count: int, first_ref: int
    ) -> tuple[bytes, bytes | None, bytes | None] | None:
        """(user field, metacopy, redirect) of an xattr area: the header's
        bloom filter and shared count and the 4 bytes after the header are
        given. reader._Reader._xattr_dict and .xattrs: inline entries, then
        shared ones; unique names, each admitted by the bloom filter."""
        p = start + 12 + 4 * count
        if p > inline_start:
            return None
        user = b""
        metacopy = redirect = None
        # A name repeated is the same kind: a second metacopy or redirect
        # is caught as such, user names are compared at the end.
        user_names: list[bytes] | None = None
        while p < inline_start:
            if p + 4 > inline_start:
                return None
            # The entry's header and name are the key of what they mean.
            head = data[p : p + 4 + data[p]]
            entry = entries.get(head)
            if entry is None:
                entry = entry_head(head)
                if entry is None:
                    return None
            value_start, value_end, step, xname, bit, kind = entry
            value = data[p + value_start : p + value_end]
            p += step
            if p > inline_start or name_filter & bit:
                return None
            if kind == _X_USER:
                item = (xname, value)
                field = xattr_fields.get(item)
                if field is None:
                    field = xattr_fields[item] = _xattr_field(xname, value)
                user += field
                if user_names is None:
                    user_names = [xname]
                else:
                    user_names.append(xname)
            elif kind == _X_REDIRECT and redirect is None:
                redirect = value
            elif kind == _X_METACOPY and metacopy is None:
                metacopy = value
            else:
                return None  # other overlay xattrs; a repeated one
        if count == 1:
            refs: tuple[int, ...] = (first_ref,)
        else:
            refs = _REFS[count].unpack_from(data, start + 12)
        for ref in refs:
            x = shared.get(ref)
            if x is None:
                x = shared_xattr(ref)
                if x is None:
                    return None
            xname, bit, kind, value, field = x
            if name_filter & bit:
                return None
            if kind == _X_USER:
                user += field
                if user_names is None:
                    user_names = [xname]
                else:
                    user_names.append(xname)
            elif kind == _X_METACOPY and metacopy is None:
                metacopy = value
            elif kind == _X_REDIRECT and redirect is None:
                redirect = value
            else:
                return None
        if user_names is not None and len(set(user_names)) != len(user_names):
            return None  # a duplicate name
        return user, metacopy, redirect

    def directory(nid: int) -> tuple[_DirValues, int, _Dirents] | None:
        # reader._Reader.inode, .xattrs, .dirent_lists (as leaf())
        head = inode_head(nid)
        if head is None:
            return None
        _, f, icount, mode, nlink, size, u, xfilter, xcount, xref, start, mid = head
        if f > 0xF or mode & _S_IFMT != _S_IFDIR or icount == 1:
            return None
        layout = f & 0xE
        inline_start = start + 8 + 4 * icount if icount else start
        if layout == _FLAT_INLINE:
            tail = size % _BLK
            inline_end = inline_start + tail
            if tail and (inline_start % _BLK) + tail > _BLK:
                return None
            count = size // _BLK
        elif layout == _FLAT_PLAIN:
            inline_end = inline_start
            count = -(-size // _BLK)
        else:
            return None  # chunk-based: refused; or unknown
        if inline_end > n or not size or size > n:
            return None
        if count and (u == 0 or (u + count) * _BLK > n):
            return None
        user = b""
        if icount:
            x = xattrs(start, inline_start, xfilter, xcount, xref)
            if x is None or x[1] is not None or x[2] is not None:
                return None
            user = x[0]
        left = r.budget - (inline_start - start) - size
        if left < 0:
            return None
        r.budget = left
        ents = r._dirent_lists(nid, u, count, size, inline_start)
        return (size, mid, user), nlink, ents

    return leaf, directory


def _check_dots(
    nid: int, parent_nid: int, names: list[bytes], nids: list[int], types: list[int]
) -> None:
    """reader._Builder's "." and ".." checks; then both are removed."""
    if len(names) > 1 and names[0] == b"." and names[1] == b"..":
        # The usual case: no name sorts before them.
        if nids[0] != nid or types[0] != _FT_DIR:
            raise _err(f"directory {nid}: . points to inode {nids[0]}")
        if nids[1] != parent_nid or types[1] != _FT_DIR:
            raise _err(f"directory {nid}: .. points to inode {nids[1]}")
        del names[:2], nids[:2], types[:2]
        return
    # Sorted names: "." and ".." are found by bisection (names starting
    # with "." and a byte below "." may sit between them).
    i = bisect_left(names, b".")
    dot = i < len(names) and names[i] == b"."
    if dot and (nids[i] != nid or types[i] != _FT_DIR):
        raise _err(f"directory {nid}: . points to inode {nids[i]}")
    j = bisect_left(names, b"..", i)
    dotdot = j < len(names) and names[j] == b".."
    if dotdot and (nids[j] != parent_nid or types[j] != _FT_DIR):
        raise _err(f"directory {nid}: .. points to inode {nids[j]}")
    if not (dot and dotdot):
        raise _err(f"directory {nid} lacks . or ..")
    for k in (j, i):
        del names[k], nids[k], types[k]


def dump_lines(
    data: bytes, *, toplevel: Collection[bytes] | None = None, max_bytes: float = float("inf")
) -> list[bytes] | None:
    """C `composefs-info dump` of a composefs image, as lines: what
    `dumpfile.dumps(read_image(data, toplevel=toplevel))` gives, with the
    same validation; `errors.ImageError` if the image is invalid.

    The lines are only returned once the whole image is validated, so they
    are held in memory: past `max_bytes` of them (deep trees of long names
    make the dump quadratic in the image size) this gives None, and the
    caller should use read_image + dumpfile.write, which streams.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        with no_gc():
            d = _Dumper(data, toplevel)
            try:
                return d.dump(max_bytes)
            finally:
                # Its tables go before the collector is back: its first pass
                # would otherwise walk every tuple in them.
                del d
    except (struct.error, ValueError, IndexError, KeyError, OverflowError) as e:
        # As read_image: every access is bounds-checked, so this is a bug.
        raise _err(f"unchecked structure ({type(e).__name__}: {e})") from None


def dump_image(data: bytes, *, toplevel: Collection[bytes] | None = None) -> bytes:
    """`dump_lines` joined (no size limit)."""
    lines = dump_lines(data, toplevel=toplevel)
    assert lines is not None
    return b"".join(lines)
