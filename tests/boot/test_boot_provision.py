"""composefs.boot.provision on the host: the errors (the kernel work itself
is tested in the VM, tests/vm/test_vm_provision.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from composefs.boot.provision import enable_repository_verity
from composefs.errors import RepositoryError


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="not a composefs repository"):
        enable_repository_verity(str(tmp_path))


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(tmp_path),
                          "enable-verity"], capture_output=True, text=True, check=False)
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and "not a composefs repository" in res.stderr
    assert "Traceback" not in res.stderr
