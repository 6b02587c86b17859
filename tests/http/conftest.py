"""Fixtures for tests/http: a source repository holding a pulled OCI image,
its published tree, and Debian's nginx serving the tree, the tree with
symlinks as files (``publish --link-files``) and the raw repository."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "oci"))

import nginxlib  # noqa: E402
import ocitestlib as L  # noqa: E402

from composefs.repository import Repository  # noqa: E402

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


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    from composefs.oci import storage

    d = tmp_path_factory.mktemp("http-src")
    image = build_layout(d / "layout")
    with make_repo(d / "repo") as repo:
        result = storage.pull(repo, f"oci:{d / 'layout'}:latest", TAG)
    assert result.image_id is not None
    return Source(d / "repo", d / "layout", image, TAG, result.image_id)


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


@pytest.fixture(scope="session")
def served(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if nginxlib.NGINX is None:
        pytest.skip("nginx not installed (make system-deps installs it)")
    from composefs.http.publish import publish

    d = tmp_path_factory.mktemp("http-served")
    with Repository.open(source.repo) as repo:
        publish(repo, str(d / "pub"))
        publish(repo, str(d / "pub-files"), link_files=True)
    cert, key = make_cert(d / "tls")
    ng = nginxlib.Nginx(d / "nginx")
    urls = [
        ng.serve(d / "pub"),
        ng.serve(d / "pub-files", link_files=True),
        ng.serve(source.repo),
        ng.serve(d / "pub", tls=(cert, key)),
    ]
    with ng:
        yield Served(*urls, published_dir=d / "pub", ca_dir=d / "tls")


@pytest.fixture
def dest_repo(tmp_path: Path) -> Iterator[Repository]:
    with make_repo(tmp_path / "dest") as repo:
        yield repo


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
