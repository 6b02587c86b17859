"""Reading directory trees from disk (composefs.fs).

Digests are checked against Debian's `fsverity digest`; everything else
against what the kernel reports for the generated tree (os.lstat,
os.listxattr).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from composefs import fs, fsverity
from composefs.errors import ComposefsError, SourceError, TreeError
from composefs.tree import Device, Directory, Fifo, Leaf, Regular, Socket, Symlink, walk
from testlib import is_root, need_tool, needs_root

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service


def _oracle(path: Path, algorithm: str = "sha256") -> str:
    out = subprocess.run(
        [need_tool("fsverity"), "digest", f"--hash-alg={algorithm}", "--compact", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip()


def _try_setxattr(path: Path, name: str, value: bytes, follow: bool = True) -> bool:
    try:
        os.setxattr(path, name, value, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            return False
        raise
    return True


def _make_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
    finally:
        s.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A source tree with every file type, xattrs, hardlinks and the inline boundary."""
    src = tmp_path / "src"
    (src / "usr" / "bin").mkdir(parents=True)
    (src / "run" / "sub").mkdir(parents=True)
    (src / "run" / "sub" / "pidfile").write_bytes(b"1\n")
    (src / "dir" / "deeper").mkdir(parents=True)
    (src / "empty").write_bytes(b"")
    (src / "f1").write_bytes(b"x")
    (src / "f64").write_bytes(b"a" * 64)
    (src / "f65").write_bytes(b"b" * 65)
    (src / "big").write_bytes(os.urandom(300_000))
    (src / "dir" / "deeper" / "mid").write_bytes(os.urandom(4097))
    (src / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n" * 10)
    os.chmod(src / "usr" / "bin" / "tool", 0o4755)
    os.link(src / "big", src / "dir" / "big-link")
    os.link(src / "f64", src / "dir" / "f64-link")
    os.symlink("../etc/passwd", src / "rel-link")
    os.symlink("/etc", src / "abs-dir-link")
    os.symlink("nowhere", src / "dangling")
    os.mkfifo(src / "fifo", 0o600)
    _make_socket(src / "sock")
    os.setxattr(src / "f64", "user.foo", b"bar")
    os.setxattr(src / "dir", "user.dirattr", b"\x00\x01binary")
    os.setxattr(src / "big", "user.big", b"v" * 300)
    os.chmod(src / "usr", 0o750)
    os.utime(src / "usr", ns=(1_000_000_000, 1_234_567_890_123_456_789))
    if is_root():
        os.mknod(src / "blk", 0o640 | stat.S_IFBLK, os.makedev(7, 3))
        os.mknod(src / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(src / "whiteout", 0o000 | stat.S_IFCHR, os.makedev(0, 0))
        os.chown(src / "f65", 1234, 5678)
        os.chown(src / "usr", 42, 43)
        os.lchown(src / "rel-link", 7, 8)
        _try_setxattr(src / "f65", "trusted.private", b"t")
        _try_setxattr(src / "rel-link", "trusted.onlink", b"s", follow=False)
        _try_setxattr(src / "usr" / "bin" / "tool", "security.capability", CAP)
        _try_setxattr(src / "usr", "security.capability", CAP)
    return src


def _xattrs_on_disk(path: Path) -> dict[bytes, bytes]:
    return {
        os.fsencode(n): os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


def _check_against_disk(
    root: Directory,
    src: Path,
    *,
    algorithm: str = "sha256",
    xattrs: Callable[[bytes], bool] = lambda n: True,
) -> int:
    """Every node's metadata and content equals what the kernel says; returns node count."""
    n = 0
    for path, node in walk(root):
        n += 1
        disk = src / os.fsdecode(path.lstrip(b"/"))
        st = os.lstat(disk)
        assert node.stat.mode == st.st_mode & 0o7777, path
        assert (node.stat.uid, node.stat.gid) == (st.st_uid, st.st_gid), path
        assert node.stat.mtime * 10**9 + node.stat.mtime_nsec == st.st_mtime_ns, path
        assert node.stat.xattrs == {k: v for k, v in _xattrs_on_disk(disk).items() if xattrs(k)}, (
            path
        )
        assert node.mode == st.st_mode, path
        if isinstance(node, Directory):
            assert sorted(node.entries) == sorted(os.fsencode(x) for x in os.listdir(disk)), path
            continue
        c = node.content
        if isinstance(c, Regular):
            assert c.size == st.st_size
            if st.st_size == 0:
                assert c.data is None and c.digest is None
            elif st.st_size <= 64:
                assert c.data == disk.read_bytes() and c.digest is None
            else:
                assert c.data is None and c.digest == _oracle(disk, algorithm), path
                assert c.backing_path() == f"{c.digest[:2]}/{c.digest[2:]}".encode()
        elif isinstance(c, Symlink):
            assert c.target == os.readlink(os.fsencode(disk))
        elif isinstance(c, Device):
            assert c.rdev == st.st_rdev and c.kind == stat.S_IFMT(st.st_mode)
        elif isinstance(c, Fifo):
            assert stat.S_ISFIFO(st.st_mode)
        else:
            assert isinstance(c, Socket) and stat.S_ISSOCK(st.st_mode)
    return n


def test_read_directory_matches_disk(tree: Path) -> None:
    root = fs.read_directory(tree, threads=2)
    count = _check_against_disk(root, tree)
    assert count == sum(1 for _ in tree.rglob("*")) + 1
    e = root.entries
    assert isinstance(e[b"f64"], Leaf) and e[b"f64"].content == Regular(64, data=b"a" * 64)
    f65 = e[b"f65"]
    assert isinstance(f65, Leaf) and isinstance(f65.content, Regular)
    assert f65.content.data is None and f65.content.size == 65
    assert isinstance(e[b"rel-link"], Leaf) and e[b"rel-link"].content == Symlink(b"../etc/passwd")
    # Symlinks are never followed: /etc's content is not in the tree.
    assert isinstance(e[b"abs-dir-link"], Leaf)
    if is_root():
        assert e[b"whiteout"].is_whiteout()  # type: ignore[union-attr]
        assert isinstance(e[b"blk"], Leaf) and e[b"blk"].content == Device(
            stat.S_IFBLK, os.makedev(7, 3)
        )


def test_readdir_types_are_only_a_hint(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Names readdir types as regular files are opened without an lstat
    # first. Should the type be stale (the name replaced meanwhile by a
    # directory, symlink, FIFO, socket or device), the general path must
    # still read what is there: pretend every name is a regular file.
    from composefs.dumpfile import dumps

    expected = dumps(fs.read_directory(tree, threads=1))
    expected_links = dumps(fs.read_directory(tree, threads=1, hardlinks=True))
    real_list, real_open = fs._Scanner._list, fs._Scanner._open_regular
    opened: list[bytes] = []

    def all_regular(self: fs._Scanner, dfd: int, shown: str) -> list[tuple[bytes, bool]]:
        return [(name, True) for name, _ in real_list(self, dfd, shown)]

    def counting(
        self: fs._Scanner, dfd: int, name: bytes, shown: str
    ) -> tuple[int, os.stat_result] | None:
        got = real_open(self, dfd, name, shown)
        if got is not None:
            opened.append(name)
        return got

    monkeypatch.setattr(fs._Scanner, "_list", all_regular)
    monkeypatch.setattr(fs._Scanner, "_open_regular", counting)
    assert dumps(fs.read_directory(tree, threads=1)) == expected
    assert dumps(fs.read_directory(tree, threads=1, hardlinks=True)) == expected_links
    # The regular files (and only they) took the short path.
    regular = {p.name.encode() for p in tree.rglob("*") if p.is_file() and not p.is_symlink()}
    assert set(opened) == regular


def test_unreadable_empty_file_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty file needs no read: one the caller may not open (mode 000,
    # not root) is stored as before. Only a file with content to read fails.
    src = tmp_path / "s"
    src.mkdir()
    (src / "empty").write_bytes(b"")
    (src / "full").write_bytes(b"data")
    real_open = os.open
    refused: list[bytes] = []

    def no_read(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if path in (b"empty", b"full") and not flags & os.O_DIRECTORY:
            refused.append(path)
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_read)
    with pytest.raises(SourceError, match="full: Permission denied"):
        fs.read_directory(src, threads=1)
    os.unlink(src / "full")
    root = fs.read_directory(src, threads=1)
    leaf = root.entries[b"empty"]
    assert isinstance(leaf, Leaf) and leaf.content == Regular(0)
    assert b"empty" in refused  # the open-first path was tried, then the general one


def test_hardlinks_broken_by_default_kept_on_request(tree: Path) -> None:
    root = fs.read_directory(tree, threads=1)
    big, link = root.lookup(b"/big"), root.lookup(b"/dir/big-link")
    assert isinstance(big, Leaf) and isinstance(link, Leaf)
    assert big is not link and big.content == link.content  # C: independent inodes
    kept = fs.read_directory(tree, hardlinks=True)
    big, link = kept.lookup(b"/big"), kept.lookup(b"/dir/big-link")
    assert big is link
    small, small_link = kept.lookup(b"/f64"), kept.lookup(b"/dir/f64-link")
    assert small is small_link


def test_inline_threshold(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    for n in (0, 1, 63, 64, 65, 4096):
        (src / f"f{n}").write_bytes(bytes([n % 251]) * n)
    root = fs.read_directory(src)
    for n in (1, 63, 64):
        c = root.lookup(f"/f{n}".encode()).content  # type: ignore[union-attr]
        assert c.data == bytes([n % 251]) * n and c.digest is None
    for n in (65, 4096):
        c = root.lookup(f"/f{n}".encode()).content  # type: ignore[union-attr]
        assert c.data is None and c.digest == _oracle(src / f"f{n}")
    c0 = root.lookup(b"/f0").content  # type: ignore[union-attr]
    assert c0 == Regular(0)
    # A different threshold is honoured too.
    root = fs.read_directory(src, inline_max=0)
    assert root.lookup(b"/f1").content.data is None  # type: ignore[union-attr]


def test_flags(tree: Path) -> None:
    no_x = fs.read_directory(tree, skip_xattrs=True, use_epoch=True)
    for _, node in walk(no_x):
        assert node.stat.xattrs == {}
        assert (node.stat.mtime, node.stat.mtime_nsec) == (0, 0)
    user = fs.read_directory(tree, user_xattrs=True)
    _check_against_disk(user, tree, xattrs=lambda n: n.startswith(b"user."))
    assert user.lookup(b"/f64").stat.xattrs == {b"user.foo": b"bar"}  # type: ignore[union-attr]
    no_dev = fs.read_directory(tree, skip_devices=True)
    for name in (b"blk", b"chr", b"whiteout"):
        assert name not in no_dev.entries
    assert b"fifo" in no_dev.entries and b"sock" in no_dev.entries
    only = fs.read_directory(tree, xattr_filter=lambda n: n == b"user.big")
    assert only.lookup(b"/big").stat.xattrs == {b"user.big": b"v" * 300}  # type: ignore[union-attr]
    assert only.lookup(b"/f64").stat.xattrs == {}  # type: ignore[union-attr]
    with pytest.raises(ComposefsError, match="together"):
        fs.read_directory(tree, skip_xattrs=True, user_xattrs=True)


@needs_root
def test_privileged_metadata(tree: Path) -> None:
    root = fs.read_directory(tree)
    f65 = root.lookup(b"/f65")
    assert f65 is not None and (f65.stat.uid, f65.stat.gid) == (1234, 5678)
    link = root.lookup(b"/rel-link")
    assert link is not None and (link.stat.uid, link.stat.gid) == (7, 8)
    if _xattrs_on_disk(tree / "rel-link"):
        assert link.stat.xattrs == {b"trusted.onlink": b"s"}
    assert root.lookup(b"/usr/bin/tool").stat.mode == 0o4755  # type: ignore[union-attr]


def test_digest_store(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store" / "nested"
    # A pre-existing object is kept as it is (C: skip when it exists).
    f65_digest = _oracle(tree / "f65")
    (store / f65_digest[:2]).mkdir(parents=True)
    (store / f65_digest[:2] / f65_digest[2:]).write_bytes(b"already here")
    root = fs.read_directory(tree, digest_store=str(store), threads=2)
    expected = {}
    for _, node in walk(root):
        if isinstance(node, Leaf) and isinstance(node.content, Regular) and node.content.digest:
            expected[node.content.digest] = node
    files = sorted(p for p in store.rglob("*") if p.is_file())
    assert len(files) == len(expected)
    for p in files:
        rel = p.relative_to(store)
        assert len(rel.parts) == 2 and len(rel.parts[0]) == 2
        digest = rel.parts[0] + rel.parts[1]
        assert digest in expected
        if digest == f65_digest:
            assert p.read_bytes() == b"already here"
            continue
        assert _oracle(p) == digest
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert not [p for p in store.rglob(".tmp*")]
    # Reading again changes nothing.
    before = {p: p.stat().st_mtime_ns for p in files}
    fs.read_directory(tree, digest_store=str(store))
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_digest_store_failure_leaves_no_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The copies are staged and named only after one syncfs at the end: a
    # failure midway removes the staged ones and names nothing.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(b"%d" % i * 5000)
    real_copy = fs._copy_data
    calls = []

    def failing_copy(a: int, b: int) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(a, b)

    monkeypatch.setattr(fs, "_copy_data", failing_copy)
    store = tmp_path / "store"
    with pytest.raises(SourceError, match="No space left"):
        fs.read_directory(src, digest_store=str(store), threads=2)
    assert len(calls) == 4
    assert [p for p in store.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(fs, "_copy_data", real_copy)
    fs.read_directory(src, digest_store=str(store), threads=2)
    assert len([p for p in store.rglob("*") if p.is_file()]) == 6
    assert not list(store.rglob(".tmp*"))


def test_object_sink(tree: Path) -> None:
    seen: list[tuple[int, str, bytes]] = []

    def sink(src: str, size: int, digest: str) -> None:
        with open(src, "rb") as f:
            data = f.read()
        seen.append((size, digest, data))

    for threads in (1, 3):
        seen.clear()
        root = fs.read_container_root(tree, object_sink=sink, threads=threads)
        digests = {
            n.content.digest
            for _, n in walk(root)
            if isinstance(n, Leaf) and isinstance(n.content, Regular) and n.content.digest
        }
        # Once per inode (big and dir/big-link are one), with the right content.
        assert sorted(d for _, d, _ in seen) == sorted(digests)
        for size, digest, data in seen:
            assert len(data) == size
            assert fsverity.digest_hex(data, "sha512") == digest


def test_object_sink_accepting_content(tmp_path: Path) -> None:
    # A sink that says it accepts content gets the bytes that were hashed
    # for a file read in one piece (small ones), None for a streamed one.
    src = tmp_path / "src"
    src.mkdir()
    files = {"small": b"s" * 5000, "mid": os.urandom(300 << 10), "big": os.urandom(5 << 20)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    seen: dict[str, bytes | None] = {}

    def sink(path: str, size: int, digest: str, content: bytes | None = None) -> None:
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) == size and fsverity.digest_hex(data) == digest
        assert content is None or content == data
        seen[digest] = content

    sink.accepts_content = True  # type: ignore[attr-defined]
    for threads in (1, 2):
        seen.clear()
        fs.read_directory(src, object_sink=sink, threads=threads)
        ids = {name: fsverity.digest_hex(data) for name, data in files.items()}
        assert set(seen) == set(ids.values())
        assert seen[ids["small"]] == files["small"]
        assert seen[ids["mid"]] == files["mid"]
        assert seen[ids["big"]] is None  # more than one read's worth: streamed


def test_digest_store_reused_keeps_existing_and_adds_new(tmp_path: Path) -> None:
    # The second run finds XX/ directories it did not create: it keeps the
    # objects there and stores only the new ones.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    store = tmp_path / "store"
    fs.read_directory(src, digest_store=str(store))
    (obj,) = [p for p in store.rglob("*") if p.is_file()]
    mtime = obj.stat().st_mtime_ns
    (src / "b").write_bytes(b"b" * 5000)
    fs.read_directory(src, digest_store=str(store), threads=2)
    objs = sorted(p for p in store.rglob("*") if p.is_file())
    assert len(objs) == 2 and obj.stat().st_mtime_ns == mtime
    for p in objs:
        assert fsverity.digest_hex(p.read_bytes()) == p.parent.name + p.name
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert not list(store.rglob(".tmp*"))


def test_object_sink_failure_aborts_cleanly(tree: Path) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))

    def sink(src: str, size: int, digest: str) -> None:
        raise RuntimeError("repository full")

    for threads in (1, 4):
        with pytest.raises(RuntimeError, match="repository full"):
            fs.read_directory(tree, object_sink=sink, threads=threads)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_no_escape_through_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 100)
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside, src / "dirlink")
    os.symlink(outside / "secret", src / "filelink")
    root = fs.read_directory(src)
    assert root.entries[b"dirlink"].content == Symlink(os.fsencode(outside))  # type: ignore[union-attr]
    assert root.entries[b"filelink"].content == Symlink(os.fsencode(outside / "secret"))  # type: ignore[union-attr]
    # The source path itself may be a symlink to a directory (resolved like any argument).
    os.symlink(src, tmp_path / "srclink")
    again = fs.read_directory(tmp_path / "srclink")
    assert sorted(again.entries) == [b"dirlink", b"filelink"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"error accessing .*missing"):
        fs.read_directory(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a directory"):
        fs.read_directory(tmp_path / "file")
    with pytest.raises(ValueError):
        fs.read_directory(tmp_path, algorithm="md5")


def test_deep_tree(tmp_path: Path) -> None:
    # Deeper than Python's recursion limit; the walk is iterative.
    src = tmp_path / "deep"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    depth = 1100
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    try:
        root = fs.read_directory(src)
    finally:
        # shutil.rmtree (pytest's tmp_path cleanup) recurses: remove it here.
        subprocess.run(["rm", "-rf", str(src)], check=True)
    node: Directory | Leaf = root
    for _ in range(depth):
        assert isinstance(node, Directory)
        node = node.entries[b"d"]
    assert isinstance(node, Directory) and isinstance(node.entries[b"leaf"], Leaf)


# -- composefs-rs create-image rules ----------------------------------------


def test_read_container_root(tree: Path) -> None:
    root = fs.read_container_root(tree, threads=2)
    usr = root.entries[b"usr"]
    assert isinstance(usr, Directory)
    # Hardlinks tracked by (dev, ino), sha512 ids.
    assert root.lookup(b"/big") is root.lookup(b"/dir/big-link")
    big = root.lookup(b"/big")
    assert isinstance(big, Leaf) and isinstance(big.content, Regular)
    assert big.content.digest == _oracle(tree / "big", "sha512")
    # Only security.capability survives.
    for _, node in walk(root):
        assert set(node.stat.xattrs) <= {b"security.capability"}
    tool = root.lookup(b"/usr/bin/tool")
    assert tool is not None
    assert tool.stat.xattrs == {
        k: v
        for k, v in _xattrs_on_disk(tree / "usr/bin/tool").items()
        if k == b"security.capability"
    }
    # The root took /usr's metadata (mode, owner, mtime with nsec, xattrs).
    st = os.lstat(tree / "usr")
    assert root.stat.mode == 0o750 == usr.stat.mode
    assert (root.stat.uid, root.stat.gid) == (st.st_uid, st.st_gid)
    assert (root.stat.mtime, root.stat.mtime_nsec) == divmod(st.st_mtime_ns, 10**9)
    assert root.stat.xattrs == usr.stat.xattrs
    assert root.stat.xattrs is not usr.stat.xattrs
    # /run emptied, with /usr's mtime.
    run = root.entries[b"run"]
    assert isinstance(run, Directory) and run.entries == {}
    assert (run.stat.mtime, run.stat.mtime_nsec) == (usr.stat.mtime, usr.stat.mtime_nsec)
    assert run.stat.mode == stat.S_IMODE(os.lstat(tree / "run").st_mode)


def test_read_filesystem_no_propagate(tree: Path) -> None:
    root = fs.read_filesystem(tree)
    _check_against_disk(root, tree, algorithm="sha512")
    assert root.lookup(b"/big") is root.lookup(b"/dir/big-link")
    assert b"sub" in root.get_dir(b"/run").entries
    st = os.lstat(tree)
    assert root.stat.mode == stat.S_IMODE(st.st_mode)


def test_transform_for_oci_needs_usr(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "run").mkdir()
    with pytest.raises(TreeError, match="/usr"):
        fs.read_container_root(src)
    root = Directory()
    root.entries[b"usr"] = Directory()
    root.entries[b"run"] = Leaf(root.stat.copy(), Regular(0))
    with pytest.raises(TreeError, match="/run"):
        fs.transform_for_oci(root)
    # No /run at all is fine.
    root = Directory()
    root.entries[b"usr"] = Directory()
    root.entries[b"usr"].stat.mode = 0o700
    fs.transform_for_oci(root)
    assert root.stat.mode == 0o700


def test_filter_xattrs_shared_leaf() -> None:
    from composefs.tree import Stat

    leaf = Leaf(Stat(xattrs={b"user.a": b"1", b"security.capability": b"c"}), Regular(0))
    root = Directory(Stat(xattrs={b"user.b": b"2"}))
    root.entries[b"x"] = leaf
    root.entries[b"y"] = leaf
    fs.filter_xattrs(root, fs.is_allowed_container_xattr)
    assert leaf.stat.xattrs == {b"security.capability": b"c"}
    assert root.stat.xattrs == {}


def test_image_from_read_tree_passes_fsck(tree: Path, tmp_path: Path) -> None:
    # Integration: what we read is something the image writer accepts and
    # an independent EROFS checker is happy with.
    writer = pytest.importorskip("composefs.erofs.writer")
    image = tmp_path / "img.cfs"
    image.write_bytes(writer.mkfs(fs.read_directory(tree)))
    subprocess.run([need_tool("fsck.erofs"), str(image)], check=True, capture_output=True)


def test_file_changing_while_read_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "s"
    src.mkdir()
    victim = src / "grows"
    victim.write_bytes(b"x" * 1000)
    real = fsverity.digest_sized

    def growing(
        fd: int, size: int, algorithm: str = "sha256", *, helper_processes: int = 0
    ) -> tuple[bytes, bytes | None]:
        with open(victim, "ab") as f:
            f.write(b"more")
        return real(fd, size, algorithm, helper_processes=helper_processes)

    monkeypatch.setattr(fsverity, "digest_sized", growing)
    with pytest.raises(SourceError, match="changed while it was being read"):
        fs.read_directory(src, threads=1)


def _fds_into(root: Path) -> set[str]:
    """This process's descriptors open on `root` or below it. Not the whole
    table: servers that earlier tests left running in threads open and
    close sockets at any moment (a full run failed on one closed midway)."""
    prefix = str(root)
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (or the listing's own)
        if target == prefix or target.startswith(prefix + "/"):
            found.add(fd)
    return found


def _wide_tree(root: Path, levels: int = 3, files: int = 20) -> None:
    """Directories of many files, with subdirectories between them (whose
    walk happens while their parent's read-ahead files are still open)."""
    root.mkdir()
    for i in range(files):
        (root / f"f{i:02}").write_bytes(os.urandom(100 + 97 * i))
        if levels > 1 and i % 7 == 3:
            _wide_tree(root / f"f{i:02}d", levels - 1, files)


@pytest.mark.parametrize("threads", [1, 2])
def test_read_ahead_is_bounded_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    # The walk opens the next regular files of a directory early and asks
    # the kernel to start reading them (a cold tree otherwise waits for
    # every file in turn). The tree read must be the same as without it,
    # with a bounded number of descriptors held and none left behind.
    from composefs.dumpfile import dumps

    src = tmp_path / "src"
    _wide_tree(src)
    advised: list[int] = []
    real_advise = os.posix_fadvise
    most = 0

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        nonlocal most
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append(os.fstat(fd).st_ino)
        real_advise(fd, offset, length, advice)

    real_ahead = fs._Scanner._read_ahead

    held = 0

    def counting(self: fs._Scanner, *args: Any) -> None:
        nonlocal most, held
        real_ahead(self, *args)
        most = max(most, self.n_ahead)
        held = max(held, len(_fds_into(src)))
        assert len(args[2]) <= fs._AHEAD_FILES

    assert _fds_into(src) == set()
    with monkeypatch.context() as m:
        m.setattr(fs, "_AHEAD_FILES", 0)  # no read-ahead: the reference
        expected = dumps(fs.read_directory(src, threads=threads))
    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(fs._Scanner, "_read_ahead", counting)
    monkeypatch.setattr(fs, "_AHEAD_MAX", 12)  # below what the tree would take
    assert dumps(fs.read_directory(src, threads=threads)) == expected
    assert held > 0  # the files read ahead are seen open on the tree...
    assert _fds_into(src) == set()  # ...and none is left behind
    assert 0 < most <= 12
    regular = {p.stat().st_ino for p in src.rglob("*") if p.is_file()}
    assert set(advised) <= regular
    assert len(set(advised)) > len(regular) // 2  # most files were read ahead


def test_read_ahead_descriptors_closed_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A walk that fails midway closes the files it had opened ahead.
    src = tmp_path / "src"
    _wide_tree(src)
    real_digest = fsverity.digest_sized
    calls = 0

    def failing(fd: int, size: int, *args: Any, **kw: Any) -> tuple[bytes, bytes | None]:
        nonlocal calls
        calls += 1
        if calls == 30:
            raise OSError(errno.EIO, "Input/output error")
        return real_digest(fd, size, *args, **kw)

    monkeypatch.setattr(fsverity, "digest_sized", failing)
    with pytest.raises(SourceError, match="Input/output error"):
        fs.read_directory(src, threads=1)
    assert calls == 30
    assert _fds_into(src) == set()
