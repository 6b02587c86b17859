"""composefs-fuse against C composefs 1.0.8's own test, its command line, and
`cfsctl mount --fuse` run by an unprivileged user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuselib import (
    VENV_BIN,
    fuse_mount,
    fuse_servers_for,
    is_mounted,
    need_fuse,
    unmount,
    wait_unmounted,
)

from composefs.erofs.reader import image_version
from testlib import need_checkout_for_nobody

UPSTREAM = Path(__file__).resolve().parent / "upstream"
SEEDS = ("05836e5516ef9cdafb92ef93b25cb935", "c55bd16cbe1f3e42736a2e7448330c2d")


def tool_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_upstream_random_fuse(seed: str) -> None:
    """C's tests/test-random-fuse.sh with our mkcomposefs, composefs-dump,
    composefs-info and composefs-fuse in its BINDIR."""
    need_fuse()
    r = subprocess.run(
        ["bash", str(UPSTREAM / "test-random-fuse.sh"), str(VENV_BIN)],
        env={**tool_env(), "seed": seed}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the FUSE part ran (the script skips it when it finds no FUSE)
    assert "has_fuse=y" in r.stdout
    assert "Mounting composefs image using fuse" in r.stdout


@pytest.mark.slow
def test_image_rebuilt_from_the_mount_is_identical(tmp_path: Path) -> None:
    need_fuse()
    env = tool_env()
    subprocess.run(
        [str(UPSTREAM / "gendir"), f"--seed={SEEDS[0]}", str(tmp_path / "root")],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    image, objects = tmp_path / "root.cfs", tmp_path / "objects"
    mkcomposefs = str(VENV_BIN / "mkcomposefs")
    subprocess.run(
        [mkcomposefs, f"--digest-store={objects}", str(tmp_path / "root"), str(image)], check=True
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse_mount(image, objects, mnt)
    try:
        rebuilt = tmp_path / "fuse.cfs"
        # The source's whiteouts made its image V1; through the mount they
        # are escaped files, as through the kernel's, so ask for V1 again.
        version = int(image_version(image.read_bytes()))
        subprocess.run(
            [mkcomposefs, f"--min-version={version}", f"--digest-store={objects}", str(mnt),
             str(rebuilt)],
            check=True,
        )  # fmt: skip
    finally:
        unmount(mnt)
    assert rebuilt.read_bytes() == image.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no mount point given"),
        (["/mnt"], "no image given: use -o source=IMAGE"),
        (["--bogus", "/mnt"], "unknown option '--bogus'"),
        (["-o"], "missing argument after -o"),
        (["-o", "source=/nonexistent.cfs", "/tmp"], "No such file or directory"),
        (["-o", "source=/dev/null", "/tmp"], "invalid composefs image"),
    ],
)
def test_command_line_errors_are_one_line(args: list[str], message: str) -> None:
    r = subprocess.run(
        [str(VENV_BIN / "composefs-fuse"), *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert r.stderr.startswith("composefs-fuse: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr


def test_help() -> None:
    r = subprocess.run([str(VENV_BIN / "composefs-fuse"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "source=IMAGE" in r.stdout


# -- an unprivileged user ----------------------------------------------------------


@pytest.fixture
def user_dev_fuse() -> Iterator[None]:
    """/dev/fuse usable by every user, as Debian's udev rules make it (some
    containers create it 0600): restored afterwards."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def as_nobody(home: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
         *args],
        env={"HOME": str(home), "PATH": f"{VENV_BIN}:/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, **kw,
    )  # fmt: skip


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can reach (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="cfs-fuse-user-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_user_mounts_its_own_repository(open_tmp: Path, user_dev_fuse: None) -> None:
    need_fuse()
    need_checkout_for_nobody()
    nobody = pwd.getpwnam("nobody")
    tmp_path = open_tmp
    home, src, mnt = tmp_path / "home", tmp_path / "src", tmp_path / "mnt"
    for d in (home, src / "sub", mnt):
        d.mkdir(parents=True)
    (src / "small").write_bytes(b"small file\n")
    big = os.urandom(300_000)
    (src / "sub" / "big").write_bytes(big)
    os.symlink("sub/big", src / "link")
    for p in (home, src, src / "sub", src / "small", src / "sub" / "big", mnt):
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    cfsctl = str(VENV_BIN / "cfsctl")

    r = as_nobody(home, cfsctl, "--user", "init", "--insecure")
    assert r.returncode == 0, r.stderr
    r = as_nobody(home, cfsctl, "--user", "create-image", "--no-propagate-usr-to-root", str(src))
    assert r.returncode == 0, r.stderr
    image_id = r.stdout.strip().split(":")[-1]
    assert (home / ".var" / "lib" / "composefs").is_dir()

    # The kernel mount is not allowed: auto says so and uses FUSE.
    for mode in ("auto", "yes"):
        r = as_nobody(home, cfsctl, "--user", "mount", "--fuse", mode, image_id, str(mnt))
        assert r.returncode == 0, r.stderr
        assert ("mounting with FUSE" in r.stderr) == (mode == "auto")
        assert is_mounted(mnt)
        # (only the mounting user may look: no allow_other)
        r = as_nobody(home, "sha256sum", str(mnt / "sub" / "big"), str(mnt / "link"),
                      str(src / "sub" / "big"))  # fmt: skip
        sums = {line.split()[0] for line in r.stdout.splitlines()}
        assert r.returncode == 0 and len(sums) == 1, r.stdout
        r = as_nobody(home, "stat", "-c", "%u:%g %s", str(mnt / "small"))
        assert r.stdout.split() == [f"{nobody.pw_uid}:{nobody.pw_gid}", "11"], r.stdout
        # the server holds no repository lock: gc runs while mounted
        r = as_nobody(home, cfsctl, "--user", "gc", "--root", image_id)
        assert r.returncode == 0, r.stderr
        r = as_nobody(home, "fusermount3", "-u", str(mnt))
        assert r.returncode == 0, r.stderr
        assert wait_unmounted(mnt)
        end = time.monotonic() + 10
        while fuse_servers_for(mnt) and time.monotonic() < end:
            time.sleep(0.05)
        assert not fuse_servers_for(mnt)

    # --fuse no: the kernel path, refused for lack of privilege
    r = as_nobody(home, cfsctl, "--user", "mount", "--fuse", "no", image_id, str(mnt))
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert not is_mounted(mnt)

    # --foreground: serves until Ctrl-C, then unmounts
    p = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", cfsctl, "--user",
         "mount", "--fuse", "yes", "--foreground", image_id, str(mnt)],
        env={"HOME": str(home), "PATH": f"{VENV_BIN}:/usr/bin:/bin"}, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        end = time.monotonic() + 30
        while not is_mounted(mnt) and time.monotonic() < end:
            time.sleep(0.05)
        r = as_nobody(home, "cat", str(mnt / "small"))
        assert r.stdout == "small file\n", r.stderr
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert wait_unmounted(mnt)
    finally:
        if p.poll() is None:
            p.kill()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
