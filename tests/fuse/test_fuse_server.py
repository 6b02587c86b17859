"""Real FUSE mounts (the kernel's fuse module, libfuse, fusermount3) compared
entry by entry with the kernel composefs mount (EROFS + overlayfs) of the
same image; integrity, read-only-ness and robustness of the server."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuselib import (
    EXTERNAL,
    VENV_BIN,
    every_type_image,
    fuse_mount,
    fuse_servers_for,
    is_mounted,
    need_fuse,
    unmount,
    wait_unmounted,
)

from composefs import fsverity


@pytest.fixture(autouse=True)
def _fuse() -> None:
    need_fuse()


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points to clean up whatever a test left mounted."""
    made: list[Path] = []
    yield made
    for m in made:
        if is_mounted(m):
            subprocess.run(["umount", "-l", str(m)], check=False)


def mountpoint(tmp_path: Path, mounts: list[Path], name: str) -> Path:
    p = tmp_path / name
    p.mkdir()
    mounts.append(p)
    return p


def kernel_mount(image: Path, basedir: Path, mnt: Path) -> None:
    subprocess.run(
        [str(VENV_BIN / "mount.composefs"), "-o", f"basedir={basedir}", str(image), str(mnt)],
        check=True,
    )


# -- entry-by-entry comparison ----------------------------------------------------


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything `stat`, `readlink`, xattrs, `readdir` and `read` show."""
    out: dict[str, tuple[object, ...]] = {}

    def one(path: Path, rel: str) -> None:
        st = os.lstat(path)
        names = sorted(os.listxattr(path, follow_symlinks=False))
        xattrs = []
        for n in names:
            try:
                xattrs.append((n, os.getxattr(path, n, follow_symlinks=False)))
            except OSError as e:  # user.* on a symlink: ENODATA from the VFS
                xattrs.append((n, e.errno))
        extra: object = None
        if stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            extra = h.hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            extra = sorted(os.listdir(path))
        out[rel] = (
            st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev,
            st.st_nlink, st.st_ino, tuple(xattrs), extra,
        )  # fmt: skip
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                one(path / name, f"{rel}/{name}")

    one(root, "")
    return out


FIELDS = ("mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "ino", "xattrs", "content")


def assert_same(kernel: dict[str, tuple[object, ...]], fuse: dict[str, tuple[object, ...]]) -> None:
    assert sorted(kernel) == sorted(fuse)
    diffs = [
        f"{path or '/'}: {field}: kernel {k!r} fuse {f!r}"
        for path in kernel
        for field, k, f in zip(FIELDS, kernel[path], fuse[path], strict=True)
        if k != f
    ]
    assert not diffs, "\n".join(diffs[:20])


@pytest.mark.parametrize("extra", [[], ["-o", "nopassthrough"]], ids=["passthrough", "splice"])
def test_every_file_type_equals_the_kernel_mount(
    tmp_path: Path, mounts: list[Path], extra: list[str]
) -> None:
    image, objects = every_type_image(tmp_path)
    km, fm = mountpoint(tmp_path, mounts, "k"), mountpoint(tmp_path, mounts, "f")
    kernel_mount(image, objects, km)
    fuse_mount(image, objects, fm, *extra)
    try:
        k, f = describe(km), describe(fm)
        assert len(k) > 15
        assert_same(k, f)
        # hardlinks share st_ino; st_ino is stable across mounts
        assert f["/ext/big"][7] == f["/ext/hardbig"][7]
        unmount(fm)
        fuse_mount(image, objects, fm, *extra)
        assert describe(fm) == f
    finally:
        subprocess.run(["umount", str(km)], check=False)
        unmount(fm)


def _debian_layout() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "composefs-py"
    layout = cache / "bench" / "oci-bookworm-minbase"
    if not (layout / "index.json").exists():
        pytest.skip(f"no Debian image at {layout}: `python -m bench oci_pull` builds it once")
    return layout


@pytest.mark.slow
def test_pulled_debian_image_equals_the_kernel_mount(tmp_path: Path, mounts: list[Path]) -> None:
    layout = _debian_layout()
    cfsctl = str(VENV_BIN / "cfsctl")
    repo = tmp_path / "repo"
    subprocess.run([cfsctl, "--repo", str(repo), "init", "--insecure"], check=True)
    subprocess.run(
        [cfsctl, "--repo", str(repo), "oci", "pull", f"oci:{layout}:a", "debian"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    km, fm = mountpoint(tmp_path, mounts, "k"), mountpoint(tmp_path, mounts, "f")
    subprocess.run([cfsctl, "--repo", str(repo), "oci", "mount", "debian", str(km)], check=True)
    subprocess.run(
        [cfsctl, "--repo", str(repo), "oci", "mount", "--fuse", "yes", "debian", str(fm)],
        check=True,
    )
    try:
        k, f = describe(km), describe(fm)
        assert len(k) > 5000
        assert_same(k, f)
    finally:
        subprocess.run(["umount", str(km)], check=False)
        unmount(fm)


# -- integrity and read-only ---------------------------------------------------------


def _object(objects: Path, data: bytes) -> Path:
    d = fsverity.digest_hex(data, "sha256")
    return objects / d[:2] / d[2:]


def test_tampered_or_missing_objects_give_eio(tmp_path: Path, mounts: list[Path]) -> None:
    image, objects = every_type_image(tmp_path)
    _object(objects, EXTERNAL[b"/ext/small"]).write_bytes(b"y" * 5001)
    _object(objects, EXTERNAL[b"/ext/block"]).unlink()
    fm = mountpoint(tmp_path, mounts, "f")
    fuse_mount(image, objects, fm)
    try:
        for name in ("small", "block"):
            with pytest.raises(OSError) as e:
                (fm / "ext" / name).read_bytes()
            assert e.value.errno == errno.EIO
        assert (fm / "ext" / "big").read_bytes() == EXTERNAL[b"/ext/big"]
        assert (fm / "dir" / "inline").read_bytes() == b"hello"
    finally:
        unmount(fm)


def test_every_write_is_erofs(tmp_path: Path, mounts: list[Path]) -> None:
    image, objects = every_type_image(tmp_path)
    fm = mountpoint(tmp_path, mounts, "f")
    fuse_mount(image, objects, fm)
    f = fm / "dir" / "inline"
    attempts = [
        lambda: open(f, "r+b"),
        lambda: open(f, "ab"),
        lambda: open(fm / "new", "wb"),
        lambda: os.mkdir(fm / "newdir"),
        lambda: os.unlink(f),
        lambda: os.rename(f, fm / "dir" / "x"),
        lambda: os.chmod(f, 0o600),
        lambda: os.chown(f, 1, 1),
        lambda: os.utime(f, (0, 0)),
        lambda: os.truncate(f, 0),
        lambda: os.setxattr(f, "user.new", b"1"),
        lambda: os.removexattr(fm / "dir", "user.a"),
        lambda: os.symlink("x", fm / "sl"),
        lambda: os.link(f, fm / "hl"),
        lambda: os.mknod(fm / "fifo", 0o600 | stat.S_IFIFO),
    ]
    try:
        for i, attempt in enumerate(attempts):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS, f"attempt {i}: {e.value}"
    finally:
        unmount(fm)


# -- robustness ----------------------------------------------------------------------


def test_corrupt_image_is_refused_with_one_line(tmp_path: Path, mounts: list[Path]) -> None:
    image, objects = every_type_image(tmp_path)
    data = bytearray(image.read_bytes())
    data[1024:1028] = b"\0\0\0\0"
    bad = tmp_path / "bad.cfs"
    bad.write_bytes(bytes(data))
    fm = mountpoint(tmp_path, mounts, "f")
    r = subprocess.run(
        [str(VENV_BIN / "composefs-fuse"), "-o", f"source={bad},basedir={objects}", str(fm)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "invalid composefs image" in r.stderr, r.stderr
    assert not is_mounted(fm)
    assert not fuse_servers_for(fm)


def test_daemon_survives_a_client_killed_mid_read(tmp_path: Path, mounts: list[Path]) -> None:
    image, objects = every_type_image(tmp_path)
    fm = mountpoint(tmp_path, mounts, "f")
    fuse_mount(image, objects, fm, "-o", "nopassthrough")  # reads go through the server
    big = fm / "ext" / "big"
    reader = (
        "import sys, time\n"
        "f = open(sys.argv[1], 'rb', buffering=0)\n"
        "while True:\n"
        "    if not f.read(65536): f.seek(0)\n"
        "    print('r', flush=True)\n"
    )
    try:
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-c", reader, str(big)], stdout=subprocess.PIPE)
            assert p.stdout is not None
            for _ in range(20):
                p.stdout.readline()
            p.kill()
            p.wait()
        assert big.read_bytes() == EXTERNAL[b"/ext/big"]
        assert fuse_servers_for(fm)
    finally:
        unmount(fm)


def test_foreground_ctrl_c_unmounts_cleanly(tmp_path: Path, mounts: list[Path]) -> None:
    image, objects = every_type_image(tmp_path)
    fm = mountpoint(tmp_path, mounts, "f")
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = subprocess.Popen(
            [str(VENV_BIN / "composefs-fuse"), "-f", "-o",
             f"source={image},basedir={objects}", str(fm)],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        end = time.monotonic() + 30
        while not is_mounted(fm) and time.monotonic() < end:
            time.sleep(0.05)
        assert is_mounted(fm)
        assert (fm / "dir" / "inline").read_bytes() == b"hello"
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert wait_unmounted(fm)
        assert not fuse_servers_for(fm)


def test_unmount_leaves_no_process(tmp_path: Path, mounts: list[Path]) -> None:
    image, objects = every_type_image(tmp_path)
    fm = mountpoint(tmp_path, mounts, "f")
    fuse_mount(image, objects, fm)
    assert fuse_servers_for(fm)
    (fm / "ext" / "big").read_bytes()
    unmount(fm)  # asserts that the server is gone


def _passthrough_kernel() -> bool:
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_FUSE_PASSTHROUGH=y" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("passthrough", [True, False])
def test_root_mounts_read_through_passthrough(
    tmp_path: Path, mounts: list[Path], passthrough: bool
) -> None:
    """As root the kernel reads verified objects itself (no READ request
    reaches the server); -o nopassthrough serves them (spliced)."""
    if passthrough and not _passthrough_kernel():
        pytest.skip("the kernel has no FUSE passthrough (CONFIG_FUSE_PASSTHROUGH)")
    image, objects = every_type_image(tmp_path)
    fm = mountpoint(tmp_path, mounts, "f")
    log = tmp_path / "debug.log"
    opts = f"source={image},basedir={objects}" + ("" if passthrough else ",nopassthrough")
    with open(log, "wb") as err:
        p = subprocess.Popen(
            [str(VENV_BIN / "composefs-fuse"), "-d", "-o", opts, str(fm)], stderr=err
        )
        try:
            end = time.monotonic() + 30
            while not is_mounted(fm) and time.monotonic() < end:
                time.sleep(0.05)
            assert (fm / "ext" / "big").read_bytes() == EXTERNAL[b"/ext/big"]
            assert (fm / "dir" / "inline").read_bytes() == b"hello"
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
    assert wait_unmounted(fm)
    reads = log.read_text().count("opcode: READ (15)")
    assert "opcode: OPEN (14)" in log.read_text()
    if passthrough:
        assert reads == 1  # the inline file only
    else:
        assert reads > 3 * 1024 * 1024 // (512 * 1024)
