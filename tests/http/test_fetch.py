"""cfsctl fetch / composefs.http.fetch against Debian's nginx serving a
published tree, a tree with symlinks as files, and a raw repository."""

from __future__ import annotations

import pytest

from composefs.http.fetch import fetch
from composefs.oci import storage
from composefs.repository import Repository
from conftest import REF, TAG, Served, Source


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
