"""Fixtures for tests/http: a source repository holding a pulled OCI image,
its published tree, and Debian's nginx serving the tree, the tree with
symlinks as files (``publish --link-files``), the raw repository and the
tree over HTTPS. Helpers live in `httptestlib`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nginxlib
from httptestlib import TAG, Served, Source, build_layout, make_cert, make_repo

from composefs.repository import Repository


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    from composefs.oci import storage

    d = tmp_path_factory.mktemp("http-src")
    image = build_layout(d / "layout")
    with make_repo(d / "repo") as repo:
        result = storage.pull(repo, f"oci:{d / 'layout'}:latest", TAG)
    assert result.image_id is not None
    return Source(d / "repo", d / "layout", image, TAG, result.image_id)


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
