"""A hostile or broken server: every misbehaviour ends in a clean one-line
error within bounded time, tags nothing, and leaves `fsck` clean."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from httptestlib import REF, TAG, Served, Source, assert_untouched, build_layout, make_repo

import hostile as H
from composefs.errors import ComposefsError, HttpError
from composefs.http.client import HttpOptions
from composefs.http.fetch import fetch
from composefs.oci import storage
from composefs.repository import Repository

REF_PATH = "streams/" + REF


def fast(**kw: object) -> HttpOptions:
    opts = HttpOptions(retries=2, backoff=0.01, max_backoff=0.02, transfer_timeout=5.0)
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


@pytest.fixture
def server(served: Served) -> Iterator[H.State]:
    state = H.State(served.published_dir)
    srv = H.Server(state)
    state.url = srv.url  # type: ignore[attr-defined]
    try:
        yield state
    finally:
        srv.stop()


def objects(root: Path) -> list[str]:
    """Object paths of a tree, biggest first."""
    out = [
        str(p.relative_to(root))
        for p in (root / "objects").glob("*/*")
        if p.is_file() and not p.is_symlink()
    ]
    return sorted(out, key=lambda p: -(root / p).stat().st_size)


def run_fails(repo: Repository, url: str, match: str, **kw: object) -> HttpError:
    t0 = time.monotonic()
    with pytest.raises(HttpError, match=match) as ei:
        fetch(repo, url, REF, fast(**kw))
    assert time.monotonic() - t0 < 20
    assert "\n" not in str(ei.value)
    assert_untouched(repo)
    return ei.value


def test_wrong_object_bytes(server: H.State, dest_repo: Repository) -> None:
    big = objects(server.root)[0]
    server.faults[big] = H.flip_bytes
    err = run_fails(dest_repo, server.url, "fs-verity digest")  # type: ignore[attr-defined]
    assert big.replace("/", "")[len("objects") :] in str(err).replace("/", "")
    assert not dest_repo.has_object(big.replace("/", "")[len("objects") :])


def test_wrong_small_object_bytes(server: H.State, dest_repo: Repository) -> None:
    small = objects(server.root)[-1]
    server.faults[small] = H.flip_bytes
    run_fails(dest_repo, server.url, "fs-verity digest")  # type: ignore[attr-defined]


def test_truncated_body(server: H.State, dest_repo: Repository) -> None:
    server.faults[objects(server.root)[0]] = H.truncated
    run_fails(dest_repo, server.url, "gave up after 3 attempts")  # type: ignore[attr-defined]


def test_wrong_content_length(server: H.State, dest_repo: Repository) -> None:
    server.faults[objects(server.root)[1]] = H.short_length
    run_fails(dest_repo, server.url, "fs-verity digest")  # type: ignore[attr-defined]


def test_endless_body(server: H.State, dest_repo: Repository) -> None:
    server.faults[objects(server.root)[0]] = H.endless
    run_fails(dest_repo, server.url, "exceeds the limit", max_object_size=16 << 20)  # type: ignore[attr-defined]


def test_dripping_body_hits_deadline(server: H.State, dest_repo: Repository) -> None:
    server.faults[objects(server.root)[0]] = H.dripping
    run_fails(dest_repo, server.url, "longer than 1 s", transfer_timeout=1.0)  # type: ignore[attr-defined]


def test_dripping_head_hits_read_timeout(server: H.State, dest_repo: Repository) -> None:
    """Every socket read succeeds, but the response's headers never end:
    the request fails once they have taken the read timeout."""
    server.faults[REF_PATH] = H.dripping_head
    run_fails(dest_repo, server.url, "response headers not complete after 1 s", read_timeout=1.0)  # type: ignore[attr-defined]


def test_missing_object(server: H.State, dest_repo: Repository) -> None:
    obj = objects(server.root)[3]
    server.faults[obj] = H.status(404)
    err = run_fails(dest_repo, server.url, "not found \\(HTTP 404\\)")  # type: ignore[attr-defined]
    assert str(err).startswith(server.url + obj)  # type: ignore[attr-defined]


def test_redirect_loop(server: H.State, dest_repo: Repository) -> None:
    server.faults[REF_PATH] = H.status(302, {"Location": "/" + REF_PATH.replace("%", "%25")})
    run_fails(dest_repo, server.url, "redirects")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "target",
    ["../../../../etc/passwd", "/etc/passwd", "../../../images/x", "../../../../objects/ab/cd"],
)
def test_symlink_target_escapes(server: H.State, dest_repo: Repository, target: str) -> None:
    server.faults[REF_PATH] = H.body(target.encode(), "text/x-symlink-target")
    run_fails(dest_repo, server.url, "escapes|invalid symlink target|not a sha512 object")  # type: ignore[attr-defined]


def test_object_id_not_hex(server: H.State, dest_repo: Repository) -> None:
    target = "../../../objects/zz/" + "g" * 126
    server.faults[REF_PATH] = H.body(target.encode(), "text/x-symlink-target")
    run_fails(dest_repo, server.url, "not a sha512 object")  # type: ignore[attr-defined]


def test_huge_stream(server: H.State, dest_repo: Repository) -> None:
    server.faults[REF_PATH] = H.endless
    run_fails(dest_repo, server.url, "exceeds the limit", max_stream_size=8 << 20)  # type: ignore[attr-defined]


def test_stream_that_is_not_a_splitstream(server: H.State, dest_repo: Repository) -> None:
    server.faults[REF_PATH] = H.body(b"<html>hello</html>")
    with pytest.raises(ComposefsError, match="splitstream"):
        fetch(dest_repo, server.url, REF, fast())  # type: ignore[attr-defined]
    assert_untouched(dest_repo)


def test_transient_errors_are_retried(
    server: H.State, dest_repo: Repository, source: Source
) -> None:
    obj = objects(server.root)[0]
    server.faults[obj] = H.fail_times(2, 503)
    server.faults[REF_PATH] = H.fail_times(1, 502)
    result = fetch(dest_repo, server.url, REF, fast())  # type: ignore[attr-defined]
    assert result.content_digest == source.image.manifest_digest
    assert server.count(obj) == 3


def test_credentials_stay_with_the_origin(served: Served, dest_repo: Repository) -> None:
    """The repository host gets the credentials; a host it redirects to does not."""
    other = H.State(served.published_dir)
    srv_b = H.Server(other, host="127.0.0.2")
    front = H.State(served.published_dir)

    def redirect(h: H.Handler) -> bool:
        return H.status(302, {"Location": srv_b.url + h.path.lstrip("/")})(h)

    front.object_fault = redirect
    srv_a = H.Server(front)
    try:
        url = srv_a.url.replace("http://", "http://alice:s3cret@")
        fetch(dest_repo, url, REF, fast())
    finally:
        srv_a.stop()
        srv_b.stop()
    assert front.requests and all(a is not None for _, a in front.requests)
    assert other.requests and all(a is None for _, a in other.requests)


def test_algorithm_mismatch(served: Served, tmp_path: Path) -> None:
    with make_repo(tmp_path / "r256", "sha256") as repo:
        with pytest.raises(HttpError, match="sha256"):
            fetch(repo, served.link_files, REF, fast())
        assert_untouched(repo)


def test_cli_one_line_error(server: H.State, tmp_path: Path) -> None:
    obj = objects(server.root)[2]
    server.faults[obj] = H.status(404)
    make_repo(tmp_path / "r").close()
    p = subprocess.run(
        [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(tmp_path / "r"),
         "fetch", "--retries", "0", server.url, REF],  # type: ignore[attr-defined]
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("cfsctl: http://127.0.0.1:") and "404" in p.stderr
    assert p.stdout == ""


def test_swapped_composefs_image_is_refused(source: Source, tmp_path: Path) -> None:
    """A config stream whose ``composefs.image`` names another image: every
    digest still holds (named refs are covered by none), so only rebuilding
    the image from the layers catches it."""
    from composefs.http.publish import publish
    from composefs.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_MANIFEST

    build_layout(tmp_path / "other", nfiles=2)
    with make_repo(tmp_path / "evil") as repo:
        storage.pull(repo, f"oci:{source.layout}:latest", TAG)
        other = storage.pull(repo, f"oci:{tmp_path / 'other'}:latest", "other").image_id
        img = storage.open_image_ref(repo, TAG)
        w = repo.create_stream(CONTENT_OCI_CONFIG)
        w.write_external(img.config_raw)
        for diff_id, verity in img.layer_refs.items():
            w.add_named_stream_ref(diff_id, verity)
        w.add_named_stream_ref("composefs.image", str(other))
        config_verity = repo.write_stream(w, f"oci-config-{img.config_digest}")
        w = repo.create_stream(CONTENT_OCI_MANIFEST)
        w.write_external(img.manifest_raw)
        w.add_named_stream_ref(f"config:{img.config_digest}", config_verity)
        for diff_id, verity in img.layer_refs.items():
            w.add_named_stream_ref(diff_id, verity)
        repo.write_stream(w, f"oci-manifest-{img.manifest_digest}", "oci/evil")
        publish(repo, str(tmp_path / "pub"), ["refs/oci/evil"])
    srv = H.Server(H.State(tmp_path / "pub"))
    try:
        with make_repo(tmp_path / "victim") as victim:
            with pytest.raises(HttpError, match="does not match its layers"):
                fetch(victim, srv.url, "refs/oci/evil", fast())
            assert_untouched(victim)
            # the check is what stops it
            fetch(victim, srv.url, "refs/oci/evil", fast(), verify_images=False)
            assert storage.open_image_ref(victim, "evil").image_id(2) == other
    finally:
        srv.stop()
