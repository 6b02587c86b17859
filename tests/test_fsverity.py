"""fs-verity digests against known answers and Debian's `fsverity digest`.

The kernel ioctls can only be checked for their "not supported" reporting
here (this kernel has no fs-verity); tests/vm exercises them for real.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.errors import VerityError, VerityNotEnabled, VerityNotSupported
from testlib import need_tool

# From the vectors README (composefs-rs tests).
KATS = [
    (b"hello world", "sha256", "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"),
    (
        b"hello world",
        "sha512",
        "18430270729d162d4e469daca123ae61893db4b0583d8f7081e3bf4f92b88ba5"
        "14e7982f10733fb6aa895195c5ae8fd2eb2c47a8be05513ce5a0c51a6f570409",
    ),
    (bytes(4095), "sha256", "5372beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719"),
    (bytes(4096), "sha256", "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e"),
    (bytes(4097), "sha256", "093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743"),
]

B = 4096
# Tree-shape edges: empty, one block, one block and a byte, exactly one full
# hash block at level 1 (128 sha256 / 64 sha512 hashes), one more, and the
# sizes the brief asks for.  Level counts: 129 blocks -> 2 levels for sha256;
# 64*64+1 blocks -> 3 levels for sha512.
SIZES = [
    0,
    1,
    4095,
    4096,
    4097,
    8192,
    64 * B,
    64 * B + 1,
    128 * B,
    128 * B + 1,
    129 * B,
    (1 << 20) + 3,
]
SHA512_3_LEVELS = 64 * 64 * B + 1
# 128*128 blocks + 1 gives a 3-level sha256 tree: 64 MiB, written sparse.
SHA256_3_LEVELS = 128 * 128 * B + 5


def _oracle(path: Path, algorithm: str) -> str:
    tool = need_tool("fsverity")
    out = subprocess.run(
        [tool, "digest", f"--hash-alg={algorithm}", "--compact", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip()


def _write_random(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed * 1_000_003 + size).randbytes(size)
    path.write_bytes(data)
    return data


def _write_sparse(path: Path, size: int) -> None:
    """A mostly-sparse file with random islands, including the last byte."""
    rng = random.Random(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, 5 * B + 17, size // 3, size // 2 + 1, size - 9000, size - 1):
            f.seek(off)
            f.write(rng.randbytes(min(9000, size - off)))


@pytest.mark.parametrize(("data", "algorithm", "expected"), KATS)
def test_known_answers(data: bytes, algorithm: str, expected: str) -> None:
    assert fsverity.digest_hex(data, algorithm) == expected
    h = fsverity.FsVerityHasher(algorithm)
    for i in range(0, len(data), 1000):
        h.update(data[i : i + 1000])
    assert h.hexdigest() == expected
    assert h.digest() == bytes.fromhex(expected)


def test_empty_and_single_block_roots() -> None:
    for alg, size in (("sha256", 32), ("sha512", 64)):
        h = fsverity.FsVerityHasher(alg)
        assert h.root_hash() == bytes(size)
        assert h.digest() == fsverity.digest(b"", alg)
        # Single block: root = H(block zero-padded), not H(H(...)).
        h.update(b"abc")
        assert h.root_hash() == hashlib.new(alg, b"abc" + bytes(B - 3)).digest()


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_against_fsverity_tool(tmp_path: Path, algorithm: str) -> None:
    rng = random.Random(7)
    for size in SIZES:
        path = tmp_path / f"f{size}"
        data = _write_random(path, size)
        expected = _oracle(path, algorithm)
        assert fsverity.digest_file(path, algorithm).hex() == expected, size
        assert fsverity.digest(data, algorithm).hex() == expected, size
        # Streaming in odd pieces gives the same answer.
        h = fsverity.FsVerityHasher(algorithm)
        pos = 0
        while pos < size:
            n = rng.choice((1, 7, 4095, 4096, 4097, 70_000))
            h.update(memoryview(data)[pos : pos + n])
            pos += n
        assert h.hexdigest() == expected, size
        assert h.size == size


def test_three_level_trees(tmp_path: Path) -> None:
    p512 = tmp_path / "three512"
    _write_random(p512, SHA512_3_LEVELS)
    assert fsverity.digest_file(p512, "sha512", threads=1).hex() == _oracle(p512, "sha512")
    p256 = tmp_path / "three256"
    _write_sparse(p256, SHA256_3_LEVELS)
    expected = _oracle(p256, "sha256")
    # In-process and with helper processes (the file is over the threshold).
    assert fsverity.digest_file(p256, "sha256", threads=1).hex() == expected
    assert fsverity.digest_file(p256, "sha256", threads=2).hex() == expected
    assert fsverity.digest_files([p256, p512], "sha256", threads=2)[0].hex() == expected


def test_fd_input_keeps_offset_and_pipes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = _write_random(path, 3 * B + 11)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        assert fsverity.digest_file(fd) == fsverity.digest(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 100
        assert fsverity.digest_fd(fd, "sha512") == fsverity.digest(data, "sha512")
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.write(w, data[:5000])
    os.close(w)
    try:
        assert fsverity.digest_file(r) == fsverity.digest(data[:5000])
    finally:
        os.close(r)


def test_digest_sized(tmp_path: Path) -> None:
    # The tree reader's entry: the size it just fstat'ed, and a small
    # file's content back (read once, written to the store as read).
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(os.urandom(10_000))
    big.write_bytes(os.urandom(fsverity._CHUNK + 1))
    for path, whole in ((small, True), (big, False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            raw, data = fsverity.digest_sized(fd, size, "sha512")
            assert raw == fsverity.digest_fd(fd, "sha512")
            assert data == (path.read_bytes() if whole else None)
            # A file that changed size since: hashed as it is now, and the
            # content (if any) shows the change to the caller.
            with open(path, "ab") as f:
                f.write(b"more")
            raw, data = fsverity.digest_sized(fd, size, "sha512")
            assert data is None or len(data) != size
            if data is None:
                assert os.fstat(fd).st_size != size
        finally:
            os.close(fd)
    fd = os.open(small, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.truncate(small, 100)
        raw, data = fsverity.digest_sized(fd, size, "sha256")
        assert data == small.read_bytes() and raw == fsverity.digest(data, "sha256")
    finally:
        os.close(fd)


def test_digest_files_parallel(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate((0, 65, 5 * B, 100_000, 3 * B + 1, 1)):
        p = tmp_path / f"f{i}"
        _write_random(p, size, seed=i)
        paths.append(p)
    expected = [fsverity.digest(p.read_bytes(), "sha512") for p in paths]
    assert fsverity.digest_files(paths, "sha512", threads=3) == expected
    assert fsverity.digest_files(paths, "sha512", threads=1) == expected
    assert fsverity.digest_files([], "sha256") == []
    with pytest.raises(FileNotFoundError):
        fsverity.digest_files([*paths, tmp_path / "missing"], threads=2)


def test_helper_processes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = _write_random(path, 10 * B + 5)
    fd = os.open(path, os.O_RDONLY)
    try:
        for alg in ("sha256", "sha512"):
            got = fsverity._digest_with_helpers(fd, len(data), alg, 2, True)
            assert got == fsverity.digest(data, alg)
        # Helpers are kept for later calls.
        assert fsverity._helpers.idle
        # Claiming more data than there is: the helper reports the short read.
        with pytest.raises(OSError) as exc:
            fsverity._digest_with_helpers(fd, 9 << 20, "sha256", 2, True)
        assert exc.value.errno == errno.EIO
        # A helper killed behind our back is noticed; the digest is still right.
        for h in list(fsverity._helpers.idle):
            h.proc.kill()
        assert fsverity.digest_fd(fd, "sha256", helper_processes=2) == fsverity.digest(data)
        # digest_fd with helpers on a 1 MiB+ file goes through them.
        big = tmp_path / "big"
        bdata = _write_random(big, (3 << 20) + 7)
        bfd = os.open(big, os.O_RDONLY)
        try:
            assert fsverity.digest_fd(bfd, "sha512", helper_processes=2) == fsverity.digest(
                bdata, "sha512"
            )
        finally:
            os.close(bfd)
    finally:
        os.close(fd)


def test_bad_algorithm() -> None:
    with pytest.raises(ValueError, match="sha1"):
        fsverity.digest(b"", "sha1")
    with pytest.raises(ValueError):
        fsverity.FsVerityHasher("md5")


def test_descriptor_layout() -> None:
    d = fsverity.descriptor("sha512", b"\x01" * 64, 0x0102030405)
    assert len(d) == 256
    assert d[:8] == bytes([1, 2, 12, 0, 0, 0, 0, 0])
    assert d[8:16] == (0x0102030405).to_bytes(8, "little")
    assert d[16:80] == b"\x01" * 64
    assert d[80:] == bytes(176)
    assert fsverity.FS_IOC_ENABLE_VERITY == 0x40806685
    assert fsverity.FS_IOC_MEASURE_VERITY == 0xC0046686


def _kernel_has_verity(fd: int) -> bool:
    try:
        fsverity.measure_verity(fd)
    except VerityNotSupported:
        return False
    except VerityNotEnabled:
        return True
    return True


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_ioctls_report_unsupported_cleanly(tmp_path: Path, where: str) -> None:
    base = tmp_path if where == "tmp" else Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no /dev/shm")
    path = base / f"cfs-verity-probe-{os.getpid()}"
    path.write_bytes(b"x" * 5000)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _kernel_has_verity(fd):
            pytest.skip("this filesystem supports fs-verity (tests/vm covers it)")
        with pytest.raises(VerityNotSupported, match="not supported"):
            fsverity.enable_verity(fd, "sha256")
        with pytest.raises(VerityNotSupported):
            fsverity.enable_verity(fd, "sha512")
        with pytest.raises(VerityNotSupported):
            fsverity.measure_verity(fd)
        # The fallback computes in userspace.
        assert fsverity.measure_or_compute(fd, "sha256") == fsverity.digest(b"x" * 5000)
        assert fsverity.measure_or_compute(fd, "sha512") == fsverity.digest(b"x" * 5000, "sha512")
    finally:
        os.close(fd)
        path.unlink()


def test_ioctl_errors_are_verity_errors(tmp_path: Path) -> None:
    # A write-only descriptor or a directory: the kernel refuses; whatever it
    # says must come out as a VerityError, never a raw OSError.
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(VerityError):
            fsverity.enable_verity(d)
        with pytest.raises(VerityError):
            fsverity.measure_verity(d)
    finally:
        os.close(d)
    r, w = os.pipe()
    try:
        with pytest.raises(VerityError):
            fsverity.measure_verity(r)
    finally:
        os.close(r)
        os.close(w)


def test_measure_or_compute_empty_file(tmp_path: Path) -> None:
    # C composefs-info measure-file gets this wrong; the kernel's answer has an all-zero root.
    path = tmp_path / "empty"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fsverity.measure_or_compute(fd, "sha256")
    finally:
        os.close(fd)
    assert got.hex() == _oracle(path, "sha256")


def test_helper_that_is_not_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An embedding program as sys.executable: it never answers; after the
    # start timeout the file is hashed in-process instead of hanging.
    fake = tmp_path / "not-python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    path = tmp_path / "f"
    data = _write_random(path, (2 << 20) + 1)
    fsverity._helpers.shutdown()
    monkeypatch.setattr(fsverity.sys, "executable", str(fake))
    monkeypatch.setattr(fsverity, "_HELPER_START_TIMEOUT", 0.5)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsverity.digest_fd(fd, "sha256", helper_processes=2) == fsverity.digest(data)
    finally:
        os.close(fd)
    assert not fsverity._helpers.idle


@pytest.mark.timeout(120)
def test_helper_scheduling_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks make many rounds of the out-of-order collection loop (a
    # scheduling slip there hangs rather than fails: hence the timeout).
    path = tmp_path / "f"
    data = _write_random(path, (3 << 20) + 4097)
    fd = os.open(path, os.O_RDONLY)
    try:
        for chunk in (B, 16 * B, 64 * B):
            monkeypatch.setattr(fsverity, "_HELPER_CHUNK", chunk)
            for nhelpers in (1, 2, 3):
                for alg in ("sha256", "sha512"):
                    got = fsverity._digest_with_helpers(fd, len(data), alg, nhelpers, True)
                    assert got == fsverity.digest(data, alg), (chunk, nhelpers, alg)
    finally:
        os.close(fd)
