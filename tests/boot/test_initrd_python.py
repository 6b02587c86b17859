"""dist/bin/composefs-initrd-python: what the initramfs hook and the dracut
module put into the initramfs (the boot itself is tested by make test-boot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import composefs

REPO = Path(__file__).resolve().parent.parent.parent
TOOL = REPO / "dist" / "bin" / "composefs-initrd-python"


def test_writes_sourceless_bytecode_and_lists_native_files(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True,
                         text=True, check=True)
    native = res.stdout.split()
    # The interpreter and the extension modules setup-root imports (ctypes).
    assert os.path.realpath(sys.executable) in native
    assert any("_ctypes" in n for n in native)
    assert all(os.path.isabs(n) and os.path.exists(n) for n in native)
    pkg = Path(os.path.realpath(os.path.dirname(composefs.__file__)))
    for mod in ("cli/setup_root", "repository/__init__", "repository/repo", "mount", "boot/cmdline", "fsverity"):
        assert (Path(str(tmp_path) + str(pkg)) / f"{mod}.pyc").is_file(), mod
    assert not list(tmp_path.rglob("*.py")), "sources are not shipped"
    # The bytecode imports (sourceless) in a fresh, isolated interpreter.
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import composefs.cli.setup_root as s; "
            "print(s.__file__)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp_path) + str(pkg.parent)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("setup_root.pyc")


def test_scripts_parse() -> None:
    for script in ("initramfs-tools/hooks/composefs", "initramfs-tools/scripts/local-bottom/composefs",
                   "dracut/95composefs/module-setup.sh"):
        shell = "bash" if script.endswith(".sh") else "sh"
        subprocess.run([shell, "-n", str(REPO / "dist" / script)], check=True)
