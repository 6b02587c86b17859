"""EROFS reader: round trips over every vector in all three formats, the
read-side semantics (whiteouts, escapes, external files, hardlinks, link
counts) and rejection of hand-made hostile images."""

from __future__ import annotations

import struct
import subprocess
import tempfile
import tracemalloc
from pathlib import Path

import pytest

from composefs import dumpfile
from composefs.erofs import format as F
from composefs.erofs import reader
from composefs.erofs.format import FormatVersion
from composefs.erofs.reader import (
    collect_digests,
    collect_objects,
    image_info,
    image_version,
    read_image,
)
from composefs.erofs.writer import mkfs
from composefs.errors import ImageError
from composefs.tree import (
    S_IFBLK,
    S_IFCHR,
    Device,
    Directory,
    Fifo,
    Leaf,
    Regular,
    Socket,
    Stat,
    Symlink,
)
from testlib import need_tool, needs_root
from vectorlib import C_VECTORS, RS_VECTORS, c_vector

V0, V1, V2 = FormatVersion.V0, FormatVersion.V1, FormatVersion.V2


DIGEST = "5a" * 32
DIGEST512 = "a5" * 64


def fsck(image: bytes) -> None:
    tool = need_tool("fsck.erofs")
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(image)
        f.flush()
        r = subprocess.run([tool, f.name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def rust_dump(root: Directory) -> bytes:
    return dumpfile.dumps(root, style="rust")


# -- round trips ------------------------------------------------------------


@pytest.mark.parametrize("name", C_VECTORS)
def test_c_vector_round_trips(vectors: Path, name: str) -> None:
    tree, lo, hi = c_vector(vectors, name)
    image = mkfs(tree, lo, max_version=hi)
    back = read_image(image)
    # composefs-dump: same composefs_version, never bumped
    v = image_version(image)
    again = mkfs(back, v, max_version=v)
    assert again == image
    # composefs-info dump | mkcomposefs [same flags] --from-file -
    text = dumpfile.dumps(back)
    assert mkfs(dumpfile.parse(text, strict=True), lo, max_version=hi) == image
    if name in ("special.dump", "special_v1.dump", "longlink.dump"):
        fsck(again)


@pytest.mark.parametrize("name", C_VECTORS)
def test_c_vector_v2_round_trip(vectors: Path, name: str) -> None:
    tree, _, _ = c_vector(vectors, name)
    image = mkfs(tree, V2)
    assert image_version(image) is V2
    back = read_image(image)
    assert mkfs(back, V2) == image
    assert rust_dump(back) == rust_dump(tree)


@pytest.mark.parametrize("version", [V0, V1, V2])
@pytest.mark.parametrize("name", RS_VECTORS)
def test_rs_vectors_read_back_the_same_tree(
    vectors: Path, name: str, version: FormatVersion
) -> None:
    tree = dumpfile.parse((vectors / "composefs-rs" / name).read_bytes())
    image = mkfs(tree, version, max_version=version)
    back = read_image(image, keep_opaque_markers=False)
    assert rust_dump(back) == rust_dump(tree)
    assert mkfs(read_image(image), version, max_version=version) == image


# -- semantics ---------------------------------------------------------------


def sample_tree() -> Directory:
    root = Directory(Stat(0o755, 1, 2, 1000, 5, {b"user.root": b"r"}))
    sub = Directory(Stat(0o700, 3, 4, 2000, 7))
    root.entries[b"sub"] = sub
    shared = Leaf(Stat(0o644, xattrs={b"user.big": b"v" * 300}), Regular(3, data=b"abc"))
    root.entries[b"a"] = shared
    sub.entries[b"b"] = shared
    sub.entries[b"ext"] = Leaf(Stat(0o644), Regular(5000, digest=DIGEST))
    sub.entries[b"custom"] = Leaf(Stat(0o600), Regular(7, payload=b"ab/cdef.file"))
    sub.entries[b"nodigest"] = Leaf(Stat(0o600), Regular(9))
    root.entries[b"link"] = Leaf(Stat(0o777), Symlink(b"sub/b"))
    root.entries[b"blk"] = Leaf(Stat(0o600), Device(S_IFBLK, 0x0801))
    root.entries[b"chr"] = Leaf(Stat(0o600), Device(S_IFCHR, 0x0103))
    root.entries[b"fifo"] = Leaf(Stat(0o600), Fifo())
    root.entries[b"sock"] = Leaf(Stat(0o600), Socket())
    root.entries[b"empty"] = Leaf(Stat(0o644), Regular(0))
    root.entries[b"esc"] = Leaf(
        Stat(0o644, xattrs={b"trusted.overlay.opaque": b"y", b"security.selinux": b"x"}),
        Regular(0),
    )
    sub.entries[b"wh"] = Leaf(Stat(0o600, 5, 6), Device(S_IFCHR, 0))
    return root


@pytest.mark.parametrize("version", [V0, V1, V2])
def test_sample_tree_semantics(version: FormatVersion) -> None:
    image = mkfs(sample_tree(), version)
    back = read_image(image)
    sub = back.get_dir(b"/sub")
    expected = sample_tree()
    if version is V2:
        # V2 stores no nanoseconds
        expected.stat.mtime_nsec = expected.get_dir(b"/sub").stat.mtime_nsec = 0
    else:
        # V1 marks directories holding whiteouts; C reads the markers back
        assert sub.stat.xattrs.pop(b"trusted.overlay.opaque") == b"x"
        assert sub.stat.xattrs.pop(b"user.overlay.opaque") == b"x"
    assert rust_dump(back) == rust_dump(expected)
    # a hardlink is the same Leaf object, and its link count is implied
    assert back.entries[b"a"] is sub.entries[b"b"]
    assert back.entries[b"a"].nlink is None  # type: ignore[union-attr]
    ext = sub.entries[b"ext"]
    assert isinstance(ext, Leaf) and ext.content == Regular(5000, digest=DIGEST)
    custom = sub.entries[b"custom"]
    assert isinstance(custom, Leaf) and custom.content == Regular(7, payload=b"ab/cdef.file")
    nodigest = sub.entries[b"nodigest"]
    assert isinstance(nodigest, Leaf) and nodigest.content == Regular(9)
    wh = sub.entries[b"wh"]
    assert isinstance(wh, Leaf) and wh.is_whiteout() and (wh.stat.uid, wh.stat.gid) == (5, 6)
    esc = back.entries[b"esc"]
    assert isinstance(esc, Leaf) and esc.stat.xattrs[b"trusted.overlay.opaque"] == b"y"
    # the 256 stubs of V0/V1 images are the writer's, not the tree's
    assert not any(len(n) == 2 for n in back.entries)
    assert back.stat.mtime == 1000 and back.stat.mtime_nsec == (0 if version is V2 else 5)
    assert collect_objects(image) == {f"{DIGEST[:2]}/{DIGEST[2:]}", "ab/cdef.file"}
    assert collect_digests(image) == {DIGEST}
    assert mkfs(read_image(image), version) == image
    if version is not V2:
        fsck(image)


def test_v1_keeps_c_whiteout_markers_by_default() -> None:
    image = mkfs(sample_tree(), V1)
    sub = read_image(image).get_dir(b"/sub")
    # like C: the "directory has whiteouts" markers stay visible
    assert sub.stat.xattrs[b"trusted.overlay.opaque"] == b"x"
    assert sub.stat.xattrs[b"user.overlay.opaque"] == b"x"
    assert b"user.overlay.whiteouts" not in sub.stat.xattrs


def test_v0_auto_bump_and_no_bump() -> None:
    assert image_version(mkfs(sample_tree(), V0)) is V1
    image = mkfs(sample_tree(), V0, max_version=V0)
    assert image_version(image) is V0
    assert mkfs(read_image(image), V0, max_version=V0) == image


def test_sha512_digests_and_empty_external_v2() -> None:
    root = Directory()
    root.entries[b"big"] = Leaf(Stat(0o644), Regular(1 << 20, digest=DIGEST512))
    root.entries[b"zero"] = Leaf(Stat(0o644), Regular(0, digest=DIGEST))
    image = mkfs(root, V2)
    back = read_image(image)
    assert back.entries[b"big"].content == Regular(1 << 20, digest=DIGEST512)  # type: ignore[union-attr]
    assert mkfs(back, V2) == image
    # composefs-rs keeps an empty file named by digest external, and gc must see it
    assert back.entries[b"zero"].content == Regular(0, digest=DIGEST)  # type: ignore[union-attr]
    assert collect_digests(image) == {DIGEST512, DIGEST}


def test_explicit_link_counts_survive() -> None:
    root = Directory()
    root.entries[b"odd"] = Leaf(Stat(0o644), Regular(2, data=b"hi"), nlink=7)
    pair = Leaf(Stat(0o644), Fifo())
    root.entries[b"p1"] = pair
    root.entries[b"p2"] = pair
    for v in (V0, V2):
        image = mkfs(root, v)
        back = read_image(image)
        # C keeps a dumpfile's NLINK; composefs-rs (V2) always counts names
        assert back.entries[b"odd"].nlink == (7 if v is V0 else None)  # type: ignore[union-attr]
        assert back.entries[b"p1"] is back.entries[b"p2"]
        assert back.entries[b"p1"].nlink is None  # type: ignore[union-attr]
        assert mkfs(back, v) == image


def test_toplevel_filter() -> None:
    image = mkfs(sample_tree(), V0)
    back = read_image(image, toplevel=[b"a", b"link"])
    assert sorted(back.entries) == [b"a", b"link"]
    # "a" lost its second name to the filter: the on-disk count is kept
    assert back.entries[b"a"].nlink == 2  # type: ignore[union-attr]


def test_deep_tree_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths of at most MAX_DEPTH components (composefs.limits, shared with
    the writers); a deeper image is built with the writer's check lifted."""

    def chain(depth: int) -> Directory:
        root = Directory()
        d = root
        for _ in range(depth):
            nxt = Directory()
            d.entries[b"d"] = nxt
            d = nxt
        return root

    read_image(mkfs(chain(reader.MAX_DEPTH), V2))
    from composefs.erofs import writer

    monkeypatch.setattr(writer, "MAX_DEPTH", reader.MAX_DEPTH + 10)
    with pytest.raises(ImageError, match="deeper"):
        read_image(mkfs(chain(reader.MAX_DEPTH + 1), V2))


def test_shared_xattrs_do_not_multiply_memory() -> None:
    # 2000 inodes all naming one 30 KiB shared xattr: reading must not
    # materialise the value 2000 times.
    root = Directory()
    for i in range(2000):
        root.entries[b"f%04d" % i] = Leaf(Stat(0o644, xattrs={b"user.x": b"v" * 30000}), Fifo())
    image = mkfs(root, V2)
    assert len(image) < 400_000
    tracemalloc.start()
    try:
        read_image(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(image), peak


# -- hostile images ------------------------------------------------------------


def locate(image: bytes, path: bytes) -> int:
    """nid of `path` (test helper built on the reader's internals)."""
    r = reader._Reader(image)
    nid = r.info.root_nid
    for part in [p for p in path.split(b"/") if p]:
        ents = {n: c for n, c, _ in r.dirents(r.inode(nid))}
        nid = ents[part]
    return nid


def dirent_offsets(image: bytes, dir_path: bytes) -> dict[bytes, int]:
    """Byte offsets of a directory's dirents (inline-tail directories only)."""
    r = reader._Reader(image)
    ino = r.inode(locate(image, dir_path))
    assert ino.datalayout == F.DATALAYOUT_FLAT_INLINE and ino.size < F.BLOCK_SIZE
    names = [n for n, _, _ in r.dirents(ino)]
    return {n: ino.inline_start + i * F.DIRENT_SIZE for i, n in enumerate(names)}


def patch(image: bytes, off: int, fmt_: str, *values: int) -> bytes:
    b = bytearray(image)
    struct.pack_into(fmt_, b, off, *values)
    return bytes(b)


def small_tree() -> Directory:
    root = Directory()
    d = Directory()
    root.entries[b"d"] = d
    d.entries[b"e"] = Directory()
    d.entries[b"f"] = Leaf(Stat(0o644, xattrs={b"user.a": b"1"}), Regular(3, data=b"abc"))
    d.entries[b"x"] = Leaf(Stat(0o644), Regular(100, digest=DIGEST))
    return root


@pytest.fixture(params=[V0, V2], ids=["v0", "v2"])
def small(request: pytest.FixtureRequest) -> bytes:
    image = mkfs(small_tree(), request.param)
    read_image(image)
    return image


def test_cycle_is_rejected(small: bytes) -> None:
    offs = dirent_offsets(small, b"/d/e")
    root_nid = image_info(small).root_nid
    # /d/e/. -> root: '.' no longer points at the directory itself
    with pytest.raises(ImageError):
        read_image(patch(small, offs[b"."], "<Q", root_nid))
    # /d/e contains an entry pointing back at /d (a cycle / directory hardlink)
    offs_d = dirent_offsets(small, b"/d")
    with pytest.raises(ImageError, match=r"twice|points"):
        read_image(patch(small, offs_d[b"e"], "<Q", locate(small, b"/d")))


def test_dotdot_must_point_to_parent(small: bytes) -> None:
    offs = dirent_offsets(small, b"/d/e")
    with pytest.raises(ImageError, match=r"\.\."):
        read_image(patch(small, offs[b".."], "<Q", locate(small, b"/d/e")))


@pytest.mark.parametrize("nid", [0, 35, 1 << 40, (1 << 64) - 1])
def test_out_of_range_nids(small: bytes, nid: int) -> None:
    offs = dirent_offsets(small, b"/d")
    with pytest.raises(ImageError, match="out of range"):
        read_image(patch(small, offs[b"f"], "<Q", nid))


def test_dirent_type_mismatch(small: bytes) -> None:
    offs = dirent_offsets(small, b"/d")
    with pytest.raises(ImageError, match="type"):
        read_image(patch(small, offs[b"f"] + 10, "<B", F.FT_DIR))


def test_unsorted_or_backwards_names(small: bytes) -> None:
    offs = dirent_offsets(small, b"/d")
    b = bytearray(small)
    # name offsets pointing backwards
    (off_f,) = struct.unpack_from("<H", b, offs[b"f"] + 8)
    with pytest.raises(ImageError):
        read_image(patch(small, offs[b"x"] + 8, "<H", off_f - 1))
    # swap the names "f" and "x": same bytes, wrong order
    r = reader._Reader(small)
    ino = r.inode(locate(small, b"/d"))
    tail = bytes(b[ino.inline_start : ino.inline_end])
    i, j = tail.index(b"fx"), tail.index(b"fx") + 1
    b[ino.inline_start + i], b[ino.inline_start + j] = ord("x"), ord("f")
    with pytest.raises(ImageError, match="sorted"):
        read_image(bytes(b))


def test_huge_sizes(small: bytes) -> None:
    r = reader._Reader(small)
    for path in (b"/d", b"/d/f"):
        ino = r.inode(locate(small, path))
        if ino.isize == F.EXTENDED_INODE_SIZE:
            bad = patch(small, ino.pos + 8, "<Q", (1 << 64) - 1)
        else:
            bad = patch(small, ino.pos + 8, "<I", 0xFFFFFFFF)
        with pytest.raises(ImageError):
            read_image(bad)


def test_directory_link_count(small: bytes) -> None:
    r = reader._Reader(small)
    ino = r.inode(locate(small, b"/d"))
    off = ino.pos + (6 if ino.isize == F.COMPACT_INODE_SIZE else 44)
    fmt_ = "<H" if ino.isize == F.COMPACT_INODE_SIZE else "<I"
    with pytest.raises(ImageError, match="link count"):
        read_image(patch(small, off, fmt_, 9))


def test_metacopy_must_be_well_formed(small: bytes) -> None:
    i = small.index(b"overlay.metacopy")
    value = i + len(b"overlay.metacopy")
    with pytest.raises(ImageError, match="metacopy"):
        read_image(patch(small, value, "<B", 1))  # version 1
    with pytest.raises(ImageError, match="metacopy"):
        read_image(patch(small, value + 3, "<B", 7))  # unknown algorithm


def test_redirect_must_be_absolute(small: bytes) -> None:
    i = small.index(b"overlay.redirect")
    with pytest.raises(ImageError, match="redirect"):
        read_image(patch(small, i + len(b"overlay.redirect"), "<B", ord("x")))


def test_bloom_filter_must_admit_names(small: bytes) -> None:
    r = reader._Reader(small)
    ino = r.inode(locate(small, b"/d/f"))
    with pytest.raises(ImageError, match="bloom"):
        read_image(patch(small, ino.pos + ino.isize, "<I", 0xFFFFFFFF))


def test_unknown_xattr_prefix(small: bytes) -> None:
    r = reader._Reader(small)
    ino = r.inode(locate(small, b"/d/f"))
    # first local entry: name_len, name_index, value_size
    with pytest.raises(ImageError, match="index"):
        read_image(patch(small, ino.pos + ino.isize + 12 + 1, "<B", 9))


@pytest.mark.parametrize(
    ("off", "fmt_", "value", "match"),
    [
        (0, "<I", 0xDEADBEEF, "composefs magic"),
        (4, "<I", 2, "header version"),
        (12, "<I", 3, "composefs_version"),
        (1024, "<I", 0, "EROFS magic"),
        (1024 + 12, "<B", 9, "block size"),
        (1024 + 8, "<I", 0x80, "feature_compat"),
        (1024 + 80, "<I", 0x1, "feature_incompat"),
        (1024 + 84, "<H", 1, "compression"),
        (1024 + 86, "<H", 1, "extra devices"),
        (1024 + 13, "<B", 1, "extension"),
        (1024 + 40, "<I", 1, "meta_blkaddr"),
        (1024 + 91, "<B", 1, "prefixes"),
        (1024 + 90, "<B", 1, "directory block"),
        (1024 + 96, "<Q", 40, "packed"),
        (1024 + 36, "<I", 1000, "truncated"),
        (1024 + 44, "<I", 1000, "xattr block"),
        (1024 + 14, "<H", 37, "inode|directory|type|range"),
        (1024 + 14, "<H", 0, "out of range"),
    ],
)
def test_header_and_superblock_checks(
    small: bytes, off: int, fmt_: str, value: int, match: str
) -> None:
    with pytest.raises(ImageError, match=match):
        read_image(patch(small, off, fmt_, value))


def test_truncated_and_tiny_images(small: bytes) -> None:
    for n in {0, 31, 1024, 1151, 1200, 4096, len(small) - 4096, len(small) - 1}:
        if n >= len(small):
            continue
        with pytest.raises(ImageError):
            read_image(small[:n])


def test_epoch1_needs_all_stubs() -> None:
    image = mkfs(small_tree(), V0)
    b = bytearray(image)
    j = image.index(b"fdfeff")  # the root's last names, packed in its block
    b[j + 5] = ord("g")  # "ff" -> "fg": still sorted, but slot ff is missing
    with pytest.raises(ImageError, match="stub"):
        read_image(bytes(b))


def test_epoch1_rejects_native_whiteouts_outside_root() -> None:
    root = Directory()
    d = Directory()
    root.entries[b"d"] = d
    d.entries[b"c"] = Leaf(Stat(0o600), Device(S_IFCHR, 5))
    image = mkfs(root, V0)
    r = reader._Reader(image)
    ino = r.inode(locate(image, b"/d/c"))
    with pytest.raises(ImageError, match="whiteout"):
        read_image(patch(image, ino.pos + 16, "<I", 0))  # rdev 5 -> 0
    # the same in V2 is a legitimate user whiteout
    image2 = mkfs(root, V2)
    ino2 = reader._Reader(image2).inode(locate(image2, b"/d/c"))
    back = read_image(patch(image2, ino2.pos + 16, "<I", 0))
    assert back.get_dir(b"/d").entries[b"c"].is_whiteout()  # type: ignore[union-attr]


def test_v2_rejects_escaped_whiteouts(monkeypatch: pytest.MonkeyPatch) -> None:
    from composefs import limits

    root = Directory()
    root.entries[b"w"] = Leaf(Stat(0o644, xattrs={b"trusted.overlay.whiteout": b""}), Regular(0))
    # The writers refuse this xattr on a regular file (composefs.limits);
    # lifted, the writer escapes it to trusted.overlay.overlay.whiteout.
    monkeypatch.setattr(limits, "WHITEOUT_XATTR", b"-")
    image = mkfs(root, V2)
    with pytest.raises(ImageError, match="escaped whiteout"):
        read_image(image)
    # C reads that back as a whiteout in V0/V1
    back = read_image(mkfs(root, V0))
    assert back.entries[b"w"].is_whiteout()  # type: ignore[union-attr]


def test_hardlinked_whiteouts_are_rejected() -> None:
    root = Directory()
    d = Directory()
    root.entries[b"d"] = d
    d.entries[b"w"] = Leaf(Stat(0o600), Device(S_IFCHR, 0))
    d.entries[b"v"] = Leaf(Stat(0o600), Fifo())
    image = mkfs(root, V2)
    offs = dirent_offsets(image, b"/d")
    # point "v" at the whiteout's inode (fix the dirent type too)
    bad = patch(image, offs[b"v"], "<Q", locate(image, b"/d/w"))
    bad = patch(bad, offs[b"v"] + 10, "<B", F.FT_CHRDEV)
    with pytest.raises(ImageError, match="hardlinked"):
        read_image(bad)


def test_not_bytes_input_and_other_errors() -> None:
    image = mkfs(small_tree(), V2)
    assert rust_dump(read_image(bytearray(image))) == rust_dump(small_tree())  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        read_image(b"\0" * 8192)


def test_external_files_have_no_data_in_the_image(small: bytes) -> None:
    r = reader._Reader(small)
    ino = r.inode(locate(small, b"/d/x"))
    assert small[ino.inline_start : ino.inline_start + 4] == F.NULL_CHUNK_INDEX
    with pytest.raises(ImageError, match="data blocks"):
        read_image(patch(small, ino.inline_start, "<I", 7))
    if ino.isize == F.EXTENDED_INODE_SIZE:
        # beyond 1024 chunks of 8 TiB: no writer makes these
        with pytest.raises(ImageError, match="too large"):
            read_image(patch(small, ino.pos + 8, "<Q", (1 << 53) + 1))
        # composefs-rs writes one chunk index whatever the size
        read_image(patch(small, ino.pos + 8, "<Q", 1 << 53))


def test_bare_xattr_header_is_rejected(small: bytes) -> None:
    # the kernel refuses an xattr area that is just the 12-byte header
    r = reader._Reader(small)
    ino = r.inode(locate(small, b"/d/f"))
    with pytest.raises(ImageError):
        read_image(patch(small, ino.pos + 2, "<H", 1))


# -- the kernel as an independent reader ----------------------------------------


def _kernel_view(image: bytes) -> dict[bytes, tuple[int, ...] | bytes | dict[bytes, bytes]]:
    """Everything the kernel shows of a mounted image, keyed by path."""
    import os
    import stat

    out: dict[bytes, tuple[int, ...] | bytes | dict[bytes, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        img, mnt = os.path.join(tmp, "img"), os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        Path(img).write_bytes(image)
        r = subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", img, mnt], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount erofs here: {r.stderr.decode(errors='replace').strip()}")
        try:
            base = os.fsencode(mnt)
            for dirpath, dirs, files in os.walk(base):
                for name in [b"", *dirs, *files] if dirpath == base else [*dirs, *files]:
                    p = os.path.join(dirpath, name) if name else dirpath
                    rel = b"/" + os.path.relpath(p, base).lstrip(b".")
                    st = os.lstat(p)
                    out[rel] = (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_mtime_ns,
                                st.st_rdev, st.st_size)  # fmt: skip
                    user_ok = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                    out[rel + b"//xattrs"] = {
                        os.fsencode(k): os.getxattr(p, k, follow_symlinks=False)
                        for k in os.listxattr(p, follow_symlinks=False)
                        if user_ok or not k.startswith("user.")
                    }
                    if stat.S_ISLNK(st.st_mode):
                        out[rel + b"//target"] = os.readlink(p)
                    elif stat.S_ISREG(st.st_mode) and st.st_blocks:
                        out[rel + b"//data"] = Path(os.fsdecode(p)).read_bytes()
        finally:
            subprocess.run(["umount", mnt], check=True)
    return out


def _reader_view(image: bytes) -> dict[bytes, tuple[int, ...] | bytes | dict[bytes, bytes]]:
    """The same, from the reader's view of the raw inodes (before any
    composefs transformation)."""
    import os

    r = reader._Reader(image)
    out: dict[bytes, tuple[int, ...] | bytes | dict[bytes, bytes]] = {}
    todo = [(b"/", r.info.root_nid)]
    while todo:
        path, nid = todo.pop()
        ino = r.inode(nid)
        size = ino.size
        out[path] = (ino.mode, ino.nlink, ino.uid, ino.gid,
                     ino.mtime * 10**9 + ino.mtime_nsec, ino.u if ino.ftype in (S_IFCHR, S_IFBLK) else 0,
                     size)  # fmt: skip
        xattrs = dict(r.raw_xattrs(ino))
        if ino.ftype not in (F.S_IFREG, F.S_IFDIR):
            xattrs = {k: v for k, v in xattrs.items() if not k.startswith(b"user.")}
        out[path + b"//xattrs"] = xattrs
        if ino.ftype == F.S_IFLNK:
            out[path + b"//target"] = r.content(ino)
        elif ino.ftype == F.S_IFREG and ino.datalayout != F.DATALAYOUT_CHUNK_BASED and size:
            out[path + b"//data"] = r.content(ino)
        if ino.ftype == F.S_IFDIR:
            for name, child, _ in r.dirents(ino):
                if name not in (b".", b".."):
                    todo.append((os.path.join(path, name), child))
    return out


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("version", [V0, V1, V2])
def test_kernel_sees_what_the_reader_sees(vectors: Path, version: FormatVersion) -> None:
    trees = [
        sample_tree(),
        dumpfile.parse((vectors / "c-mkcomposefs" / "special.dump").read_bytes()),
    ]
    for tree in trees:
        image = mkfs(tree, version)
        kernel = _kernel_view(image)
        ours = _reader_view(image)
        # external files read as holes from the image alone
        for k in [k for k in kernel if k.endswith(b"//data") and k not in ours]:
            data = kernel.pop(k)
            assert data == bytes(len(data))
        assert kernel == ours


def test_unprefixed_xattr_names() -> None:
    # C stores names without a known prefix under index 0; they read back
    root = Directory()
    root.entries[b"f"] = Leaf(Stat(0o644, xattrs={b"foo": b"1", b"lustre.x": b"2"}), Fifo())
    for v in (V0, V2):
        back = read_image(mkfs(root, v))
        assert back.entries[b"f"].stat.xattrs == {b"foo": b"1", b"lustre.x": b"2"}
    # but a known prefix stored as index 0 is unreachable by name: refused
    root.entries[b"f"].stat.xattrs = {b"fuser.x": b"1"}  # type: ignore[union-attr]
    image = bytearray(mkfs(root, V2))
    i = image.index(b"fuser.x")
    image[i] = ord("u")
    image[i + 1 : i + 7] = b"ser.xy"
    with pytest.raises(ImageError, match="prefix index"):
        read_image(bytes(image))
