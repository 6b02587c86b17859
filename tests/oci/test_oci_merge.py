"""Merging OCI layers into one tree (composefs.oci.layers).

Known answers: composefs-rs 0.7.0's pinned image ids for its test OCI layout
(crates/composefs-integration-tests/src/tests/cli.rs). Everything else is
checked against the OCI image-spec rules the module docstring lists.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import ocitestlib as L
import pytest

from composefs import dumpfile, fsverity
from composefs.erofs.format import FormatVersion
from composefs.erofs.writer import mkfs
from composefs.errors import OciError
from composefs.oci import tar as T
from composefs.oci.layers import LayerMerger, merge_layers, split_name
from composefs.tree import S_IFBLK, S_IFCHR, Device, Directory, Fifo, Leaf, Regular, Symlink


def digest(data: bytes) -> str:
    return fsverity.digest_hex(data, "sha256")


def merge(
    *layers: list[L.Member], transform: bool = True, fmt: int = tarfile.PAX_FORMAT
) -> Directory:
    return merge_layers(
        [T.read_members([L.tar_layer(entries, format=fmt)]) for entries in layers],
        transform=transform,
        large_inline=digest,
    )


def names(root: Directory) -> list[str]:
    return [p.decode() for p, _ in walk(root)]


def walk(root: Directory) -> list[tuple[bytes, Directory | Leaf]]:
    from composefs.tree import walk as w

    return list(w(root))[1:]


def node(root: Directory, path: str) -> Directory | Leaf:
    n = root.lookup(path.encode())
    assert n is not None, path
    return n


def leaf(root: Directory, path: str) -> Leaf:
    n = node(root, path)
    assert isinstance(n, Leaf)
    return n


# -- known answers ------------------------------------------------------------


def test_composefs_rs_oci_layout_image_ids() -> None:
    root = merge_layers([T.read_members([L.composefs_rs_test_layer()])])
    assert fsverity.digest_hex(mkfs(root, FormatVersion.V2), "sha512") == L.OCI_LAYOUT_V2_SHA512
    assert fsverity.digest_hex(mkfs(root, FormatVersion.V1), "sha512") == L.OCI_LAYOUT_V1_SHA512


# -- basics -----------------------------------------------------------------------


def test_single_layer_every_type() -> None:
    big = os.urandom(1000)
    root = merge(
        [
            L.directory("usr", mode=0o751, uid=5, gid=6, xattrs={"user.dir": b"d"}),
            L.file(
                "usr/small",
                b"tiny",
                mode=0o640,
                uid=1,
                gid=2,
                xattrs={"security.capability": b"\x01\x02"},
            ),
            L.file("usr/big", big, mode=0o4755),
            L.file("usr/empty", b""),
            L.symlink("usr/sym", "small"),
            L.chardev("usr/null", 1, 3),
            L.blockdev("usr/sda", 8, 1),
            L.fifo("usr/fifo"),
            L.hardlink("usr/big-link", "usr/big"),
        ]
    )
    small = leaf(root, "/usr/small")
    assert small.content == Regular(4, data=b"tiny")
    assert (small.stat.mode, small.stat.uid, small.stat.gid) == (0o640, 1, 2)
    assert small.stat.xattrs == {b"security.capability": b"\x01\x02"}
    assert leaf(root, "/usr/big").content == Regular(1000, digest=digest(big))
    assert leaf(root, "/usr/big").stat.mode == 0o4755
    assert leaf(root, "/usr/empty").content == Regular(0, data=b"")
    assert leaf(root, "/usr/sym").content == Symlink(b"small")
    assert leaf(root, "/usr/null").content == Device(S_IFCHR, os.makedev(1, 3))
    assert leaf(root, "/usr/sda").content == Device(S_IFBLK, os.makedev(8, 1))
    assert isinstance(leaf(root, "/usr/fifo").content, Fifo)
    assert leaf(root, "/usr/big-link") is leaf(root, "/usr/big")
    usr = node(root, "/usr")
    assert isinstance(usr, Directory) and usr.stat.xattrs == {b"user.dir": b"d"}
    # transform_for_oci: the root gets /usr's metadata
    assert (root.stat.mode, root.stat.uid, root.stat.gid) == (0o751, 5, 6)
    assert root.stat.xattrs == {b"user.dir": b"d"}


def test_dot_slash_and_absolute_names_are_the_same() -> None:
    root = merge(
        [L.file("./a/b", b"1"), L.file("/a/c", b"2"), L.file("a//d", b"3"), L.directory("./a/")]
    )
    assert names(root) == ["/a", "/a/b", "/a/c", "/a/d"]


def test_root_entry_sets_root_metadata_then_usr_wins() -> None:
    root = merge([L.directory("./", mode=0o700, uid=3)], transform=False)
    assert (root.stat.mode, root.stat.uid) == (0o700, 3)
    root = merge([L.directory("/", mode=0o700, uid=3), L.directory("usr", mode=0o755, uid=0)])
    assert (root.stat.mode, root.stat.uid) == (0o755, 0)


def test_no_usr_keeps_root_metadata() -> None:
    root = merge([L.directory(".", mode=0o711, mtime=5), L.file("bin", b"x")])
    assert (root.stat.mode, root.stat.mtime) == (0o711, 5)


def test_run_is_emptied() -> None:
    root = merge(
        [
            L.directory("usr", mtime=777),
            L.directory("run", mode=0o700, mtime=1),
            L.file("run/secret", b"s"),
            L.directory("run/lock"),
        ]
    )
    run = node(root, "/run")
    assert isinstance(run, Directory) and run.entries == {}
    assert (run.stat.mode, run.stat.mtime) == (0o700, 777)


def test_implicit_parents() -> None:
    root = merge([L.directory("usr"), L.file("a/b/c", b"x", mtime=99)])
    for p in ("/a", "/a/b"):
        d = node(root, p)
        assert isinstance(d, Directory)
        assert (d.stat.mode, d.stat.uid, d.stat.gid, d.stat.mtime, d.stat.xattrs) == (
            0o755,
            0,
            0,
            0,
            {},
        )


def test_implicit_parent_keeps_lower_metadata() -> None:
    root = merge([L.directory("etc", mode=0o700, mtime=50)], [L.file("etc/new", b"n")])
    etc = node(root, "/etc")
    assert isinstance(etc, Directory) and (etc.stat.mode, etc.stat.mtime) == (0o700, 50)


def test_redeclared_dir_keeps_children_and_takes_metadata() -> None:
    root = merge(
        [L.directory("d", mode=0o700), L.file("d/lower", b"1")],
        [L.directory("d", mode=0o750, uid=9), L.file("d/upper", b"2")],
    )
    d = node(root, "/d")
    assert isinstance(d, Directory) and sorted(d.entries) == [b"lower", b"upper"]
    assert (d.stat.mode, d.stat.uid) == (0o750, 9)
    # within one layer too
    root = merge([L.directory("d", mode=0o700), L.file("d/x", b"1"), L.directory("d", mode=0o711)])
    d = node(root, "/d")
    assert isinstance(d, Directory) and list(d.entries) == [b"x"] and d.stat.mode == 0o711


def test_non_dir_replaces_anything() -> None:
    root = merge(
        [L.directory("d"), L.file("d/x", b"1"), L.file("f", b"file")],
        [L.symlink("d", "elsewhere"), L.directory("f")],
    )
    assert leaf(root, "/d").content == Symlink(b"elsewhere")
    assert isinstance(node(root, "/f"), Directory)


def test_duplicates_last_wins() -> None:
    root = merge(
        [
            L.file("x", b"first"),
            L.file("x", b"second", mode=0o600),
            L.symlink("y", "a"),
            L.file("y", b"f"),
        ]
    )
    assert leaf(root, "/x").content == Regular(6, data=b"second")
    assert leaf(root, "/x").stat.mode == 0o600
    assert leaf(root, "/y").content == Regular(1, data=b"f")


# -- whiteouts ----------------------------------------------------------------------


def test_whiteout_removes_lower_entry() -> None:
    root = merge(
        [
            L.directory("etc"),
            L.file("etc/a", b"a"),
            L.file("etc/b", b"b"),
            L.directory("etc/sub"),
            L.file("etc/sub/x", b"x"),
        ],
        [L.whiteout("etc/a"), L.whiteout("etc/sub")],
    )
    assert names(root) == ["/etc", "/etc/b"]


def test_whiteout_does_not_hide_same_layer_entries() -> None:
    # composefs-rs would drop etc/a here (it removes in tar order); the spec
    # says a whiteout only applies to lower layers.
    root = merge(
        [L.directory("etc"), L.file("etc/a", b"old")],
        [L.file("etc/a", b"new"), L.whiteout("etc/a")],
    )
    assert leaf(root, "/etc/a").content == Regular(3, data=b"new")
    root = merge(
        [L.directory("etc"), L.file("etc/a", b"old")],
        [L.whiteout("etc/a"), L.file("etc/a", b"new")],
    )
    assert leaf(root, "/etc/a").content == Regular(3, data=b"new")


def test_whiteout_of_missing_or_below_file_is_harmless() -> None:
    root = merge(
        [L.file("f", b"x")], [L.whiteout("nothing"), L.whiteout("f/child"), L.whiteout("no/dir/x")]
    )
    assert names(root) == ["/f"]


def test_whiteout_creates_no_parents() -> None:
    root = merge([L.file("f", b"x")], [L.whiteout("newdir/x")])
    assert names(root) == ["/f"]


def test_opaque_hides_lower_children_only() -> None:
    root = merge(
        [
            L.directory("d", mode=0o700),
            L.file("d/lower", b"1"),
            L.directory("d/sub"),
            L.file("d/sub/deep", b"2"),
        ],
        [L.file("d/upper1", b"3"), L.opaque("d"), L.file("d/upper2", b"4")],
    )
    d = node(root, "/d")
    assert isinstance(d, Directory)
    assert sorted(d.entries) == [b"upper1", b"upper2"]
    assert d.stat.mode == 0o700  # the directory itself stays


def test_opaque_marker_in_first_layer() -> None:
    root = merge([L.directory("d"), L.opaque("d"), L.file("d/x", b"1")])
    assert names(root) == ["/d", "/d/x"]


def test_aufs_meta_names_are_ignored() -> None:
    root = merge([L.file("a", b"1")], [L.file(".wh..wh.plnk", b""), L.directory(".wh..wh.aufs")])
    assert names(root) == ["/a"]


def test_whiteout_then_readd_dir_in_same_layer() -> None:
    root = merge(
        [L.directory("d"), L.file("d/old", b"1")],
        [L.whiteout("d"), L.directory("d"), L.file("d/new", b"2")],
    )
    assert names(root) == ["/d", "/d/new"]


def test_user_whiteout_device_is_kept() -> None:
    # a char device 0:0 in a layer is content (an overlay whiteout inside the image)
    root = merge([L.chardev("wh", 0, 0)])
    assert leaf(root, "/wh").is_whiteout()


# -- hardlinks ---------------------------------------------------------------------


def test_hardlink_across_layers() -> None:
    root = merge([L.file("a", b"x" * 100)], [L.hardlink("b", "a")])
    assert leaf(root, "/a") is leaf(root, "/b")


def test_hardlink_keeps_old_inode_when_target_replaced() -> None:
    root = merge([L.file("a", b"old"), L.hardlink("b", "a"), L.file("a", b"new")])
    assert leaf(root, "/b").content == Regular(3, data=b"old")
    assert leaf(root, "/a").content == Regular(3, data=b"new")
    assert leaf(root, "/a") is not leaf(root, "/b")


def test_hardlink_to_lower_file_that_is_whited_out() -> None:
    root = merge([L.file("a", b"keep")], [L.hardlink("b", "a"), L.whiteout("a")])
    assert names(root) == ["/b"]
    assert leaf(root, "/b").content == Regular(4, data=b"keep")


def test_hardlink_with_dot_slash_target() -> None:
    root = merge([L.file("./x/a", b"1"), L.hardlink("./y", "./x/a")])
    assert leaf(root, "/y") is leaf(root, "/x/a")


def test_hardlink_counts_in_image() -> None:
    root = merge(
        [
            L.directory("usr"),
            L.file("usr/a", b"z" * 70),
            L.hardlink("usr/b", "usr/a"),
            L.hardlink("usr/c", "usr/b"),
        ]
    )
    dump = dumpfile.dumps(root, style="rust").decode()
    assert "/usr/a 70 100644 3 " in dump


@pytest.mark.parametrize(
    "layers, match",
    [
        ([[L.hardlink("b", "missing")]], "does not exist"),
        ([[L.directory("d"), L.hardlink("b", "d")]], "is a directory"),
        ([[L.file("a", b"1")], [L.symlink("a", "x"), L.hardlink("c", "a/x")]], "does not exist"),
        ([[L.hardlink("b", "../etc/passwd")]], r"'\.\.'"),
        ([[L.hardlink("b", "/")]], "root"),
    ],
)
def test_bad_hardlinks(layers: list[list[L.Member]], match: str) -> None:
    with pytest.raises(OciError, match=match):
        merge(*layers)


# -- hostile names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "./..", "a/.."])
def test_dotdot_rejected(name: str) -> None:
    with pytest.raises(OciError, match=r"'\.\.'"):
        merge([L.file(name, b"x")])


def test_names_through_symlinks_are_errors() -> None:
    with pytest.raises(OciError, match="not a directory"):
        merge([L.symlink("lib", "usr/lib"), L.file("lib/x", b"1")])
    with pytest.raises(OciError, match="not a directory in a lower layer"):
        merge([L.symlink("lib", "usr/lib")], [L.file("lib/x", b"1")])


def test_whiteout_of_symlink_then_dir_is_fine() -> None:
    root = merge([L.symlink("lib", "usr/lib")], [L.whiteout("lib"), L.file("lib/x", b"1")])
    assert names(root) == ["/lib", "/lib/x"]


def test_root_must_be_a_directory() -> None:
    with pytest.raises(OciError, match="root must be a directory"):
        merge([L.file("./", b"x")])


def test_name_too_long() -> None:
    with pytest.raises(OciError, match="255"):
        merge([L.file("x" * 256, b"")])
    merge([L.file("x" * 255, b"")])


def test_odd_bytes_in_names() -> None:
    weird = b"sp ace/\x01ctl/new\nline/caf\xe9/=eq"
    buf_entries = [L.file(weird.decode("utf-8", "surrogateescape"), b"x")]
    root = merge(buf_entries)
    assert root.lookup(weird) is not None
    # the image writer and dumpfile take them too
    mkfs(root, FormatVersion.V2)
    assert dumpfile.parse(dumpfile.dumps(root)) is not None


def test_split_name() -> None:
    assert split_name(b"/./a//b/./") == [b"a", b"b"]
    assert split_name(b".") == []


def test_xattrs_binary_values_and_overrides() -> None:
    root = merge(
        [
            L.directory("usr"),
            L.file("usr/x", b"1", xattrs={"user.bin": b"\x00\xff\n=", "trusted.overlay.x": b"y"}),
        ],
        [L.file("usr/x", b"2", xattrs={"user.other": b"o"})],
    )
    assert leaf(root, "/usr/x").stat.xattrs == {b"user.other": b"o"}
    root = merge([L.file("x", b"1", xattrs={"user.bin": b"\x00\xff\n="})])
    assert leaf(root, "/x").stat.xattrs == {b"user.bin": b"\x00\xff\n="}


def test_mtime_nanoseconds_from_pax() -> None:
    root = merge([L.file("x", b"1", mtime=1234567890.25)])
    st = leaf(root, "/x").stat
    assert (st.mtime, st.mtime_nsec) == (1234567890, 250_000_000)


def test_large_inline_data_needs_a_digest() -> None:
    members = T.read_members([L.tar_layer([L.file("big", b"x" * 100)])])
    with pytest.raises(OciError, match="inline"):
        LayerMerger().add_layer(members)


def test_many_layers_deep_tree() -> None:
    deep = "/".join(f"d{i}" for i in range(300))
    layers = [[L.file(f"{deep}/f{i}", bytes([i]))] for i in range(20)]
    root = merge(*layers)
    d = node(root, "/" + deep)
    assert isinstance(d, Directory) and len(d.entries) == 20


# -- umoci as an independent implementation of the layer rules ----------------------


def umoci_layers() -> list[list[L.Member]]:
    """Layers in the shape real tools write them (whiteouts before the
    entries of their layer), exercising every rule both sides implement."""
    big = bytes(range(256)) * 8
    return [
        [
            L.directory("usr", mode=0o755),
            L.directory("usr/bin"),
            L.file("usr/bin/tool", big, mode=0o4755, uid=0, gid=0),
            L.hardlink("usr/bin/tool2", "usr/bin/tool"),
            L.symlink("usr/bin/sh", "tool"),
            L.directory("etc", mode=0o750, uid=1, gid=2),
            L.file("etc/keep", b"keep", xattrs={"user.note": b"kept"}),
            L.file("etc/gone", b"gone"),
            L.directory("etc/opq"),
            L.file("etc/opq/lower", b"lower"),
            L.directory("etc/dir2file"),
            L.file("etc/dir2file/child", b"c"),
            L.file("etc/file2dir", b"f"),
            L.directory("dev"),
            L.chardev("dev/null", 1, 3, mode=0o666),
            L.blockdev("dev/loop0", 7, 0),
            L.fifo("dev/fifo"),
            L.directory("long-" + "n" * 120),
            L.file("long-" + "n" * 120 + "/" + "f" * 200, b"deep"),
        ],
        [
            L.whiteout("etc/gone"),
            L.opaque("etc/opq"),
            L.directory("etc", mode=0o755, uid=3, gid=4),
            L.file("etc/opq/upper", b"upper"),
            L.file("etc/dir2file", b"now a file"),
            L.directory("etc/file2dir", mode=0o700),
            L.file("etc/file2dir/inside", b"i" * 300, mode=0o600, uid=1000, gid=1000),
            L.hardlink("etc/link-to-lower", "usr/bin/tool"),
            L.file("usr/bin/tool", big[::-1], mode=0o755),
        ],
    ]


def test_same_tree_as_umoci(tmp_path: Path) -> None:
    """umoci (OCI image-spec unpacker) extracts the same layers to disk; the
    tree read back from disk must equal our merged tree, except the root's
    metadata (composefs takes /usr's)."""
    import shutil
    import subprocess

    from composefs import fs

    umoci = shutil.which("umoci")
    if umoci is None:
        pytest.skip("umoci not installed (make system-deps installs it)")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack keeps owners and devices only as root")
    layers = [L.tar_layer(entries) for entries in umoci_layers()]
    L.write_oci_layout(tmp_path / "layout", [L.ImageSpec(layers)])
    subprocess.run(
        [umoci, "unpack", "--image", f"{tmp_path / 'layout'}:latest", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    ours = merge_layers(
        [T.read_members([t]) for t in layers],
        transform=False,
        large_inline=lambda d: fsverity.digest_hex(d, "sha512"),
    )
    theirs = fs.read_filesystem(tmp_path / "bundle" / "rootfs", algorithm="sha512")

    def lines(root: Directory) -> list[str]:
        return dumpfile.dumps(root, style="rust").decode().splitlines()[1:]  # not "/"

    assert lines(ours) == lines(theirs)
