"""A running ``cfsctl varlink`` service, repositories and OCI layouts for the
varlink tests, plus the registry fixtures of tests/oci (re-used, not copied).
Helpers live in `varlinklib`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from varlinklib import (
    CFSCTL,
    IMAGE_FILES,
    OTHER_FILES,
    Layout,
    LayoutBuilder,
    Service,
    _oci,
    cfsctl,
    layer,
    wait_for_socket,
)

registry_workdir = _oci.registry_workdir
registry_plain = _oci.registry_plain
oci_images = _oci.oci_images


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
