from composefs.tree import Directory, Leaf, Regular, Stat, Symlink, leaf_link_counts, walk


def test_walk_order_and_hardlink_counts() -> None:
    root = Directory()
    root.insert(b"/b", Directory())
    shared = Leaf(Stat(0o644), Regular(3, b"abc"))
    root.insert(b"/b/x", shared)
    root.insert(b"/a", shared)
    root.insert(b"/c", Leaf(Stat(0o777), Symlink(b"b/x")))
    assert [p for p, _ in walk(root)] == [b"/", b"/a", b"/b", b"/b/x", b"/c"]
    assert leaf_link_counts(root)[id(shared)] == 2
    assert root.nlink() == 3
    assert root.lookup(b"/b/x") is shared
