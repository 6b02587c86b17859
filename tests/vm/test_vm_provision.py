"""`cfsctl enable-verity` (composefs.boot.provision) on a real fs-verity
filesystem, in the VM: an insecure repository copied onto ext4 -O verity
becomes secure, and an object that does not match its name stops it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.boot.provision import enable_repository_verity
from composefs.errors import RepositoryError
from composefs.repository import Repository

pytestmark = pytest.mark.vm


@pytest.fixture
def scratch() -> Path:
    base = os.environ.get("COMPOSEFS_VERITY_SCRATCH")
    if not base:
        pytest.skip("COMPOSEFS_VERITY_SCRATCH is unset: needs kernel fs-verity, run `make test-vm`")
    return Path(tempfile.mkdtemp(prefix="prov-", dir=base))


def _insecure_repo(path: Path) -> list[str]:
    """A repository made where fs-verity is impossible (tmpfs), then copied
    onto the verity filesystem: what mke2fs -d gives a disk image."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        repo, _ = Repository.init(Path(tmp) / "repo", insecure=True)
        with repo:
            ids = [repo.ensure_object(bytes([i]) * (5000 + i)) for i in range(3)]
        shutil.copytree(Path(tmp) / "repo", path, symlinks=True)
    return ids


def _measured(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fsverity.measure_verity(fd)[1].hex()
    finally:
        os.close(fd)


def test_enable_verity_makes_the_repository_secure(scratch: Path) -> None:
    ids = _insecure_repo(scratch / "repo")
    res = subprocess.run([sys.executable, "-m", "composefs.cli.cfsctl", "--repo",
                          str(scratch / "repo"), "enable-verity"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "3 objects (3 enabled now)" in res.stdout
    for object_id in ids:
        assert _measured(scratch / "repo" / "objects" / object_id[:2] / object_id[2:]) == object_id
    with Repository.open(scratch / "repo", require_verity=True) as repo:
        assert not repo.insecure
    # Idempotent: nothing left to enable.
    assert enable_repository_verity(str(scratch / "repo")).enabled == 0


def test_enable_verity_refuses_a_mismatched_object(scratch: Path) -> None:
    ids = _insecure_repo(scratch / "repo")
    bad = scratch / "repo" / "objects" / ids[0][:2] / ids[0][2:]
    bad.write_bytes(b"not the content the name promises")
    with pytest.raises(RepositoryError, match=r"1 object\(s\) do not match their names"):
        enable_repository_verity(str(scratch / "repo"))
    # meta.json did not get fs-verity: the repository stays insecure.
    with Repository.open(scratch / "repo") as repo:
        assert repo.insecure
