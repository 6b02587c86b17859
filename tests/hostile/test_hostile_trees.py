"""Property: whatever the writers accept, the reader accepts again (and
re-writing what it read gives the same image). Hostile trees come from
`hostilelib`; a refusal must be one `TreeError` line."""

from __future__ import annotations

import random

import pytest

import hostilelib as H
from composefs import dumpfile, limits
from composefs.erofs.format import FormatVersion
from composefs.erofs.reader import read_image
from composefs.erofs.writer import mkfs
from composefs.errors import DumpfileError, TreeError
from composefs.tree import Directory

VERSIONS = (FormatVersion.V0, FormatVersion.V1, FormatVersion.V2)


def _roundtrip(tree: Directory, version: FormatVersion) -> str:
    try:
        image = mkfs(tree, version)
    except TreeError as e:
        assert "\n" not in str(e) and "\x1b" not in str(e), str(e)
        return "refused"
    back = read_image(image)  # must not raise: the writer accepted it
    again = mkfs(back, version)
    if _has_dropped_markers(tree):
        # documented read-side normalisation: one pass reaches a fixpoint
        assert mkfs(read_image(again), version) == again
    else:
        assert again == image
    return "ok"


def _has_dropped_markers(tree: Directory) -> bool:
    # also: an empty regular file with trusted.overlay.whiteout, which the
    # C formats write as a whiteout (and which reads back as one)
    from composefs.tree import walk

    return any(
        (limits.READ_DROPPED_XATTRS | {limits.WHITEOUT_XATTR}) & node.stat.xattrs.keys()
        for _, node in walk(tree)
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_write_succeeded_implies_read_back_equal(version: FormatVersion) -> None:
    rng = random.Random(1111 + int(version))
    outcomes: dict[str, set[str]] = {}
    for cls, tree in H.hostile_trees(rng):
        outcomes.setdefault(cls.split("-")[0], set()).add(_roundtrip(tree, version))
    # the generator reaches both sides of the rules
    assert outcomes["random"] == {"ok", "refused"}


def test_depth_limit_is_shared() -> None:
    for version in VERSIONS:
        read_image(mkfs(H.deep_chain(limits.MAX_DEPTH), version))
        read_image(mkfs(H.deep_chain(limits.MAX_DEPTH - 1, leaf_at_bottom=True), version))
        with pytest.raises(TreeError, match="deeper than 2048"):
            mkfs(H.deep_chain(limits.MAX_DEPTH + 1), version)
        with pytest.raises(TreeError, match="deeper than 2048"):
            mkfs(H.deep_chain(limits.MAX_DEPTH, leaf_at_bottom=True), version)


@pytest.mark.parametrize("key", [b"user.a\0b", b"\0"], ids=["nul", "only-nul"])
def test_xattrs_the_reader_refuses_are_refused(key: bytes) -> None:
    from composefs.tree import Leaf, Regular, Stat

    root = Directory()
    root.entries[b"f"] = Leaf(Stat(0o644, xattrs={key: b"y"}), Regular(0))
    for version in VERSIONS:
        with pytest.raises(TreeError):
            mkfs(root, version)


def test_whiteout_xattr_on_a_regular_file() -> None:
    """C's formats write an empty regular file with trusted.overlay.whiteout
    as C does (a whiteout, the way a mount shows one), and it reads back as a
    whiteout; with data, or in V2 (no escaped whiteouts), it is refused."""
    from composefs.tree import Device, Leaf, Regular, Stat

    def tree(content: Regular) -> Directory:
        root = Directory()
        root.entries[b"f"] = Leaf(Stat(0o644, xattrs={limits.WHITEOUT_XATTR: b""}), content)
        return root

    for version in (FormatVersion.V0, FormatVersion.V1):
        back = read_image(mkfs(tree(Regular(0)), version))
        f = back.entries[b"f"]
        assert isinstance(f, Leaf) and f.content == Device(0o020000, 0)
        with pytest.raises(TreeError, match="reserved for whiteouts"):
            mkfs(tree(Regular(1, data=b"x")), version)
    # V2: an empty file, and an external one (the writer's common-leaf path)
    for content in (Regular(0), Regular(5000, digest="ab" * 64)):
        with pytest.raises(TreeError, match="reserved for whiteouts"):
            mkfs(tree(content), FormatVersion.V2)


def test_whiteout_xattr_allowed_on_directories() -> None:
    # only a regular file turns into a whiteout when read back
    root = Directory()
    root.entries[b"d"] = Directory()
    root.entries[b"d"].stat.xattrs[limits.WHITEOUT_XATTR] = b"y"
    for version in VERSIONS:
        back = read_image(mkfs(root, version))
        assert back.entries[b"d"].stat.xattrs[limits.WHITEOUT_XATTR] == b"y"


def _dump_chain(depth: int) -> bytes:
    lines = [b"/ 0 40755 2 0 0 0 0.0 - - -"]
    path = b""
    for _ in range(depth):
        path += b"/d"
        lines.append(path + b" 0 40755 2 0 0 0 0.0 - - -")
    return b"\n".join(lines) + b"\n"


def test_dumpfile_parser_shares_the_depth_limit() -> None:
    tree = dumpfile.parse(_dump_chain(limits.MAX_DEPTH))
    read_image(mkfs(tree))
    with pytest.raises(DumpfileError, match="deeper than 2048"):
        dumpfile.parse(_dump_chain(limits.MAX_DEPTH + 1))


def test_dumpfile_parser_refuses_xattrs_the_reader_refuses() -> None:
    text = b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - - user.a\\x00b=v\n"
    with pytest.raises(DumpfileError):
        dumpfile.parse(text)


def test_dumpfile_whiteout_xattr_is_the_writers_to_judge() -> None:
    text = b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - - trusted.overlay.whiteout=\n"
    tree = dumpfile.parse(text)
    read_image(mkfs(tree, FormatVersion.V0))
    with pytest.raises(TreeError):
        mkfs(tree, FormatVersion.V2)
