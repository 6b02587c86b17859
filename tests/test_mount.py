"""Kernel composefs mounts: the mounted tree matches its source, mount.composefs
options (also via mount(8)), and unmounting leaves nothing behind.

Everything that mounts needs root; option parsing is tested without.
Checks for leftovers look only at *our* paths (other test runs may mount
concurrently on this machine).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefs import fsverity
from composefs import mount as cfsmount
from composefs.cli.mount_composefs import main as mount_main
from composefs.cli.mount_composefs import parse_mount_options, split_options
from composefs.erofs.format import FormatVersion
from composefs.errors import MountError
from composefs.tree import Directory, Leaf, Regular, Stat, Symlink
from testlib import need_checkout_for_nobody, need_tool, needs_root

ROOT = Path(__file__).resolve().parent.parent
VENV_HELPER = ROOT / ".venv" / "bin" / "mount.composefs"


# -- helpers ------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at or below `path`."""
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def loops_for(path: Path) -> list[str]:
    """Loop devices whose backing file is `path` (losetup -a)."""
    res = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    return [ln for ln in res.stdout.splitlines() if f"({path})" in ln]


def wait_no_loops(path: Path, timeout: float = 5.0) -> list[str]:
    # The EROFS superblock (and so the auto-clearing loop device) is
    # released asynchronously after the overlay's last reference goes.
    deadline = time.monotonic() + timeout
    while True:
        left = loops_for(path)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def store_object(objdir: Path, data: bytes) -> str:
    d = fsverity.digest_hex(data)
    p = objdir / d[:2] / d[2:]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return d


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route mount.py's temporary directories to a dir we can inspect."""
    t = tmp_path / "tmpdirs"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    # A failing test must not leave mounts behind either.
    for mp in reversed(mounts_under(tmp_path)):
        subprocess.run(["umount", "-l", mp], check=False)


# -- option parsing (no root needed) -----------------------------------------


def test_split_options_escapes() -> None:
    assert split_options("basedir=/a\\,b:/c,ro,digest=x=y") == [
        ("basedir", "/a,b:/c"),
        ("ro", None),
        ("digest", "x=y"),
    ]
    assert split_options("") == []
    assert split_options("a,,b") == [("a", None), ("b", None)]
    assert split_options("k=") == [("k", "")]


def test_parse_mount_options() -> None:
    r = parse_mount_options("rw,noatime,nosuid,basedir=/a:/b,tryverity,ro,x-systemd.foo,defaults")
    assert r.basedirs == ["/a", "/b"]
    assert r.readonly is True
    assert r.try_verity and not r.verity
    assert r.attributes == ["noatime", "nosuid"]
    assert parse_mount_options("basedir=/a,ro,rw").readonly is False
    r = parse_mount_options("basedir=/o,upperdir=/u,workdir=/w,digest=ab,verity,idmap=/p")
    assert (r.upperdir, r.workdir, r.digest, r.verity, r.idmap) == ("/u", "/w", "ab", True, "/p")


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ("ro", "no object dirs"),
        ("basedir", "no value specified for basedir"),
        ("basedir=/a::/b", "incorrect format"),
        ("basedir=/a,upperdir=/u", "both workdir and upperdir"),
        ("basedir=/a,workdir=/w", "both workdir and upperdir"),
        ("basedir=/a,frobnicate", "unsupported option frobnicate"),
        ("basedir=/a,digest", "no value specified for digest"),
    ],
)
def test_parse_mount_options_errors(opts: str, message: str) -> None:
    with pytest.raises(MountError, match=message):
        parse_mount_options(opts)


def test_sloppy_ignores_unknown() -> None:
    assert parse_mount_options("basedir=/a,frobnicate", sloppy=True).ignored == ["frobnicate"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "objs").mkdir()
    (tmp_path / "m").mkdir()
    cases = [
        (["-o", "basedir=/nonexistent-objs", str(tmp_path / "img"), str(tmp_path / "m")], "object"),
        (["-o", f"basedir={tmp_path / 'objs'}", str(tmp_path / "img"), str(tmp_path / "m")], "img"),
        (["-t", "ext4", "-o", "basedir=/x", "img", "m"], "unsupported fs type"),
        (["-o", "basedir=/x,bogus", "img", "m"], "unsupported option bogus"),
        (["img"], "MOUNTPOINT"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as ei:
            mount_main(argv)
        assert ei.value.code == 1, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("mount.composefs: ") and needle in last, err
        assert "Traceback" not in err


def test_cli_not_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "objs").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "img").write_bytes(b"\0" * 4096)
    with pytest.raises(SystemExit):
        mount_main(
            ["-o", f"basedir={tmp_path / 'objs'}", str(tmp_path / "img"), str(tmp_path / "m")]
        )
    assert "not a composefs image" in capsys.readouterr().err


def test_parse_digest() -> None:
    assert cfsmount.parse_digest("AB" * 32) == ("sha256", bytes([0xAB]) * 32)
    assert cfsmount.parse_digest("cd" * 64)[0] == "sha512"
    for bad in ("ab", "zz" * 32, ""):
        with pytest.raises(MountError, match="invalid digest"):
            cfsmount.parse_digest(bad)


# -- a small image for the option tests ----------------------------------------

BIG = b"composefs external content\n" * 300
BIG2 = bytes(range(256)) * 40


@pytest.fixture
def small_image(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An image whose two external files live in two different basedirs."""
    objs_a, objs_b = tmp_path / "objs-a", tmp_path / "objs-b"
    objs_a.mkdir()
    objs_b.mkdir()
    d1 = store_object(objs_a, BIG)
    d2 = store_object(objs_b, BIG2)
    root = Directory(Stat(0o755, 0, 0, 1_700_000_000))
    root.entries[b"big"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000), Regular(len(BIG), digest=d1))
    root.entries[b"big2"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000), Regular(len(BIG2), digest=d2))
    root.entries[b"small"] = Leaf(Stat(0o644, 0, 0, 1_700_000_000), Regular(5, data=b"small"))
    sub = Directory(Stat(0o755, 0, 0, 1_700_000_000))
    sub.entries[b"link"] = Leaf(Stat(0o777, 0, 0, 1_700_000_000), Symlink(b"../big"))
    root.entries[b"sub"] = sub
    from composefs.erofs.writer import mkfs

    img = tmp_path / "small.cfs"
    img.write_bytes(mkfs(root, FormatVersion.V0))
    return img, objs_a, objs_b


def image_digest(img: Path) -> str:
    return fsverity.digest_file(img).hex()


# -- (a) the mounted tree equals its source -------------------------------------


def _make_source(src: Path) -> None:
    """A tree with every file type, xattrs, hardlinks and odd names."""
    src.mkdir()
    t0 = 1_600_000_000

    def meta(p: Path, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        os.chown(p, uid, gid, follow_symlinks=False)  # before chmod: chown clears setuid
        if not p.is_symlink():
            os.chmod(p, mode)
        os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    files = {
        "inline": b"tiny inline file\n",
        "external": b"x" * 5000,
        "external-big": os.urandom(200_000),
        "empty": b"",
        "exactly-4096": b"y" * 4096,
        "name with spaces": b"spaces",
        "-dash": b"dash",
        "uni-\u00e9\u4e2d": b"unicode",
        "equals=and\\backslash": b"odd",
        "n" * 255: b"longest name",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    bad = os.fsencode(str(src)) + b"/bad-\xff\xfe"
    with open(bad, "wb") as f:
        f.write(b"not utf-8")
    nl = src / "new\nline"
    nl.write_bytes(b"newline")
    d = src / "dir"
    d.mkdir()
    (d / "nested").mkdir()
    (d / "nested" / "deep").write_bytes(b"deep content that is external" * 10)
    (src / "emptydir").mkdir()
    os.symlink("dir/nested/deep", src / "symlink")
    os.symlink("/absolute/dangling", src / "dangling")
    os.mknod(src / "chardev", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(src / "fifo", 0o640)
    cwd = os.getcwd()
    try:
        os.chdir(src)  # keep the AF_UNIX path short
        s = socket.socket(socket.AF_UNIX)
        s.bind("socket")
        s.close()
    finally:
        os.chdir(cwd)
    # hardlinks: an external file, an inline file and an empty file
    os.link(src / "external", src / "hardlink-external")
    os.link(src / "inline", d / "hardlink-inline")
    os.link(src / "empty", src / "hardlink-empty")

    os.setxattr(src / "inline", "user.comment", b"hello")
    os.setxattr(src / "inline", "trusted.private", b"\x00\x01binary")
    os.setxattr(src / "external", "user.big", b"v" * 300)
    os.setxattr(src / "external-big", "trusted.overlay.custom", b"escaped")
    os.setxattr(d, "user.dirattr", b"on a directory")
    os.setxattr(src / "symlink", "trusted.onlink", b"symlink xattr", follow_symlinks=False)
    # the same xattr on several inodes (becomes a shared xattr)
    for n in ("empty", "-dash", "fifo", "chardev"):
        os.setxattr(src / n, "trusted.shared", b"same value")
    for n in ("empty", "-dash"):
        os.setxattr(src / n, "user.shared", b"same user value")

    owners = [(0, 0), (1000, 1000), (65534, 100), (70000, 70001)]
    all_paths = sorted(
        (Path(dp) / n for dp, dns, fns in os.walk(src) for n in dns + fns),
        key=lambda p: len(p.parts),
        reverse=True,
    )
    for i, p in enumerate(all_paths):
        st = p.lstat()
        uid, gid = owners[i % len(owners)]
        if stat.S_ISDIR(st.st_mode):
            mode = (0o755, 0o2750, 0o700)[i % 3]
        else:
            mode = (0o644, 0o600, 0o4755, 0o1777, 0o2711)[i % 5]
        meta(p, mode, uid, gid, (t0 + i) * 10**9 + 123456789 * (i % 2))
    meta(src, 0o755, 0, 0, t0 * 10**9)


def _describe(root: Path, ns: bool) -> dict[bytes, tuple[object, ...]]:
    """Everything the mount must reproduce, keyed by relative path."""
    out: dict[bytes, tuple[object, ...]] = {}
    rootb = os.fsencode(str(root))
    for dp, dns, fns in os.walk(rootb):
        for n in [*dns, *fns, *([b"."] if dp == rootb else [])]:
            p = os.path.join(dp, n) if n != b"." else dp
            st = os.lstat(p)
            rel = os.path.relpath(p, rootb)
            xattrs = {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in os.listxattr(p, follow_symlinks=False)
            }
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:  # a digest keeps failure messages short
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                content = sorted(os.listdir(p))
            mtime = st.st_mtime_ns if ns else st.st_mtime_ns // 10**9
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            # A directory's st_size depends on the filesystem.
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, mtime, size, rdev, xattrs, content)
    return out


def _hardlink_groups(root: Path) -> tuple[set[frozenset[bytes]], dict[bytes, int]]:
    by_ino: dict[int, set[bytes]] = {}
    nlinks: dict[bytes, int] = {}
    rootb = os.fsencode(str(root))
    for dp, _dns, fns in os.walk(rootb):
        for n in fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, rootb)
            by_ino.setdefault(st.st_ino, set()).add(rel)
            nlinks[rel] = st.st_nlink
    return {frozenset(v) for v in by_ino.values()}, nlinks


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("version", list(FormatVersion), ids=lambda v: f"V{int(v)}")
def test_mounted_tree_matches_source(
    tmp_path: Path, mnt: Path, private_tmp: Path, version: FormatVersion
) -> None:
    fs = pytest.importorskip("composefs.fs")
    from composefs.erofs.writer import mkfs

    src = tmp_path / "src"
    _make_source(src)
    objs = tmp_path / "objects"
    objs.mkdir()
    tree = fs.read_directory(str(src), hardlinks=True, digest_store=str(objs))
    img = tmp_path / "image.cfs"
    img.write_bytes(mkfs(tree, version))
    assert any(objs.iterdir()), "external files were not stored"

    cfsmount.mount_composefs(str(img), str(mnt), [str(objs)])
    try:
        # V2 does not store mtime nanoseconds (composefs-rs writes 0).
        ns = version != FormatVersion.V2
        expected = _describe(src, ns)
        got = _describe(mnt, ns)
        assert sorted(got) == sorted(expected)
        for rel, want in expected.items():
            assert got[rel] == want, rel
        groups_src, nlink_src = _hardlink_groups(src)
        groups_mnt, nlink_mnt = _hardlink_groups(mnt)
        assert groups_mnt == groups_src
        assert nlink_mnt == nlink_src
        assert any(len(g) > 1 for g in groups_mnt)
    finally:
        cfsmount.unmount(str(mnt))
    assert mounts_under(tmp_path) == []
    assert list(private_tmp.iterdir()) == []


# -- (b) mount.composefs ------------------------------------------------------------


def _check_small(m: Path) -> None:
    assert (m / "big").read_bytes() == BIG
    assert (m / "big2").read_bytes() == BIG2
    assert (m / "small").read_bytes() == b"small"
    assert os.readlink(m / "sub" / "link") == "../big"
    assert sorted(os.listdir(m)) == ["big", "big2", "small", "sub"]


@needs_root
@pytest.mark.root
def test_cli_basedirs_and_digest(
    small_image: tuple[Path, Path, Path], mnt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, objs_a, objs_b = small_image
    good = image_digest(img)
    opts = f"basedir={objs_a}:{objs_b},digest={good},insecure"  # no kernel fs-verity here
    assert mount_main(["-t", "composefs", "-o", opts, str(img), str(mnt)]) == 0
    try:
        _check_small(mnt)
        assert mounts_under(mnt) == [str(mnt)]
    finally:
        cfsmount.unmount(str(mnt))

    # Only one of the two basedirs: the other file's content is missing.
    assert mount_main(["-o", f"basedir={objs_a}", str(img), str(mnt)]) == 0
    try:
        assert (mnt / "big").read_bytes() == BIG
        with pytest.raises(OSError):
            (mnt / "big2").read_bytes()
    finally:
        cfsmount.unmount(str(mnt))

    wrong = ("0" if good[0] != "0" else "1") + good[1:]
    with pytest.raises(SystemExit) as ei:
        mount_main(["-o", f"basedir={objs_a},digest={wrong},insecure", str(img), str(mnt)])
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("mount.composefs: ") and "wrong fs-verity digest" in err
    assert err.count("\n") == 1
    assert mounts_under(mnt) == []


@needs_root
@pytest.mark.root
def test_cli_upper_work_rw_and_ro(
    small_image: tuple[Path, Path, Path], tmp_path: Path, mnt: Path
) -> None:
    img, objs_a, objs_b = small_image
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    objs_before = {
        p: p.read_bytes() for p in [*objs_a.rglob("*"), *objs_b.rglob("*")] if p.is_file()
    }
    base = f"basedir={objs_a}:{objs_b},upperdir={upper},workdir={work}"

    assert mount_main(["-o", base + ",rw", str(img), str(mnt)]) == 0
    try:
        _check_small(mnt)
        (mnt / "new-file").write_bytes(b"written")
        with open(mnt / "big", "ab") as f:  # copy-up of a metacopy file
            f.write(b"appended")
        assert (mnt / "big").read_bytes() == BIG + b"appended"
    finally:
        cfsmount.unmount(str(mnt))
    assert (upper / "new-file").read_bytes() == b"written"
    assert (upper / "big").read_bytes() == BIG + b"appended"
    # The object store is never written through the overlay.
    assert {p: p.read_bytes() for p in objs_before} == objs_before

    assert mount_main(["-o", base + ",ro", str(img), str(mnt)]) == 0
    try:
        assert (mnt / "new-file").read_bytes() == b"written"
        with pytest.raises(OSError) as ei:
            (mnt / "another").write_bytes(b"x")
        assert ei.value.errno == errno.EROFS
        assert " ro," in next(ln for ln in open("/proc/self/mountinfo") if f" {mnt} " in ln)
    finally:
        cfsmount.unmount(str(mnt))

    # Without an upper layer the mount is read-only whatever is asked.
    assert mount_main(["-o", f"basedir={objs_a}:{objs_b},rw", str(img), str(mnt)]) == 0
    try:
        with pytest.raises(OSError):
            (mnt / "x").write_bytes(b"x")
    finally:
        cfsmount.unmount(str(mnt))


@needs_root
@pytest.mark.root
def test_generic_mount_flags(small_image: tuple[Path, Path, Path], mnt: Path) -> None:
    img, objs_a, objs_b = small_image
    opts = f"rw,nosuid,nodev,noexec,noatime,x-test.option,basedir={objs_a}:{objs_b}"
    assert mount_main([str(img), str(mnt), "-n", "-v", "-o", opts]) == 0
    try:
        line = next(ln for ln in open("/proc/self/mountinfo") if f" {mnt} " in ln)
        per_mount = line.split()[5].split(",")
        assert {"nosuid", "nodev", "noexec", "noatime"} <= set(per_mount)
    finally:
        cfsmount.unmount(str(mnt))


@needs_root
@pytest.mark.root
def test_mount_helper_via_mount8(
    small_image: tuple[Path, Path, Path], tmp_path: Path, mnt: Path
) -> None:
    """`mount -t composefs` runs /sbin/mount.composefs (util-linux searches
    /sbin, /sbin/fs.d and /sbin/fs only, not PATH)."""
    need_tool("mount")
    if not VENV_HELPER.exists():
        pytest.skip(f"{VENV_HELPER} not installed (pip install -e .)")
    helper = Path("/sbin/mount.composefs")
    if helper.exists() or helper.is_symlink():
        pytest.skip(f"{helper} already exists; not touching it")
    img, objs_a, objs_b = small_image
    helper.symlink_to(VENV_HELPER)
    try:
        res = subprocess.run(
            ["mount", "-t", "composefs", str(img), str(mnt), "-o", f"basedir={objs_a}:{objs_b},ro"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        try:
            _check_small(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        # Errors from the helper reach the user through mount(8).
        res = subprocess.run(
            ["mount", "-t", "composefs", str(img), str(mnt), "-o", f"basedir={objs_a},digest={'0' * 64},insecure"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode != 0
        assert "wrong fs-verity digest" in res.stderr
        # -i: mount(8) must not call the helper; the kernel has no "composefs".
        res = subprocess.run(
            ["mount", "-i", "-t", "composefs", str(img), str(mnt), "-o", f"basedir={objs_a}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode != 0
    finally:
        helper.unlink()
    assert mounts_under(tmp_path) == []


@needs_root
@pytest.mark.root
def test_idmap(small_image: tuple[Path, Path, Path], mnt: Path) -> None:
    need_tool("unshare")
    img, objs_a, objs_b = small_image
    proc = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        ns = f"/proc/{proc.pid}/ns/user"
        deadline = time.monotonic() + 5
        while os.readlink(ns) == os.readlink("/proc/self/ns/user"):
            if time.monotonic() > deadline:
                pytest.fail("unshare did not create a user namespace")
            time.sleep(0.02)
        Path(f"/proc/{proc.pid}/uid_map").write_text("0 100000 65536\n")
        Path(f"/proc/{proc.pid}/gid_map").write_text("0 200000 65536\n")
        assert mount_main(["-o", f"basedir={objs_a}:{objs_b},idmap={ns}", str(img), str(mnt)]) == 0
        try:
            st = (mnt / "big").stat()
            assert (st.st_uid, st.st_gid) == (100000, 200000)
            assert (mnt / "big").read_bytes() == BIG
        finally:
            cfsmount.unmount(str(mnt))
    finally:
        proc.kill()
        proc.wait()


@needs_root
@pytest.mark.root
def test_api_errors(small_image: tuple[Path, Path, Path], tmp_path: Path, mnt: Path) -> None:
    img, objs_a, _ = small_image
    with pytest.raises(MountError, match="upperdir and workdir"):
        cfsmount.mount_composefs(str(img), str(mnt), [str(objs_a)], upperdir=str(tmp_path))
    with pytest.raises(MountError, match="no object directories"):
        cfsmount.mount_composefs(str(img), str(mnt), [])
    with pytest.raises(MountError, match="mount target"):
        cfsmount.mount_composefs(str(img), str(tmp_path / "nope"), [str(objs_a)])
    with pytest.raises(MountError, match="not a mount point"):
        cfsmount.unmount(str(mnt))
    # An open fd works as the image, and is left open for the caller.
    fd = os.open(img, os.O_RDONLY)
    try:
        cfsmount.mount_composefs(
            fd, str(mnt), [str(objs_a)], digest=image_digest(img), insecure=True
        )
        assert (mnt / "big").read_bytes() == BIG
        cfsmount.unmount(str(mnt))
        os.fstat(fd)
    finally:
        os.close(fd)


def test_not_root_message(small_image: tuple[Path, Path, Path]) -> None:
    """A non-root user gets one clear line (as root: an unprivileged child)."""
    cmd_prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv not available")
        cmd_prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        need_checkout_for_nobody()  # 65534 is nobody
    img = small_image[0]
    # pytest's tmp_path is private to root: use a world-readable copy.
    pub = Path(tempfile.mkdtemp(prefix="cfs-mount-test-", dir="/tmp"))
    try:
        os.chmod(pub, 0o755)
        shutil.copy(img, pub / "img")
        (pub / "objs").mkdir()
        (pub / "m").mkdir()
        cmd = [
            *cmd_prefix, sys.executable, "-m", "composefs.cli.mount_composefs",
            "-o", f"basedir={pub / 'objs'}", str(pub / "img"), str(pub / "m"),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/")
        assert res.returncode == 1
        assert res.stderr.startswith("mount.composefs: ") and "root" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1
        assert mounts_under(pub) == []
    finally:
        shutil.rmtree(pub)


# -- (c) nothing left behind, with every kernel strategy ------------------------


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("overlay_mode", ["fd", "tmpdir", "legacy", "mount2-only"])
@pytest.mark.parametrize("backing", ["file", "loop"])
def test_unmount_leaves_nothing(
    small_image: tuple[Path, Path, Path],
    tmp_path: Path,
    mnt: Path,
    private_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    overlay_mode: str,
    backing: str,
) -> None:
    need_tool("losetup")
    real = cfsmount.kernel_support()
    order = ["legacy", "tmpdir", "fd"]
    new_api = overlay_mode != "mount2-only"  # as if there were no fsopen() at all
    mode = overlay_mode if new_api else "legacy"
    if order.index(mode) > order.index(real.overlay_mode):
        pytest.skip(f"kernel supports only {real.overlay_mode!r} overlay setup")
    forced = cfsmount.KernelSupport(mode, new_api=new_api, erofs_file_backed=(backing == "file"))
    monkeypatch.setattr(cfsmount, "_support", forced)
    img, objs_a, objs_b = small_image
    for _ in range(2):
        cfsmount.mount_composefs(str(img), str(mnt), [str(objs_a), str(objs_b)])
        try:
            _check_small(mnt)
            assert mounts_under(tmp_path) == [str(mnt)], "helper mounts left attached"
            assert list(private_tmp.iterdir()) == [], "temporary directory left"
            assert bool(loops_for(img)) == (backing == "loop")
            line = next(ln for ln in open("/proc/self/mountinfo") if f" {mnt} " in ln)
            assert " - overlay composefs " in line
        finally:
            cfsmount.unmount(str(mnt))
        assert mounts_under(tmp_path) == []
        assert wait_no_loops(img) == []
        assert list(private_tmp.iterdir()) == []


@needs_root
@pytest.mark.root
def test_failed_mount_leaves_nothing(
    small_image: tuple[Path, Path, Path], tmp_path: Path, mnt: Path, private_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A mount the kernel refuses late (overlayfs, after the EROFS mount and
    loop device exist) cleans up too."""
    img, objs_a, _ = small_image
    (tmp_path / "a" / "upper").mkdir(parents=True)
    (tmp_path / "a" / "work").mkdir()
    work = tmp_path / "work-bind"
    work.mkdir()
    # Same filesystem, different mount: only overlayfs itself notices.
    subprocess.run(["mount", "--bind", str(tmp_path / "a" / "work"), str(work)], check=True)
    for mode in ("fd", "tmpdir", "legacy"):
        support = cfsmount.KernelSupport(mode, erofs_file_backed=False)
        monkeypatch.setattr(cfsmount, "_support", support)
        with pytest.raises(MountError, match="cannot mount overlayfs: Invalid argument"):
            cfsmount.mount_composefs(
                str(img), str(mnt), [str(objs_a)],
                upperdir=str(tmp_path / "a" / "upper"), workdir=str(work),
            )  # fmt: skip
        assert mounts_under(tmp_path) == [str(work)]
        assert wait_no_loops(img) == []
        assert list(private_tmp.iterdir()) == []


@needs_root
@pytest.mark.root
def test_upper_work_prechecks(
    small_image: tuple[Path, Path, Path], tmp_path: Path, mnt: Path
) -> None:
    img, objs_a, _ = small_image
    up = tmp_path / "up"
    (up / "work").mkdir(parents=True)
    with pytest.raises(MountError, match="separate subtrees"):
        cfsmount.mount_composefs(
            str(img), str(mnt), [str(objs_a)], upperdir=str(up), workdir=str(up / "work")
        )
    with pytest.raises(MountError, match="same filesystem"):
        cfsmount.mount_composefs(
            str(img), str(mnt), [str(objs_a)], upperdir=str(up), workdir="/dev/shm"
        )
    assert mounts_under(tmp_path) == []


@needs_root
@pytest.mark.root
def test_verity_options(small_image: tuple[Path, Path, Path], mnt: Path) -> None:
    img, objs_a, objs_b = small_image
    base = f"basedir={objs_a}:{objs_b}"

    def options() -> list[str]:
        line = next(ln for ln in open("/proc/self/mountinfo") if f" {mnt} " in ln)
        return line.split()[-1].split(",")

    # verity: overlayfs requires a digest on every backing file; these
    # objects have no fs-verity, so their content is refused.
    assert mount_main(["-o", base + ",verity", str(img), str(mnt)]) == 0
    try:
        assert "verity=require" in options()
        with pytest.raises(OSError) as ei:
            (mnt / "big").read_bytes()
        assert ei.value.errno == errno.EIO
        assert (mnt / "small").read_bytes() == b"small"  # inline: no backing file
    finally:
        cfsmount.unmount(str(mnt))

    # tryverity: only where the objects' filesystem can carry fs-verity.
    assert mount_main(["-o", base + ",tryverity", str(img), str(mnt)]) == 0
    try:
        if cfsmount._fs_has_verity(str(objs_a)):
            assert "verity=require" in options()
        else:
            assert "verity=require" not in options()
            assert (mnt / "big").read_bytes() == BIG
    finally:
        cfsmount.unmount(str(mnt))

    # digest= means a kernel-measured image and verity=require (C). Where
    # the kernel cannot measure it, C refuses ("Image has no fs-verity"):
    # a userspace check and a mount without verity happen only on request
    # (tryverity, or the insecure option).
    fd = os.open(img, os.O_RDONLY)
    try:
        fsverity.measure_verity(fd)
        kernel_verity = True
    except Exception:
        kernel_verity = False
    finally:
        os.close(fd)
    digest = f"digest={image_digest(img)}"
    if not kernel_verity:
        with pytest.raises(SystemExit) as ei:
            mount_main(["-o", f"{base},{digest}", str(img), str(mnt)])
        assert ei.value.code == 1
        assert mounts_under(mnt) == []
        with pytest.raises(MountError, match=r"has no fs-verity.*insecure"):
            cfsmount.mount_composefs(str(img), str(mnt), [str(objs_a)], digest=image_digest(img))
        assert mounts_under(mnt) == []
    for less in ("insecure", "tryverity"):
        assert mount_main(["-o", f"{base},{digest},{less}", str(img), str(mnt)]) == 0
        try:
            assert ("verity=require" in options()) == kernel_verity
        finally:
            cfsmount.unmount(str(mnt))


@needs_root
@pytest.mark.root
def test_fake_and_namespace(small_image: tuple[Path, Path, Path], mnt: Path) -> None:
    """-f checks without mounting; -N mounts in another mount namespace."""
    need_tool("unshare")
    img, objs_a, objs_b = small_image
    opts = f"basedir={objs_a}:{objs_b}"
    assert mount_main(["-f", "-o", opts, str(img), str(mnt)]) == 0
    assert mounts_under(mnt) == []
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            if time.monotonic() > deadline:
                pytest.fail("unshare did not create a mount namespace")
            time.sleep(0.02)
        # A child process: setns() would move the test process itself.
        cmd = [sys.executable, "-m", "composefs.cli.mount_composefs", "-N", str(proc.pid)]
        res = subprocess.run(
            [*cmd, "-o", opts, str(img), str(mnt)], capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr
        assert mounts_under(mnt) == []  # not in our namespace...
        theirs = Path(f"/proc/{proc.pid}/mountinfo").read_text()
        assert f" {mnt} " in theirs  # ...but in theirs
        root = Path(f"/proc/{proc.pid}/root")
        assert (root / str(mnt).lstrip("/") / "big").read_bytes() == BIG
    finally:
        proc.kill()
        proc.wait()
