"""Splitstream: a file format that keeps large chunks of a byte stream outside it.

IO-free: the writer is fed bytes and writes the finished file to a binary
stream it is given; the reader parses a seekable binary stream (or bytes). The
repository (`composefs.repository`) stores external chunks as objects and the
splitstream file itself as an object.

Layout (composefs-rs 0.7.0 `splitstream.rs`, all integers little-endian)::

    @0   header, 32 bytes: magic "SplitStream" | version u8 (0) | flags u16 |
         algorithm u8 (1 sha256, 2 sha512) | lg_blocksize u8 (12) |
         info range {start u64, end u64}
    @32  info, 80 bytes: ranges of stream_refs, object_refs, stream, named_refs;
         content_type u64; stream_size u64 (size of the reassembled stream)
    then stream_refs (raw digests), object_refs (raw digests), named_refs
    (zstd: "IDX:NAME\\0" records sorted by NAME, IDX indexes stream_refs),
    stream (zstd: chunks of i64 n; n < 0 → -n inline bytes follow,
    n >= 0 → index into object_refs).

Readers also accept the legacy header layout written by bootc <= 1.15
(info range at 0, flags at 16, magic at 18, version/algorithm/lg_blocksize at
29/30/31).

Inline data is buffered until the next external reference (or the end) and
written as a single chunk: composefs-rs's tar reader requires that a tar header
never straddles two inline chunks, so we keep the same chunking. Large inline
runs spill to a temporary spool rather than memory, zstd-compressed (a run of
300k small tar entries is hundreds of MB raw); the compressed stream goes to a
spool too, so no layer is ever held in memory whole. The repository passes
spools that live in its own directory, never in ``$TMPDIR``.

Digests are lowercase hex strings throughout the public API.
"""

from __future__ import annotations

import io
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, Protocol

from .errors import SplitstreamError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

MAGIC = b"SplitStream"
LG_BLOCKSIZE = 12
HEADER_SIZE = 32
INFO_SIZE = 80
ALGORITHM_IDS = {"sha256": 1, "sha512": 2}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHM_IDS.items()}
DIGEST_SIZES = {"sha256": 32, "sha512": 64}
ZSTD_LEVEL = 3  # composefs-rs uses zstd's default level (0 → 3)

_HEADER = struct.Struct("<11sBHBBQQ")
_LEGACY_HEADER = struct.Struct("<QQH11sBBB")
_INFO = struct.Struct("<QQQQQQQQQQ")
_I64 = struct.Struct("<q")

# Keep pending inline data in memory up to this size, then spill to a spool.
_INLINE_MEM_MAX = 4 << 20
# Spools keep this much in memory before becoming an anonymous temp file.
_SPOOL_MEM_MAX = 8 << 20
_COPY_BLOCK = 1 << 20
# The stream body (length markers, inline data, reference indexes) goes to
# the compressor in batches of this size: one call per record cost ~7% of a
# layer import. The output is the same: the compressor buffers its input.
_BODY_BATCH = 64 << 10


class Writable(Protocol):
    """Anything with a binary `write` (a file, BytesIO, a hashing fd writer)."""

    def write(self, data: bytes, /) -> object: ...


def content_type(tag: bytes) -> int:
    """The u64 content-type id for an 8-byte ASCII tag (as composefs-rs does it)."""
    if len(tag) != 8:
        raise ValueError("content type tags are exactly 8 bytes")
    return int.from_bytes(tag, "little")


def content_type_name(value: int) -> str:
    """Readable form of a content type: its 8-byte tag when printable, else hex."""
    raw = value.to_bytes(8, "little")
    if all(0x20 <= b < 0x7F for b in raw):
        return raw.decode("ascii")
    return f"0x{value:016x}"


CONTENT_OCI_LAYER = content_type(b"ocilayer")
CONTENT_OCI_CONFIG = content_type(b"ociconfg")
CONTENT_OCI_MANIFEST = content_type(b"ocimanif")
CONTENT_OCI_BLOB = content_type(b"oci_blob")


def _default_spool() -> IO[bytes]:
    import tempfile  # lazily: most commands never spool

    return tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEM_MAX)


def _check_algorithm(algorithm: str) -> int:
    try:
        return DIGEST_SIZES[algorithm]
    except KeyError:
        raise ValueError(f"unknown fs-verity algorithm {algorithm!r}") from None


def _raw_digest(object_id: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(object_id)
    except ValueError:
        raise SplitstreamError(f"invalid object id {object_id!r}") from None
    if len(raw) != size:
        raise SplitstreamError(f"object id {object_id!r} has the wrong length")
    return raw


class _UniqueList:
    """Digests in first-appearance order with O(1) index lookup."""

    __slots__ = ("index", "items")

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.index: dict[bytes, int] = {}

    def ensure(self, item: bytes) -> int:
        idx = self.index.get(item)
        if idx is None:
            idx = len(self.items)
            self.index[item] = idx
            self.items.append(item)
        return idx

    def as_bytes(self) -> bytes:
        return b"".join(self.items)


class SplitStreamWriter:
    """Builds one splitstream file incrementally.

    Feed it with `write_inline(data)` and `write_reference(object_id, size)`
    (the external object must already be stored by the caller; `size` is its
    length, counted into the reassembled stream size), optionally
    `add_named_stream_ref(name, stream_id)`, then `finish(out)`.

    `spool` makes the temporary buffers (default: spooled temp files that
    live in memory up to 8 MiB); pass `io.BytesIO` to stay purely in memory.
    """

    def __init__(
        self,
        algorithm: str = "sha512",
        content_type: int = 0,
        *,
        level: int = ZSTD_LEVEL,
        spool: Callable[[], IO[bytes]] = _default_spool,
    ) -> None:
        self.algorithm = algorithm
        self._digest_size = _check_algorithm(algorithm)
        if not 0 <= content_type < 1 << 64:
            raise ValueError("content type must be an unsigned 64-bit integer")
        self.content_type = content_type
        self._spool = spool
        self._compressor = zstd.ZstdCompressor(level=level)
        self._stream: IO[bytes] = spool()
        self._body = bytearray()  # uncompressed body not yet compressed
        self._pending = bytearray()
        self._pending_spill: IO[bytes] | None = None
        self._spill_compressor: zstd.ZstdCompressor | None = None
        self._pending_len = 0
        self._object_refs = _UniqueList()
        self._stream_refs = _UniqueList()
        self._named_refs: dict[str, int] = {}
        self.total_size = 0
        self.inline_size = 0
        self.external_size = 0
        self._finished = False

    # -- references ------------------------------------------------------
    def add_object_ref(self, object_id: str) -> int:
        """Record an object reference; return its stable index."""
        return self._object_refs.ensure(_raw_digest(object_id, self._digest_size))

    def add_named_stream_ref(self, name: str, stream_id: str) -> None:
        """Name another stream (or any object) this one depends on.

        Named refs keep their target alive through garbage collection; the
        name only has meaning to whoever reads this stream (OCI uses diff ids,
        `config:<digest>` and `composefs.image`).
        """
        if "\0" in name:
            raise SplitstreamError("named reference names cannot contain NUL")
        idx = self._stream_refs.ensure(_raw_digest(stream_id, self._digest_size))
        self._named_refs[name] = idx

    @property
    def object_refs(self) -> list[str]:
        return [d.hex() for d in self._object_refs.items]

    @property
    def named_refs(self) -> dict[str, str]:
        items = self._stream_refs.items
        return {name: items[idx].hex() for name, idx in self._named_refs.items()}

    # -- content ---------------------------------------------------------
    def write_inline(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes stored inside the splitstream."""
        self._check_open()
        n = len(data)
        if not n:
            return
        self.total_size += n
        self.inline_size += n
        self._append_inline(data)

    def _append_inline(self, data: bytes | bytearray | memoryview) -> None:
        # The stream body part of `write_inline` (counters already updated).
        self._pending_len += len(data)
        if self._pending_spill is not None:
            assert self._spill_compressor is not None
            self._pending_spill.write(self._spill_compressor.compress(data))
            return
        self._pending += data
        if len(self._pending) > _INLINE_MEM_MAX:
            self._pending_spill = self._spool()
            # fast level: this is only a holding area
            self._spill_compressor = zstd.ZstdCompressor(level=1)
            self._pending_spill.write(self._spill_compressor.compress(self._pending))
            self._pending = bytearray()

    def write_reference(self, object_id: str, size: int) -> None:
        """Append an external chunk: the stored object `object_id` of `size` bytes."""
        self._check_open()
        self._append_reference(object_id)
        self.total_size += size
        self.external_size += size

    def _append_reference(self, object_id: str) -> None:
        # The stream body part of `write_reference`.
        idx = self.add_object_ref(object_id)
        self._flush_inline()
        self._emit(_I64.pack(idx))

    def _emit(self, data: bytes | bytearray) -> None:
        body = self._body
        body += data
        if len(body) >= _BODY_BATCH:
            self._stream.write(self._compressor.compress(body))
            body.clear()

    def _flush_inline(self) -> None:
        n = self._pending_len
        if not n:
            return
        emit = self._emit
        emit(_I64.pack(-n))
        if self._pending_spill is not None:
            spill = self._pending_spill
            assert self._spill_compressor is not None
            spill.write(self._spill_compressor.flush())
            self._spill_compressor = None
            spill.seek(0)
            with zstd.ZstdFile(spill, "rb") as raw:
                while block := raw.read(_COPY_BLOCK):
                    emit(block)
            spill.close()
            self._pending_spill = None
        else:
            emit(self._pending)
            self._pending.clear()
        self._pending_len = 0

    def _check_open(self) -> None:
        if self._finished:
            raise SplitstreamError("splitstream writer already finished")

    def _named_refs_section(self) -> bytes:
        comp = zstd.ZstdCompressor(level=ZSTD_LEVEL)
        records = b"".join(
            f"{idx}:{name}\0".encode() for name, idx in sorted(self._named_refs.items())
        )
        if not records:
            # composefs-rs finishes an encoder nothing was written to: a
            # single-segment frame (28b52ffd2000010000). compress(b"") would
            # open a streaming frame with a window descriptor instead and so
            # change every layer stream's id.
            return comp.flush()
        return comp.compress(records) + comp.flush()

    # -- output ----------------------------------------------------------
    def finish(self, out: Writable) -> int:
        """Write the complete splitstream file to `out`; return its length."""
        self._check_open()
        self._flush_inline()
        if self._body:
            self._stream.write(self._compressor.compress(self._body))
            self._body.clear()
        self._stream.write(self._compressor.flush())
        self._finished = True
        stream_len = self._stream.tell()

        stream_refs = self._stream_refs.as_bytes()
        object_refs = self._object_refs.as_bytes()
        named_refs = self._named_refs_section()

        info_start = HEADER_SIZE
        info_end = info_start + INFO_SIZE
        sr_start, sr_end = info_end, info_end + len(stream_refs)
        or_start, or_end = sr_end, sr_end + len(object_refs)
        nr_start, nr_end = or_end, or_end + len(named_refs)
        st_start, st_end = nr_end, nr_end + stream_len

        header = _HEADER.pack(
            MAGIC, 0, 0, ALGORITHM_IDS[self.algorithm], LG_BLOCKSIZE, info_start, info_end
        )
        info = _INFO.pack(
            sr_start, sr_end, or_start, or_end, st_start, st_end, nr_start, nr_end,
            self.content_type, self.total_size,
        )  # fmt: skip
        out.write(header + info + stream_refs + object_refs + named_refs)
        self._stream.seek(0)
        while block := self._stream.read(_COPY_BLOCK):
            out.write(block)
        self._stream.close()
        return st_end

    def getvalue(self) -> bytes:
        """The finished splitstream as bytes (for small streams and tests)."""
        buf = io.BytesIO()
        self.finish(buf)
        return buf.getvalue()

    def close(self) -> None:
        """Discard everything (abandon the stream)."""
        self._finished = True
        self._stream.close()
        if self._pending_spill is not None:
            self._pending_spill.close()
            self._pending_spill = None
        self._pending = bytearray()


# ---------------------------------------------------------------------------
# reading


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An external chunk: the object `object_id` (hex) from the object store."""

    object_id: str


class _Window(io.RawIOBase):
    """A read-only view of [start, end) of a seekable binary stream."""

    def __init__(self, source: IO[bytes], start: int, end: int) -> None:
        self._source = source
        self._pos = start
        self._end = end

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._end - self._pos)
        if n <= 0:
            return 0
        self._source.seek(self._pos)
        data = self._source.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True, slots=True)
class _Range:
    start: int
    end: int

    def length(self) -> int:
        if self.end < self.start:
            raise SplitstreamError("negative-sized range in splitstream")
        return self.end - self.start


class SplitStreamReader:
    """Parses a splitstream from a seekable binary stream (or bytes).

    After construction the tables are available: `algorithm`, `content_type`,
    `total_size`, `object_refs` (hex ids, stream order of first appearance),
    `stream_refs`, `named_refs` (name → hex id). The content is then read once,
    front to back, with `chunks()`, `cat()` or the tar-oriented
    `read_inline_exact()` / `read_exact()`.

    `algorithm`, when given, must match the header's; `expected_content_type`
    likewise. Every malformation raises `SplitstreamError`. With
    `owns_source`, `close()` (or leaving a `with` block) closes the source.
    """

    def __init__(
        self,
        source: IO[bytes] | BinaryIO | bytes,
        *,
        algorithm: str | None = None,
        expected_content_type: int | None = None,
        owns_source: bool = False,
    ) -> None:
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(bytes(source))
        self._source: IO[bytes] = source
        self._owns_source = owns_source
        self._decoder: zstd.ZstdFile | None = None
        self._inline_left = 0
        try:
            self._parse(algorithm, expected_content_type)
        except BaseException:
            self.close()
            raise

    def _parse(self, algorithm: str | None, expected_content_type: int | None) -> None:
        header = self._read_at(0, HEADER_SIZE, "header")
        magic, version, flags, alg_id, lg_bs, info_start, info_end = _HEADER.unpack(header)
        self.legacy_header = False
        if magic != MAGIC:
            info_start, info_end, flags, magic, version, alg_id, lg_bs = _LEGACY_HEADER.unpack(
                header
            )
            if magic != MAGIC:
                raise SplitstreamError("invalid splitstream header magic value")
            self.legacy_header = True
        self.flags = flags
        if version != 0:
            raise SplitstreamError(f"invalid splitstream version {version}")
        name = ALGORITHM_NAMES.get(alg_id)
        if name is None:
            raise SplitstreamError(f"invalid splitstream fs-verity algorithm type {alg_id}")
        if algorithm is not None and name != algorithm:
            raise SplitstreamError(f"splitstream uses fs-verity {name}, expected {algorithm}")
        if lg_bs != LG_BLOCKSIZE:
            raise SplitstreamError("invalid splitstream fs-verity block size")
        self.algorithm: str = name
        dsize = DIGEST_SIZES[name]

        # The info section may grow in future versions: extra bytes are ignored.
        info = self._read_range(_Range(info_start, info_end), "info")
        if len(info) < INFO_SIZE:
            raise SplitstreamError("splitstream info section is too small")
        f = _INFO.unpack_from(info)
        stream_refs_r, object_refs_r = _Range(f[0], f[1]), _Range(f[2], f[3])
        self._stream_range = _Range(f[4], f[5])
        named_refs_r = _Range(f[6], f[7])
        self.content_type: int = f[8]
        self.total_size: int = f[9]
        if expected_content_type is not None and self.content_type != expected_content_type:
            raise SplitstreamError(
                f"invalid splitstream content type {content_type_name(self.content_type)}"
                f" (expected {content_type_name(expected_content_type)})"
            )
        self.stream_refs: list[str] = self._digests(stream_refs_r, dsize, "stream references")
        self.object_refs: list[str] = self._digests(object_refs_r, dsize, "object references")
        self.named_refs: dict[str, str] = self._parse_named_refs(
            self._read_range(named_refs_r, "named references")
        )
        self._stream_range.length()

    # -- sections --------------------------------------------------------
    def _read_at(self, offset: int, size: int, what: str) -> bytes:
        self._source.seek(offset)
        data = self._source.read(size)
        if len(data) != size:
            raise SplitstreamError(f"incomplete read of splitstream {what}")
        return data

    def _read_range(self, r: _Range, what: str) -> bytes:
        n = r.length()
        if n > 1 << 30:
            raise SplitstreamError(f"implausibly large splitstream {what} section")
        return self._read_at(r.start, n, what) if n else b""

    def _digests(self, r: _Range, dsize: int, what: str) -> list[str]:
        raw = self._read_range(r, what)
        if len(raw) % dsize:
            raise SplitstreamError(f"error reading splitstream {what}: bad section size")
        return [raw[i : i + dsize].hex() for i in range(0, len(raw), dsize)]

    def _parse_named_refs(self, section: bytes) -> dict[str, str]:
        if not section:
            return {}
        try:
            data = zstd.decompress(section)
        except (zstd.ZstdError, EOFError) as e:
            raise SplitstreamError(f"error reading splitstream named references: {e}") from e
        refs: dict[str, str] = {}
        if not data:
            return refs
        if not data.endswith(b"\0"):
            raise SplitstreamError("trailing junk in splitstream named references")
        for record in data[:-1].split(b"\0"):
            try:
                text = record.decode()
            except UnicodeDecodeError:
                raise SplitstreamError("named reference is not valid UTF-8") from None
            idx_s, sep, name = text.partition(":")
            if not sep:
                raise SplitstreamError("named reference doesn't contain a colon")
            if not idx_s.isdigit():
                raise SplitstreamError("named reference contains a non-integer index")
            idx = int(idx_s)
            if idx >= len(self.stream_refs):
                raise SplitstreamError("named reference out of bounds")
            refs[name] = self.stream_refs[idx]
        return refs

    # -- the chunk stream ------------------------------------------------
    def _dec(self) -> zstd.ZstdFile:
        if self._decoder is None:
            r = self._stream_range
            window = io.BufferedReader(_Window(self._source, r.start, r.end), _COPY_BLOCK)
            self._decoder = zstd.ZstdFile(window, "rb")
        return self._decoder

    def _read_stream(self, n: int) -> bytes:
        try:
            data = self._dec().read(n)
        except (zstd.ZstdError, EOFError) as e:
            raise SplitstreamError(f"corrupt splitstream content: {e}") from e
        return data

    def _next_instruction(self, eof_ok: bool) -> int | None:
        """Start the next chunk. Returns the object index for an external
        chunk, -1 for inline (length in `_inline_left`), None at the end."""
        raw = self._read_stream(8)
        if not raw:
            if not eof_ok:
                raise SplitstreamError("unexpected EOF in splitstream")
            return None
        if len(raw) != 8:
            raise SplitstreamError("truncated chunk header in splitstream")
        n: int = _I64.unpack(raw)[0]
        if n < 0:
            self._inline_left = -n
            return -1
        if n >= len(self.object_refs):
            raise SplitstreamError("splitstream external reference is out of range")
        return n

    def _read_inline(self, n: int) -> bytes:
        data = self._read_stream(n)
        if len(data) != n:
            raise SplitstreamError("splitstream inline content is truncated")
        self._inline_left -= n
        return data

    def chunks(self, block: int = _COPY_BLOCK) -> Iterator[bytes | ObjectRef]:
        """Yield the content in order: inline bytes (in pieces of at most
        `block` bytes) and `ObjectRef`s for external chunks."""
        while True:
            if self._inline_left:
                yield self._read_inline(min(block, self._inline_left))
                continue
            kind = self._next_instruction(eof_ok=True)
            if kind is None:
                return
            if kind >= 0:
                yield ObjectRef(self.object_refs[kind])

    def read_inline_exact(self, n: int) -> bytes | None:
        """Read exactly `n` inline bytes that must not cross a chunk boundary
        (a tar header). None at the end of the stream."""
        if not self._inline_left:
            kind = self._next_instruction(eof_ok=True)
            if kind is None:
                return None
            if kind >= 0:
                raise SplitstreamError("unexpected external reference in splitstream")
        if self._inline_left < n:
            raise SplitstreamError("unexpectedly small inline content in splitstream")
        return self._read_inline(n)

    def read_exact(self, actual_size: int, stored_size: int) -> bytes | ObjectRef:
        """Read one tar member's content: either `stored_size` inline bytes
        (returned truncated to `actual_size`) or an external reference followed
        by `stored_size - actual_size` inline padding bytes (discarded)."""
        if not self._inline_left:
            kind = self._next_instruction(eof_ok=False)
            if kind is not None and kind >= 0:
                pad = stored_size - actual_size
                if pad:
                    if not self._inline_left and self._next_instruction(eof_ok=False) != -1:
                        raise SplitstreamError("unexpected external reference in splitstream")
                    if self._inline_left < pad:
                        raise SplitstreamError("unexpectedly small inline content in splitstream")
                    self._read_inline(pad)
                return ObjectRef(self.object_refs[kind])
        if self._inline_left < stored_size:
            raise SplitstreamError("unexpectedly small inline content in splitstream")
        return self._read_inline(stored_size)[:actual_size]

    def cat(self, out: Writable, open_object: Callable[[str], BinaryIO | IO[bytes]]) -> int:
        """Write the reassembled stream to `out`; `open_object(id)` opens an
        external object for reading. Returns the number of bytes written."""
        total = 0
        for chunk in self.chunks():
            if isinstance(chunk, ObjectRef):
                with open_object(chunk.object_id) as f:
                    while block := f.read(_COPY_BLOCK):
                        out.write(block)
                        total += len(block)
            else:
                out.write(chunk)
                total += len(chunk)
        return total

    def scan(self) -> tuple[int, int]:
        """Decode the whole chunk stream without reassembling it (a structure
        check); returns (inline bytes, external chunk count)."""
        inline = externals = 0
        for chunk in self.chunks():
            if isinstance(chunk, ObjectRef):
                externals += 1
            else:
                inline += len(chunk)
        return inline, externals

    def close(self) -> None:
        """Release the decoder (and the source, when `owns_source` was set)."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._owns_source:
            self._source.close()

    def __enter__(self) -> SplitStreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_to_legacy_header(data: bytes) -> bytes:
    """Rewrite a current-layout splitstream's header in the legacy layout
    (what bootc <= 1.15 wrote); the rest of the file is unchanged. For tests."""
    magic, version, flags, alg, lg_bs, info_start, info_end = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SplitstreamError("input is not a current-layout splitstream")
    legacy = _LEGACY_HEADER.pack(info_start, info_end, flags, magic, version, alg, lg_bs)
    return legacy + data[HEADER_SIZE:]
