from composefs.tree import (
    Directory,
    Leaf,
    Regular,
    Stat,
    Symlink,
    iter_leaves,
    leaf_link_counts,
    walk,
)


def test_walk_order_and_hardlink_counts() -> None:
    root = Directory()
    root.insert(b"/b", Directory())
    shared = Leaf(Stat(0o644), Regular(3, b"abc"))
    root.insert(b"/b/x", shared)
    root.insert(b"/a", shared)
    root.insert(b"/c", Leaf(Stat(0o777), Symlink(b"b/x")))
    assert [p for p, _ in walk(root)] == [b"/", b"/a", b"/b", b"/b/x", b"/c"]
    assert leaf_link_counts(root)[id(shared)] == 2
    leaves = list(iter_leaves(root))
    assert len(leaves) == 3 and sum(leaf is shared for leaf in leaves) == 2
    assert root.nlink() == 3
    assert root.lookup(b"/b/x") is shared


def test_iter_leaves_deep_tree() -> None:
    """Iterative: deeper than the recursion limit."""
    root = Directory()
    d = root
    for _ in range(5000):
        sub = Directory()
        d.insert(b"/d", sub)
        d = sub
    leaf = Leaf(Stat(0o644), Regular(0, b""))
    d.insert(b"/f", leaf)
    assert list(iter_leaves(root)) == [leaf]
