"""Tar archives for OCI layers: header parsing and tar -> splitstream splitting.

IO-free. Parsing follows what composefs-rs 0.7.0 does through tar-core 0.1,
so that layers give the same trees (and image ids) in both:

- ustar/GNU/v7 headers; numbers in octal or GNU base-256 (negative values
  are rejected); checksums as unsigned (or historic signed) byte sums.
- extension records before an entry: PAX ``x`` (path, linkpath, size, uid,
  gid, mtime with a fractional part, ``SCHILY.xattr.NAME``), GNU ``L``/``K``
  long name/link. They count only in ustar/GNU headers (a v7 header with
  type ``x`` is an ordinary, unsupported entry). Each kind at most once per
  entry, at most 16 records and 1 MiB of metadata per entry.
- PAX global ``g`` records are kept byte for byte but not applied
  (composefs-rs ignores them too).
- name precedence: PAX path > GNU long name > ustar prefix + name.
- a zero block followed by another zero block ends the archive; a single
  stray zero block in the middle is skipped. Whatever follows the end
  (record padding, even garbage) is kept so that the layer reassembles
  byte for byte.
- sparse entries (GNU ``S`` or PAX ``GNU.sparse.*``) and unknown entry
  types are rejected; header-only types (directories, links, devices,
  fifos) must have size 0.

Names stay bytes throughout (no decoding); ``..`` handling is the merge's
business (see `composefs.oci.layers`).

Splitting (`split_tar`: reads a file-like source, hands pieces to a sink):
headers, extension records, padding, contents of at most `inline_max`
bytes (64, composefs-rs's INLINE_CONTENT_MAX_V0) and everything after the
end-of-archive marker are inline; contents of regular files larger than
that become external objects. Reading back (`read_members`) takes the
splitstream's chunks and yields entries with their inline data or the
external object that holds their content.
"""

from __future__ import annotations

import os
import stat as _stat
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .. import limits
from ..errors import TarFormatError

BLOCK = 512
INLINE_MAX = 64
MAX_METADATA = 1024 * 1024
MAX_PENDING = 16
# Sizes beyond this are nonsense for any real layer (and would overflow
# the signed offsets other tools use).
MAX_SIZE = (1 << 63) - 1
_ZERO_BLOCK = bytes(BLOCK)

# Entry kinds (the file types a tar entry can make).
REG = "reg"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
CHR = "chr"
BLK = "blk"
FIFO = "fifo"

_KINDS = {
    b"0": REG,
    b"\0": REG,
    b"7": REG,
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHR,
    b"4": BLK,
    b"5": DIR,
    b"6": FIFO,
}

_TAR_WS = b" \t\n\v\f\r"

# The 512-byte header split into its fields in one call (cheaper than a
# slice per field): name mode uid gid size mtime chksum typeflag linkname
# magic+version uname gname devmajor devminor prefix (+12 bytes padding).
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")
_H_NAME, _H_MODE, _H_UID, _H_GID, _H_SIZE, _H_MTIME, _H_CHKSUM, _H_TYPE, _H_LINK = range(9)
_H_MAGIC, _H_DEVMAJOR, _H_DEVMINOR, _H_PREFIX = 9, 12, 13, 14


@dataclass(slots=True)
class TarEntry:
    """One archive member, with every extension record applied."""

    path: bytes
    kind: str
    mode: int  # permission bits only
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    size: int
    linkname: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def padded_size(self) -> int:
        return -(-self.size // BLOCK) * BLOCK

    @property
    def file_type(self) -> int:
        return _FILE_TYPES[self.kind]


_FILE_TYPES = {
    REG: _stat.S_IFREG,
    DIR: _stat.S_IFDIR,
    SYMLINK: _stat.S_IFLNK,
    HARDLINK: _stat.S_IFREG,
    CHR: _stat.S_IFCHR,
    BLK: _stat.S_IFBLK,
    FIFO: _stat.S_IFIFO,
}


def _show(name: bytes) -> str:
    return limits.show(name)


# -- numbers ----------------------------------------------------------------


# Parsed octal fields by their raw bytes. Layers repeat the same few
# modes, ids, mtimes and sizes thousands of times, so a lookup beats
# re-parsing; bounded so a hostile archive cannot grow it without end.
_OCTAL_CACHE: dict[bytes, int] = {}
_OCTAL_CACHE_MAX = 4096


def parse_octal(fld: bytes, what: str = "number") -> int:
    """An octal ASCII field: NUL-terminated, blank-padded; empty means 0."""
    value = _OCTAL_CACHE.get(fld)
    if value is not None:
        return value
    value = _parse_octal(fld, what)
    if len(_OCTAL_CACHE) >= _OCTAL_CACHE_MAX:
        _OCTAL_CACHE.clear()
    _OCTAL_CACHE[fld] = value
    return value


def _parse_octal(fld: bytes, what: str) -> int:
    nul = fld.find(b"\0")
    if nul >= 0:
        fld = fld[:nul]
    fld = fld.strip(_TAR_WS)
    if not fld:
        return 0
    # Digits 0-7 only (int() alone would also take signs and underscores).
    if fld.translate(None, b"01234567"):
        raise TarFormatError(f"tar header: invalid {what} field {fld[:20]!r}")
    return int(fld, 8)


def parse_number(fld: bytes, what: str = "number") -> int:
    """Octal, or GNU base-256 when the top bit of the first byte is set."""
    value = _OCTAL_CACHE.get(fld)
    if value is not None:
        return value
    if fld and fld[0] & 0x80:
        if fld[0] == 0xFF:
            raise TarFormatError(f"tar header: negative {what}")
        value = int.from_bytes(bytes([fld[0] & 0x7F]) + fld[1:], "big")
        if value > 0xFFFF_FFFF_FFFF_FFFF:
            raise TarFormatError(f"tar header: {what} out of range")
        return value
    return parse_octal(fld, what)


def _byte_sum(mv: memoryview) -> int:
    """Sum of the bytes of `mv` (at most 256 bytes): the low half of
    Adler-32 is 1 + that sum modulo 65521, and 256 * 255 < 65521, so zlib's
    C loop gives it exactly -- several times faster than sum() here."""
    return (zlib.adler32(mv) & 0xFFFF) - 1


def _checksum_ok(block: bytes | memoryview, field: bytes | None = None) -> bool:
    b = bytes(block)
    if field is None:
        field = b[148:156]
    stored = parse_octal(field, "checksum")
    # The checksum field itself counts as eight blanks.
    with memoryview(b) as mv:
        unsigned = _byte_sum(mv[:148]) + _byte_sum(mv[156:412]) + _byte_sum(mv[412:]) + 8 * 0x20
    if stored == unsigned:
        return True
    # Some historic tars summed signed chars.
    signed = unsigned - 256 * sum(1 for c in b[:148] + b[156:] if c & 0x80)
    return stored == signed


# -- PAX -------------------------------------------------------------------------


def parse_pax(data: bytes) -> list[tuple[bytes, bytes]]:
    """Records ``"LEN KEY=VALUE\\n"``; anything malformed is an error."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:
            # NUL padding after the last record (some writers add it).
            if data[pos:].strip(b"\0"):
                raise TarFormatError("tar: malformed PAX record")
            break
        sp = data.find(b" ", pos, min(n, pos + 24))
        if sp < 0:
            raise TarFormatError("tar: malformed PAX record length")
        digits = data[pos:sp]
        if not digits.isdigit():
            raise TarFormatError("tar: malformed PAX record length")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 3 or end > n or data[end - 1] != 0x0A:
            raise TarFormatError("tar: malformed PAX record")
        kv = data[sp + 1 : end - 1]
        eq = kv.find(b"=")
        if eq <= 0:
            raise TarFormatError("tar: malformed PAX record (no key)")
        out.append((kv[:eq], kv[eq + 1 :]))
        pos = end
    return out


def _pax_uint(value: bytes, key: str) -> int:
    if not value.isdigit():
        raise TarFormatError(f"tar: invalid PAX {key} {_show(value[:30])}")
    if len(value) > 20:
        value = value.lstrip(b"0") or b"0"
        if len(value) > 20:
            # beyond 2**64 (and int() refuses more than 4300 digits anyway)
            raise TarFormatError(f"tar: PAX {key} out of range")
    v = int(value)
    if v > 0xFFFF_FFFF_FFFF_FFFF:
        raise TarFormatError(f"tar: PAX {key} out of range")
    return v


def pax_mtime(value: bytes) -> tuple[int, int]:
    """``SEC[.FRAC]`` -> (seconds, nanoseconds), like composefs-rs: the
    fraction is truncated or zero-padded to 9 digits; a fraction that is
    not plain digits counts as 0."""
    intpart, dot, frac = value.partition(b".")
    sec = _pax_uint(intpart, "mtime")
    nsec = 0
    if dot and frac.isdigit():
        nsec = int(frac[:9].ljust(9, b"0"))
    return sec, nsec


# -- header parsing ------------------------------------------------------------------

# Parser events (first element of the tuple returned by `parse_header`).
NEED = 0  # (NEED, min_bytes, None)
ENTRY = 1  # (ENTRY, consumed, TarEntry) -- consumed covers headers only
GLOBAL = 2  # (GLOBAL, consumed, None)
STRAY = 3  # (STRAY, 512, None): a lone zero block mid-archive
END = 4  # (END, 1024, None)

Event = tuple[int, int, "TarEntry | None"]


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def parse_header(buf: bytes | bytearray | memoryview, at_eof: bool = False) -> Event:
    """Parse the next entry (with its extension records) at the start of `buf`.

    Returns ``(NEED, n, None)`` when `buf` holds fewer than n bytes of what
    is needed. With `at_eof`, a lone trailing zero block counts as the end.
    """
    mv = memoryview(buf)
    pos = 0
    pax: list[tuple[bytes, bytes]] | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None
    pending = 0
    meta = 0
    while True:
        if len(mv) - pos < BLOCK:
            return (NEED, pos + BLOCK, None)
        block = mv[pos : pos + BLOCK]
        if block == _ZERO_BLOCK:
            if pending:
                raise TarFormatError("tar: extension header without an entry")
            if len(mv) - pos < 2 * BLOCK:
                if at_eof:
                    return (END, pos + BLOCK, None)
                return (NEED, pos + 2 * BLOCK, None)
            if mv[pos + BLOCK : pos + 2 * BLOCK] == _ZERO_BLOCK:
                return (END, pos + 2 * BLOCK, None)
            return (STRAY, pos + BLOCK, None)
        hdr = bytes(block)
        fields = _HEADER.unpack(hdr)
        if not _checksum_ok(hdr, fields[_H_CHKSUM]):
            raise TarFormatError("tar: header checksum mismatch (corrupt or not a tar archive)")
        magic = fields[_H_MAGIC]
        is_ustar = magic == b"ustar\x0000"
        is_gnu = magic == b"ustar  \x00"
        typeflag = fields[_H_TYPE]
        size = parse_number(fields[_H_SIZE], "size")
        if size > MAX_SIZE:
            raise TarFormatError("tar: entry size is absurd")
        ext_kind = None
        if typeflag == b"g":
            ext_kind = "g"
        elif (is_ustar or is_gnu) and typeflag in (b"x", b"L", b"K"):
            ext_kind = typeflag.decode()
        if ext_kind is not None:
            if size > MAX_METADATA or meta + size > MAX_METADATA:
                raise TarFormatError("tar: extension header is too large")
            total = BLOCK + _padded(size)
            if len(mv) - pos < total:
                return (NEED, pos + total, None)
            data = bytes(mv[pos + BLOCK : pos + BLOCK + size])
            if ext_kind == "g":
                if pending:
                    raise TarFormatError("tar: global header between extension headers")
                parse_pax(data)  # validate only; not applied (as composefs-rs)
                return (GLOBAL, pos + total, None)
            pending += 1
            meta += size
            if pending > MAX_PENDING:
                raise TarFormatError("tar: too many extension headers for one entry")
            if ext_kind == "x":
                if pax is not None:
                    raise TarFormatError("tar: duplicate PAX header")
                pax = parse_pax(data)
            else:
                nul = data.find(b"\0")
                value = data if nul < 0 else data[:nul]
                if ext_kind == "L":
                    if long_name is not None:
                        raise TarFormatError("tar: duplicate GNU long name")
                    long_name = value
                else:
                    if long_link is not None:
                        raise TarFormatError("tar: duplicate GNU long link")
                    long_link = value
            pos += total
            continue
        entry = _make_entry(fields, is_ustar, is_gnu, size, pax, long_name, long_link)
        return (ENTRY, pos + BLOCK, entry)


def _cstr(b: bytes) -> bytes:
    nul = b.find(b"\0")
    return b if nul < 0 else b[:nul]


def _components(path: bytes) -> int:
    return sum(1 for p in path.split(b"/") if p and p != b".")


def _make_entry(
    hdr: tuple[bytes, ...],
    is_ustar: bool,
    is_gnu: bool,
    size: int,
    pax: list[tuple[bytes, bytes]] | None,
    long_name: bytes | None,
    long_link: bytes | None,
) -> TarEntry:
    """The entry of a ustar/GNU/v7 header (`hdr`: its `_HEADER` fields)."""
    typeflag = hdr[_H_TYPE]
    path = _cstr(hdr[_H_NAME])
    if is_ustar:
        prefix = _cstr(hdr[_H_PREFIX])
        if prefix:
            path = prefix + b"/" + path
    if long_name is not None:
        path = long_name
    link = long_link if long_link is not None else _cstr(hdr[_H_LINK])
    uid = parse_number(hdr[_H_UID], "uid")
    gid = parse_number(hdr[_H_GID], "gid")
    mtime = parse_number(hdr[_H_MTIME], "mtime")
    mtime_nsec = 0
    mode = parse_number(hdr[_H_MODE], "mode")
    xattrs: dict[bytes, bytes] = {}
    for key, value in pax if pax is not None else ():
        if key == b"path":
            path = value
        elif key == b"linkpath":
            link = value
        elif key == b"size":
            size = _pax_uint(value, "size")
        elif key == b"uid":
            uid = _pax_uint(value, "uid")
        elif key == b"gid":
            gid = _pax_uint(value, "gid")
        elif key == b"mtime":
            mtime, mtime_nsec = pax_mtime(value)
        elif key.startswith(b"SCHILY.xattr."):
            name = key[len(b"SCHILY.xattr.") :]
            if not name:
                raise TarFormatError("tar: PAX xattr record without a name")
            xattrs[name] = value
        elif key.startswith(b"GNU.sparse."):
            raise TarFormatError(f"tar: sparse entries are not supported ({_show(path)})")
    if not path:
        raise TarFormatError("tar: entry with an empty name")
    # Names cut from the header at their NUL have none; extension records may.
    extended = pax is not None or long_name is not None or long_link is not None
    if extended and (b"\0" in path or b"\0" in link):
        raise TarFormatError(f"tar: NUL byte in name {_show(path)}")
    if size > MAX_SIZE:
        raise TarFormatError(f"tar: size of {_show(path)} is absurd")
    if uid > 0xFFFF_FFFF or gid > 0xFFFF_FFFF:
        raise TarFormatError(f"tar: uid/gid of {_show(path)} out of range")
    if typeflag == b"S" and (is_gnu or is_ustar):
        raise TarFormatError(f"tar: sparse entries are not supported ({_show(path)})")
    kind = _KINDS.get(typeflag)
    if kind is None:
        shown = typeflag.decode("ascii", "backslashreplace") if typeflag != b"\0" else "\\0"
        raise TarFormatError(f"tar: unsupported entry type {shown!r} for {_show(path)}")
    rdev = 0
    if kind in (CHR, BLK):
        if not (is_ustar or is_gnu):
            raise TarFormatError(f"tar: device {_show(path)} without device numbers")
        major = parse_octal(hdr[_H_DEVMAJOR], "devmajor")
        minor = parse_octal(hdr[_H_DEVMINOR], "devminor")
        if major > 0xFFFF_FFFF or minor > 0xFFFF_FFFF:
            raise TarFormatError(f"tar: device numbers of {_show(path)} out of range")
        rdev = os.makedev(major, minor)
    if kind != REG and size != 0:
        raise TarFormatError(f"tar: {kind} entry {_show(path)} has a nonzero size")
    if kind in (SYMLINK, HARDLINK) and not link:
        raise TarFormatError(f"tar: {kind} {_show(path)} has an empty target")
    # The rules the image reader applies (composefs.limits), checked at import.
    if path.count(b"/") >= limits.MAX_DEPTH and _components(path) > limits.MAX_DEPTH:
        raise TarFormatError(f"tar: {_show(path)}: {limits.depth_error()}")
    for name, value in xattrs.items():
        problem = limits.xattr_problem(name, value, kind == REG)
        if problem is not None:
            raise TarFormatError(f"tar: {_show(path)}: {problem}")
    # Positional: measurably cheaper than keywords, once per entry.
    return TarEntry(
        path, kind, mode & 0o7777, uid, gid, mtime, mtime_nsec, size,
        link if kind in (SYMLINK, HARDLINK) else b"", rdev, xattrs,
    )  # fmt: skip


# -- splitting -------------------------------------------------------------------------


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class SplitSink(Protocol):
    """Receives the pieces of a tar stream, in order."""

    def inline(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes stored inside the split stream."""
        ...

    def entry(self, entry: TarEntry) -> None:
        """An entry was parsed (its headers were just passed to `inline`)."""
        ...

    def external(self, entry: TarEntry, content: ContentReader) -> None:
        """The content of `entry` (exactly ``entry.size`` bytes) must be read
        from `content` and stored as an object."""
        ...


class _Buffer:
    """A read buffer with a start offset, so consuming small pieces is O(1)."""

    __slots__ = ("block", "buf", "eof", "pos", "src")

    def __init__(self, src: Readable, block: int) -> None:
        self.src = src
        self.block = block
        self.buf = bytearray()
        self.pos = 0
        self.eof = False

    def __len__(self) -> int:
        return len(self.buf) - self.pos

    def fill(self, n: int) -> bool:
        """At least n bytes buffered (True), or the source ended first."""
        if len(self.buf) - self.pos >= n:
            return True
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        while len(self.buf) < n and not self.eof:
            data = self.src.read(max(self.block, n - len(self.buf)))
            if not data:
                self.eof = True
            else:
                self.buf += data
        return len(self.buf) >= n

    def take(self, n: int) -> bytes:
        with memoryview(self.buf) as mv:  # one copy, not two
            data = bytes(mv[self.pos : self.pos + n])
        self.pos += len(data)
        return data

    def parse(self) -> Event:
        with memoryview(self.buf) as mv:
            return parse_header(mv[self.pos :], at_eof=self.eof)


class ContentReader:
    """Reads exactly one entry's content from the archive; a short archive
    raises `TarFormatError`. File-like (``read``/``readinto``)."""

    def __init__(self, buf: _Buffer, size: int, name: bytes) -> None:
        self._buf = buf
        self.remaining = size
        self._name = name

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0 or n > self.remaining:
            n = self.remaining
        if n == 0:
            return b""
        b = self._buf
        if len(b):
            data = b.take(min(n, len(b)))
        else:
            data = b.src.read(n)
            if not data:
                raise TarFormatError(f"tar: archive is truncated (in {_show(self._name)})")
        self.remaining -= len(data)
        return data

    def readinto(self, target: bytearray | memoryview) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)


# What may follow the end-of-archive marker: record padding (tar's
# blocking factor, 10 KiB by default; 1 MiB covers `tar -b 2048`).
TRAILER_MAX = 1 << 20


def split_tar(
    src: Readable, sink: SplitSink, *, inline_max: int = INLINE_MAX, block: int = 1 << 20
) -> int:
    """Split the tar archive read from `src` into `sink`; returns the entry count.

    Concatenating every `inline` piece and every external content in call
    order reproduces the input exactly. Memory use is bounded by `block`
    plus the largest header run (at most ~1 MiB of extension records).

    Up to `TRAILER_MAX` bytes after the end-of-archive marker are kept (so
    the layer is still reproduced byte for byte and matches its diff_id);
    more is a `TarFormatError`, read no further: no legitimate tar carries
    it, and a compressed layer of zeros after its end would otherwise be
    stored in full.
    """
    buf = _Buffer(src, block)
    count = 0
    while True:
        ev, amount, entry = buf.parse()
        if ev == NEED:
            if buf.fill(amount):
                continue
            if not len(buf):
                return count  # clean end at a header boundary, no end marker
            ev, amount, entry = buf.parse()
            if ev == NEED:
                raise TarFormatError("tar: archive is truncated (partial header at the end)")
        sink.inline(buf.take(amount))
        if ev == END:
            # Record padding (or anything else) after the end marker.
            trailer = len(buf)
            if trailer > TRAILER_MAX:
                raise _trailer_error()
            if trailer:
                sink.inline(buf.take(trailer))
            while data := src.read(min(block, TRAILER_MAX + 1 - trailer)):
                trailer += len(data)
                if trailer > TRAILER_MAX:
                    raise _trailer_error()
                sink.inline(data)
            return count
        if ev != ENTRY:
            continue
        assert entry is not None
        count += 1
        sink.entry(entry)
        if entry.kind == REG and entry.size > inline_max:
            reader = ContentReader(buf, entry.size, entry.path)
            sink.external(entry, reader)
            if reader.remaining:
                raise TarFormatError(f"tar: content of {_show(entry.path)} was not consumed")
            pad = entry.padded_size - entry.size
        else:
            pad = entry.padded_size
        if pad:
            if not buf.fill(pad):
                raise TarFormatError(f"tar: archive is truncated (in {_show(entry.path)})")
            sink.inline(buf.take(pad))


def _trailer_error() -> TarFormatError:
    return TarFormatError(
        f"tar: more than {TRAILER_MAX} bytes after the end-of-archive marker (not stored)"
    )


# -- reading back ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class External:
    """A reference to an external object in a split stream: its fs-verity id."""

    digest: str


@dataclass(slots=True)
class TarMember:
    """An entry read back from a split stream, with where its content is."""

    entry: TarEntry
    data: bytes | None = None  # inline content (regular files)
    external: str | None = None  # object id holding the content


class _Chunks:
    def __init__(self, chunks: Iterable[bytes | External]) -> None:
        self._it = iter(chunks)
        self._peek: bytes | External | None = None
        self.buf = bytearray()
        self.pos = 0

    def __len__(self) -> int:
        return len(self.buf) - self.pos

    def _next(self) -> bytes | External | None:
        if self._peek is not None:
            item, self._peek = self._peek, None
            return item
        return next(self._it, None)

    def fill(self, n: int) -> bool:
        """Make the inline buffer at least n bytes; False at end of stream."""
        if len(self) >= n:
            return True
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        while len(self.buf) < n:
            item = self._next()
            if item is None:
                return False
            if isinstance(item, External):
                raise TarFormatError("split stream: external object where tar headers belong")
            self.buf += item
        return True

    def take(self, n: int) -> bytes:
        with memoryview(self.buf) as mv:  # one copy, not two
            data = bytes(mv[self.pos : self.pos + n])
        self.pos += len(data)
        return data

    def skip(self, n: int) -> None:
        self.pos = min(self.pos + n, len(self.buf))

    def parse(self, at_eof: bool = False) -> Event:
        with memoryview(self.buf) as mv:
            return parse_header(mv[self.pos :], at_eof=at_eof)

    def take_external(self) -> str | None:
        """The next chunk's object id, if the next chunk is an external reference."""
        if len(self):
            return None
        item = self._next()
        if isinstance(item, External):
            return item.digest
        if item is not None:
            self._peek = item
        return None


def read_members(chunks: Iterable[bytes | External]) -> Iterator[TarMember]:
    """Entries of a split tar stream (or of plain tar bytes: pass ``[data]``)."""
    src = _Chunks(chunks)
    while True:
        if len(src) < BLOCK:
            src.fill(BLOCK)  # the usual case: one header block; saves a NEED round
        ev, amount, entry = src.parse()
        while ev == NEED:
            if not src.fill(amount):
                if not len(src):
                    return  # clean end at a header boundary
                ev, amount, entry = src.parse(at_eof=True)
                if ev == END:
                    return
                raise TarFormatError("tar: archive is truncated (partial header at the end)")
            ev, amount, entry = src.parse()
        src.skip(amount)
        if ev == END:
            return
        if ev != ENTRY:
            continue
        assert entry is not None
        member = TarMember(entry)
        if entry.size:
            ext = src.take_external() if entry.kind == REG else None
            if ext is not None:
                member.external = ext
                pad = entry.padded_size - entry.size
                if not src.fill(pad):
                    raise TarFormatError(f"tar: archive is truncated (in {_show(entry.path)})")
                src.skip(pad)
            else:
                if not src.fill(entry.padded_size):
                    raise TarFormatError(f"tar: archive is truncated (in {_show(entry.path)})")
                member.data = src.take(entry.padded_size)[: entry.size]
        elif entry.kind == REG:
            member.data = b""
        yield member
