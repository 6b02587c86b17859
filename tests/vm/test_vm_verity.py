"""Tests that need a kernel with fs-verity: run inside the QEMU VM (`make test-vm`).

The kernel is the oracle here: what FS_IOC_MEASURE_VERITY reports must equal
what our userspace code computes, and the kernel must refuse what composefs
promises it refuses.  Python in the VM is ~15x slower: keep this set lean.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.errors import VerityError, VerityNotEnabled

pytestmark = pytest.mark.vm

SCRATCH_ENV = "COMPOSEFS_VERITY_SCRATCH"


@pytest.fixture
def verity_dir() -> Path:
    """A fresh directory on a filesystem with fs-verity (ext4 -O verity).

    Outside the VM there is none: skip, naming the way to run these tests.
    """
    scratch = os.environ.get(SCRATCH_ENV)
    if not scratch:
        pytest.skip(f"{SCRATCH_ENV} is unset: needs kernel fs-verity, run `make test-vm`")
    return Path(tempfile.mkdtemp(prefix="t-", dir=scratch))


# Sizes around the fs-verity tree's edges: empty, one block, a block and a
# byte, exactly one full hash block for sha512 (64 hashes of 64 bytes), one
# block more than a full sha256 hash block (128 hashes), and a three-level tree.
SIZES = (0, 1, 4096, 4097, 64 * 4096, 128 * 4096 + 1, 1_000_003)


def _content(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _enable(path: Path, algorithm: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsverity.enable_verity(fd, algorithm)
    finally:
        os.close(fd)


def _measure(path: Path) -> tuple[str, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fsverity.measure_verity(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_kernel_digest_equals_userspace(verity_dir: Path, algorithm: str) -> None:
    for size in SIZES:
        path = verity_dir / f"f{size}"
        data = _content(size)
        _write(path, data)
        expected = fsverity.digest(data, algorithm)
        assert fsverity.digest_file(path, algorithm) == expected, size
        _enable(path, algorithm)
        assert _measure(path) == (algorithm, expected), size
    # The digest lives on disk: a fresh open after dropping caches agrees.
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    for size in SIZES:
        path = verity_dir / f"f{size}"
        assert _measure(path) == (algorithm, fsverity.digest(_content(size), algorithm)), size
        assert path.read_bytes() == _content(size)


def test_verity_file_is_immutable(verity_dir: Path) -> None:
    path = verity_dir / "f"
    _write(path, b"immutable\n")
    _enable(path, "sha256")
    with pytest.raises(OSError) as exc:
        open(path, "ab")
    assert exc.value.errno in (errno.EPERM, errno.EACCES)
    # Enabling again is not an error (the kernel's EEXIST is success for us).
    _enable(path, "sha256")
    assert _measure(path) == ("sha256", fsverity.digest(b"immutable\n"))


def test_measure_without_verity(verity_dir: Path) -> None:
    path = verity_dir / "plain"
    _write(path, b"no verity\n")
    with pytest.raises(VerityNotEnabled):
        _measure(path)


def test_enable_while_open_for_writing(verity_dir: Path) -> None:
    path = verity_dir / "busy"
    with open(path, "wb") as w:
        w.write(b"still being written")
        w.flush()
        with pytest.raises(VerityError):
            _enable(path, "sha256")
    with pytest.raises(VerityNotEnabled):
        _measure(path)


# -- mount.composefs: digest= and verity ----------------------------------


def _cli(name: str, module: str) -> list[str]:
    """A console script from the venv, or its module when not installed."""
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def _store_object(objects: Path, data: bytes, *, verity: bool = True) -> str:
    """Put `data` in a composefs object dir (xx/yyyy by sha256 fs-verity digest)."""
    hexdigest = fsverity.digest_hex(data)
    path = objects / hexdigest[:2] / hexdigest[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, data)
    if verity:
        _enable(path, "sha256")
    return hexdigest


class ComposefsFixture:
    """An image over an object dir with one good, one unprotected and one
    replaced object; the image has fs-verity, `digest` is its digest."""

    GOOD = b"hello composefs\n" * 300
    PLAIN = b"this object has no fs-verity\n"
    ORIGINAL = b"the content the image was made for\n"
    REPLACED = b"something else, with fs-verity\n"

    def __init__(self, base: Path) -> None:
        from composefs.erofs.writer import mkfs
        from composefs.tree import Directory, Leaf, Regular, Stat

        self.base = base
        self.objects = base / "objects"
        self.objects.mkdir()
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        root = Directory(Stat(0o755))
        for name, data, verity in ((b"good", self.GOOD, True), (b"plain", self.PLAIN, False),
                                   (b"replaced", self.ORIGINAL, True)):
            digest = _store_object(self.objects, data, verity=verity)
            root.entries[name] = Leaf(Stat(0o644), Regular(len(data), digest=digest))
        # Swap the object's content under its name (and give it fs-verity, so
        # only the digest in the image can tell).
        replaced = fsverity.digest_hex(self.ORIGINAL)
        victim = self.objects / replaced[:2] / replaced[2:]
        victim.unlink()
        _write(victim, self.REPLACED)
        _enable(victim, "sha256")
        self.image_bytes = mkfs(root)
        self.image = base / "image.cfs"
        _write(self.image, self.image_bytes)
        _enable(self.image, "sha256")
        self.digest = fsverity.digest_hex(self.image_bytes)

    def mount_cli(self, options: str, image: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*_cli("mount.composefs", "composefs.cli.mount_composefs"),
               "-o", options, str(image or self.image), str(self.mnt)]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    def unmount(self) -> None:
        while os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=True)


@pytest.fixture
def cfs(verity_dir: Path) -> Iterator[ComposefsFixture]:
    pytest.importorskip("composefs.mount", reason="composefs.mount not there yet")
    pytest.importorskip("composefs.erofs.writer", reason="composefs.erofs.writer not there yet")
    fx = ComposefsFixture(verity_dir)
    try:
        yield fx
    finally:
        fx.unmount()


def _read_errno(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno or 0
    return 0


def test_mount_composefs_digest_and_verity(cfs: ComposefsFixture) -> None:
    res = cfs.mount_cli(f"basedir={cfs.objects},digest={cfs.digest},verity")
    assert res.returncode == 0, res.stderr
    assert os.path.ismount(cfs.mnt)
    assert (cfs.mnt / "good").read_bytes() == cfs.GOOD
    assert (cfs.mnt / "replaced").stat().st_size == len(cfs.ORIGINAL)
    assert _read_errno(cfs.mnt / "replaced") == errno.EIO
    assert _read_errno(cfs.mnt / "plain") == errno.EIO


def test_digest_implies_verity(cfs: ComposefsFixture) -> None:
    # Library calls where the CLI adds nothing: every process start costs
    # seconds under emulation.
    from composefs.mount import mount_composefs, unmount

    mount_composefs(str(cfs.image), str(cfs.mnt), [str(cfs.objects)], digest=cfs.digest)
    try:
        assert (cfs.mnt / "good").read_bytes() == cfs.GOOD
        assert _read_errno(cfs.mnt / "replaced") == errno.EIO
        assert _read_errno(cfs.mnt / "plain") == errno.EIO
    finally:
        unmount(str(cfs.mnt))


def test_mount_without_verity_does_not_check(cfs: ComposefsFixture) -> None:
    # The control for the tests above: without verity the kernel serves
    # whatever the object dir holds.
    from composefs.mount import mount_composefs, unmount

    mount_composefs(str(cfs.image), str(cfs.mnt), [str(cfs.objects)])
    try:
        assert (cfs.mnt / "replaced").read_bytes() == cfs.REPLACED
        assert (cfs.mnt / "plain").read_bytes() == cfs.PLAIN
    finally:
        unmount(str(cfs.mnt))


def test_mount_composefs_wrong_digest_refused(cfs: ComposefsFixture) -> None:
    wrong = fsverity.digest_hex(cfs.image_bytes + b"\0")
    res = cfs.mount_cli(f"basedir={cfs.objects},digest={wrong},verity")
    assert res.returncode != 0
    assert res.stderr.startswith("mount.composefs: ") and res.stderr.count("\n") == 1, res.stderr
    assert not os.path.ismount(cfs.mnt)


def test_image_without_verity_refused(cfs: ComposefsFixture) -> None:
    from composefs.errors import MountError
    from composefs.mount import mount_composefs

    plain = cfs.base / "plain-image.cfs"
    _write(plain, cfs.image_bytes)
    with pytest.raises(MountError, match="fs-verity"):
        mount_composefs(str(plain), str(cfs.mnt), [str(cfs.objects)], digest=cfs.digest)
    assert not os.path.ismount(cfs.mnt)


def test_digest_on_filesystem_without_verity(cfs: ComposefsFixture) -> None:
    """A kernel with fs-verity, an image on a filesystem without it (tmpfs):
    digest= is refused as C refuses it; `insecure` checks in userspace and
    then does not require verity (the replaced object is served)."""
    from composefs.errors import MountError
    from composefs.mount import mount_composefs, unmount

    shm = cfs.base / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shm)], check=True)
    try:
        image = shm / "image.cfs"
        _write(image, cfs.image_bytes)
        with pytest.raises(MountError, match="has no fs-verity"):
            mount_composefs(str(image), str(cfs.mnt), [str(cfs.objects)], digest=cfs.digest)
        assert not os.path.ismount(cfs.mnt)
        mount_composefs(
            str(image), str(cfs.mnt), [str(cfs.objects)], digest=cfs.digest, insecure=True
        )
        try:
            assert (cfs.mnt / "replaced").read_bytes() == cfs.REPLACED
        finally:
            unmount(str(cfs.mnt))
    finally:
        subprocess.run(["umount", str(shm)], check=True)


# -- a secure repository (cfsctl) -----------------------------------------


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _replace(path: Path, data: bytes, *, verity: bool = True) -> None:
    """Put other content under an object's name (a new inode: the old one is immutable)."""
    path.unlink()
    _write(path, data)
    if verity:
        _enable(path, "sha512")


class RepoFixture:
    """A secure (sha512) repository on the verity scratch filesystem with one
    committed image over a few objects. Built with the library: `cfsctl` is
    run only where the test is about it (a process start costs seconds in
    the VM)."""

    FILES: dict[bytes, bytes] = {
        b"hello": b"hello from a secure repository\n" * 100,
        b"victim": b"this object will be replaced\n" * 10,
        b"unverified": b"this object will lose its fs-verity\n",
        b"big": random.Random(7).randbytes(300_000),
    }
    INLINE = b"small"

    def __init__(self, base: Path) -> None:
        from composefs.repository import Repository
        from composefs.tree import Directory, Leaf, Regular, Stat

        self.base = base
        self.path = base / "repo"
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        repo, created = Repository.init(self.path)
        assert created
        with repo:
            assert not repo.insecure
            assert repo.algorithm == "sha512"
            root = Directory(Stat(0o755))
            self.ids: dict[bytes, str] = {}
            for name, data in self.FILES.items():
                self.ids[name] = repo.ensure_object(data)
                root.entries[name] = Leaf(Stat(0o644), Regular(len(data), digest=self.ids[name]))
            root.entries[b"inline"] = Leaf(Stat(0o600), Regular(len(self.INLINE), data=self.INLINE))
            self.image_id = repo.commit_image(root)
            self.image_object = Path(repo.objects_dir) / repo.object_relpath(self.image_id)

    def object_path(self, object_id: str) -> Path:
        return self.path / "objects" / object_id[:2] / object_id[2:]

    def cfsctl(self, *args: str, repo: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*_cli("cfsctl", "composefs.cli.cfsctl"), "--repo", str(repo or self.path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    def cfsctl_mount(self, name: str) -> subprocess.CompletedProcess[str]:
        if not _has_module("composefs.cli.cfsctl"):
            pytest.skip("composefs.cli.cfsctl not there yet")
        return self.cfsctl("mount", name, str(self.mnt))

    def mount(self, name: str) -> None:
        """Repository.mount, what `cfsctl mount` does, without a new process."""
        from composefs.repository import Repository

        with Repository.open(self.path) as repo:
            repo.mount(name, str(self.mnt))

    def unmount(self) -> None:
        while os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=True)


def _assert_refused(res: subprocess.CompletedProcess[str]) -> None:
    """A clean refusal: non-zero exit and one `cfsctl: ...` line."""
    assert res.returncode != 0, f"cfsctl mount succeeded: {res.stdout}"
    assert res.stderr.startswith("cfsctl: ") and res.stderr.count("\n") == 1, res.stderr


@pytest.fixture
def repo(verity_dir: Path) -> Iterator[RepoFixture]:
    for module in ("composefs.repository", "composefs.mount", "composefs.erofs.writer"):
        if not _has_module(module):
            pytest.skip(f"{module} not there yet")
    fx = RepoFixture(verity_dir)
    try:
        yield fx
    finally:
        fx.unmount()


def _objects(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "objects").glob("??/*") if p.is_file())


def test_cfsctl_init_create_image_mount(verity_dir: Path) -> None:
    """The user's path: cfsctl init, create-image from a directory, mount by digest."""
    if not _has_module("composefs.cli.cfsctl"):
        pytest.skip("composefs.cli.cfsctl not there yet")
    src = verity_dir / "src"
    files = {
        "usr/bin/tool": random.Random(1).randbytes(70_000),
        "usr/share/doc/readme": b"read me\n" * 50,
        "etc/small": b"tiny",  # inline in the image, no object
        "usr/lib/same": b"read me\n" * 50,  # same content: one object
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        _write(src / rel, data)
    path = verity_dir / "repo"
    mnt = verity_dir / "mnt"
    mnt.mkdir()

    def cfsctl(*args: str) -> str:
        res = subprocess.run([*_cli("cfsctl", "composefs.cli.cfsctl"), "--repo", str(path),
                              *args], capture_output=True, text=True, check=False)
        assert res.returncode == 0, (args, res.stderr)
        return res.stdout

    cfsctl("init")
    assert _measure(path / "meta.json")[0] in ("sha256", "sha512")
    image_id = cfsctl("create-image", str(src)).strip().split(":")[-1]
    objects = _objects(path)
    names = {p.parent.name + p.name for p in objects}
    assert names == {
        image_id, *(fsverity.digest_hex(d, "sha512") for d in files.values() if len(d) > 64)}
    for p in objects:
        assert _measure(p) == ("sha512", bytes.fromhex(p.parent.name + p.name)), p
    cfsctl("mount", image_id, str(mnt))
    try:
        for rel, data in files.items():
            assert (mnt / rel).read_bytes() == data, rel
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_secure_repository_everything_has_verity(repo: RepoFixture) -> None:
    from composefs.repository import Repository

    assert _measure(repo.path / "meta.json")[0] in ("sha256", "sha512")
    objects = _objects(repo.path)
    names = {p.parent.name + p.name for p in objects}
    assert names == {*repo.ids.values(), repo.image_id}
    for p in objects:
        assert _measure(p) == ("sha512", bytes.fromhex(p.parent.name + p.name)), p
    with Repository.open(repo.path, require_verity=True) as r:
        fd, verity = r.open_image(repo.image_id)
        os.close(fd)
        assert verity


def test_replaced_objects_give_eio(repo: RepoFixture) -> None:
    _replace(repo.object_path(repo.ids[b"victim"]), b"evil content\n")
    # Right content, but no fs-verity: overlayfs cannot check it, so refuses it.
    _replace(repo.object_path(repo.ids[b"unverified"]), repo.FILES[b"unverified"], verity=False)
    repo.mount(repo.image_id)
    assert _read_errno(repo.mnt / "victim") == errno.EIO
    assert _read_errno(repo.mnt / "unverified") == errno.EIO
    assert (repo.mnt / "hello").read_bytes() == repo.FILES[b"hello"]


def test_wrong_image_digest_refused(repo: RepoFixture) -> None:
    from composefs.errors import NotFoundError

    # An images/ entry whose name is not the digest of what it points to.
    fake = fsverity.digest_hex(b"some other image", "sha512")
    images = repo.path / "images"
    os.symlink(os.readlink(images / repo.image_id), images / fake)
    _assert_refused(repo.cfsctl_mount(fake))
    assert not os.path.ismount(repo.mnt)
    with pytest.raises(NotFoundError):
        repo.mount(fsverity.digest_hex(b"not in the repository", "sha512"))
    assert not os.path.ismount(repo.mnt)


def test_tampered_image_refused_by_ref_too(repo: RepoFixture) -> None:
    """In a secure repository a ref (refs/NAME, or a bare NAME) is no way
    around the image's digest check."""
    from composefs.errors import RepositoryError
    from composefs.repository import Repository

    with Repository.open(repo.path) as r:
        r.symlink("images/refs/named", f"images/{repo.image_id}")
    original = repo.image_object.read_bytes()
    _replace(repo.image_object, original, verity=False)
    for name in ("refs/named", "named"):
        with pytest.raises(RepositoryError, match="fs-verity"):
            repo.mount(name)
        assert not os.path.ismount(repo.mnt)
    _replace(repo.image_object, original)
    repo.mount("named")
    try:
        assert os.path.ismount(repo.mnt)
    finally:
        subprocess.run(["umount", str(repo.mnt)], check=True)


def test_tampered_image_refused(repo: RepoFixture) -> None:
    from composefs.errors import RepositoryError

    original = repo.image_object.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF  # any change at all must be caught
    _replace(repo.image_object, bytes(data))
    _assert_refused(repo.cfsctl_mount(repo.image_id))
    assert not os.path.ismount(repo.mnt)
    # The right bytes without fs-verity are refused too: nothing vouches for them.
    _replace(repo.image_object, original, verity=False)
    with pytest.raises(RepositoryError, match="fs-verity"):
        repo.mount(repo.image_id)
    assert not os.path.ismount(repo.mnt)
