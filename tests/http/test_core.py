"""The IO-free core: URLs, symlink targets, response classes, named-ref rules."""

from __future__ import annotations

import pytest

from composefs.errors import HttpError
from composefs.http import core
from composefs.splitstream import CONTENT_OCI_BLOB, CONTENT_OCI_CONFIG, CONTENT_OCI_MANIFEST

H64 = "ab" * 32
H128 = "cd" * 64


def test_base_url() -> None:
    assert core.base_url("http://h:8080/repo") == "http://h:8080/repo/"
    assert core.base_url("https://h/") == "https://h/"
    for bad in ("ftp://h/", "h/repo", "http:///x", "http://h/?q=1", "http://h:99999/"):
        with pytest.raises(HttpError):
            core.base_url(bad)


def test_paths_and_quoting() -> None:
    assert core.stream_path("refs/oci/a%2Fb:1") == "streams/refs/oci/a%2Fb:1"
    assert (
        core.url_for("http://h/r/", "streams/refs/oci/a%2Fb:1")
        == "http://h/r/streams/refs/oci/a%252Fb:1"
    )
    assert core.url_for("http://h/", "streams/a b#c?") == "http://h/streams/a%20b%23c%3F"
    assert core.object_path(H64, "sha256") == f"objects/ab/{H64[2:]}"
    for bad in ("", "/abs", "a//b", "../x", "a/./b", "a\0b"):
        with pytest.raises(HttpError):
            core.stream_path(bad)
    for bad in (H64.upper(), H64[:-1], H128, "zz" * 32):
        with pytest.raises(HttpError):
            core.object_path(bad, "sha256")


def test_resolve_link() -> None:
    r = core.resolve_link
    assert r("streams/x", f"../objects/ab/{H64[2:]}", "sha256").object_id == H64
    assert r("streams/refs/oci/t", "../../oci-manifest-sha256:1", "sha256").stream == (
        "oci-manifest-sha256:1"
    )
    assert r("streams/refs/a/b", "../c", "sha256").stream == "refs/c"
    for target in (
        "../../etc/passwd",
        "/etc/passwd",
        "../../../../x",
        "../images/ab",
        "",
        "a\0b",
        "x" * 5000,
    ):
        with pytest.raises(HttpError):
            r("streams/x", target, "sha256")
    with pytest.raises(HttpError, match="not a sha256 object"):
        r("streams/x", f"../objects/cd/{H128[2:]}", "sha256")
    with pytest.raises(HttpError, match="not a sha256 object"):
        r("streams/x", "../objects/zz/" + "g" * 62, "sha256")


def test_symlink_content_type() -> None:
    assert core.is_symlink_response("text/x-symlink-target")
    assert core.is_symlink_response("Text/X-Symlink-Target; charset=utf-8")
    assert not core.is_symlink_response("application/octet-stream")
    assert not core.is_symlink_response(None)


def test_classify_and_redirects() -> None:
    A = core.Action
    assert core.classify(200) is A.OK
    assert [core.classify(c) for c in (301, 302, 303, 307, 308)] == [A.REDIRECT] * 5
    assert [core.classify(c) for c in (408, 429, 500, 502, 503, 504)] == [A.RETRY] * 6
    assert core.classify(404) is A.NOT_FOUND and core.classify(410) is A.NOT_FOUND
    assert core.classify(403) is A.FAIL and core.classify(206) is A.FAIL
    assert core.redirect_target("http://h/a/b", "/c") == "http://h/c"
    assert core.redirect_target("http://h/a/b", "https://o/x") == "https://o/x"
    with pytest.raises(HttpError):
        core.redirect_target("http://h/a", "file:///etc/passwd")
    with pytest.raises(HttpError):
        core.redirect_target("http://h/a", None)
    assert core.same_origin("http://h/a", "http://H:80/b")
    assert not core.same_origin("http://h/a", "https://h/a")
    assert not core.same_origin("http://h/a", "http://h2/a")
    assert core.parse_content_length(" 12 ") == 12 and core.parse_content_length(None) is None
    with pytest.raises(HttpError):
        core.parse_content_length("-1")


def test_named_ref_rules() -> None:
    assert core.key_digest(f"sha256:{H64}") == ("sha256", H64)
    assert core.key_digest(f"config:sha256:{H64}") == ("sha256", H64)
    assert core.key_digest(f"sha512:{H128}") == ("sha512", H128)
    assert core.key_digest(f"sha256:{H128}") is None
    assert core.key_digest("composefs.image") is None
    assert core.is_image_key("composefs.image") and core.is_image_key("composefs.image.boot.v1")
    assert not core.is_image_key("composefs.imagex")
    assert core.content_id_for(CONTENT_OCI_CONFIG, "sha256:1") == "oci-config-sha256:1"
    assert core.content_id_for(CONTENT_OCI_MANIFEST, "sha256:1") == "oci-manifest-sha256:1"
    assert core.content_id_for(CONTENT_OCI_BLOB, "sha256:1") == "oci-layer-sha256:1"
    assert core.content_id_for(0, "sha256:1") is None
    assert core.content_id_digest(f"oci-layer-sha256:{H64}") == ("sha256", H64)
    assert core.content_id_digest("my-stream") is None


def test_content_ids() -> None:
    assert core.is_content_id("oci-config-sha256:1") and core.is_content_id("my-stream")
    for bad in ("", "refs", ".hidden", "a/b", "a\0b"):
        assert not core.is_content_id(bad)
