"""`repository.objects`: object writes (O_TMPFILE and fallback), copy paths, sinks, symlinks.

See repotestlib for the shared helpers.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from repotestlib import (
    RUST_META_V2,
    bare_store,
    objpath,
    stray_files,
)

from composefs import fsverity
from composefs.errors import NotFoundError, RepositoryError
from composefs.repository import (
    Repository,
    StoreMethod,
)
from composefs.splitstream import CONTENT_OCI_LAYER
from testlib import need_checkout_for_nobody, need_tool, needs_root


def test_objects(repo: Repository, tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)
    oid = repo.ensure_object(data)
    assert oid == fsverity.digest_hex(data, "sha512")
    path = Path(repo.path) / "objects" / oid[:2] / oid[2:]
    assert path.read_bytes() == data
    oracle = need_tool("fsverity")
    out = subprocess.run(
        [oracle, "digest", "--hash-alg=sha512", str(path)], capture_output=True, text=True
    )
    assert out.stdout.split()[0] == f"sha512:{oid}"
    assert repo.ensure_object(data) == oid
    assert repo.ensure_object_from_stream(io.BytesIO(data)) == oid
    assert repo.ensure_object(io.BytesIO(data)) == oid
    src = tmp_path / "src"
    src.write_bytes(data)
    assert repo.ensure_object_from_file(src) == (oid, StoreMethod.ALREADY_PRESENT)
    other = tmp_path / "other"
    other.write_bytes(data + b"!")
    oid2, method = repo.ensure_object_from_file(other)
    assert method in (StoreMethod.COPIED, StoreMethod.REFLINKED)
    assert repo.read_object(oid2) == data + b"!"
    assert repo.store_file_with_digest(str(src), oid) is False
    empty = repo.ensure_object(b"")
    assert empty == "00" * 64 or len(empty) == 128
    with pytest.raises(NotFoundError):
        repo.open_object("ab" * 64)
    with pytest.raises(RepositoryError, match="invalid sha512 object id"):
        repo.open_object("../../etc/passwd")
    assert stray_files(repo) == []


@needs_root
def test_copy_across_filesystems_falls_back(repo: Repository, tmp_path: Path) -> None:
    """A source on another filesystem (a tmpfs): FICLONE and copy_file_range
    fail with EXDEV, the content is copied by read/write instead."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        big = os.urandom(2 * 1024 * 1024 + 4097)  # more than one copy block
        small = os.urandom(5000)
        (mnt / "big").write_bytes(big)
        (mnt / "small").write_bytes(small)
        probe = tmp_path / "probe"
        with open(mnt / "small", "rb") as src, open(probe, "wb") as dst:
            try:
                os.copy_file_range(src.fileno(), dst.fileno(), len(small))
            except OSError as e:
                assert e.errno == errno.EXDEV, e
            else:
                pytest.skip("this kernel copies across filesystems: no EXDEV to fall back from")
        probe.unlink()
        big_id = fsverity.digest_hex(big, "sha512")
        assert repo.store_file_with_digest(str(mnt / "big"), big_id) is True
        # The second file takes the remembered fallback directly.
        small_id = fsverity.digest_hex(small, "sha512")
        repo.object_sink()(str(mnt / "small"), len(small), small_id)
        assert objpath(repo, big_id).read_bytes() == big
        assert objpath(repo, small_id).read_bytes() == small
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    report = repo.fsck()
    assert report.ok, str(report)
    assert stray_files(repo) == []


def test_object_sink_write_only_descriptor(repo: Repository, tmp_path: Path) -> None:
    """A write-only ``/proc/self/fd/N`` cannot be read: the sink reopens it
    by path, and the caller's descriptor keeps its offset."""
    data = os.urandom(70_000)
    fd = os.open(tmp_path / "wo", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.lseek(fd, 1234, os.SEEK_SET)
        oid = fsverity.digest_hex(data, "sha512")
        repo.object_sink()(f"/proc/self/fd/{fd}", len(data), oid)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1234
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
    finally:
        os.close(fd)
    assert repo.read_object(oid) == data
    assert repo.fsck().ok
    assert stray_files(repo) == []


def test_concurrent_writers(repo: Repository) -> None:
    """Two processes storing the same objects, images and refs at once."""
    script = textwrap.dedent(
        f"""
        from composefs.erofs.writer import mkfs
        from composefs.repository import Repository
        from composefs.tree import Directory, Leaf, Regular, Stat
        r = Repository.open({repo.path!r})
        for i in range(150):
            data = (b"shared object %d " % i) * 50
            oid = r.ensure_object(data)
            if i % 10 == 0:
                root = Directory()
                root.insert(b"/f", Leaf(Stat(0o644), Regular(len(data), digest=oid)))
                r.write_image(mkfs(root), "same/ref")
        w = r.create_stream(0)
        w.write_external(b"z" * 5000)
        r.write_stream(w, "shared-stream", "shared")
        print("done")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == b"done"
    result = repo.fsck()
    assert result.ok, str(result)
    assert result.objects_checked == 150 + 15 + 2
    assert result.images_checked == 15
    assert stray_files(repo) == []


def test_symlink_layout(repo: Repository) -> None:
    oid = repo.write_image(b"x" * 100, "some/deep/name")
    root = Path(repo.path)
    assert os.readlink(root / "images" / oid) == f"../objects/{oid[:2]}/{oid[2:]}"
    assert os.readlink(root / "images/refs/some/deep/name") == f"../../../{oid}"
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"abc")
    sid = repo.write_stream(w, "oci-layer-sha256:1234", "tag/one")
    assert os.readlink(root / "streams/oci-layer-sha256:1234") == f"../objects/{sid[:2]}/{sid[2:]}"
    assert os.readlink(root / "streams/refs/tag/one") == "../../oci-layer-sha256:1234"
    # Replacing a ref is atomic and leaves no temporaries.
    oid2 = repo.write_image(b"y" * 100, "some/deep/name")
    assert os.readlink(root / "images/refs/some/deep/name") == f"../../../{oid2}"
    for bad in ("../escape", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(RepositoryError):
            repo.write_image(b"z" * 100, bad)
    with pytest.raises(RepositoryError):
        repo.write_stream(repo.create_stream(), "has/slash")
    assert stray_files(repo) == []


def test_without_o_tmpfile(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filesystems without O_TMPFILE: named temporaries in the repository
    root, removed after use; leftovers of killed writers go with gc."""
    real_open = os.open

    def no_tmpfile(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_tmpfile)
    other, created = Repository.init(Path(repo.path).parent / "other", insecure=True)
    assert created and (Path(other.path) / "meta.json").read_bytes() == RUST_META_V2
    assert stray_files(other) == []
    other.close()
    oid = repo.ensure_object(b"fallback" * 100)
    assert repo.read_object(oid) == b"fallback" * 100
    w = repo.create_stream(0)
    w.write_external(b"more" * 100)
    repo.write_stream(w, "s", "r")
    assert stray_files(repo) == []
    monkeypatch.undo()
    (Path(repo.path) / ".tmp-leftover").write_bytes(b"half")
    assert repo.fsck().ok
    repo.gc()
    assert stray_files(repo) == []


def test_object_store_alone(tmp_path: Path) -> None:
    """The store needs no facade: an fd on a directory is enough."""
    store = bare_store(tmp_path / "store")
    data = b"hello objects" * 1000
    oid = store.ensure_object(data)
    assert oid == fsverity.digest_hex(data, "sha256")
    assert store.has_object(oid) and store.read_object(oid) == data
    assert (tmp_path / "store" / "objects" / oid[:2] / oid[2:]).read_bytes() == data
    assert store.ensure_object(io.BytesIO(data)) == oid
    store.symlink("images/x", f"objects/{store.object_relpath(oid)}")
    assert os.readlink(tmp_path / "store" / "images" / "x") == f"../objects/{oid[:2]}/{oid[2:]}"
    assert store.readlink_id("images/x") == oid
    with pytest.raises(RepositoryError, match="invalid"):
        store.object_relpath("zz")
    store.close()
    assert store.dirfd == -1


def test_object_sink_with_content(repo: Repository, tmp_path: Path) -> None:
    """The tree reader hands over the bytes it hashed: the object holds
    them."""
    sink = repo.object_sink()
    assert getattr(sink, "accepts_content", False)
    hashed = os.urandom(9000)
    src = tmp_path / "f"
    src.write_bytes(hashed)
    oid = fsverity.digest_hex(hashed, "sha512")
    sink(str(src), len(hashed), oid, hashed)
    assert repo.read_object(oid) == hashed
    assert repo.fsck().ok
    # Without content (a streamed big file) the file itself is copied.
    other = os.urandom(5000)
    src.write_bytes(other)
    oid2 = fsverity.digest_hex(other, "sha512")
    sink(str(src), len(other), oid2, None)
    assert repo.read_object(oid2) == other
    assert stray_files(repo) == []


def _same_prefix_data(prefix: str, algorithm: str = "sha512") -> tuple[bytes, str]:
    """Some content whose object id starts with `prefix`."""
    i = 0
    while True:
        data = b"other writer %d\n" % i * 40
        oid = fsverity.digest_hex(data, algorithm)
        if oid.startswith(prefix):
            return data, oid
        i += 1


def test_object_another_writer_linked_meanwhile_is_already_present(repo: Repository) -> None:
    """A store skips the existence check in an `XX/` directory it created
    itself; an object a second writer put there meanwhile is still found
    (linkat's EEXIST) and left as it is."""
    oid_a, new = repo.objects.store_bytes_counted(b"first\n" * 100, check_writable=False)
    assert new
    other = Repository.open(repo.path)
    data, oid = _same_prefix_data(oid_a[:2])
    assert repo.objects._surely_absent(oid)  # the shortcut applies...
    assert other.objects.store_bytes_counted(data, check_writable=False) == (oid, True)
    # ...and does not fool us: the object is reported present, not new.
    assert repo.objects.store_bytes_counted(data, check_writable=False) == (oid, False)
    assert Path(objpath(repo, oid)).read_bytes() == data
    # Our own links are remembered: storing again is a plain "present".
    assert not repo.objects._surely_absent(oid_a)
    assert repo.objects.store_bytes_counted(b"first\n" * 100, check_writable=False)[1] is False
    assert stray_files(repo) == []
    other.close()


@needs_root
def test_unprivileged_writer_stores_objects(tmp_path: Path) -> None:
    """Without CAP_DAC_READ_SEARCH linkat(AT_EMPTY_PATH) is refused before
    Linux 6.10 (then the /proc/self/fd way is used, see the next test) and
    allowed after: either way a user's objects are stored."""
    need_tool("setpriv")
    need_checkout_for_nobody()
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="cfs-objects-user-"))
    try:
        os.chmod(top, 0o755)
        os.chown(top, nobody.pw_uid, nobody.pw_gid)
        code = textwrap.dedent("""
            import sys
            from composefs.repository import Repository
            repo = Repository.init(sys.argv[1], insecure=True)[0]
            for i in range(3):
                print(*repo.objects.store_bytes_counted(bytes([i]) * 5000, check_writable=False))
        """)
        src = Path(fsverity.__file__).resolve().parent.parent
        r = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
             sys.executable, "-c", code, str(top / "repo")],
            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")[:-1]
        assert len(lines) == 3
        for i, line in enumerate(lines):
            oid, new = line.split()
            assert new == "True"
            assert oid == fsverity.digest_hex(bytes([i]) * 5000, "sha512")
            assert (top / "repo" / "objects" / oid[:2] / oid[2:]).read_bytes() == bytes([i]) * 5000
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("refusal", [errno.ENOENT, errno.EPERM])
def test_link_falls_back_when_at_empty_path_is_refused(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    """Kernels before 6.10 answer ENOENT to linkat(AT_EMPTY_PATH) without
    CAP_DAC_READ_SEARCH: the link is made through /proc/self/fd instead,
    and that way is kept for the store's later objects."""
    from composefs.repository import objects as objects_mod

    calls = []

    def refused(fd: int, dirfd: int, name: str) -> None:
        calls.append(name)
        raise OSError(refusal, os.strerror(refusal), name)

    monkeypatch.setattr(objects_mod, "_linkat_empty_path", refused)
    datas = [bytes([i]) * 5000 for i in range(3)]
    for data in datas:
        oid, new = repo.objects.store_bytes_counted(data, check_writable=False)
        assert new and Path(objpath(repo, oid)).read_bytes() == data
    assert len(calls) == 1 and repo.objects._link_empty_path is False
    assert stray_files(repo) == []


@needs_root
def test_objects_linked_with_at_empty_path_as_root(repo: Repository) -> None:
    oid, new = repo.objects.store_bytes_counted(b"root\n" * 1000, check_writable=False)
    assert new and repo.objects._link_empty_path
    assert Path(objpath(repo, oid)).read_bytes() == b"root\n" * 1000


def test_object_sink_content_without_reflink(repo: Repository, tmp_path: Path) -> None:
    """Once FICLONE said the repository's filesystem cannot reflink, a
    sink given the content writes it without touching the source again
    (here: the source is gone by then, and its bytes still land)."""
    sink = repo.objects.object_sink()
    first = tmp_path / "first"
    first.write_bytes(b"first\n" * 1000)
    sink(str(first), first.stat().st_size, fsverity.digest_hex(first.read_bytes(), "sha512"),
         first.read_bytes())  # type: ignore[call-arg]  # fmt: skip
    if repo.objects._reflink_here:
        pytest.skip("this filesystem reflinks: the sink reflinks from the source")
    data = b"second\n" * 1000
    oid = fsverity.digest_hex(data, "sha512")
    sink(str(tmp_path / "no-such-file"), len(data), oid, data)  # type: ignore[call-arg]
    assert Path(objpath(repo, oid)).read_bytes() == data
    assert stray_files(repo) == []


def test_fresh_prefix_memory_is_bounded(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past _FRESH_IDS_MAX linked ids the store forgets them and looks
    every id up again (the shortcut is an optimisation, never the answer)."""
    from composefs.repository import objects as objects_mod

    monkeypatch.setattr(objects_mod, "_FRESH_IDS_MAX", 3)
    ids = [repo.objects.store_bytes_counted(b"%d\n" % i * 99, check_writable=False)[0]
           for i in range(5)]  # fmt: skip
    assert len(repo.objects._fresh_ids) <= 3
    for i, oid in enumerate(ids):
        assert repo.objects.store_bytes_counted(b"%d\n" % i * 99, check_writable=False) == (
            oid,
            False,
        )


class _SelfChecking(io.RawIOBase):
    """A stream that, like an HTTP body, checks its content against an id
    and raises instead of returning its last byte when they differ."""

    def __init__(self, data: bytes, ok: bool) -> None:
        self._data, self._ok, self._pos = data, ok, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        n = len(self._data) - self._pos if n < 0 else n
        chunk = self._data[self._pos : self._pos + min(n, 100_000)]
        self._pos += len(chunk)
        if self._pos == len(self._data) and chunk and not self._ok:
            raise ValueError("content does not match its id")
        return chunk


@pytest.mark.parametrize("size", [5000, (1 << 20) + 4097], ids=["small", "streamed"])
def test_store_from_stream_verified_id(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A stream that checks itself is not hashed again by the store (the
    fetch path hashed every object twice), and one that fails its check
    leaves nothing behind."""
    data = os.urandom(size)
    oid = fsverity.digest_hex(data, "sha512")

    def no_hashing(*args: object, **kwargs: object) -> None:
        raise AssertionError("hashed again")

    with monkeypatch.context() as m:
        m.setattr(fsverity, "digest_hex", no_hashing)
        m.setattr(fsverity, "FsVerityHasher", no_hashing)
        with pytest.raises(ValueError, match="does not match"):
            repo.objects.store_from_stream_counted(
                _SelfChecking(data, ok=False), size, verified_id=oid
            )
        assert not repo.has_object(oid)
        assert stray_files(repo) == []
        got = repo.objects.store_from_stream_counted(
            _SelfChecking(data, ok=True), size, verified_id=oid
        )
        assert got == (oid, size, True)
        # Already there: no second object, nothing hashed either.
        again = repo.ensure_object_from_stream(_SelfChecking(data, ok=True), size, verified_id=oid)
        assert again == oid
    assert Path(objpath(repo, oid)).read_bytes() == data
    # A stream longer than said would never have reached its check.
    other = os.urandom(size)
    other_id = fsverity.digest_hex(other, "sha512")
    with pytest.raises(RepositoryError, match="longer than"):
        repo.objects.store_from_stream_counted(
            _SelfChecking(other + b"x", ok=True), size, verified_id=other_id
        )
    assert not repo.has_object(other_id)
    with pytest.raises(RepositoryError, match="invalid"):
        repo.ensure_object_from_stream(io.BytesIO(data), size, verified_id="zz" + oid[2:])
    # Without a verified id the store hashes, as before.
    assert repo.ensure_object_from_stream(io.BytesIO(data), size) == oid


def test_open_object_reads_in_blocking_mode(repo: Repository) -> None:
    # Objects are opened O_NONBLOCK (a FIFO in their place must not block
    # the open) but read as before, in blocking mode.
    oid = repo.ensure_object(b"x" * 5000)
    fd = repo.open_object(oid)
    try:
        assert os.get_blocking(fd)
        assert os.pread(fd, 10, 0) == b"x" * 10
    finally:
        os.close(fd)
