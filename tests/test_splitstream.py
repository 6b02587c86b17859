"""Splitstream format: round trips, the exact binary layout, legacy headers, errors."""

from __future__ import annotations

import io
import os
import struct
import sys

import pytest

from composefs.errors import SplitstreamError
from composefs.splitstream import (
    CONTENT_OCI_CONFIG,
    CONTENT_OCI_LAYER,
    ObjectRef,
    SplitStreamReader,
    SplitStreamWriter,
    content_type,
    content_type_name,
    new_to_legacy_header,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

A = "aa" * 64
B = "bb" * 64
C = "cc" * 64


def reassemble(data: bytes, objects: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    SplitStreamReader(data).cat(out, lambda oid: io.BytesIO(objects[oid]))
    return out.getvalue()


def raw_chunks(data: bytes) -> list[tuple[str, int | bytes]]:
    """Decode the stream section by hand (independent of the reader)."""
    info = struct.unpack_from("<10Q", data, 32)
    stream = zstd.decompress(data[info[4] : info[5]])
    out: list[tuple[str, int | bytes]] = []
    pos = 0
    while pos < len(stream):
        (n,) = struct.unpack_from("<q", stream, pos)
        pos += 8
        if n < 0:
            out.append(("inline", stream[pos : pos - n]))
            pos -= n
        else:
            out.append(("external", n))
    return out


def test_round_trip_mixed() -> None:
    objects = {A: os.urandom(5000), B: b"x" * 100}
    w = SplitStreamWriter("sha512", CONTENT_OCI_LAYER)
    w.write_inline(b"header")
    w.write_reference(A, len(objects[A]))
    w.write_inline(b"pad")
    w.write_inline(b"ding")
    w.write_reference(B, 100)
    w.write_reference(A, len(objects[A]))
    w.write_inline(b"end")
    data = w.getvalue()
    expected = b"header" + objects[A] + b"padding" + objects[B] + objects[A] + b"end"
    assert reassemble(data, objects) == expected
    r = SplitStreamReader(data)
    assert r.algorithm == "sha512"
    assert r.content_type == CONTENT_OCI_LAYER
    assert r.total_size == len(expected)
    assert r.object_refs == [A, B]  # unique, first-appearance order
    assert not r.legacy_header
    # Adjacent inline writes are coalesced into one chunk, flushed before each
    # external reference (composefs-rs's tar reader depends on this).
    assert raw_chunks(data) == [
        ("inline", b"header"),
        ("external", 0),
        ("inline", b"padding"),
        ("external", 1),
        ("external", 0),
        ("inline", b"end"),
    ]


def test_inline_only_and_empty() -> None:
    w = SplitStreamWriter("sha256", 0)
    w.write_inline(b"just data")
    data = w.getvalue()
    r = SplitStreamReader(data)
    assert r.algorithm == "sha256"
    assert list(r.chunks()) == [b"just data"]
    assert r.object_refs == [] and r.named_refs == {}

    empty = SplitStreamWriter("sha256").getvalue()
    # composefs-rs finishes an encoder nothing was written to: a single-segment
    # frame; both the named refs and the stream section are exactly that
    f = struct.unpack_from("<10Q", empty, 32)
    assert empty[f[6] : f[7]] == bytes.fromhex("28b52ffd2000010000")
    assert empty[f[4] : f[5]] == bytes.fromhex("28b52ffd2000010000")
    assert data[f[6] : f[7]] == bytes.fromhex("28b52ffd2000010000")
    r = SplitStreamReader(empty)
    assert r.total_size == 0
    assert list(r.chunks()) == []


def test_large_inline_run_spills_and_stays_one_chunk() -> None:
    blob = os.urandom(1 << 16) * 90  # ~5.9 MiB: beyond the in-memory limit
    w = SplitStreamWriter("sha256")
    for i in range(0, len(blob), 100_000):
        w.write_inline(blob[i : i + 100_000])
    w.write_reference("11" * 32, 3)
    data = w.getvalue()
    chunks = raw_chunks(data)
    assert [k for k, _ in chunks] == ["inline", "external"]
    assert chunks[0][1] == blob
    assert reassemble(data, {"11" * 32: b"abc"}) == blob + b"abc"


def test_binary_layout() -> None:
    w = SplitStreamWriter("sha256", CONTENT_OCI_CONFIG)
    w.write_inline(b"{}")
    w.write_reference("01" * 32, 7)
    w.add_named_stream_ref("second", "03" * 32)
    w.add_named_stream_ref("first", "02" * 32)
    w.add_named_stream_ref("again", "03" * 32)
    data = w.getvalue()
    magic, version, flags, alg, lg, info_start, info_end = struct.unpack_from("<11sBHBBQQ", data)
    assert (magic, version, flags, alg, lg) == (b"SplitStream", 0, 0, 1, 12)
    assert (info_start, info_end) == (32, 112)
    f = struct.unpack_from("<10Q", data, 32)
    # stream_refs, object_refs, named_refs, stream follow each other in that order
    assert f[0] == 112 and f[1] == 112 + 64  # two distinct stream refs
    assert data[f[0] : f[1]] == bytes.fromhex("03" * 32 + "02" * 32)
    assert (f[2], f[3]) == (f[1], f[1] + 32)
    assert data[f[2] : f[3]] == bytes.fromhex("01" * 32)
    assert f[6] == f[3] and f[4] == f[7] and f[5] == len(data)
    assert zstd.decompress(data[f[6] : f[7]]) == b"0:again\x001:first\x000:second\x00"
    assert f[8] == int.from_bytes(b"ociconfg", "little")
    assert f[9] == 2 + 7
    r = SplitStreamReader(data)
    assert r.stream_refs == ["03" * 32, "02" * 32]
    assert r.named_refs == {"again": "03" * 32, "first": "02" * 32, "second": "03" * 32}


def handmade(
    *,
    alg: int = 1,
    stream_chunks: bytes = b"",
    object_refs: bytes = b"",
    stream_refs: bytes = b"",
    named: bytes = b"",
    info_extra: bytes = b"",
    ctype: int = 0,
    size: int = 0,
) -> bytes:
    """A splitstream assembled from the documented layout, not by our writer."""
    stream = zstd.compress(stream_chunks)
    named_c = zstd.compress(named) if named else b""
    info_len = 80 + len(info_extra)
    sr = 32 + info_len
    orr = sr + len(stream_refs)
    nr = orr + len(object_refs)
    st = nr + len(named_c)
    header = struct.pack("<11sBHBBQQ", b"SplitStream", 0, 0, alg, 12, 32, 32 + info_len)
    info = (
        struct.pack("<10Q", sr, orr, orr, nr, st, st + len(stream), nr, st, ctype, size)
        + info_extra
    )
    return header + info + stream_refs + object_refs + named_c + stream


def test_reads_handmade_stream_with_grown_info_and_multiple_frames() -> None:
    oid = bytes(range(32))
    chunks = struct.pack("<q", -3) + b"abc" + struct.pack("<q", 0)
    data = handmade(
        stream_chunks=chunks,
        object_refs=oid,
        stream_refs=oid,
        named=b"0:x\0",
        info_extra=b"\xff" * 16,  # a future, larger info section is tolerated
        ctype=content_type(b"oci_blob"),
        size=10,
    )
    r = SplitStreamReader(data)
    assert r.named_refs == {"x": oid.hex()}
    assert list(r.chunks()) == [b"abc", ObjectRef(oid.hex())]
    assert content_type_name(r.content_type) == "oci_blob"

    # A stream section made of two zstd frames (the Rust decoder accepts it).
    info = struct.unpack_from("<10Q", data, 32)
    two = zstd.compress(chunks[:11]) + zstd.compress(chunks[11:])
    patched = bytearray(data[: info[4]] + two)
    struct.pack_into("<QQ", patched, 32 + 32, info[4], info[4] + len(two))
    assert list(SplitStreamReader(bytes(patched)).chunks()) == [b"abc", ObjectRef(oid.hex())]


def test_legacy_header_layout() -> None:
    w = SplitStreamWriter("sha512", CONTENT_OCI_LAYER)
    w.write_inline(b"old")
    w.write_reference(A, 1)
    data = w.getvalue()
    legacy = new_to_legacy_header(data)
    assert legacy[18:29] == b"SplitStream" and legacy[30] == 2 and legacy[31] == 12
    assert struct.unpack_from("<QQ", legacy) == (32, 112)
    r = SplitStreamReader(legacy)
    assert r.legacy_header
    assert list(r.chunks()) == [b"old", ObjectRef(A)]


def test_tar_style_reads() -> None:
    w = SplitStreamWriter("sha256")
    w.write_inline(b"H" * 512)
    w.write_reference("11" * 32, 700)
    w.write_inline(b"\0" * (1024 - 700) + b"H" * 512 + b"small" + b"\0" * 507)
    r = SplitStreamReader(w.getvalue())
    assert r.read_inline_exact(512) == b"H" * 512
    assert r.read_exact(700, 1024) == ObjectRef("11" * 32)
    assert r.read_inline_exact(512) == b"H" * 512
    assert r.read_exact(5, 512) == b"small"
    assert r.read_inline_exact(512) is None

    # A header that would cross an inline chunk boundary is an error.
    w = SplitStreamWriter("sha256")
    w.write_inline(b"H" * 100)
    w.write_reference("11" * 32, 1)
    r = SplitStreamReader(w.getvalue())
    with pytest.raises(SplitstreamError, match="small inline"):
        r.read_inline_exact(512)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: b"NotAStream!" + d[11:], "magic"),
        (lambda d: d[:11] + b"\x01" + d[12:], "version"),
        (lambda d: d[:14] + b"\x07" + d[15:], "algorithm"),
        (lambda d: d[:15] + b"\x10" + d[16:], "block size"),
        (lambda d: d[:20], "incomplete"),
        (lambda d: d[:-5], "corrupt|truncated"),
    ],
)
def test_rejects_malformed(mutate: object, match: str) -> None:
    w = SplitStreamWriter("sha256")
    w.write_inline(b"some inline data" * 10)
    w.write_reference("22" * 32, 4)
    data = mutate(w.getvalue())  # type: ignore[operator]
    with pytest.raises(SplitstreamError, match=match):
        r = SplitStreamReader(data)
        r.scan()


def test_rejects_bad_references() -> None:
    bad_index = handmade(stream_chunks=struct.pack("<q", 3), object_refs=bytes(32))
    with pytest.raises(SplitstreamError, match="out of range"):
        SplitStreamReader(bad_index).scan()
    bad_named = handmade(stream_refs=bytes(32), named=b"1:x\0")
    with pytest.raises(SplitstreamError, match="out of bounds"):
        SplitStreamReader(bad_named)
    no_colon = handmade(stream_refs=bytes(32), named=b"0x\0")
    with pytest.raises(SplitstreamError, match="colon"):
        SplitStreamReader(no_colon)
    ragged = handmade(object_refs=bytes(31))
    with pytest.raises(SplitstreamError, match="section size"):
        SplitStreamReader(ragged)
    truncated_inline = handmade(stream_chunks=struct.pack("<q", -10) + b"abc")
    with pytest.raises(SplitstreamError, match="truncated"):
        SplitStreamReader(truncated_inline).scan()


def test_checks() -> None:
    data = SplitStreamWriter("sha256", CONTENT_OCI_LAYER).getvalue()
    with pytest.raises(SplitstreamError, match="content type"):
        SplitStreamReader(data, expected_content_type=CONTENT_OCI_CONFIG)
    with pytest.raises(SplitstreamError, match="sha256"):
        SplitStreamReader(data, algorithm="sha512")
    w = SplitStreamWriter("sha256")
    with pytest.raises(SplitstreamError, match="invalid object id"):
        w.write_reference("zz" * 32, 1)
    with pytest.raises(SplitstreamError, match="wrong length"):
        w.write_reference("00" * 64, 1)
    w.getvalue()
    with pytest.raises(SplitstreamError, match="finished"):
        w.write_inline(b"late")
