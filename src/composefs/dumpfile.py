"""The composefs dumpfile text format (composefs-dump(5)), read and write.

IO-free: `parse` takes bytes (or a binary file object, read in chunks) and
returns a tree; `dumps` returns bytes. Parsing follows C mkcomposefs 1.0.8
(inline content up to 5000 bytes, forward hardlink references, SIZE checked
against inline content, `CFS_PARSE_STRICT` rules when `strict=True`), but is
stricter than C where C silently accepts garbage (malformed integers,
malformed digests, NUL in xattr names).

One line per entry, space separated:

    PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST [XATTR...]
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Iterator

from . import limits
from .errors import DumpfileError
from .tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    Device,
    Directory,
    Fifo,
    Leaf,
    LeafContent,
    Regular,
    Socket,
    Stat,
    Symlink,
    leaf_link_counts,
    no_gc,
    walk,
)

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing

if TYPE_CHECKING:  # typing costs milliseconds at every CLI start
    from typing import BinaryIO

# Limits of C libcomposefs 1.0.8 (lcfs-writer.h, lcfs-internal.h, linux/limits.h).
INLINE_CONTENT_MAX = 5000
PATH_MAX = 4096
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0xFFFF
# Dumpfile input may use at most half the space an inode's xattrs can take.
EXTERNAL_XATTR_MAX = 0xFFFF // 2
_XATTR_HEADER_SIZE = 12
_XATTR_META_SIZE = 4
_LINE_XATTR_MAX = 0xFFFF
# No valid line comes near this: a path of 2048 255-byte names, xattrs and
# inline content, all fully escaped, stay under 3 MiB. Longer lines are
# refused as they arrive, not accumulated.
MAX_LINE = 8 << 20

_VALID_TYPES = frozenset((S_IFREG, S_IFDIR, S_IFLNK, S_IFBLK, S_IFCHR, S_IFSOCK, S_IFIFO))
_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{64}(?:[0-9a-fA-F]{64})?")
_OCTAL = re.compile(rb"[0-7]+")
# A well-formed, non-hardlink-only line; anything else takes the careful path.
_LINE = re.compile(
    rb"([^ \0]*) (\d+) (@?)([0-7]+) (\d+) (\d+) (\d+) (\d+) (-?\d+)\.(\d+)"
    rb" ([^ \0]*) ([^ \0]*) ([^ \0]*)(?: ([^\0]*))?"
)
_HEXDIGITS = b"0123456789abcdefABCDEF"


# -- escaping ---------------------------------------------------------------


def unescape(field: bytes) -> bytes:
    """Undo dumpfile escaping (`\\\\`, `\\n`, `\\r`, `\\t`, `\\xHH`)."""
    i = field.find(b"\\")
    if i < 0:
        return field
    out = bytearray(field[:i])
    n = len(field)
    while i < n:
        c = field[i]
        if c != 0x5C:  # not a backslash: copy the run up to the next one
            j = field.find(b"\\", i)
            if j < 0:
                j = n
            out += field[i:j]
            i = j
            continue
        if i + 1 >= n:
            raise ValueError("no character after escape")
        e = field[i + 1]
        if e == 0x5C:
            out.append(0x5C)
        elif e == 0x6E:  # n
            out.append(0x0A)
        elif e == 0x72:  # r
            out.append(0x0D)
        elif e == 0x74:  # t
            out.append(0x09)
        elif e == 0x78:  # x
            hx = field[i + 2 : i + 4]
            if len(hx) < 2:
                raise ValueError("no hex characters after hex escape")
            if hx[0] not in _HEXDIGITS or hx[1] not in _HEXDIGITS:
                raise ValueError("invalid hex characters after hex escape")
            out.append(int(hx, 16))
            i += 4
            continue
        else:
            raise ValueError(f"unsupported escape type {chr(e)!r}")
        i += 2
    return bytes(out)


def _escape_table(escape_equal: bool) -> list[bytes]:
    table = []
    for c in range(256):
        if c == 0x5C:
            table.append(b"\\\\")
        elif c == 0x0A:
            table.append(b"\\n")
        elif c == 0x0D:
            table.append(b"\\r")
        elif c == 0x09:
            table.append(b"\\t")
        elif (c == 0x3D and escape_equal) or not 0x21 <= c <= 0x7E:
            table.append(b"\\x%02x" % c)
        else:
            table.append(bytes((c,)))
    return table


_ESC = _escape_table(False)
_ESC_EQ = _escape_table(True)
# Translation tables keeping the bytes printed as they are and changing
# every other: `value.translate(_SAME) == value` when nothing in value needs
# escaping (a C loop, several times faster than a regex search over a
# negated class, which was a tenth of `composefs-info dump`).
_SAME = bytes(c if _ESC[c] == bytes((c,)) else c ^ 1 for c in range(256))
_SAME_EQ = bytes(c if _ESC_EQ[c] == bytes((c,)) else c ^ 1 for c in range(256))


def escape(value: bytes, *, escape_equal: bool = False) -> bytes:
    """Escape a field the way C `composefs-info dump` does (C locale isgraph)."""
    if escape_equal:
        if value.translate(_SAME_EQ) == value:
            return value
        return b"".join([_ESC_EQ[c] for c in value])
    if value.translate(_SAME) == value:
        return value
    return b"".join([_ESC[c] for c in value])


def _escape_optional(value: bytes | None) -> bytes:
    # A literal "-" would read back as "none", so it is hex-escaped.
    if value is None:
        return b"-"
    if value == b"-":
        return b"\\x2d"
    return escape(value)


# -- parsing ----------------------------------------------------------------


def _chunks(source: bytes | BinaryIO, strict: bool) -> Iterator[list[bytes]]:
    """Yield lists of lines (without newlines); a file object is read in
    chunks. Raises for text after the last newline when `strict`, after
    every complete line was yielded."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        lines = bytes(source).split(b"\n")
        last = lines.pop()  # text after the final newline
        yield lines
        if last:
            if strict:
                raise DumpfileError("missing trailing newline", len(lines) + 1)
            yield [last]
        return
    lineno = 0
    # The unfinished line, in pieces: joined only once its newline arrives,
    # so a long line costs linear time, not a copy per chunk.
    pending: list[bytes] = []
    pending_len = 0
    while True:
        chunk = source.read(1 << 20)
        if not chunk:
            break
        if b"\n" not in chunk:
            pending.append(chunk)
            pending_len += len(chunk)
            if pending_len > MAX_LINE:
                raise DumpfileError(f"line longer than {MAX_LINE} bytes", lineno + 1)
            continue
        pending_len = 0
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
        parts = chunk.split(b"\n")
        rest = parts.pop()
        if rest:
            pending.append(rest)
            pending_len = len(rest)
        lineno += len(parts)
        yield parts
    rest = b"".join(pending)
    if rest:
        if strict:
            raise DumpfileError("missing trailing newline", lineno + 1)
        yield [rest]


def _optional(field: bytes) -> bytes | None:
    if field == b"-":
        return None
    return unescape(field)


def _split_path(path: bytes) -> tuple[bytes, bytes]:
    """(canonical parent path, name) the way C looks paths up: repeated
    slashes collapse, a trailing slash leaves an empty (invalid) name."""
    parts = path.split(b"/")
    name = parts[-1]
    parent = b"/" + b"/".join(p for p in parts[:-1] if p)
    return parent, name


class _Parser:
    __slots__ = (
        "_lineno", "_meta", "_xattrs", "deep", "dirs", "hardlinks", "root", "sha256_only",
        "strict",
    )

    def __init__(self, strict: bool, sha256_only: bool = False) -> None:
        self.strict = strict
        self.sha256_only = sha256_only
        self.root: Directory | None = None
        # canonical path -> directory, so a parent is found in one lookup
        self.dirs: dict[bytes, Directory] = {}
        # directories at the depth limit (limits.MAX_DEPTH): no children allowed
        self.deep: set[bytes] = set()
        # canonical path -> (line number, parent, name, target path)
        self.hardlinks: dict[bytes, tuple[int, Directory, bytes, bytes]] = {}
        self._lineno = 0
        # Fast-path caches (see `lines`): the MODE..MTIME fields, and the
        # xattr field, of a line repeat a lot within a dump.
        self._meta: dict[tuple[bytes, ...], _Meta | None] = {}
        self._xattrs: dict[bytes, dict[bytes, bytes] | None] = {}

    def lines(self, lines: list[bytes], lineno: int) -> int:
        """Parse `lines`, the first being number `lineno + 1`; returns the
        number of the last one.

        Most lines of a real dump have one of a few shapes: no escapes, an
        ordinary path below an already known directory, external or empty
        content. Those are handled here with few Python operations each;
        every other line (the root, hardlinks, escapes, inline content,
        anything odd or invalid) goes to the careful `line`, which also
        produces the error messages. The fast path never accepts a line
        that `line` would reject, nor builds anything different.
        """
        dirs = self.dirs
        meta_cache = self._meta
        meta_get = meta_cache.get
        xattr_cache = self._xattrs
        xattr_get = xattr_cache.get
        strict = self.strict
        slow = self.line
        unhexlify = binascii.unhexlify
        new = object.__new__
        for line in lines:
            lineno += 1
            try:
                if 92 in line or 0 in line:  # a backslash (escapes) or NUL
                    self._lineno = lineno
                    slow(line)
                    continue
                parts = line.split(b" ", 11)
                # unpacked whole: cheaper than slicing and indexing
                if len(parts) == 11:
                    (path, size_f, mode_f, nlink_f, uid_f, gid_f, rdev_f, mtime_f,
                     payload_f, content_f, digest_f) = parts  # fmt: skip
                    xattr_f = b""
                elif len(parts) == 12:
                    (path, size_f, mode_f, nlink_f, uid_f, gid_f, rdev_f, mtime_f,
                     payload_f, content_f, digest_f, xattr_f) = parts  # fmt: skip
                else:
                    self._lineno = lineno
                    slow(line)
                    continue
                key = (mode_f, nlink_f, uid_f, gid_f, rdev_f, mtime_f)
                meta = meta_get(key, _MISSING)
                if meta is _MISSING:
                    meta = _meta(key, strict)
                    if len(meta_cache) >= _CACHE_MAX:
                        meta_cache.clear()
                    meta_cache[key] = meta
                ppath, _, name = path.rpartition(b"/")
                parent = dirs.get(ppath or b"/")
                ln = len(name)
                if (
                    meta is None
                    or parent is None
                    or ln > NAME_MAX
                    or (ln < 3 and (not ln or name == b"." or name == b".."))
                    or name in parent.entries
                    or not size_f.isdigit()
                    or content_f != b"-"
                ):
                    self._lineno = lineno
                    slow(line)
                    continue
                size = int(size_f)
                if size >= _U64:
                    raise ValueError
                payload: bytes | None = payload_f
                if payload == b"-":
                    payload = None
                digest: str | None = None
                if digest_f != b"-" and digest_f:
                    n = len(digest_f)
                    if n != 64 and (n != 128 or self.sha256_only):
                        raise ValueError  # the careful path names the problem
                    try:
                        digest = unhexlify(digest_f).hex()  # strict: hex digits only
                    except binascii.Error:
                        raise ValueError from None
                xattrs: dict[bytes, bytes]
                if xattr_f:
                    xa = xattr_get(xattr_f, _MISSING_XATTRS)
                    if xa is _MISSING_XATTRS:
                        xa = _xattrs_or_none(xattr_f)
                        if len(xattr_cache) >= _CACHE_MAX:
                            xattr_cache.clear()
                        xattr_cache[xattr_f] = xa
                    if xa is None:
                        raise ValueError
                    xattrs = xa.copy()
                else:
                    xattrs = {}
                ftype, perm, nlink, uid, gid, rdev, mtime, nsec = meta
                # Stat(perm, uid, gid, mtime, nsec, xattrs), without the
                # class call (a third of the cost of building the entry)
                stat = new(Stat)
                stat.mode = perm
                stat.uid = uid
                stat.gid = gid
                stat.mtime = mtime
                stat.mtime_nsec = nsec
                stat.xattrs = xattrs
                if ftype == S_IFREG:
                    if not payload:
                        payload = None
                        if size and digest is not None:
                            payload = b""  # as in `line`
                    elif len(payload) >= PATH_MAX:
                        raise ValueError
                    # Leaf(stat, Regular(size, None, digest, payload), nlink), likewise
                    reg = new(Regular)
                    reg.size = size
                    reg.data = None
                    reg.digest = digest
                    reg.payload = payload
                    leaf = new(Leaf)
                    leaf.stat = stat
                    leaf.content = reg
                    leaf.nlink = nlink
                    leaf.primary = None
                    parent.entries[name] = leaf
                elif ftype == S_IFDIR:
                    d = Directory(stat)
                    d.size = size
                    parent.entries[name] = d
                    # ppath is "" or "/" for the root (C collapses "//")
                    self._add_dir(ppath + b"/" + name if len(ppath) > 1 else b"/" + name, d)
                elif ftype == S_IFLNK:
                    if not payload or len(payload) >= PATH_MAX or (strict and size != len(payload)):
                        raise ValueError
                    parent.entries[name] = Leaf(stat, Symlink(payload), nlink)
                else:
                    special: LeafContent
                    if ftype == S_IFCHR or ftype == S_IFBLK:
                        special = Device(ftype, rdev)
                    elif ftype == S_IFIFO:
                        special = Fifo()
                    else:
                        special = Socket()
                    parent.entries[name] = Leaf(stat, special, nlink)
            except ValueError as e:
                if not str(e):
                    # The fast path only says "not mine" before changing
                    # anything; the careful path gives the real verdict.
                    try:
                        self._lineno = lineno
                        slow(line)
                        continue
                    except ValueError as e2:
                        e = e2
                raise DumpfileError(str(e), lineno) from None
        return lineno

    def line(self, line: bytes) -> None:
        m = _LINE.fullmatch(line)
        if m is not None:
            # Fast path: one regex both splits and validates the numbers.
            (path_f, size_f, at, mode_f, nlink_f, uid_f, gid_f, rdev_f, sec_f, nsec_f,
             payload_f, content_f, digest_f, xattr_f) = m.groups()
            is_hardlink = bool(at)
        else:
            if b"\0" in line:
                raise ValueError(f"invalid embedded NUL character at position {line.index(0)}")
            parts = line.split(b" ", 11)
            if len(parts) < 11:
                if not line:
                    raise ValueError("empty line")
                # C reads missing trailing fields as empty strings.
                parts += [b""] * (11 - len(parts))
            (path_f, size_f, mode_f, nlink_f, uid_f, gid_f, rdev_f, mtime_f,
             payload_f, content_f, digest_f) = parts[:11]
            xattr_f = parts[11] if len(parts) == 12 else None
            is_hardlink = mode_f[:1] == b"@"
            if is_hardlink:
                mode_f = mode_f[1:]
            if _OCTAL.fullmatch(mode_f) is None:
                raise ValueError(f"invalid mode {mode_f.decode(errors='replace')!r}")
            if not is_hardlink:  # C does not read a hardlink's other fields
                for f, what in ((size_f, "size"), (nlink_f, "nlink"), (uid_f, "uid"),
                                (gid_f, "gid"), (rdev_f, "rdev")):
                    if not f.isdigit():
                        raise ValueError(f"invalid {what} {_show(f)!r}")
                sec_f, dot, nsec_f = mtime_f.partition(b".")
                sec_digits = sec_f[1:] if sec_f[:1] == b"-" else sec_f
                if not dot or not sec_digits.isdigit() or not nsec_f.isdigit():
                    raise ValueError(f"invalid mtime {_show(mtime_f)!r}")
        path = unescape(path_f)
        if not path:
            raise ValueError("invalid empty path")
        mode = int(mode_f, 8)
        ftype = mode & S_IFMT
        if ftype not in _VALID_TYPES and not (is_hardlink and mode == 0):
            raise ValueError(f"invalid mode {mode:o}")
        if mode > 0xFFFFFFFF:
            raise ValueError(f"invalid mode {mode:o}")

        if path == b"/":
            if self.root is not None:
                raise ValueError("can't have multiple roots")
            if ftype != S_IFDIR or is_hardlink:
                raise ValueError("root must be a directory")
            parent: Directory | None = None
            name = b""
        else:
            if self.root is None:
                raise ValueError("root node not present")
            if path[:1] == b"/" and b"//" not in path and path[-1:] != b"/":
                ppath, _, name = path.rpartition(b"/")
                ppath = ppath or b"/"
            else:
                ppath, name = _split_path(path)
            parent = self.dirs.get(ppath)
            if parent is None:
                if ppath in self.deep:
                    raise ValueError(f"{_show(path)}: {limits.depth_error()}")
                node = self.root.lookup(ppath)
                if node is None:
                    raise ValueError(f"parent directory missing for {_show(path)}")
                raise ValueError(f"parent must be a directory for {_show(path)}")
            if name in (b".", b".."):
                raise ValueError(f"invalid . or .. in path: {_show(path)}")
            if not name:
                raise ValueError(f"invalid empty name in path: {_show(path)}")
            if len(name) > NAME_MAX:
                raise ValueError(f"name too long in path: {_show(path)}")
            if name in parent.entries:
                raise ValueError(f"path {_show(path)} already exists")

        if is_hardlink:
            if ftype == S_IFDIR:
                raise ValueError("directories can't be hardlinked")
            target = _optional(payload_f)
            if not target:
                raise ValueError("no target path for the hardlink")
            assert parent is not None
            # Placeholder until every line is read: C allows forward references.
            parent.entries[name] = _PENDING
            cpath = b"/" + name if ppath == b"/" else ppath + b"/" + name
            self.hardlinks[cpath] = (self._lineno, parent, name, target)
            return

        size = int(size_f)
        nlink = int(nlink_f)
        uid = int(uid_f)
        gid = int(gid_f)
        rdev = int(rdev_f)
        if uid > 0xFFFFFFFF or gid > 0xFFFFFFFF:
            raise ValueError("uid or gid out of range")
        if nlink > 0xFFFFFFFF:
            raise ValueError("nlink out of range")
        if size >= 1 << 64 or rdev >= 1 << 64:
            raise ValueError("size or rdev out of range")
        mtime = int(sec_f)
        mtime_nsec = int(nsec_f)
        if not -(1 << 63) <= mtime < (1 << 63):
            raise ValueError("mtime out of range")
        if mtime_nsec >= 1_000_000_000:
            raise ValueError(f"invalid mtime nanoseconds {mtime_nsec}")
        payload = _optional(payload_f)
        content = _optional(content_f)
        if content is not None and len(content) != size:
            raise ValueError(f"invalid content size {len(content)}, must match size {size}")
        digest: str | None = None
        if digest_f not in (b"-", b""):
            raw = unescape(digest_f)
            if _HEX_DIGEST.fullmatch(raw) is None:
                raise ValueError(f"invalid fs-verity digest {_show(raw)}")
            if self.sha256_only and len(raw) != 64:
                # C 1.0.8 would keep the first 32 bytes: a digest no file has
                raise ValueError(
                    f"fs-verity digest of {len(raw)} hex digits: this format holds"
                    " sha256 digests (64 hex digits) only"
                )
            digest = raw.decode().lower()

        if ftype not in (S_IFCHR, S_IFBLK) and rdev != 0 and self.strict:
            raise ValueError("non-zero devnum on non-device")

        xattrs: dict[bytes, bytes] = {}
        if xattr_f:  # a single trailing space means no xattrs
            if len(xattr_f) > _LINE_XATTR_MAX:
                raise ValueError("too many xattrs")
            # (trusted.overlay.whiteout on a regular file is the writer's to
            # judge: C's formats take an empty one as a whiteout, V2 none)
            xattrs = _parse_xattrs(xattr_f)
        stat = Stat(mode & 0o7777, uid, gid, mtime, mtime_nsec, xattrs)

        if ftype == S_IFDIR:
            d = Directory(stat)
            d.size = size
            if parent is None:
                self.root = d
                self.dirs[b"/"] = d
            else:
                parent.entries[name] = d
                self._add_dir(b"/" + name if ppath == b"/" else ppath + b"/" + name, d)
            return

        leaf_content: LeafContent
        if ftype == S_IFREG:
            if not payload:
                payload = None
            elif len(payload) >= PATH_MAX:
                raise ValueError("invalid payload: too long")
            if content is not None and len(content) > INLINE_CONTENT_MAX:
                raise ValueError(
                    f"inline content size {len(content)} exceeds maximum {INLINE_CONTENT_MAX}"
                )
            # Empty inline content is just an empty file (C stores no data).
            data = content if content else None
            if data is None and size and digest is not None and payload is None:
                payload = b""  # C: metacopy with the digest but no redirect
            leaf_content = Regular(size, data=data, digest=digest, payload=payload)
        elif ftype == S_IFLNK:
            if not payload:
                raise ValueError("invalid symlink: empty target")
            if len(payload) >= PATH_MAX:
                raise ValueError("invalid symlink: target too long")
            if self.strict:
                if size != len(payload):
                    raise ValueError(
                        f"invalid symlink size {len(payload)}, must match size {size}"
                    )
                if content:
                    raise ValueError("symlink cannot have content")
            leaf_content = Symlink(payload)
        elif ftype in (S_IFCHR, S_IFBLK):
            leaf_content = Device(ftype, rdev)
        elif ftype == S_IFIFO:
            leaf_content = Fifo()
        else:
            leaf_content = Socket()
        assert parent is not None
        parent.entries[name] = Leaf(stat, leaf_content, nlink)

    def _add_dir(self, cpath: bytes, d: Directory) -> None:
        # A directory whose children would be too deep for the reader.
        if cpath.count(b"/") >= limits.MAX_DEPTH:
            self.deep.add(cpath)
        else:
            self.dirs[cpath] = d

    def resolve_hardlinks(self) -> None:
        """Point every hardlink at its final target (C allows forward
        references and links to links; cycles and self-links are errors)."""
        assert self.root is not None
        root = self.root
        pending = self.hardlinks
        done: dict[bytes, Leaf] = {}

        def resolve(canon: bytes, lineno: int, target: bytes) -> Leaf:
            # Iterative: a chain of links to links may be thousands long.
            chain = [canon]
            seen = {canon}
            while True:
                tcanon = _canon(target)
                if tcanon in seen:
                    raise DumpfileError(f"self-referential hardlink {_show(target)}", lineno)
                leaf = done.get(tcanon)
                if leaf is not None:
                    break
                rec = pending.get(tcanon)
                if rec is None:
                    node = root.lookup(tcanon)
                    if node is None:
                        raise DumpfileError(f"no target at {_show(target)} for hardlink", lineno)
                    if isinstance(node, Directory):
                        raise DumpfileError(
                            f"hardlink target {_show(target)} is a directory", lineno
                        )
                    node.primary = tcanon  # C keeps the inode at the target's line
                    leaf = node
                    break
                chain.append(tcanon)
                seen.add(tcanon)
                lineno, target = rec[0], rec[3]
            for link in chain:
                done[link] = leaf
            return leaf

        for canon, (lineno, parent, name, target) in pending.items():
            parent.entries[name] = resolve(canon, lineno, target)


# (file type, permission bits, nlink, uid, gid, rdev, mtime, mtime_nsec)
_Meta = tuple[int, int, int, int, int, int, int, int]
_MISSING: _Meta = (-1, -1, -1, -1, -1, -1, -1, -1)
_MISSING_XATTRS: dict[bytes, bytes] = {}  # compared by identity only
_CACHE_MAX = 1 << 16
_U64 = 1 << 64
_META = re.compile(rb"([0-7]+) (\d+) (\d+) (\d+) (\d+) (-?\d+)\.(\d+)")


def _meta(fields: tuple[bytes, ...], strict: bool) -> _Meta | None:
    """The MODE..MTIME fields of a non-hardlink line, validated exactly as
    `_Parser.line` does, or None when that line must look at them."""
    m = _META.fullmatch(b" ".join(fields))
    if m is None:
        return None
    mode_f, nlink_f, uid_f, gid_f, rdev_f, sec_f, nsec_f = m.groups()
    mode = int(mode_f, 8)
    ftype = mode & S_IFMT
    nlink, uid, gid, rdev = int(nlink_f), int(uid_f), int(gid_f), int(rdev_f)
    mtime, nsec = int(sec_f), int(nsec_f)
    if (
        ftype not in _VALID_TYPES
        or mode > 0xFFFFFFFF
        or uid > 0xFFFFFFFF
        or gid > 0xFFFFFFFF
        or nlink > 0xFFFFFFFF
        or rdev >= _U64
        or not -(1 << 63) <= mtime < (1 << 63)
        or nsec >= 1_000_000_000
        or (strict and rdev != 0 and ftype not in (S_IFCHR, S_IFBLK))
    ):
        return None
    return ftype, mode & 0o7777, nlink, uid, gid, rdev, mtime, nsec


def _xattrs_or_none(field: bytes) -> dict[bytes, bytes] | None:
    """`_parse_xattrs` of an escape-free field, or None if it is invalid."""
    if len(field) > _LINE_XATTR_MAX:
        return None
    try:
        return _parse_xattrs(field)
    except ValueError:
        return None


def _canon(path: bytes) -> bytes:
    return b"/" + b"/".join(x for x in path.split(b"/") if x)


# A unique placeholder leaf for hardlinks not yet resolved.
_PENDING = Leaf(Stat(), Fifo())


def _parse_xattrs(field: bytes) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    used = 0
    for item in field.split(b" "):
        key_e, eq, value_e = item.partition(b"=")
        if not eq:
            raise ValueError("missing = in xattr")
        key = unescape(key_e)
        value = unescape(value_e)
        if not key:
            raise ValueError("empty xattr name")
        if b"\0" in key:
            raise ValueError("NUL in xattr name")
        if len(key) > XATTR_NAME_MAX:
            raise ValueError(f"xattr name too long ({len(key)} > {XATTR_NAME_MAX})")
        if len(value) > XATTR_VALUE_MAX:
            raise ValueError(f"xattr value too long ({len(value)} > {XATTR_VALUE_MAX})")
        old = xattrs.pop(key, None)
        if old is not None:
            used -= 2 * _XATTR_META_SIZE - 1 + len(key) + len(old)
            if not xattrs:
                used = 0
        entry = 2 * _XATTR_META_SIZE - 1 + len(key) + len(value)
        if not xattrs:
            entry += _XATTR_HEADER_SIZE
        if used + entry > EXTERNAL_XATTR_MAX:
            raise ValueError("xattrs too large")
        used += entry
        xattrs[key] = value
    return xattrs


def _show(b: bytes) -> str:
    return limits.show(b, 80)


def parse(
    source: bytes | BinaryIO, *, strict: bool = True, sha256_only: bool = False
) -> Directory:
    """Parse a dumpfile into a tree.

    `strict` follows C's `CFS_PARSE_STRICT`: a missing final newline, rdev
    on a non-device, a symlink SIZE that differs from its target length,
    and content on a symlink are errors. `sha256_only` refuses sha512
    digests (128 hex digits), which C's formats cannot hold. Raises
    DumpfileError naming the line.
    """
    p = _Parser(strict, sha256_only)
    with no_gc():
        lineno = 0
        for lines in _chunks(source, strict):
            lineno = p.lines(lines, lineno)
    if p.root is None:
        raise DumpfileError("no root directory (the first line must be /)")
    if p.hardlinks:
        p.resolve_hardlinks()
    return p.root


def parse_lines(lines: Iterable[bytes], *, strict: bool = True) -> Directory:
    """Parse from an iterable of lines without their newlines."""
    return parse(b"".join(line + b"\n" for line in lines), strict=strict)


# -- writing ----------------------------------------------------------------


def _leaf_fields(leaf: Leaf, nlink: int) -> tuple[int, int, bytes | None, bytes | None, str | None]:
    """(size, rdev, payload, content, digest) of a leaf as dump fields."""
    c = leaf.content
    if isinstance(c, Regular):
        if c.data is not None:
            # an empty file has no content field ("-"), as C writes it
            return c.size, 0, c.payload, c.data or None, c.digest
        payload = c.backing_path() if c.size else c.payload
        return c.size, 0, payload, None, c.digest
    if isinstance(c, Symlink):
        return len(c.target), 0, c.target, None, None
    if isinstance(c, Device):
        return 0, c.rdev, None, None, None
    return 0, 0, None, None, None


def _xattr_fields(xattrs: dict[bytes, bytes], sort: bool) -> bytes:
    items = sorted(xattrs.items()) if sort else xattrs.items()
    return b"".join(
        [b" " + escape(k, escape_equal=True) + b"=" + escape(v, escape_equal=True) for k, v in items]
    )


def _iter_lines(root: Directory, style: str) -> Iterator[bytes]:
    rust = style == "rust"
    counts = leaf_link_counts(root)
    first_path: dict[int, bytes] = {}
    for path, node in walk(root):
        epath = escape(path)
        if isinstance(node, Directory):
            st = node.stat
            size = 0 if rust or node.size is None else node.size
            yield b"%s %d %o %d %d %d 0 %d.%d - - -%s\n" % (
                epath, size, S_IFDIR | st.mode, node.nlink(), st.uid, st.gid, st.mtime,
                st.mtime_nsec, _xattr_fields(st.xattrs, rust),
            )
            continue
        key = id(node)
        links = counts[key]
        target = first_path.get(key) if links > 1 else None
        if target is None and links > 1:
            first_path[key] = path
        if target is not None and rust:
            yield b"%s 0 @120000 - - - - 0.0 %s - -\n" % (epath, _escape_optional(target))
            continue
        nlink = links if rust or node.nlink is None else node.nlink
        size, rdev, payload, content, digest = _leaf_fields(node, nlink)
        st = node.stat
        if target is not None:
            payload = target
        yield b"%s %d %s%o %d %d %d %d %d.%d %s %s %s%s\n" % (
            epath, size, b"@" if target is not None else b"", node.mode, nlink, st.uid, st.gid,
            rdev, st.mtime, st.mtime_nsec, _escape_optional(payload), _escape_optional(content),
            digest.encode() if digest else b"-", _xattr_fields(st.xattrs, rust),
        )


def dumps(root: Directory, *, style: str = "c") -> bytes:
    """Serialise a tree as a dumpfile.

    style "c" prints what C `composefs-info dump` prints: xattrs in stored
    order, hardlinks as full lines with `@` before the mode and the first
    path as payload, leaf link counts from `Leaf.nlink` when set. style
    "rust" prints what composefs-rs `cfsctl create-dumpfile` prints: sorted
    xattrs, directory size 0, short hardlink lines.
    """
    with no_gc():
        return b"".join(_iter_lines(root, style))


def write(root: Directory, out: BinaryIO, *, style: str = "c") -> None:
    """Stream a dumpfile to a binary file object."""
    buf: list[bytes] = []
    n = 0
    for line in _iter_lines(root, style):
        buf.append(line)
        n += len(line)
        if n >= 1 << 16:
            out.write(b"".join(buf))
            buf.clear()
            n = 0
    if buf:
        out.write(b"".join(buf))
