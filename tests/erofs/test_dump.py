"""erofs.dump: the streamed `composefs-info dump` equals read_image + dumps.

The mutation fuzzer (test_erofs_fuzz.py) also checks that both accept and
refuse the same images; here: real images of every version, hardlinks,
whiteouts, external files, and the top-level filter.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from test_erofs_fuzz import SOURCES, rich_tree

from composefs import dumpfile
from composefs.erofs import dump, reader
from composefs.erofs.dump import dump_image
from composefs.erofs.format import FormatVersion
from composefs.erofs.writer import mkfs
from composefs.errors import ImageError

MORE = ["c-mkcomposefs/cs9-x86_64-minimal.dump.gz", "c-mkcomposefs/config.dump.gz"]


def _images(vectors: Path) -> list[tuple[str, bytes]]:
    trees = [("rich", rich_tree())]
    for rel in SOURCES + MORE:
        data = (vectors / rel).read_bytes()
        if rel.endswith(".gz"):
            data = gzip.decompress(data)
        trees.append((rel, dumpfile.parse(data, strict=not rel.endswith("longlink.dump"))))
    return [
        (f"{name} {v.name}", mkfs(tree, v, max_version=v))
        for name, tree in trees
        for v in FormatVersion
    ]


def test_dump_equals_tree_dump(vectors: Path) -> None:
    for name, image in _images(vectors):
        assert dump_image(image) == dumpfile.dumps(reader.read_image(image)), name


def test_dump_with_toplevel_filter(vectors: Path) -> None:
    for name, image in _images(vectors):
        if name.startswith(tuple(MORE)):
            continue  # the big ones: read below once each is enough
        root = reader.read_image(image)
        names = sorted(root.entries)
        # single names, none, every other name, an unknown one
        choices = [[n] for n in names[:4]] + [[], names[::2], [b"no-such-name"]]
        for keep in choices:
            want = dumpfile.dumps(reader.read_image(image, toplevel=keep))
            assert dump_image(image, toplevel=keep) == want, (name, keep)


def test_hardlink_across_filter() -> None:
    # The first name of a hardlinked file is left out by the filter: the
    # second, printed, name must carry the full line, not an "@" reference.
    from composefs.tree import Directory, Leaf, Regular, Stat

    root = Directory()
    a, b = Directory(), Directory()
    root.entries[b"a"], root.entries[b"b"] = a, b
    leaf = Leaf(Stat(0o644), Regular(3, data=b"abc"))
    a.entries[b"f"] = b.entries[b"f"] = b.entries[b"g"] = leaf
    image = mkfs(root, FormatVersion.V1)
    out = dump_image(image, toplevel=[b"b"])
    assert out == dumpfile.dumps(reader.read_image(image, toplevel=[b"b"]))
    assert b"/b/f 3 100644 3 " in out and b"/b/g 3 @100644 3 " in out


def test_bad_image_gives_no_dump(vectors: Path) -> None:
    _, image = _images(vectors)[0]
    with pytest.raises(ImageError, match="invalid composefs image"):
        dump_image(image[:-4096])


def _count_fast_paths(d: dump._Dumper, taken: dict[str, int]) -> None:
    """Wrap d's fused readers to count what they handle and give back."""
    fast, fast_dir = d.fast, d.fast_dir
    assert fast is not None and fast_dir is not None

    def leaf(nid: int, ftype: int) -> object:
        got = fast(nid, ftype)
        taken["leaf" if got is not None else "leaf fallback"] += 1
        return got

    def directory(nid: int) -> object:
        got = fast_dir(nid)
        taken["directory" if got is not None else "directory fallback"] += 1
        return got

    d.fast, d.fast_dir = leaf, directory  # type: ignore[assignment]


def test_fast_paths_agree_with_the_general_path(vectors: Path) -> None:
    # The fused readers (leaf, directory) handle the common inodes and give
    # the others back to the general path: on these images both are taken,
    # and dumping without the fused readers gives the same lines.
    taken = {"leaf": 0, "directory": 0, "leaf fallback": 0, "directory fallback": 0}
    for name, image in _images(vectors):
        d = dump._Dumper(image, None)
        _count_fast_paths(d, taken)
        lines = d.dump(float("inf"))
        general = dump._Dumper(image, None, fast=False).dump(float("inf"))
        assert lines is not None and lines == general, name
    # rich_tree and the C vectors have whiteouts, escaped overlay xattrs and
    # opaque directories, which the fused readers leave to the general path.
    assert all(taken.values()), taken


@pytest.mark.parametrize("version", list(FormatVersion))
def test_names_sorting_before_dot(version: FormatVersion) -> None:
    # "." and ".." are usually the first two entries; names with a byte
    # below "." ("!", "+", "-", ".-") sort before or between them.
    from composefs.tree import Directory, Leaf, Regular, Stat

    root = Directory()
    sub = Directory()
    root.entries[b"sub"] = sub
    for d in (root, sub):
        for name in (b"!bang", b"+plus", b"-dash", b".-dot-dash", b"..x", b"z"):
            d.entries[name] = Leaf(Stat(0o644), Regular(1, data=b"x"))
    image = mkfs(root, version)
    out = dump_image(image)
    assert out == dumpfile.dumps(reader.read_image(image))
    assert b"/sub/.-dot-dash " in out and b"/!bang " in out
