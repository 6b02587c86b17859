"""A running ``cfsctl varlink`` service, repositories and OCI layouts for the
varlink tests, plus the registry fixtures of tests/oci (re-used, not copied)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "oci"))
sys.path.insert(0, str(HERE))


def _load_oci_conftest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_cfs_tests_oci_conftest", HERE.parent / "oci" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


_oci = _load_oci_conftest()


def _is_fixture(obj: Any) -> bool:
    return hasattr(obj, "_pytestfixturefunction") or (
        type(obj).__name__ == "FixtureFunctionDefinition"
    )


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


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for kernel mounts")


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


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``cfsctl varlink --address unix:…``; the service must survive every test."""
    tmp = tmp_path_factory.mktemp("vlsvc")
    sock = str(tmp / "composefs.sock")
    log = tmp / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([CFSCTL, "varlink", "--address", f"unix:{sock}"], stderr=out)
    try:
        wait_for_socket(sock, proc)
        yield Service(proc, sock, log)
        assert proc.poll() is None, f"service died: {log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not os.path.exists(sock), "socket left behind"


@dataclass
class Layout:
    path: Path
    digests: dict[str, str]  # tag -> manifest digest

    def ref(self, tag: str) -> str:
        return f"oci:{self.path}:{tag}"


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """An OCI layout with two images: ``one`` (two layers) and ``two``."""
    path = tmp_path_factory.mktemp("vllayout") / "layout"
    b = LayoutBuilder(path)
    one = b.image([layer(IMAGE_FILES, dirs=("tmp",)), layer({"etc/extra": b"x\n"})])
    b.tag(one, "one")
    two = b.image([layer(OTHER_FILES)])
    b.tag(two, "two")
    return Layout(path, {"one": one["digest"], "two": two["digest"]})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    cfsctl("--repo", str(path), "init", "--insecure")
    return path


@pytest.fixture
def pulled(repo: Path, layout: Layout) -> Path:
    """`repo` with layout image ``one`` pulled as ``one`` (by the CLI)."""
    cfsctl("--repo", str(repo), "oci", "pull", layout.ref("one"), "one")
    return repo


def need_systemd_socket_activate() -> str:
    path = shutil.which("systemd-socket-activate")
    if path is None:
        pytest.skip("systemd-socket-activate not installed (Debian package systemd)")
    return path


# pytest imports every conftest.py as the module ``conftest``; tests that do
# ``from conftest import …`` at run time get whichever was loaded last (this
# one). Keep the helpers of tests/oci (which re-exports the root's) working.
for _name in dir(_oci):
    if not _name.startswith("_") and _name not in globals():
        if not _is_fixture(getattr(_oci, _name)):
            globals()[_name] = getattr(_oci, _name)
