"""Tar parsing and tar -> splitstream splitting (composefs.oci.tar).

Oracles: Python's tarfile and GNU tar write the archives and say what each
member is; reassembly must give the input back byte for byte.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import ocitestlib as L
import pytest

from composefs.errors import OciError
from composefs.oci import tar as T


class Sink:
    """Collects the split: inline pieces and external contents, in order."""

    def __init__(self, chunk: int = 7000) -> None:
        self.parts: list[tuple[str, bytes]] = []
        self.entries: list[T.TarEntry] = []
        self.chunk = chunk

    def inline(self, data: bytes | bytearray | memoryview) -> None:
        self.parts.append(("i", bytes(data)))

    def entry(self, entry: T.TarEntry) -> None:
        self.entries.append(entry)

    def external(self, entry: T.TarEntry, content: T.ContentReader) -> None:
        out = bytearray()
        buf = bytearray(self.chunk)
        while n := content.readinto(memoryview(buf)):
            out += buf[:n]
        assert len(out) == entry.size
        self.parts.append(("e", bytes(out)))

    def joined(self) -> bytes:
        return b"".join(p for _, p in self.parts)

    def chunks(self) -> list[bytes | T.External]:
        """The split as a splitstream would hold it: externals by 'digest'."""
        out: list[bytes | T.External] = []
        pending = b""
        for kind, data in self.parts:
            if kind == "i":
                pending += data
            else:
                if pending:
                    out.append(pending)
                    pending = b""
                out.append(T.External("obj:" + data[:8].hex() + f":{len(data)}"))
        if pending:
            out.append(pending)
        return out


class Trickle:
    """A reader that returns at most `n` bytes per call."""

    def __init__(self, data: bytes, n: int) -> None:
        self.f = io.BytesIO(data)
        self.n = n

    def read(self, size: int = -1, /) -> bytes:
        return self.f.read(self.n if size < 0 else min(size, self.n))


def split(data: bytes, *, trickle: int | None = None, block: int = 1 << 20) -> Sink:
    sink = Sink()
    src = Trickle(data, trickle) if trickle else io.BytesIO(data)
    T.split_tar(src, sink, block=block)
    return sink


def members(data: bytes) -> list[T.TarMember]:
    return list(T.read_members([data]))


SIZES = [0, 1, 63, 64, 65, 511, 512, 513, 1023, 1024, 1025, 4096, 70000]


def sample_archive(fmt: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    entries: list[L.Member] = [L.directory("usr"), L.directory("usr/lib")]
    for i, size in enumerate(SIZES):
        depth = rng.choice([1, 2, 30])
        name = "/".join(f"d{i}x{j}" for j in range(depth)) + f"/file{i}"
        entries.append(L.directory(name.rsplit("/", 1)[0]))
        entries.append(L.file(name, rng.randbytes(size), mode=rng.choice([0o644, 0o755, 0o4711])))
    entries += [
        L.symlink("usr/lib/link", "x" * 150),
        L.hardlink("hard", "usr/lib/../lib/link" if False else "d0x0/file0"),
        L.chardev("dev/null", 1, 3),
        L.blockdev("dev/sda", 8, 0),
        L.fifo("run/fifo"),
    ]
    if fmt == tarfile.PAX_FORMAT:
        entries.append(
            L.file(
                "xattr",
                b"x" * 100,
                xattrs={"user.a": b"1", "security.capability": b"\x01\x00\x00\x02"},
            )
        )
    return L.tar_layer(entries, format=fmt)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("trickle", [None, 1, 511, 513, 4096])
def test_split_reassembles_byte_for_byte(fmt: int, trickle: int | None) -> None:
    if fmt == tarfile.USTAR_FORMAT:
        # ustar can't hold 30-component names; keep it to what it can.
        data = L.tar_layer([L.file(f"f{s}", bytes([s % 251]) * s) for s in SIZES], format=fmt)
    else:
        data = sample_archive(fmt)
    sink = split(data, trickle=trickle, block=4096 if trickle else 1 << 20)
    assert sink.joined() == data
    for kind, piece in sink.parts:
        if kind == "e":
            assert len(piece) > T.INLINE_MAX


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_entries_match_tarfile(fmt: int) -> None:
    data = sample_archive(fmt, seed=7)
    sink = split(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        ref = t.getmembers()
    assert len(sink.entries) == len(ref)
    kinds = {
        tarfile.REGTYPE: T.REG, tarfile.DIRTYPE: T.DIR, tarfile.SYMTYPE: T.SYMLINK,
        tarfile.LNKTYPE: T.HARDLINK, tarfile.CHRTYPE: T.CHR, tarfile.BLKTYPE: T.BLK,
        tarfile.FIFOTYPE: T.FIFO,
    }  # fmt: skip
    for ours, theirs in zip(sink.entries, ref, strict=True):
        assert ours.path.decode().rstrip("/") == theirs.name.rstrip("/")
        assert ours.kind == kinds[theirs.type]
        assert ours.mode == theirs.mode & 0o7777
        assert (ours.uid, ours.gid, ours.mtime) == (theirs.uid, theirs.gid, int(theirs.mtime))
        assert ours.size == (theirs.size if theirs.type == tarfile.REGTYPE else 0)
        if theirs.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            assert ours.linkname.decode() == theirs.linkname
        if theirs.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            assert ours.rdev == os.makedev(theirs.devmajor, theirs.devminor)
        xattrs = {
            k[len("SCHILY.xattr.") :].encode(): v.encode("utf-8", "surrogateescape")
            for k, v in theirs.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert ours.xattrs == xattrs


def test_read_members_from_split_stream() -> None:
    data = sample_archive(tarfile.PAX_FORMAT, seed=3)
    sink = split(data)
    got = list(T.read_members(sink.chunks()))
    assert [m.entry.path for m in got] == [e.path for e in sink.entries]
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m, ti in zip(got, t.getmembers(), strict=True):
            if not ti.isreg():
                assert m.data is None and m.external is None
            elif ti.size > T.INLINE_MAX:
                assert m.external is not None and m.external.endswith(f":{ti.size}")
            else:
                f = t.extractfile(ti)
                assert f is not None and m.data == f.read()


def test_inline_threshold_is_64_bytes() -> None:
    data = L.tar_layer([L.file("a", b"a" * 64), L.file("b", b"b" * 65)])
    sink = split(data)
    externals = [p for k, p in sink.parts if k == "e"]
    assert externals == [b"b" * 65]


def test_pax_mtime_fraction_and_overrides() -> None:
    ti, data = L.file("x", b"data")
    ti.pax_headers.update({"mtime": "1234567890.5", "uid": "4000000", "gid": "70000"})
    (m,) = members(L.tar_layer([(ti, data)]))
    assert (m.entry.mtime, m.entry.mtime_nsec) == (1234567890, 500_000_000)
    assert (m.entry.uid, m.entry.gid) == (4000000, 70000)
    assert T.pax_mtime(b"1234567890.123456789999") == (1234567890, 123456789)
    assert T.pax_mtime(b"1.000000001") == (1, 1)
    assert T.pax_mtime(b"7") == (7, 0)
    assert T.pax_mtime(b"7.x") == (7, 0)  # composefs-rs: unparsable fraction -> 0
    with pytest.raises(OciError):
        T.pax_mtime(b"-1.5")


def test_base256_numbers() -> None:
    # GNU format writes values that do not fit in octal as base-256.
    ti, data = L.file("big-ids", b"", uid=1 << 30, gid=(1 << 32) - 1, mtime=1 << 40)
    raw = L.tar_layer([(ti, data)], format=tarfile.GNU_FORMAT)
    assert raw[108] & 0x80
    (m,) = members(raw)
    assert (m.entry.uid, m.entry.gid, m.entry.mtime) == (1 << 30, (1 << 32) - 1, 1 << 40)
    assert T.parse_number(b"\x80" + b"\0" * 6 + b"\x05") == 5
    with pytest.raises(OciError, match="negative"):
        T.parse_number(b"\xff" * 12)


def test_long_names_all_formats() -> None:
    long_name = "/".join(["segment" * 3] * 20) + "/leaf"
    long_target = "t" * 300
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = L.tar_layer(
            [
                L.file(long_name, b"z" * 100),
                L.symlink("s", long_target),
                L.hardlink("h", long_name),
            ],
            format=fmt,
        )
        got = members(data)
        assert got[0].entry.path == long_name.encode()
        assert got[1].entry.linkname == long_target.encode()
        assert got[2].entry.linkname == long_name.encode()
        assert split(data).joined() == data


def test_ustar_prefix_field() -> None:
    d = "usr/lib/python3.12/site-packages/some-very-long-package-name-here/__pycache__/subdir"
    name = f"{d}/module_name_with_extra_stuff.cpython-312.opt-2.pyc"
    data = L.tar_layer([L.file(name, b"test")], format=tarfile.USTAR_FORMAT)
    assert data[345:350] == b"usr/l"
    (m,) = members(data)
    assert m.entry.path == name.encode()


def test_non_utf8_names_stay_bytes() -> None:
    name = b"caf\xe9/\xff\xfe".decode("utf-8", "surrogateescape")
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(
            fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
        ) as t:
            ti = tarfile.TarInfo(name)
            t.addfile(ti, io.BytesIO(b""))
        (m,) = members(buf.getvalue())
        assert m.entry.path == b"caf\xe9/\xff\xfe"


def test_global_header_kept_but_not_applied() -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        pax_headers={"comment": "x", "mtime": "99"},
    ) as t:
        ti, _ = L.file("f", b"")
        t.addfile(ti, io.BytesIO(b""))
    data = buf.getvalue()
    assert data[156:157] == b"g"
    (m,) = members(data)
    assert m.entry.mtime == L.MTIME  # like composefs-rs: globals are not applied
    assert split(data).joined() == data


def test_trailing_padding_and_garbage_preserved() -> None:
    data = L.tar_layer([L.file("f", b"x" * 100)])
    assert len(data) % 10240 == 0  # tarfile pads to the record size
    for tail in (b"", b"\0" * 512, b"garbage after the end"):
        sink = split(data + tail)
        assert sink.joined() == data + tail
        assert len(sink.entries) == 1


def test_no_end_marker_and_stray_zero_block() -> None:
    one = L.tar_layer([L.file("a", b"a" * 100)])
    two = L.tar_layer([L.file("b", b"b")])
    body_a = one[: 512 + 512]  # header + one content block, no end marker
    assert [m.entry.path for m in members(body_a)] == [b"a"]
    assert split(body_a).joined() == body_a
    glued = body_a + b"\0" * 512 + two  # a stray zero block between entries
    assert [m.entry.path for m in members(glued)] == [b"a", b"b"]
    assert split(glued).joined() == glued


def test_empty_archive() -> None:
    data = L.tar_layer([])
    sink = split(data)
    assert sink.entries == [] and sink.joined() == data
    assert split(b"").joined() == b""


def test_gnu_tar_archives(tmp_path: Path) -> None:
    """GNU tar as an independent producer: long names, xattrs, hardlinks."""
    gtar = shutil.which("tar")
    if gtar is None:
        pytest.skip("tar not installed")
    src = tmp_path / "src"
    deep = src / ("long-directory-name-" * 6) / ("another-long-one-" * 6)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(os.urandom(3000))
    (src / "small").write_bytes(b"hi")
    os.link(src / "small", src / "small-link")
    os.symlink("small", src / "sym")
    try:
        os.setxattr(src / "small", "user.test", b"\x00value")
        has_xattr = True
    except OSError:
        has_xattr = False
    for fmt in ("gnu", "posix"):
        out = tmp_path / f"{fmt}.tar"
        cmd = [gtar, f"--format={fmt}", "-C", str(src), "-cf", str(out), "."]
        if has_xattr and fmt == "posix":
            cmd.insert(1, "--xattrs")
        subprocess.run(cmd, check=True)
        data = out.read_bytes()
        sink = split(data, trickle=3000)
        assert sink.joined() == data
        names = {e.path.rstrip(b"/") for e in sink.entries}
        assert b"./small" in names and b"./sym" in names
        longest = max(names, key=len)
        assert len(longest) > 200 and longest.endswith(b"/file")
        links = [e for e in sink.entries if e.kind == T.HARDLINK]
        assert len(links) == 1
        if has_xattr and fmt == "posix":
            small = next(e for e in sink.entries if e.path == b"./small")
            assert small.xattrs.get(b"user.test") == b"\x00value"


# -- hostile input -----------------------------------------------------------


def _header(
    name: bytes = b"f",
    typeflag: bytes = b"0",
    size: int = 0,
    magic: bytes = b"ustar\x0000",
    **fields: bytes,
) -> bytearray:
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = magic
    for off, value in fields.items():
        start = int(off[1:])
        h[start : start + len(value)] = value
    _fix_checksum(h)
    return h


def _fix_checksum(h: bytearray) -> None:
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)


def _expect(data: bytes, match: str) -> None:
    with pytest.raises(OciError, match=match):
        split(data)
    with pytest.raises(OciError, match=match):
        list(T.read_members([data]))


END = b"\0" * 1024


def test_bad_checksum() -> None:
    data = bytearray(L.tar_layer([L.file("f", b"x")]))
    data[0] ^= 1
    _expect(bytes(data), "checksum")
    _expect(b"this is not a tar archive".ljust(512, b"!"), "checksum")


def test_signed_checksum_accepted() -> None:
    h = _header(b"caf\xe9")
    signed = sum(h[:148]) + sum(h[156:]) + 256 - 256 * sum(1 for c in h if c & 0x80)
    h[148:156] = b"%06o\0 " % signed
    assert [m.entry.path for m in members(bytes(h) + END)] == [b"caf\xe9"]


@pytest.mark.parametrize("cut", [100, 512, 700, 1024 + 100])
def test_truncated(cut: int) -> None:
    data = L.tar_layer([L.file("f", b"x" * 1000), L.file("g", b"y")])
    _expect(data[:cut], "truncated")


def test_truncated_inside_external_content() -> None:
    data = L.tar_layer([L.file("f", b"x" * 100000)])
    with pytest.raises(OciError, match=r"truncated \(in f\)"):
        split(data[:50000], trickle=4096)


def test_sparse_rejected() -> None:
    gnu = _header(b"sparse", b"S", magic=b"ustar  \0")
    _expect(bytes(gnu) + END, "sparse")
    ti, data = L.file("s", b"")
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    _expect(L.tar_layer([(ti, data)]), "sparse")


def test_absurd_size() -> None:
    h = _header()
    h[124:136] = b"\x80" + b"\xff" * 11
    _fix_checksum(h)
    _expect(bytes(h) + END, "absurd|out of range")
    ti, data = L.file("s", b"")
    ti.pax_headers = {"size": "9" * 40}
    _expect(L.tar_layer([(ti, data)]), "out of range")


def test_header_only_types_must_have_size_zero() -> None:
    h = _header(b"dir/", b"5", size=10)
    _expect(bytes(h) + b"x" * 512 + END, "nonzero size")


def test_unknown_entry_type() -> None:
    _expect(bytes(_header(b"vol", b"V")) + END, "unsupported entry type")
    # a v7 header (no magic) with type 'x' is an entry, not a PAX header
    _expect(bytes(_header(b"x", b"x", magic=b"\0" * 8)) + END, "unsupported entry type")


def test_malformed_pax() -> None:
    for payload in (b"5 path=x\n", b"99 path=x\n", b"abc path=x\n", b"12 pathx\n\n\n"):
        pax = _header(b"PaxHeader/f", b"x", size=len(payload))
        data = bytes(pax) + payload.ljust(512, b"\0") + bytes(_header()) + END
        _expect(data, "PAX")


def test_duplicate_and_orphan_extension_headers() -> None:
    payload = b"10 path=a\n"
    pax = bytes(_header(b"P", b"x", size=len(payload))) + payload.ljust(512, b"\0")
    _expect(pax + pax + bytes(_header()) + END, "duplicate")
    _expect(pax + END, "extension header without an entry")
    longname = bytes(_header(b"././@LongLink", b"L", size=4, magic=b"ustar  \0")) + b"abc\0".ljust(
        512, b"\0"
    )
    chain = longname * 2 + bytes(_header()) + END
    _expect(chain, "duplicate GNU long name")


def test_too_many_or_too_big_extension_headers() -> None:
    payload = b"x" * (T.MAX_METADATA + 1)
    h = _header(b"P", b"x", size=len(payload))
    _expect(
        bytes(h) + payload + b"\0" * (-len(payload) % 512) + bytes(_header()) + END, "too large"
    )


def test_empty_name_and_nul_in_name() -> None:
    _expect(bytes(_header(b"")) + END, "empty name")
    payload = b"12 path=a\0b\n"
    pax = bytes(_header(b"P", b"x", size=len(payload))) + payload.ljust(512, b"\0")
    _expect(pax + bytes(_header()) + END, "NUL")


def test_device_without_numbers() -> None:
    _expect(bytes(_header(b"dev", b"3", magic=b"\0" * 8)) + END, "device numbers")


def test_hostile_round_trip_never_crashes() -> None:
    """Random corruption: only clean OciErrors (or success), never anything else."""
    base = sample_archive(tarfile.PAX_FORMAT, seed=11)
    rng = random.Random(5)
    for _ in range(150):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, min(len(data), 20000))
            data[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        try:
            sink = split(bytes(data), trickle=rng.choice([None, 777]))
        except OciError:
            continue
        assert sink.joined() == bytes(data)
