"""Tests that need a kernel with fs-verity: run inside the QEMU VM (`make test-vm`).

The kernel is the oracle here: what FS_IOC_MEASURE_VERITY reports must equal
what our userspace code computes, and the kernel must refuse what composefs
promises it refuses.  Python in the VM is ~15x slower: keep this set lean.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.errors import VerityError, VerityNotEnabled

pytestmark = pytest.mark.vm

# Sizes around the fs-verity tree's edges: empty, one block, a block and a
# byte, a full first level (4096/32 sha256 or 4096/64 sha512 hashes per
# block), and a three-level tree for sha512.
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
