"""Hostile layers and the repository: nothing after the end-of-archive marker
beyond record padding is stored, long inline runs spool compressed inside
the repository (never $TMPDIR)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

import hostilelib as H
from composefs.errors import TarFormatError
from composefs.oci import tar as T
from composefs.repository import Repository
from testlib import needs_root


def _zeros_gz(tar: bytes, zeros: int) -> bytes:
    """gzip of `tar` followed by `zeros` zero bytes, streamed (tiny result)."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [co.compress(tar)]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(co.compress(block))
    out.append(co.flush())
    return b"".join(out)


@pytest.mark.parametrize("extra", [0, 512, 10240, T.TRAILER_MAX - 10240])
def test_record_padding_is_kept(extra: int) -> None:
    data = H.tar_bytes([H.reg("f", b"x" * 100)]) + bytes(extra)
    sink = _Collect()
    T.split_tar(io.BytesIO(data), sink)
    assert b"".join(sink.parts) == data  # byte for byte, so the diff_id holds


@pytest.mark.parametrize("extra", [T.TRAILER_MAX + 1, 64 << 20])
def test_data_after_the_end_is_refused(extra: int) -> None:
    data = H.tar_bytes([H.reg("f", b"x" * 100)])
    sink = _Collect()
    with pytest.raises(TarFormatError, match="after the end-of-archive marker"):
        T.split_tar(gzip.GzipFile(fileobj=io.BytesIO(_zeros_gz(data, extra))), sink)
    assert sum(len(p) for p in sink.parts) <= len(data) + T.TRAILER_MAX + (1 << 20)


def test_zero_bomb_layer_import_stores_nothing(repo: Repository) -> None:
    from composefs.errors import ComposefsError
    from composefs.oci import pull

    tar = H.tar_bytes([H.reg("f", b"x" * 100)])
    bomb = _zeros_gz(tar, 256 << 20)  # ~250 KB of gzip, 256 MiB after the tar
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    with pytest.raises(ComposefsError, match="after the end-of-archive marker"):
        pull.import_layer(repo, diff_id, io.BytesIO(bomb), compression="gzip")
    assert repo.has_stream(pull.layer_stream(diff_id)) is None


class _Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def inline(self, data: bytes | bytearray | memoryview) -> None:
        self.parts.append(bytes(data))

    def entry(self, entry: T.TarEntry) -> None:
        pass

    def external(self, entry: T.TarEntry, content: T.ContentReader) -> None:
        self.parts.append(content.read(-1))


@needs_root
def test_long_inline_runs_do_not_use_tmpdir(tmp_path: Path) -> None:
    """40k small entries (~40 MB of inline tar) with $TMPDIR a 256 KiB
    tmpfs: the spools live (compressed) in the repository."""
    small = tmp_path / "tmp"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        members = []
        for i in range(40000):
            info = tarfile.TarInfo(f"d/f{i:06d}")
            info.size = 40
            members.append((info, b"%040d" % i))
        layer = H.tar_bytes(members, tarfile.GNU_FORMAT)
        (tmp_path / "layer.tar").write_bytes(layer)
        repo = tmp_path / "repo"
        Repository.init(repo, insecure=True)[0].close()
        diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
        cfsctl = str(Path(sys.executable).parent / "cfsctl")
        with open(tmp_path / "layer.tar", "rb") as f:
            r = subprocess.run(
                [cfsctl, "--repo", str(repo), "oci", "import-layer", diff_id],
                stdin=f,
                capture_output=True,
                text=True,
                env={**os.environ, "TMPDIR": str(small)},
            )
        assert r.returncode == 0, r.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _layer(files: dict[str, bytes]) -> bytes:
    return H.tar_bytes([H.reg(name, data) for name, data in files.items()])


def test_failed_layer_import_removes_its_objects(repo: Repository) -> None:
    """Wrong diff_id: the objects the import stored go again; an object a
    stored layer shares stays."""
    from composefs import fsverity
    from composefs.errors import DigestMismatch
    from composefs.oci import pull

    x, y = b"X" * 5000, b"Y" * (8 << 20)
    good = _layer({"x": x})
    pull.import_layer(repo, "sha256:" + hashlib.sha256(good).hexdigest(), io.BytesIO(good))
    bomb = gzip.compress(_layer({"x": x, "y": y}))  # 8 MiB of Y in ~10 KB
    with pytest.raises(DigestMismatch):
        pull.import_layer(repo, "sha256:" + "0" * 64, io.BytesIO(bomb), compression="gzip")
    assert repo.has_object(fsverity.digest_hex(x, repo.algorithm))
    assert not repo.has_object(fsverity.digest_hex(y, repo.algorithm))
    assert repo.fsck().ok


def test_failed_import_leaves_objects_to_gc_when_repository_busy(tmp_path: Path) -> None:
    from composefs import fsverity
    from composefs.errors import DigestMismatch
    from composefs.oci import pull

    r, _ = Repository.init(tmp_path / "r", insecure=True)
    other = Repository.open(tmp_path / "r")  # another user: shared lock held
    y = b"Y" * 100000
    with pytest.raises(DigestMismatch):
        pull.import_layer(r, "sha256:" + "0" * 64, io.BytesIO(_layer({"y": y})))
    assert r.has_object(fsverity.digest_hex(y, r.algorithm))
    other.close()
    assert r.gc().objects_removed == 1


def test_busy_discard_keeps_the_shared_lock(tmp_path: Path) -> None:
    """flock(2) drops the shared lock when a non-blocking upgrade fails: the
    repository must hold it again afterwards (a gc elsewhere must wait)."""
    import fcntl

    r, _ = Repository.init(tmp_path / "r", insecure=True)
    other = Repository.open(tmp_path / "r")
    oid = r.ensure_object(b"Z" * 1000)
    assert r.discard_unreferenced([oid]) == 0  # busy: nothing removed
    other.close()
    fd = os.open(tmp_path / "r", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # r still holds LOCK_SH
    finally:
        os.close(fd)
    r.close()
