"""cfsctl fetch / composefs.http.fetch against Debian's nginx serving a
published tree, a tree with symlinks as files, and a raw repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from httptestlib import REF, TAG, Served, Source, assert_untouched, cfsctl, make_repo

from composefs.http.fetch import fetch
from composefs.oci import storage
from composefs.repository import Repository


@pytest.mark.parametrize("site", ["published", "link_files", "raw_repo"])
def test_fetch_oci_image(site: str, served: Served, source: Source, dest_repo: Repository) -> None:
    url = getattr(served, site)
    result = fetch(dest_repo, url, REF)
    assert result.objects_fetched > 40
    images = storage.list_images(dest_repo)
    assert [(i.name, i.manifest_digest) for i in images] == [(TAG, source.image.manifest_digest)]
    img = storage.open_image_ref(dest_repo, TAG)
    assert img.image_id(2) == source.image_id
    assert result.content_digest == source.image.manifest_digest
    assert dest_repo.fsck().ok
    again = fetch(dest_repo, url, REF)
    assert again.objects_fetched == 0


def test_https_verifies_certificates(served: Served, source: Source, tmp_path: Path) -> None:
    """An unknown CA is refused (one line, nothing named); --cert-dir (the
    registry client's CA option) or --tls-verify=false make it work."""
    from composefs.errors import HttpError
    from composefs.http.client import HttpOptions

    with make_repo(tmp_path / "a") as repo:
        with pytest.raises(HttpError, match="certificate verify failed"):
            fetch(repo, served.https, REF, HttpOptions(retries=0, certs_d=()))
        assert_untouched(repo)
        r = fetch(repo, served.https, REF, HttpOptions(cert_dir=str(served.ca_dir), certs_d=()))
        assert r.content_digest == source.image.manifest_digest
    make_repo(tmp_path / "b").close()
    p = cfsctl("--repo", str(tmp_path / "b"), "fetch", "--tls-verify=false", served.https, REF)
    assert p.returncode == 0, p.stderr
    p = cfsctl("--repo", str(tmp_path / "b"), "fetch", "--cert-dir", str(tmp_path / "nope"),
               served.https, REF)  # fmt: skip
    assert p.returncode == 1 and "--cert-dir" in p.stderr
