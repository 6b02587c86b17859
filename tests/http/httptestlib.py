"""Helpers of tests/http. A module with a name of its own: pytest imports
every conftest.py as ``conftest``, so names imported from there can resolve
to another directory's conftest."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "oci"))

import ocitestlib as L

from composefs.repository import Repository

TAG = "demo/app:1.0"  # a '/' in the tag: stored as refs/oci/demo%2Fapp:1.0
REF = "refs/oci/demo%2Fapp:1.0"


def det_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def build_layout(path: Path, nfiles: int = 40) -> L.BuiltImage:
    """A two-layer image: many small files, some big ones, a symlink, a
    whiteout; layer 2 gzip-compressed."""
    base = [L.directory("usr"), L.directory("usr/bin"), L.directory("etc")]
    base += [L.file(f"usr/bin/tool{i}", det_bytes(i, 100 + 97 * i)) for i in range(nfiles)]
    base += [L.file("etc/big", det_bytes(1000, 3 << 20)), L.file("etc/small", b"tiny")]
    base += [L.symlink("usr/bin/link", "tool1"), L.file("etc/gone", det_bytes(7, 500))]
    top = [L.directory("etc"), L.whiteout("etc/gone"), L.file("etc/new", det_bytes(8, 70000))]
    spec = L.ImageSpec(
        [L.tar_layer(base), L.tar_layer(top)], compression=["none", "gzip"], tag="latest"
    )
    return L.write_oci_layout(path, [spec])[0]


@dataclass
class Source:
    repo: Path
    layout: Path
    image: L.BuiltImage
    tag: str
    image_id: str


def make_repo(path: Path, algorithm: str = "sha512") -> Repository:
    return Repository.init(path, algorithm=algorithm, insecure=True)[0]


@dataclass
class Served:
    published: str  # publish DEST (symlinks)
    link_files: str  # publish --link-files DEST
    raw_repo: str  # the source repository directory itself
    https: str  # the published tree over TLS (certificate for 127.0.0.1)
    published_dir: Path
    ca_dir: Path  # holds the server's self-signed certificate as ca.crt


def make_cert(d: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (make system-deps installs it)")
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-keyout", str(d / "key.pem"), "-out", str(d / "ca.crt"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "ca.crt", d / "key.pem"


def assert_untouched(repo: Repository) -> None:
    """A failed or interrupted fetch: nothing named, nothing broken."""
    from composefs.oci import storage

    assert repo.list_stream_refs("") == []
    assert storage.list_images(repo) == []
    streams = os.path.join(repo.path, "streams")
    assert not os.path.exists(streams) or os.listdir(streams) in ([], ["refs"])
    assert repo.fsck().ok


def count_objects(repo: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(repo / "objects"))


def cfsctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "composefs.cli.cfsctl", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
