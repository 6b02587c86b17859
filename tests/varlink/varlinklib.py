"""Helpers of the varlink tests (test modules import them from here, not
from ``conftest``: see tests/testlib.py), and the OCI layout builder of
tests/oci, loaded under its own name (re-used, not copied)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "oci"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from testlib import load_module, need_tool, needs_root  # noqa: E402

_oci: Any = load_module("_cfs_tests_oci_conftest", HERE.parent / "oci" / "conftest.py")

registry_workdir = _oci.registry_workdir
registry_plain = _oci.registry_plain
oci_images = _oci.oci_images
LayoutBuilder = _oci.LayoutBuilder
layer = _oci.layer
det_bytes = _oci._det_bytes

BIN = Path(sys.executable).parent
CFSCTL = str(BIN / "cfsctl")

IMAGE_FILES = {"etc/hostname": b"varlink-test\n", "usr/bin/tool": det_bytes(7, 200_000)}
OTHER_FILES = {"etc/motd": b"other image\n", "usr/lib/data": det_bytes(8, 120_000)}


def cfsctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CFSCTL, *args], capture_output=True, text=True, check=check)


def wait_for_socket(path: str, proc: subprocess.Popen[Any] | None = None) -> None:
    # Listening, not just bound: the file appears at bind(), and a connect()
    # before listen() is refused (seen with systemd-socket-activate).
    deadline = time.monotonic() + 30
    while not _listening(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def _listening(path: str) -> bool:
    """A listening Unix socket is bound at `path` (/proc/net/unix flag
    __SO_ACCEPTCON, 0x10000)."""
    if not os.path.exists(path):
        return False
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    socket: str
    log: Path

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Layout:
    path: Path
    digests: dict[str, str]  # tag -> manifest digest

    def ref(self, tag: str) -> str:
        return f"oci:{self.path}:{tag}"


def need_systemd_socket_activate() -> str:
    return need_tool("systemd-socket-activate")


__all__ = [
    "CFSCTL",
    "IMAGE_FILES",
    "OTHER_FILES",
    "Layout",
    "LayoutBuilder",
    "Service",
    "cfsctl",
    "det_bytes",
    "layer",
    "need_systemd_socket_activate",
    "needs_root",
    "wait_for_socket",
]
