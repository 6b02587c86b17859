"""Dumpfile parsing and writing, against the C 1.0.8 test assets."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from composefs import dumpfile
from composefs.errors import DumpfileError
from composefs.tree import Device, Directory, Leaf, Regular, Symlink
from vectorlib import LAX, c_vector_bytes

# Vectors whose text is already canonical: writing back gives the same bytes.
CANONICAL = {
    "bigfile-xattr.dump",
    "bigfile.dump",
    "config.dump.gz",
    "cs9-x86_64-minimal.dump.gz",
    "honggfuzz-bigfile-with-acl.dump",
    "honggfuzz-long-symlink.dump",
    "special.dump",
    "special_v1.dump",
}


def _inputs(vectors: Path) -> list[Path]:
    d = vectors / "c-mkcomposefs"
    return sorted(p for p in d.iterdir() if p.name.endswith((".dump", ".dump.gz")))


def test_vectors_parse_and_round_trip(vectors: Path) -> None:
    inputs = _inputs(vectors)
    assert len(inputs) >= 12
    for p in inputs:
        data = c_vector_bytes(vectors, p.name)
        root = dumpfile.parse(data, strict=p.name not in LAX)
        out = dumpfile.dumps(root)
        if p.name in CANONICAL:
            assert out == data, p.name
        # Writing is a fixed point: parse(dumps(t)) dumps to the same text.
        assert dumpfile.dumps(dumpfile.parse(out)) == out, p.name
        # Streaming writer and reader agree with the in-memory ones.
        buf = io.BytesIO()
        dumpfile.write(root, buf)
        assert buf.getvalue() == out
        assert dumpfile.dumps(dumpfile.parse(io.BytesIO(out))) == out


def test_non_strict_quirks(vectors: Path) -> None:
    d = vectors / "c-mkcomposefs"
    # Missing trailing newline (and rdev on a directory) only when not strict.
    data = (d / "no-newline.dump").read_bytes()
    with pytest.raises(DumpfileError, match="devnum"):
        dumpfile.parse(data, strict=True)
    with pytest.raises(DumpfileError, match="trailing newline"):
        dumpfile.parse(data.replace(b" 10 0.0", b" 0 0.0"), strict=True)
    root = dumpfile.parse(data, strict=False)
    assert root.nlink() == 2  # NLINK of a directory is recomputed
    # A symlink SIZE that disagrees with its target is an error only when strict.
    data = (d / "longlink.dump").read_bytes()
    with pytest.raises(DumpfileError, match="symlink size"):
        dumpfile.parse(data, strict=True)
    link = dumpfile.parse(data, strict=False).lookup(b"/big-but-not-max-link")
    assert isinstance(link, Leaf) and isinstance(link.content, Symlink)
    assert len(link.content.target) == 4070
    # Missing trailing fields read as empty ones, high mode bits are dropped.
    data = (d / "honggfuzz-longlink-unterminated.dump").read_bytes()
    node = dumpfile.parse(data, strict=False).lookup(b"/chardev")
    assert isinstance(node, Leaf) and isinstance(node.content, Symlink)


@pytest.mark.parametrize("strict", [True, False])
def test_should_fail_vectors(vectors: Path, strict: bool) -> None:
    files = sorted((vectors / "c-mkcomposefs" / "should-fail").glob("*.dump"))
    assert files
    # too-big is valid text; the EROFS writer rejects it (its test covers that).
    for p in files:
        if p.name == "should-fail-too-big.dump":
            continue
        with pytest.raises(DumpfileError) as info:
            dumpfile.parse(p.read_bytes(), strict=strict)
        msg = str(info.value)
        assert msg.startswith("line ") and "\n" not in msg, (p.name, msg)


def test_hardlinks_forward_and_chained() -> None:
    text = (
        b"/ 0 40755 2 0 0 0 0.0 - - -\n"
        b"/a 0 @100644 0 0 0 0 0.0 /c - -\n"  # forward reference
        b"/b 0 @100644 0 0 0 0 0.0 /a - -\n"  # link to a link
        b"/c 3 100644 3 1 2 0 5.6 - abc - user.x=1\n"
    )
    root = dumpfile.parse(text)
    a, b, c = (root.entries[n] for n in (b"a", b"b", b"c"))
    assert a is b is c
    assert isinstance(c, Leaf) and c.nlink == 3
    out = dumpfile.dumps(root)
    # C style: the first path in sorted order is canonical, the others
    # repeat its metadata with @ and the canonical path as payload.
    assert out.splitlines()[1:] == [
        b"/a 3 100644 3 1 2 0 5.6 - abc - user.x=1",
        b"/b 3 @100644 3 1 2 0 5.6 /a abc - user.x=1",
        b"/c 3 @100644 3 1 2 0 5.6 /a abc - user.x=1",
    ]
    rust = dumpfile.dumps(root, style="rust")
    assert rust.splitlines()[2] == b"/b 0 @120000 - - - - 0.0 /a - -"
    assert dumpfile.dumps(dumpfile.parse(rust), style="rust") == rust


@pytest.mark.parametrize(
    "line, message",
    [
        (b"/x 0 @100644 0 0 0 0 0.0 /x - -", "self-referential"),
        (b"/x 0 @100644 0 0 0 0 0.0 /y - -\n/y 0 @100644 0 0 0 0 0.0 /x - -", "self-referential"),
        (b"/x 0 @100644 0 0 0 0 0.0 /nope - -", "no target"),
        (b"/x 0 @100644 0 0 0 0 0.0 / - -", "directory"),
        (b"/x 0 100644 1 0 0 0 0.0 - - - a", "missing ="),
        (b"/x 0 100644 1 0 0 0 0.0 - - - a=\\q", "unsupported escape"),
        (b"/x 0 100644 1 0 0 0 0.0 - - - a=\\x4", "hex"),
        (b"/x 0 100644 1 0 0 0 0.0 - - - a=\\xzz", "hex"),
        (b"/x 0 100644 1 0 0 0 0.0 - - 1234", "digest"),
        (b"/x 2 100644 1 0 0 0 0.0 - abc -", "content size"),
        (b"/x 0 100644 1 0 0 0 1 - - -", "mtime"),
        (b"/x 0 100644 1 0 0 0 1.1000000000 - - -", "nanoseconds"),
        (b"/x 0 100644 1 -1 0 0 0.0 - - -", "uid"),
        (b"/x 0 109644 1 0 0 0 0.0 - - -", "mode"),
        (b"/x 0 100644 1 0 0 0 0.0 - - -\n/x 0 100644 1 0 0 0 0.0 - - -", "already exists"),
        (b"/x/y 0 100644 1 0 0 0 0.0 - - -", "parent directory missing"),
        (b"/x 0 100644 1 0 0 0 0.0 - - -\n/x/y 0 100644 1 0 0 0 0.0 - - -", "must be a directory"),
        (b"/x 0 100644 1 0 0 5 0.0 - - -", "devnum"),
        (b"/" + b"n" * 256 + b" 0 100644 1 0 0 0 0.0 - - -", "name too long"),
        (b"/x\x00 0 100644 1 0 0 0 0.0 - - -", "NUL"),
        (b"", "empty line"),
        (b"/ 0 40755 2 0 0 0 0.0 - - -", "multiple roots"),
    ],
)
def test_rejections(line: bytes, message: str) -> None:
    text = b"/ 0 40755 2 0 0 0 0.0 - - -\n" + line + b"\n"
    with pytest.raises(DumpfileError, match=message) as info:
        dumpfile.parse(text)
    assert str(info.value).startswith("line ")


def test_root_rules() -> None:
    with pytest.raises(DumpfileError, match="root node not present"):
        dumpfile.parse(b"/x 0 100644 1 0 0 0 0.0 - - -\n")
    with pytest.raises(DumpfileError, match="root must be a directory"):
        dumpfile.parse(b"/ 0 100644 1 0 0 0 0.0 - - -\n")
    with pytest.raises(DumpfileError, match="no root"):
        dumpfile.parse(b"")


def test_escaping_round_trip() -> None:
    name = bytes(range(1, 256)).replace(b"/", b"")
    raw_values = [b"-", b"", b"a=b", b"\\", b" x\n\r\t\x00\xff"]
    root = Directory()
    leaf = Leaf(root.stat.copy(), Regular(5, data=b"-=\\ \x00"))
    for i, v in enumerate(raw_values):
        leaf.stat.xattrs[b"user.k=" + bytes([0x30 + i])] = v
    root.entries[name] = leaf
    root.entries[b"-"] = Leaf(root.stat.copy(), Symlink(b"-"))
    root.entries[b"dev"] = Leaf(root.stat.copy(), Device(0o060000, 0x1234))
    out = dumpfile.dumps(root)
    assert b"\\x2d" in out and b"\\x3d" in out and b"\\x20" in out
    back = dumpfile.parse(out)
    assert dumpfile.dumps(back) == out
    got = back.entries[name]
    assert isinstance(got, Leaf) and got.stat.xattrs == leaf.stat.xattrs
    assert isinstance(got.content, Regular) and got.content.data == b"-=\\ \x00"
    sym = back.entries[b"-"]
    assert isinstance(sym, Leaf) and isinstance(sym.content, Symlink)
    assert sym.content.target == b"-"


def test_external_and_paths() -> None:
    digest = "ab" * 32
    text = (
        b"/ 4096 40755 3 0 0 0 0.0 - - -\n"
        b"/d 4096 40755 2 0 0 0 -5.7 - - -\n"
        b"//d///f 10 100600 1 0 0 0 0.0 ab/" + b"ab" * 31 + b" - " + digest.encode() + b"\n"
        b"/e 10 100600 1 0 0 0 0.0 custom/path - -\n"
    )
    root = dumpfile.parse(text)
    f = root.lookup(b"/d/f")
    assert isinstance(f, Leaf) and isinstance(f.content, Regular)
    assert f.content.digest == digest and f.content.is_external
    assert root.get_dir(b"/d").stat.mtime == -5
    e = root.lookup(b"/e")
    assert isinstance(e, Leaf) and isinstance(e.content, Regular)
    assert e.content.digest is None and e.content.payload == b"custom/path"
    assert b"/e 10 100600 1 0 0 0 0.0 custom/path - -\n" in dumpfile.dumps(root)


def test_digest_without_payload_means_no_redirect() -> None:
    """C 1.0.8 writes a metacopy but no redirect for `payload -` with a
    digest; the tree keeps that as an empty payload through every path."""
    from composefs.erofs import reader, writer
    from composefs.erofs.format import FormatVersion

    digest = ("ab" * 32).encode()
    text = (
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
        b"/f 100 100644 1 0 0 0 0.0 - - " + digest + b"\n"
        b"/g 100 100644 1 0 0 0 0.0 ab/" + b"ab" * 31 + b" - " + digest + b"\n"
    )
    root = dumpfile.parse(text)
    f = root.lookup(b"/f")
    assert isinstance(f, Leaf) and isinstance(f.content, Regular)
    assert f.content.backing_path() is None
    assert dumpfile.dumps(root) == text
    img = writer.mkfs(root, FormatVersion.V0)
    assert img.count(b"/ab/abab") == 1  # only /g has a redirect
    back = reader.read_image(img)
    assert dumpfile.dumps(back) == text
    assert writer.mkfs(back, FormatVersion.V0) == img


def test_empty_inline_file_is_written_with_the_none_sentinel() -> None:
    """A library-built empty inline file (`data=b""`) is written as C writes
    an empty file, `-`, never as an empty field (which no parser accepts)."""
    root = Directory()
    root.entries[b"empty"] = Leaf(root.stat.copy(), Regular(0, data=b""))
    root.entries[b"none"] = Leaf(root.stat.copy(), Regular(0))
    for style in ("c", "rust"):
        out = dumpfile.dumps(root, style=style)
        lines = out.splitlines()
        assert lines[1] == b"/empty 0 100755 1 0 0 0 0.0 - - -", style
        assert lines[2] == b"/none 0 100755 1 0 0 0 0.0 - - -", style
        assert dumpfile.dumps(dumpfile.parse(out), style=style) == out


def test_fast_path_entries_are_whole_objects() -> None:
    """The parser's fast path builds Stat, Regular and Leaf without calling
    them: every slot is set, and they equal the objects the classes make."""
    from composefs.tree import Stat

    text = (
        b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
        b"/f 100 100644 1 1 2 0 3.4 ab/cdef - " + b"ab" * 32 + b"\n"
    )
    f = dumpfile.parse(text).lookup(b"/f")
    assert isinstance(f, Leaf) and isinstance(f.content, Regular)
    for obj in (f, f.stat, f.content):
        for slot in type(obj).__slots__:
            getattr(obj, slot)  # AttributeError if the fast path missed one
    assert f.stat == Stat(0o644, 1, 2, 3, 4)
    assert f.content == Regular(100, None, "ab" * 32, b"ab/cdef")
    assert (f.nlink, f.primary) == (1, None)
