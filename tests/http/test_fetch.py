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


def test_ramp_adds_threads_only_while_they_wait() -> None:
    """`_parallel`'s rule: double the threads while they mostly wait for
    the network, never past the limit; none while they are busy on CPU
    (on loopback extra threads only fight over the interpreter)."""
    from composefs.http.fetch import _Ramp

    r = _Ramp(32, cpu=0.0, now=0.0)
    # one thread, 0.05 s, 0.04 s of CPU: busy, no more
    assert r.more(1, 1, cpu=0.04, now=0.05) == 0
    # then 0.005 s of CPU in 0.05 s: it waits, one more; then 2 more, ...
    assert r.more(1, 1, cpu=0.045, now=0.10) == 1
    assert r.more(2, 2, cpu=0.050, now=0.15) == 2
    assert r.more(4, 4, cpu=0.060, now=0.20) == 4
    # 8 threads, 0.3 s of CPU in 0.05 s (0.75 each): enough
    assert r.more(8, 8, cpu=0.36, now=0.25) == 0
    # waiting again, but only up to the limit
    r2 = _Ramp(5, cpu=0.0, now=0.0)
    assert r2.more(4, 3, cpu=0.0, now=0.05) == 1
    assert r2.more(5, 5, cpu=0.0, now=0.10) == 0
    # no time elapsed, or nothing running: nothing to judge
    assert _Ramp(8, 1.0, 1.0).more(1, 1, cpu=1.0, now=1.0) == 0
    assert _Ramp(8, 0.0, 0.0).more(1, 0, cpu=0.0, now=1.0) == 0


def test_a_slow_server_gets_parallel_requests(served: Served, source: Source, tmp_path: Path) -> None:
    """Each answer takes 0.05 s: the fetch goes from one request at a time
    to up to --jobs at once (and with --jobs 1 stays at one)."""
    import time

    import hostile as H
    from composefs.http.client import HttpOptions

    state = H.State(served.published_dir, delay=0.05)
    srv = H.Server(state)
    try:
        with make_repo(tmp_path / "one") as repo:
            fetch(repo, srv.url, REF, HttpOptions(max_workers=1))
        assert state.max_inflight == 1
        state.max_inflight = 0
        n = state.count("objects/")
        assert n > 40
        t0 = time.monotonic()
        with make_repo(tmp_path / "many") as repo:
            r = fetch(repo, srv.url, REF, HttpOptions(max_workers=8))
            assert r.content_digest == source.image.manifest_digest
            assert repo.fsck().ok
        # n objects one at a time would take n * 0.05 s
        assert 4 <= state.max_inflight <= 8
        assert time.monotonic() - t0 < n * 0.05 * 0.6
    finally:
        srv.stop()
