"""cfsctl end to end: the real command line against real repositories, real
kernel mounts (as root), and a crash test with kill -9.

Commands run as subprocesses (`python -m composefs.cli.cfsctl`) so exit
codes, stdout and stderr are exactly what a user sees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefs import dumpfile, fsverity
from composefs.erofs.reader import read_image
from composefs.repository import Repository
from testlib import kill_at_objects, needs_root

IS_ROOT = os.geteuid() == 0
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
HEX128 = re.compile(r"^[0-9a-f]{128}$")


def cfsctl(
    *args: str | os.PathLike[str],
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    raw = subprocess.run(
        [sys.executable, "-m", "composefs.cli.cfsctl", *map(str, args)],
        input=input,
        capture_output=True,
        env=ENV,
        timeout=timeout,
    )
    p = subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode()
    )
    if check and p.returncode != 0:
        raise AssertionError(f"cfsctl {args} failed ({p.returncode}): {p.stderr}")
    return p


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0
    assert p.stderr.startswith("cfsctl: "), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    return p.stderr.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    out = cfsctl("--repo", path, "init", "--insecure").stdout
    assert out == (
        f"Initialized composefs repository at {path}\n"
        "  algorithm: fsverity-sha512-12\n"
        "  verity:    not required (insecure)\n"
    )
    return path


def make_tree(root: Path) -> None:
    """A tree with every file type composefs represents."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "etc").mkdir()
    (root / "run/lock").mkdir(parents=True)
    (root / "run/lock/pid").write_text("123")
    (root / "etc/small").write_bytes(b"inline content\n")
    (root / "etc/exactly64").write_bytes(b"6" * 64)
    (root / "etc/empty").write_bytes(b"")
    (root / "usr/bin/tool").write_bytes(os.urandom(70_000))
    os.chmod(root / "usr/bin/tool", 0o4755)
    (root / "usr/lib/dup").write_bytes((root / "usr/bin/tool").read_bytes())
    (root / "usr/lib/big").write_bytes(os.urandom(5 << 20))
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    os.symlink("../lib/big", root / "usr/bin/link")
    os.symlink("/nonexistent/absolute", root / "etc/dangling")
    os.mkfifo(root / "etc/fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "etc/sock"))
    s.close()
    if IS_ROOT:
        os.mknod(root / "etc/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "etc/loop", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.chown(root / "etc/small", 1234, 5678)
        os.setxattr(root / "usr/bin/tool", "security.capability", b"\x01\x00\x00\x02" + b"\0" * 16)
    try:
        os.setxattr(root / "etc/small", "user.dropped", b"host only")
    except OSError:
        pass
    os.chmod(root / "usr", 0o750)
    for d, t in ((root / "usr", 1_600_000_000), (root / "etc", 1_500_000_000)):
        os.utime(d, (t, t), follow_symlinks=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "root"
    root.mkdir()
    make_tree(root)
    return root


def snapshot(root: Path, container: bool) -> dict[str, tuple[object, ...]]:
    """What a composefs mount of `root` should show, per path."""
    out: dict[str, tuple[object, ...]] = {}
    usr = os.lstat(root / "usr")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            rel = "/" + str(p.relative_to(root)) if p != root else "/"
            if rel == "/.":
                rel = "/"
            st = os.lstat(p)
            if container and rel in ("/", "/run"):
                meta: tuple[object, ...] = (
                    stat.S_IFMT(st.st_mode),
                    stat.S_IMODE(usr.st_mode) if rel == "/" else stat.S_IMODE(st.st_mode),
                    *((usr.st_uid, usr.st_gid) if rel == "/" else (st.st_uid, st.st_gid)),
                    int(usr.st_mtime),
                )
            else:
                meta = (
                    stat.S_IFMT(st.st_mode),
                    stat.S_IMODE(st.st_mode),
                    st.st_uid,
                    st.st_gid,
                    int(st.st_mtime),
                )
            if container and rel.startswith("/run/"):
                continue
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(), st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            try:
                cap = os.getxattr(p, "security.capability", follow_symlinks=False)
            except OSError:
                cap = None
            try:
                user = os.getxattr(p, "user.dropped", follow_symlinks=False)
            except OSError:
                user = None
            if container:
                user = None
            out[rel] = (*meta, extra, cap, user)
    return out


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield mnt
    while os.path.ismount(mnt):
        subprocess.run(["umount", str(mnt)], check=False)


def test_help_for_every_command() -> None:
    top = cfsctl("--help").stdout
    commands = [
        "init", "transaction", "cat", "gc", "import-image", "mount", "create-image",
        "compute-id", "compute-karg", "create-dumpfile", "image-objects", "dump-files", "fsck",
    ]  # fmt: skip
    for c in commands:
        assert c in top
        out = cfsctl(c, "--help").stdout
        assert out.startswith(f"usage: cfsctl {c}")
    # The oci group comes from the composefs.cli.oci hook, when installed.
    import importlib.util

    if importlib.util.find_spec("composefs.cli.oci") is not None:
        assert "oci" in top
        assert cfsctl("oci", "--help").stdout.startswith("usage: cfsctl oci")
        assert "invalid choice" in one_line_error(cfsctl("oci", "frobnicate", check=False))


def test_usage_errors_are_one_line(repo: Path, tmp_path: Path) -> None:
    assert "invalid choice" in one_line_error(cfsctl("frobnicate", check=False))
    assert "required" in one_line_error(cfsctl("--repo", repo, "cat", check=False))
    assert "--no-repo" in one_line_error(cfsctl("--repo", repo, "--no-repo", "gc", check=False))
    assert "cannot open repository" in one_line_error(
        cfsctl("--repo", tmp_path / "missing", "gc", check=False)
    )
    err = one_line_error(cfsctl("--repo", repo, "mount", "x", "/mnt", "--read-write", check=False))
    assert "--upperdir" in err
    err = one_line_error(
        cfsctl("--repo", repo, "mount", "x", "/mnt", "--upperdir", "/u", check=False)
    )
    assert "--workdir" in err
    assert "not found" in one_line_error(
        cfsctl("--repo", repo, "image-objects", "refs/x", check=False)
    )
    assert "sha256" in one_line_error(cfsctl("--repo", repo, "--hash", "sha256", "gc", check=False))
    (tmp_path / "nousr").mkdir()
    err = one_line_error(cfsctl("--repo", repo, "create-image", tmp_path / "nousr", check=False))
    assert "/usr is missing" in err
    assert not os.listdir(repo / "objects")


def test_init_rules(tmp_path: Path) -> None:
    path = tmp_path / "a/b/repo"  # parents are created
    cfsctl("--repo", path, "init", "--insecure", "--erofs-version", "1")
    assert cfsctl("--repo", path, "init", "--insecure", "--erofs-version", "1").stdout == (
        f"Repository already initialized at {path}\n"
    )
    err = one_line_error(cfsctl("init", "--insecure", path, check=False))
    assert "different configuration" in err
    meta = json.loads((path / "meta.json").read_text())
    assert meta["erofs_formats"] == {"default": 1}
    out = cfsctl(
        "init", "--insecure", "--algorithm", "fsverity-sha256-12", tmp_path / "r256"
    ).stdout
    assert "algorithm: fsverity-sha256-12" in out
    assert "block size" in one_line_error(
        cfsctl("init", "--algorithm", "fsverity-sha256-16", tmp_path / "x", check=False)
    )


def test_init_without_repo_names_its_path_and_fails_cleanly(tmp_path: Path) -> None:
    """`init` without --repo says where the repository is; an init that
    fails (no fs-verity here, no --insecure) names the path and leaves no
    directory behind (neither the repository nor the parents it made)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**ENV, "HOME": str(home)}
    cmd = [sys.executable, "-m", "composefs.cli.cfsctl", "--user", "init"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    where = home / ".var/lib/composefs"
    if p.returncode == 0:
        pytest.skip("this filesystem has fs-verity: a secure init succeeds")
    assert p.stderr.startswith("cfsctl: ") and p.stderr.count("\n") == 1, p.stderr
    assert str(where) in p.stderr and "--insecure" in p.stderr
    assert list(home.iterdir()) == []
    # an existing parent is kept, only what init made goes
    (home / ".var").mkdir()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and [x.name for x in home.iterdir()] == [".var"]
    assert list((home / ".var").iterdir()) == []
    p = subprocess.run([*cmd, "--insecure"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"Initialized composefs repository at {where}"


def test_create_image_compute_id_and_mount(
    repo: Path, tree: Path, mountpoint: Path, tmp_path: Path
) -> None:
    out = cfsctl("--repo", repo, "create-image", tree, "mytree").stdout
    assert out.startswith("sha512:")
    image_id = out.strip().removeprefix("sha512:")
    assert HEX128.match(image_id)
    # compute-id stores nothing and agrees (also without a repository).
    assert cfsctl("--repo", repo, "compute-id", tree).stdout.strip() == image_id
    assert cfsctl("--no-repo", "compute-id", tree).stdout.strip() == image_id
    sha256_id = cfsctl("--no-repo", "--hash", "sha256", "compute-id", tree).stdout.strip()
    assert len(sha256_id) == 64
    v1 = cfsctl("--repo", repo, "--erofs-version", "1", "compute-id", tree).stdout.strip()
    assert v1 != image_id
    assert (
        cfsctl("--repo", repo, "--erofs-version", "1", "create-image", tree).stdout
        == f"sha512:{v1}\n"
    )

    # Every external file's content is an object; the image lists them.
    objects = cfsctl("--repo", repo, "image-objects", "refs/mytree").stdout.split()
    expected = {
        "sha512:" + fsverity.digest_file(tree / p, "sha512").hex()
        for p in ("usr/bin/tool", "usr/lib/big")
    }
    assert set(objects) == expected
    assert cfsctl("--repo", repo, "fsck").stdout.endswith("status: ok\n")

    # The image, read back, has the transformed tree.
    image = (repo / "images" / image_id).read_bytes()
    root = read_image(image)
    assert root.entries[b"run"].entries == {}  # type: ignore[union-attr]
    assert root.stat.mode == 0o750  # from /usr

    if not IS_ROOT:
        pytest.skip("mounting needs root")
    want = snapshot(tree, container=True)
    for name in (image_id, "refs/mytree"):
        cfsctl("--repo", repo, "mount", name, mountpoint)
        try:
            assert snapshot(mountpoint, container=True) == want
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)

    # A corrupted image is refused by id (digest check), not by ref.
    obj = repo / "objects" / image_id[:2] / image_id[2:]
    data = bytearray(obj.read_bytes())
    data[-1] ^= 1
    obj.write_bytes(bytes(data))
    assert "mismatch" in one_line_error(
        cfsctl("--repo", repo, "mount", image_id, mountpoint, check=False)
    )


@needs_root
def test_no_propagate_and_writable_mount(
    repo: Path, tree: Path, mountpoint: Path, tmp_path: Path
) -> None:
    image_id = cfsctl(
        "--repo", repo, "create-image", "--no-propagate-usr-to-root", tree, "raw"
    ).stdout.strip()
    assert cfsctl(
        "--repo", repo, "compute-id", "--no-propagate-usr-to-root", tree
    ).stdout.strip() == image_id.removeprefix("sha512:")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    cfsctl(
        "--repo", repo, "mount", "refs/raw", mountpoint,
        "--upperdir", upper, "--workdir", work, "--read-write",
    )  # fmt: skip
    try:
        got, want = snapshot(mountpoint, container=False), snapshot(tree, container=False)
        # A merged directory shows its upper directory's mtime.
        assert got.pop("/")[:4] == want.pop("/")[:4]
        assert got == want
        (mountpoint / "etc/new").write_text("written")
        assert (upper / "etc/new").read_text() == "written"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_create_dumpfile_and_dump_files(repo: Path, tree: Path) -> None:
    text = cfsctl("--repo", repo, "create-dumpfile", tree).stdout.encode()
    parsed = dumpfile.parse(text)
    assert b"lock" not in text and parsed.lookup(b"/usr/bin/tool") is not None
    assert b"/usr/bin/tool-hardlink 0 @120000 - - - - 0.0 /usr/bin/tool - -" in text

    cfsctl("--repo", repo, "create-image", tree, "t")
    out = cfsctl("--repo", repo, "dump-files", "refs/t", "/etc/small", "/usr/bin").stdout
    lines = out.split("\n")
    assert lines[0].startswith("/etc/small 15 100644 1 ")
    assert lines[0].endswith(" - inline\\x20content\\n -")
    assert [line.split(" ")[0] for line in lines[1:-2]] == [
        "/usr/bin", "/usr/bin/link", "/usr/bin/tool", "/usr/bin/tool-hardlink",
    ]  # fmt: skip
    assert out.endswith("\n\n")  # composefs-rs prints one more newline
    assert "@120000" in lines[4]
    # A hardlink whose first name is outside the subtree gets the full entry.
    out = cfsctl("--repo", repo, "dump-files", "refs/t", "usr/bin/tool-hardlink").stdout
    assert out.startswith("usr/bin/tool-hardlink 70000 104755 2 ")

    tool = fsverity.digest_file(tree / "usr/bin/tool", "sha512").hex()
    out = cfsctl(
        "--repo", repo, "dump-files", "--backing-path-only", "refs/t", "/usr/bin/tool", "/etc/small"
    ).stdout
    assert out == f"/usr/bin/tool {tool[:2]}/{tool[2:]}\n/etc/small inline\n"
    err = cfsctl("--repo", repo, "dump-files", "--backing-path-only", "refs/t", "/usr", check=False)
    assert "is a directory" in one_line_error(err)
    assert "not found" in one_line_error(
        cfsctl("--repo", repo, "dump-files", "refs/t", "/nope", check=False)
    )


def test_gc_and_fsck_commands(repo: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, unique in ((a, b"A"), (b, b"B")):
        (d / "usr").mkdir(parents=True)
        (d / "usr/shared").write_bytes(b"S" * 4096)
        (d / "usr/unique").write_bytes(unique * 3000)
    cfsctl("--repo", repo, "create-image", a, "keep")
    b_id = cfsctl("--repo", repo, "create-image", b).stdout.strip().removeprefix("sha512:")
    b_size = (repo / "images" / b_id).stat().st_size

    out = cfsctl("--repo", repo, "gc", "--dry-run").stdout
    assert out == (
        "Dry run (no files deleted):\n"
        f"Objects: 2 removed ({3000 + b_size} bytes)\n"
        "Pruned symlinks: 1 images, 0 streams\n"
    )
    assert cfsctl("--repo", repo, "gc", "-n", "-r", b_id).stdout == (
        "Dry run (no files deleted):\nObjects: 0 removed (0 bytes)\n"
    )
    assert cfsctl("--repo", repo, "gc").stdout == (
        f"Objects: 2 removed ({3000 + b_size} bytes)\nPruned symlinks: 1 images, 0 streams\n"
    )
    assert not (repo / "objects" / b_id[:2] / b_id[2:]).exists()
    assert cfsctl("--repo", repo, "gc").stdout == "Objects: 0 removed (0 bytes)\n"

    ok = cfsctl("--repo", repo, "fsck")
    assert (
        ok.stdout == "meta.json: ok\nobjects: 3/3 ok\nstreams: 0/0 ok\nimages: 1/1 ok\nstatus: ok\n"
    )
    shared = fsverity.digest_hex(b"S" * 4096, "sha512")
    (repo / "objects" / shared[:2] / shared[2:]).write_bytes(b"X" * 4096)
    bad = cfsctl("--repo", repo, "fsck", check=False)
    assert bad.returncode == 1
    assert bad.stderr == "cfsctl: repository integrity check failed\n"
    assert "status: 1 error(s)\n  - fsck: object-digest-mismatch: objects/" in bad.stdout
    js = cfsctl("--repo", repo, "fsck", "--json", check=False)
    assert js.returncode == 1 and js.stderr == ""
    reply = json.loads(js.stdout)
    assert reply["ok"] is False and reply["objects_corrupted"] == 1
    assert reply["errors"][0].startswith("fsck: object-digest-mismatch: ")
    assert cfsctl("--repo", repo, "fsck", "--metadata-only").returncode == 0


@needs_root
def test_image_ids_in_every_printed_form(repo: Path, tmp_path: Path, mountpoint: Path) -> None:
    """create-image prints `sha512:<hex>`: that, the bare hex, refs/NAME and a
    bare NAME that is a ref all name the image, for every command; a gc root
    that names nothing is an error that deletes nothing."""
    src = tmp_path / "src"
    (src / "usr").mkdir(parents=True)
    (src / "usr/big").write_bytes(b"B" * 5000)
    printed = cfsctl("--repo", repo, "create-image", src).stdout.strip()
    assert printed.startswith("sha512:")
    hex_id = printed.removeprefix("sha512:")
    big = fsverity.digest_hex(b"B" * 5000, "sha512")
    objects = {f"sha512:{hex_id}", f"sha512:{big}"}

    out = cfsctl("--repo", repo, "gc", "--root", printed).stdout
    assert out == "Objects: 0 removed (0 bytes)\n"
    assert (repo / "images" / hex_id).exists()
    for form in (printed, hex_id):
        assert set(cfsctl("--repo", repo, "image-objects", form).stdout.split()) >= {
            f"sha512:{big}"
        }
        cfsctl("--repo", repo, "mount", form, mountpoint)
        try:
            assert (mountpoint / "usr/big").read_bytes() == b"B" * 5000
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
        assert cfsctl("--repo", repo, "dump-files", form, "/usr/big").stdout.startswith("/usr/big")

    # a ref, named as refs/NAME and as a bare NAME (composefs-rs 0.8)
    cfsctl("--repo", repo, "create-image", src, "named")
    for form in ("refs/named", "named"):
        assert cfsctl("--repo", repo, "image-objects", form).stdout.split()
        assert cfsctl("--repo", repo, "gc", "-n", "--root", form).returncode == 0
    # the wrong algorithm is refused, not taken for a name
    err = one_line_error(cfsctl("--repo", repo, "image-objects", f"sha256:{'0' * 64}", check=False))
    assert "sha512" in err

    # a root naming nothing: an error, and nothing goes
    os.unlink(repo / "images/refs/named")
    for bad in ("nope", f"sha512:{'0' * 128}", "refs/nope"):
        p = cfsctl("--repo", repo, "gc", "--root", bad, check=False)
        assert "names no image or stream" in one_line_error(p)
    assert (repo / "images" / hex_id).exists()
    assert set(cfsctl("--repo", repo, "image-objects", hex_id).stdout.split()) >= objects - {
        printed
    }
    # and with the image named, gc keeps it
    cfsctl("--repo", repo, "gc", "--root", printed)
    assert (repo / "images" / hex_id).exists()
    assert (repo / "objects" / big[:2] / big[2:]).exists()


def test_import_image_and_cat(repo: Path) -> None:
    from composefs.erofs.writer import mkfs
    from composefs.tree import Directory

    image = mkfs(Directory())
    out = cfsctl("--repo", repo, "import-image", "imported", input=image).stdout
    assert out == f"sha512:{fsverity.digest_hex(image, 'sha512')}\n"
    assert (repo / "images/refs/imported").is_symlink()
    for bad in (b"", b"garbage" * 1000):
        r = cfsctl("--repo", repo, "import-image", "bad", input=bad, check=False)
        assert "invalid composefs image" in one_line_error(r)
    assert not (repo / "images/refs/bad").exists()
    data = bytes(range(256)) * 40
    with Repository.open(repo) as r:
        w = r.create_stream(0)
        w.write_inline(b"head:")
        w.write_external(data)
        r.write_stream(w, "my-stream", "named")
    p = subprocess.run(
        [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo), "cat", "refs/named"],
        capture_output=True,
        env=ENV,
    )
    assert p.returncode == 0 and p.stdout == b"head:" + data
    assert "not found" in one_line_error(cfsctl("--repo", repo, "cat", "nope", check=False))
    # the stream's id as the tools print it, bare, and a bare ref name
    stream_id = os.readlink(repo / "streams/my-stream").rsplit("/", 2)
    hex_id = stream_id[-2] + stream_id[-1]
    for form in (f"sha512:{hex_id}", hex_id, "named", "my-stream"):
        p = subprocess.run(
            [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo), "cat", form],
            capture_output=True,
            env=ENV,
        )
        assert p.returncode == 0 and p.stdout == b"head:" + data, (form, p.stderr)


def test_transaction_holds_off_gc(repo: Path) -> None:
    base = [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo)]
    tx = subprocess.Popen([*base, "transaction"], env=ENV)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until the transaction holds its lock
            probe = os.open(repo, os.O_RDONLY)
            try:
                import fcntl

                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                break
            finally:
                os.close(probe)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        gc = subprocess.Popen([*base, "gc"], env=ENV, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert gc.poll() is None  # blocked behind the transaction
    finally:
        tx.send_signal(signal.SIGKILL)
        tx.wait()
    out, _ = gc.communicate(timeout=60)
    assert gc.returncode == 0 and out == "Objects: 0 removed (0 bytes)\n"


def test_multicall(tmp_path: Path) -> None:
    script = shutil.which("cfsctl") or str(Path(sys.executable).parent / "cfsctl")
    if not os.path.exists(script):
        pytest.skip("cfsctl console script not installed")
    link = tmp_path / "mkcomposefs"
    link.symlink_to(script)
    p = subprocess.run([str(link), "--help"], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0 and p.stdout.startswith("usage: mkcomposefs")
    p = cfsctl("composefs-info", "--help")
    assert p.stdout.startswith("usage: composefs-info")
    dump = b"/ 0 40755 2 0 0 0 0.0 - - -\n"
    p = cfsctl("mkcomposefs", "--from-file", "-", tmp_path / "out.img", input=dump)
    assert (tmp_path / "out.img").stat().st_size > 0


def test_kill9_during_create_image(repo: Path, tmp_path: Path) -> None:
    """kill -9 at several points of create-image: fsck stays clean, and the
    same command then succeeds with the id compute-id predicts."""
    src = tmp_path / "src"
    (src / "usr/data").mkdir(parents=True)
    for i in range(400):
        (src / "usr/data" / f"f{i:03}").write_bytes(os.urandom(3000 + i))
    (src / "usr/big").write_bytes(os.urandom(24 << 20))
    expected = cfsctl("--repo", repo, "compute-id", src).stdout.strip()
    argv = [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo), "create-image"]
    objects = repo / "objects"
    killed = 0
    for threshold in (1, 50, 200, 390):
        shutil.rmtree(repo / "images", ignore_errors=True)
        for d in objects.iterdir():
            shutil.rmtree(d)
        killed += kill_at_objects([*argv, str(src), "crash"], objects, threshold, env=ENV)
        fsck = cfsctl("--repo", repo, "fsck", check=False)
        assert fsck.returncode == 0, fsck.stdout
        assert not [n for n in os.listdir(repo) if n.startswith((".tmp-", ".symlink-"))]
        out = cfsctl("--repo", repo, "create-image", src, "crash").stdout
        assert out == f"sha512:{expected}\n"
        assert cfsctl("--repo", repo, "fsck").returncode == 0
    assert killed >= 2  # the test really interrupted writers


@pytest.mark.vm
@needs_root
def test_secure_repository_mount(tmp_path: Path, mountpoint: Path) -> None:
    """Under kernel fs-verity (`tests/vm/run.py tests/cli/test_cfsctl.py -m vm`):
    `init` without --insecure, and a mount that makes overlayfs require
    verity on every object."""
    scratch = os.environ.get("COMPOSEFS_VERITY_SCRATCH")
    if not scratch:
        pytest.skip("COMPOSEFS_VERITY_SCRATCH is unset: needs kernel fs-verity (make test-vm)")
    repo = Path(scratch) / f"cli-{os.getpid()}"
    out = cfsctl("--repo", repo, "init").stdout
    assert out.endswith("  verity:    required\n")
    src = tmp_path / "src"
    (src / "usr").mkdir(parents=True)
    (src / "usr/data").write_bytes(b"verified content\n" * 1000)
    (src / "usr/small").write_bytes(b"tiny")
    image_id = cfsctl("--repo", repo, "create-image", src, "v").stdout.strip()
    image_id = image_id.removeprefix("sha512:")
    assert cfsctl("--repo", repo, "--require-verity", "fsck").stdout.endswith("status: ok\n")
    for name in (image_id, "refs/v"):
        cfsctl("--repo", repo, "mount", name, mountpoint)
        try:
            assert (mountpoint / "usr/data").read_bytes() == b"verified content\n" * 1000
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)


def test_kill9_during_gc(repo: Path) -> None:
    """A GC killed while deleting leaves a consistent repository."""
    from composefs.erofs.writer import mkfs
    from composefs.tree import Directory, Leaf, Regular, Stat

    with Repository.open(repo) as r:
        for img in range(20):
            root = Directory()
            for i in range(300):
                data = b"%d-%d " % (img, i) * 20
                oid = r.ensure_object(data)
                root.insert(b"/f%d" % i, Leaf(Stat(0o644), Regular(len(data), digest=oid)))
            r.write_image(mkfs(root), "kept" if img == 0 else None)
    objects = repo / "objects"

    def count() -> int:
        return sum(len(os.listdir(d)) for d in objects.iterdir())

    before = count()
    gc = subprocess.Popen(
        [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo), "gc"],
        env=ENV,
        stdout=subprocess.DEVNULL,
    )
    while gc.poll() is None and count() > before - 1000:
        time.sleep(0.001)
    gc.send_signal(signal.SIGKILL)
    gc.wait()
    assert cfsctl("--repo", repo, "fsck").stdout.endswith("status: ok\n")
    cfsctl("--repo", repo, "gc")
    assert count() == 301  # the kept image and its files
    assert cfsctl("--repo", repo, "fsck").stdout.endswith("status: ok\n")


def test_bootable_and_compute_karg(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "boot-src"
    for d in ("usr/lib", "boot/junk", "sysroot/junk", "etc"):
        (src / d).mkdir(parents=True)
    (src / "usr/lib/f").write_bytes(b"hello\n")
    (src / "boot/junk/vmlinuz").write_bytes(b"K" * 1000)
    image = cfsctl("--repo", repo, "create-image", "--bootable", src, "b").stdout.strip()
    digest = image.removeprefix("sha512:")
    assert cfsctl("--repo", repo, "compute-id", "--bootable", src).stdout.strip() == digest
    assert cfsctl("--repo", repo, "compute-id", src).stdout.strip() != digest
    # the repository is insecure (no fs-verity here): its karg says so with "?"
    assert cfsctl("--repo", repo, "compute-karg", src).stdout == f"composefs=?{digest}\n"
    assert cfsctl("--no-repo", "compute-karg", src).stdout == f"composefs={digest}\n"
    assert cfsctl("--no-repo", "--insecure", "compute-karg", src).stdout == (
        f"composefs=?{digest}\n"
    )
    assert "--insecure" in cfsctl("--help").stdout
    v1 = cfsctl("--repo", repo, "--erofs-version", "1", "compute-id", "--bootable", src)
    out = cfsctl("--repo", repo, "--insecure", "--erofs-version", "1", "compute-karg", src).stdout
    assert out == f"composefs.digest=?v1-sha512-12:{v1.stdout.strip()}\n"
    dump = cfsctl("--repo", repo, "create-dumpfile", "--bootable", src).stdout
    assert "/boot/junk" not in dump and "/sysroot/junk" not in dump
    (src / "sysroot/junk").rmdir()
    (src / "sysroot").rmdir()
    assert "sysroot" in one_line_error(cfsctl("--repo", repo, "compute-karg", src, check=False))


def test_create_image_imports_only_what_it_uses(tmp_path: Path) -> None:
    """Every command pays for its imports at start: a sequential create-image
    needs no thread pool, spool file or random names."""
    (tmp_path / "src" / "usr").mkdir(parents=True)
    (tmp_path / "src" / "usr" / "big").write_bytes(os.urandom(100_000))
    Repository.init(tmp_path / "repo", insecure=True)
    code = (
        "import sys\n"
        "from composefs.cli.cfsctl import main\n"
        f"main(['--repo', {str(tmp_path / 'repo')!r}, 'create-image', {str(tmp_path / 'src')!r}])\n"
        "print([m for m in ('concurrent.futures', 'tempfile', 'secrets', 'subprocess')"
        " if m in sys.modules], file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"sha512:")
    assert r.stderr.strip() == b"[]"


# -- the parser: only the command at hand is built ------------------------------------


def _actions(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], str, object]]:
    return [(tuple(a.option_strings), a.dest, a.default) for a in parser._actions]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _command_paths() -> list[list[str]]:
    from composefs.cli.cfsctl import build_parser

    paths = []
    for name, sp in _subparsers(build_parser()).items():
        subs = _subparsers(sp)
        paths.extend([[name, sub] for sub in subs] if subs else [[name]])
    return paths


def test_a_command_line_builds_only_its_command_parser() -> None:
    """For every command (and every command of a group) the parser built
    for that command line holds that command alone, defined exactly as in
    the whole parser: the thirty others cost ~6 ms at every start."""
    from composefs.cli.cfsctl import build_parser

    full = build_parser()
    paths = _command_paths()
    assert len(paths) >= 30 and ["oci", "pull"] in paths and ["gc"] in paths
    for path in paths:
        lazy = build_parser(path)
        assert _actions(lazy) == _actions(full)
        want, have = full, lazy
        for word in path:
            assert list(_subparsers(have)) == [word], path
            want, have = _subparsers(want)[word], _subparsers(have)[word]
        assert _actions(have) == _actions(want), path
    # a group named without its command: all of the group's commands
    assert len(_subparsers(_subparsers(build_parser(["oci"]))["oci"])) > 5


@pytest.mark.parametrize(
    "argv",
    [
        ["--repo", "/r", "oci", "pull", "--tls-verify=false", "docker://h/i:t", "name"],
        ["--repo=/r", "--insecure", "gc", "-n", "--root", "x"],
        ["--hash", "sha256", "create-image", "/tree", "img"],
        ["--rep", "gc", "gc"],  # an abbreviated option taking the word after it
        ["--rep", "mount", "gc"],  # ... and the command's parser was the wrong one
        ["fsck", "--json"],
    ],
)
def test_the_command_line_parses_as_with_the_whole_parser(argv: list[str]) -> None:
    from composefs.cli.cfsctl import _parse, build_parser

    assert vars(_parse(argv)) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    ("argv", "listed"),
    [
        (["nosuch"], "'init', 'transaction'"),
        (["--repo", "/r", "oci", "nosuch"], "'pull', 'push', 'images'"),
    ],
)
def test_a_mistake_is_reported_by_the_whole_parser(argv: list[str], listed: str) -> None:
    """What does not parse with the command's parser alone is parsed again
    with the whole one: a misspelt command's error lists every command."""
    from composefs.cli.cfsctl import _parse
    from composefs.errors import UsageError

    with pytest.raises(UsageError, match="invalid choice") as e:
        _parse(argv)
    assert listed in str(e.value)


def test_help_before_the_command_lists_every_command() -> None:
    r = cfsctl("--help", "gc")
    assert "create-image" in r.stdout and "varlink" in r.stdout
    r = cfsctl("oci", "--help")
    assert "pull" in r.stdout and "prepare-boot" in r.stdout
