"""The native registry client against real registries on loopback.

Fixtures (tests/oci/conftest.py) start Debian's docker-registry (plain,
htpasswd basic auth, TLS) and our own bearer-token/redirect/fault-injecting
front server; test images are pushed with skopeo.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from composefs.errors import DigestMismatch, OciError, RegistryAuthError, RegistryError
from composefs.oci import auth as oauth
from composefs.oci import registry as reg
from composefs.oci import transports as tr

# ---------------------------------------------------------------- helpers


def _decompressed(f: Any, media_type: str) -> Any:
    comp = tr.layer_compression(media_type)
    if comp == "gzip":
        return gzip.GzipFile(fileobj=f)
    if comp == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            from backports import zstd
        return zstd.ZstdFile(f)
    return f


def layer_files(src: reg.RegistrySource, desc: tr.Descriptor) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with src.open_blob_stream(desc.digest, desc.size) as blob:
        with tarfile.open(fileobj=_decompressed(blob, desc.media_type), mode="r|") as t:
            for m in t:
                if m.isfile():
                    fh = t.extractfile(m)
                    assert fh is not None
                    out[m.name] = fh.read()
        blob.finish()
        assert blob.verified
    return out


def pull_files(
    src: reg.RegistrySource, platform: str | None = None
) -> tuple[tr.ResolvedImage, dict[str, bytes]]:
    """Resolve and download every layer; the merged regular files (no whiteouts in test images)."""
    resolved = tr.resolve_manifest(src, tr.Platform.parse(platform) if platform else None)
    files: dict[str, bytes] = {}
    for layer in resolved.manifest.layers:
        files.update(layer_files(src, layer))
    with src.open_blob(resolved.manifest.config.digest, resolved.manifest.config.size) as c:
        json.loads(c.read())
    return resolved, files


def drain(stream: Any, chunk: int = 4096) -> bytes:
    """Read like a consumer that keeps whatever it got before a failure."""
    got = bytearray()
    try:
        while data := stream.read(chunk):
            got += data
    finally:
        drain.got = bytes(got)  # type: ignore[attr-defined]
    return bytes(got)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, repr(text)
    assert "Traceback" not in text
    return text


def opts(base: Any, **kw: Any) -> reg.RegistryOptions:
    return reg.RegistryOptions(**{**base.__dict__, **kw})


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("docker://busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("docker.io/library/debian:bookworm", "docker.io", "library/debian", "bookworm", None),
        ("index.docker.io/foo/bar", "docker.io", "foo/bar", "latest", None),
        ("foo/bar", "docker.io", "foo/bar", "latest", None),
        ("quay.io/fedora/fedora:40", "quay.io", "fedora/fedora", "40", None),
        ("127.0.0.1:5000/a/b/c:v1.2_x", "127.0.0.1:5000", "a/b/c", "v1.2_x", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
        ("[::1]:5000/img:t", "[::1]:5000", "img", "t", None),
        (
            "r.example/a__b/c-d.e@sha256:" + "a" * 64,
            "r.example",
            "a__b/c-d.e",
            None,
            "sha256:" + "a" * 64,
        ),
        ("r.example/a:t@sha512:" + "b" * 128, "r.example", "a", "t", "sha512:" + "b" * 128),
    ],
)
def test_parse_reference(
    text: str, registry: str, repo: str, tag: str | None, digest: str | None
) -> None:
    r = reg.parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert r.ref == (digest or tag)
    assert r.api_host == ("registry-1.docker.io" if registry == "docker.io" else registry)
    assert reg.parse_reference(str(r)) == r


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case:tag",  # "UPPER" is a host by the Docker rule, then "case" ok... but host has no dot
        "foo/Bar",
        "foo:bad/tag",
        "foo@sha256:abc",
        "foo@md5:" + "a" * 32,
        "foo:" + "t" * 129,
        "a//b",
        "-a/b",
        "host:port/x",
    ],
)
def test_parse_reference_rejects(text: str) -> None:
    if text == "UPPER/case:tag":
        # The Docker rule makes an upper-case first component a registry host.
        assert reg.parse_reference(text).registry == "UPPER"
        return
    with pytest.raises(OciError) as ei:
        reg.parse_reference(text)
    one_line(ei.value)


def test_loopback_rules() -> None:
    for host in ("127.0.0.1", "127.9.8.7", "localhost", "::1"):
        assert reg.is_loopback(host)
    for host in ("10.0.0.1", "registry.example", "::2", "localhost.example"):
        assert not reg.is_loopback(host)
    assert reg.RegistryClient("127.0.0.1:1").allow_http
    assert reg.RegistryClient("[::1]:1").allow_http
    assert not reg.RegistryClient("registry.example:5000").allow_http
    insecure = reg.RegistryOptions(tls_verify=False)
    assert reg.RegistryClient("registry.example:5000", options=insecure).allow_http


# ---------------------------------------------------------------- auth helpers


def test_www_authenticate_parsing() -> None:
    chs = oauth.parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert len(chs) == 1 and chs[0].scheme == "bearer"
    assert chs[0].params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull",
    }
    chs = oauth.parse_www_authenticate(
        'Basic realm="a \\"quoted\\" realm", Bearer realm=x ,service=y'
    )
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].params["realm"] == 'a "quoted" realm'
    assert chs[1].params == {"realm": "x", "service": "y"}
    chs = oauth.parse_www_authenticate("Negotiate abc+/==, Basic")
    assert chs[0].params == {"token68": "abc+/=="} and chs[1].scheme == "basic"
    assert oauth.parse_www_authenticate("") == []
    assert (
        oauth.parse_www_authenticate('Basic realm="unterminated')[0].params["realm"]
        == "unterminated"
    )


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_credentials_lookup(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _b64("hub:pw")},
                    "reg.example:5000": {"auth": _b64("u:p:with:colons")},
                }
            }
        )
    )
    env = {"HOME": str(home)}
    assert oauth.load_credentials("docker.io", "library/x", env=env) == oauth.Credentials(
        "hub", "pw"
    )
    assert oauth.load_credentials("reg.example:5000", "a/b", env=env) == oauth.Credentials(
        "u", "p:with:colons"
    )
    assert oauth.load_credentials("other.example", None, env=env) is None

    # XDG_RUNTIME_DIR (podman's file) comes before docker's; namespace keys are most specific.
    run = tmp_path / "run"
    (run / "containers").mkdir(parents=True)
    (run / "containers" / "auth.json").write_text(
        json.dumps(
            {
                "auths": {
                    "reg.example:5000": {"auth": _b64("podman:1")},
                    "reg.example:5000/team": {"auth": _b64("team:2")},
                }
            }
        )
    )
    env["XDG_RUNTIME_DIR"] = str(run)
    assert oauth.load_credentials("reg.example:5000", "a/b", env=env) == oauth.Credentials(
        "podman", "1"
    )
    assert oauth.load_credentials("reg.example:5000", "team/img", env=env) == oauth.Credentials(
        "team", "2"
    )

    # REGISTRY_AUTH_FILE replaces the search entirely.
    explicit = tmp_path / "auth.json"
    explicit.write_text(
        json.dumps({"auths": {"other.example": {"username": "x", "password": "y"}}})
    )
    env["REGISTRY_AUTH_FILE"] = str(explicit)
    assert oauth.load_credentials("reg.example:5000", "a/b", env=env) is None
    assert oauth.load_credentials("other.example", "a", env=env) == oauth.Credentials("x", "y")

    explicit.write_text("{not json")
    with pytest.raises(RegistryAuthError) as ei:
        oauth.load_credentials("other.example", "a", env=env)
    assert "not valid JSON" in one_line(ei.value)
    with pytest.raises(RegistryAuthError):
        oauth.load_credentials("x", None, auth_file=tmp_path / "missing.json")

    assert oauth.parse_creds("a:b:c") == oauth.Credentials("a", "b:c")
    assert "b:c" not in repr(oauth.parse_creds("a:b:c"))
    with pytest.raises(RegistryAuthError):
        oauth.parse_creds("nocolon")


def test_no_credentials_to_plain_http_token_server() -> None:
    client = reg.RegistryClient("registry.example")
    with pytest.raises(RegistryAuthError) as ei:
        client._fetch_token("http://auth.example/token", {"Authorization": "Basic eDp5"})
    assert "plain-HTTP" in one_line(ei.value)


# ---------------------------------------------------------------- plain registry


def test_pull_plain(registry_plain: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_plain.ref(img.name)) as src:
        resolved, files = pull_files(src)
        assert src.client.base_url() == f"http://{registry_plain.host}"
    assert resolved.digest == img.digest
    assert resolved.media_type == tr.OCI_MANIFEST
    assert len(resolved.manifest.layers) == 2
    assert files == img.files


def test_pull_by_digest_and_docker_prefix(registry_plain: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    repo = img.name.split(":")[0]
    with reg.open_source(f"docker://{registry_plain.host}/{repo}@{img.digest}") as src:
        resolved, files = pull_files(src)
    assert resolved.digest == img.digest and files == img.files


def test_missing_image(registry_plain: Any, oci_images: Any) -> None:
    with (
        reg.open_source(registry_plain.ref("test/plain:nope")) as src,
        pytest.raises(RegistryError) as ei,
    ):
        src.get_manifest()
    assert "not found" in one_line(ei.value)
    with (
        reg.open_source(registry_plain.ref("test/plain@sha256:" + "0" * 64)) as src,
        pytest.raises(RegistryError),
    ):
        src.get_manifest()
    with (
        reg.open_source(registry_plain.ref("test/plain:v1")) as src,
        pytest.raises(RegistryError) as ei,
    ):
        src.open_blob("sha256:" + "1" * 64, 10)
    assert "blob not found" in one_line(ei.value)


def test_nothing_listens() -> None:
    from testlib import free_port

    o = reg.RegistryOptions(retries=1, backoff=0.01)
    with (
        reg.open_source(f"127.0.0.1:{free_port()}/x:y", o) as src,
        pytest.raises(RegistryError) as ei,
    ):
        src.get_manifest()
    assert "cannot reach" in one_line(ei.value)


def test_docker_schema2(registry_plain: Any, oci_images: Any) -> None:
    img = oci_images["v2s2"]
    with reg.open_source(registry_plain.ref(img.name)) as src:
        _raw, media_type = src.get_manifest()
        assert media_type == tr.DOCKER_MANIFEST
        resolved, files = pull_files(src)
    assert resolved.media_type == tr.DOCKER_MANIFEST
    assert all(
        layer.media_type.startswith("application/vnd.docker.image.rootfs")
        for layer in resolved.manifest.layers
    )
    assert files == img.files
    # Same layers as the OCI original (skopeo only rewrote the manifest).
    with reg.open_source(registry_plain.ref(oci_images["plain"].name)) as src:
        plain = tr.resolve_manifest(src)
    assert [x.digest for x in plain.manifest.layers] == [x.digest for x in resolved.manifest.layers]


def test_zstd_layer(registry_plain: Any, oci_images: Any) -> None:
    img = oci_images["zstd"]
    with reg.open_source(registry_plain.ref(img.name)) as src:
        resolved, files = pull_files(src)
    assert resolved.manifest.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert tr.layer_compression(resolved.manifest.layers[0].media_type) == "zstd"
    assert files == img.files


@pytest.mark.parametrize(
    ("platform", "expect"),
    [
        ("linux/arm64", b"arm64v8\n"),
        ("linux/arm64/v8", b"arm64v8\n"),
        ("linux/arm/v7", b"armv7\n"),
        ("linux/amd64", b"amd64\n"),
        (None, None),
    ],
)
def test_multi_arch(
    registry_plain: Any, oci_images: Any, platform: str | None, expect: bytes | None
) -> None:
    img = oci_images["multi"]
    with reg.open_source(registry_plain.ref(img.name)) as src:
        raw, media_type = src.get_manifest()
        assert media_type == tr.OCI_INDEX
        assert hashlib.sha256(raw).hexdigest() == img.digest.split(":")[1]
        if platform is None:
            host = tr.Platform.host()
            if host.architecture not in ("amd64", "arm64", "arm"):
                pytest.skip(f"no test image for {host}")
            expect = {"amd64": b"amd64\n", "arm64": b"arm64v8\n", "arm": b"armv7\n"}[
                host.architecture
            ]
        resolved, files = pull_files(src, platform)
    assert files["etc/arch"] == expect
    assert resolved.digest in {d["digest"] for d in img.layers}


def test_multi_arch_unknown_platform(registry_plain: Any, oci_images: Any) -> None:
    with (
        reg.open_source(registry_plain.ref(oci_images["multi"].name)) as src,
        pytest.raises(OciError) as ei,
    ):
        tr.resolve_manifest(src, tr.Platform.parse("linux/s390x"))
    msg = one_line(ei.value)
    assert "linux/s390x" in msg and "linux/arm64" in msg


def test_parallel_downloads(registry_plain: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_plain.ref(img.name), max_workers=3) as src:
        resolved = tr.resolve_manifest(src)
        results = reg.fetch_parallel(resolved.manifest.layers, lambda d: layer_files(src, d), 3)
    merged: dict[str, bytes] = {}
    for r in results:
        merged.update(r)
    assert merged == img.files

    def boom(x: int) -> int:
        if x == 2:
            raise RegistryError("layer 2 failed")
        return x * 10

    assert reg.fetch_parallel([1, 3, 4], boom, 2) == [10, 30, 40]
    with pytest.raises(RegistryError, match="layer 2"):
        reg.fetch_parallel([1, 2, 3, 4], boom, 2)


# ---------------------------------------------------------------- basic auth


def test_basic_auth_good(registry_auth: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_auth.ref(img.name), creds=registry_auth.creds) as src:
        resolved, files = pull_files(src)
    assert resolved.digest == img.digest and files == img.files


def test_basic_auth_from_auth_file(registry_auth: Any, oci_images: Any, tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"auths": {registry_auth.host: {"auth": _b64(registry_auth.creds)}}}))
    img = oci_images["zstd"]
    env = {"REGISTRY_AUTH_FILE": str(f), "HOME": str(tmp_path)}
    with reg.open_source(registry_auth.ref(img.name), env=env) as src:
        _, files = pull_files(src)
    assert files == img.files
    with reg.open_source(
        registry_auth.ref(img.name), auth_file=str(f), env={"HOME": str(tmp_path)}
    ) as src:
        _, files = pull_files(src)
    assert files == img.files


@pytest.mark.parametrize("creds", [None, "cfsuser:wrong", "nobody:cfs-Pa55:word"])
def test_basic_auth_bad(
    registry_auth: Any, oci_images: Any, creds: str | None, tmp_path: Path
) -> None:
    o = reg.RegistryOptions(creds=creds, env={"HOME": str(tmp_path)})
    with reg.open_source(registry_auth.ref(oci_images["plain"].name), o) as src:
        with pytest.raises(RegistryAuthError) as ei:
            src.get_manifest()
    msg = one_line(ei.value)
    assert ("invalid username or password" if creds else "authentication required") in msg
    assert "Pa55" not in msg and "wrong" not in msg


# ---------------------------------------------------------------- TLS


def test_tls_with_ca(registry_tls: Any, oci_images: Any, tmp_path: Path) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_tls.ref(img.name), ca_file=registry_tls.ca_file) as src:
        _resolved, files = pull_files(src)
        assert src.client.base_url() == f"https://{registry_tls.host}"
    assert files == img.files
    # certs.d-style directory (--cert-dir)
    certdir = tmp_path / "certs"
    certdir.mkdir()
    (certdir / "ca.crt").write_bytes(Path(registry_tls.ca_file).read_bytes())
    with reg.open_source(registry_tls.ref(img.name), cert_dir=str(certdir)) as src:
        assert tr.resolve_manifest(src).digest == img.digest


def test_tls_ssl_cert_file(
    registry_tls: Any, oci_images: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", registry_tls.ca_file)
    with reg.open_source(registry_tls.ref(oci_images["plain"].name)) as src:
        assert tr.resolve_manifest(src).digest == oci_images["plain"].digest


def test_tls_without_ca_fails(registry_tls: Any, oci_images: Any) -> None:
    with reg.open_source(registry_tls.ref(oci_images["plain"].name)) as src:
        with pytest.raises(RegistryError) as ei:
            src.get_manifest()
    msg = one_line(ei.value)
    assert "certificate verification failed" in msg
    # A certificate problem must not be "solved" by falling back to plain HTTP.
    assert src.client._base is None


def test_tls_verify_false(registry_tls: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_tls.ref(img.name), tls_verify=False) as src:
        _, files = pull_files(src)
        assert src.client.base_url().startswith("https://")
    assert files == img.files


# ---------------------------------------------------------------- bearer tokens, redirects


def test_bearer_token(front: Any, oci_images: Any, fast_options: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        resolved, files = pull_files(src)
    assert files == img.files and resolved.digest == img.digest
    assert front.token_requests, "no token was requested"
    q = front.token_requests[0].path
    assert "service=cfs-test" in q and "scope=repository%3Atest%2Fplain%3Apull" in q
    # Anonymous token requests carry no credentials.
    assert all("Authorization" not in r.headers for r in front.token_requests)
    # One token is reused: not one token round trip per request.
    assert len(front.token_requests) <= 2
    v2 = [r for r in front.requests("front", "/v2/test/") if "Authorization" in r.headers]
    assert v2 and all(r.headers["Authorization"].startswith("Bearer ") for r in v2)


def test_bearer_token_with_credentials(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.require_creds = ("tokuser", "tok:pass")
    img = oci_images["zstd"]
    with reg.open_source(front.ref(img.name), opts(fast_options, creds="tokuser:tok:pass")) as src:
        _, files = pull_files(src)
    assert files == img.files
    want = "Basic " + _b64("tokuser:tok:pass")
    assert front.token_requests and all(
        r.headers.get("Authorization") == want for r in front.token_requests
    )
    # Basic credentials went only to the token endpoint, never to /v2/.
    assert all(
        r.headers.get("Authorization", "").startswith("Bearer")
        for r in front.requests("front", "/v2/test")
    )

    with reg.open_source(front.ref(img.name), opts(fast_options, creds="tokuser:bad")) as src:
        with pytest.raises(RegistryAuthError) as ei:
            src.get_manifest()
    assert "invalid username or password" in one_line(ei.value)
    with (
        reg.open_source(front.ref(img.name), fast_options) as src,
        pytest.raises(RegistryAuthError) as ei,
    ):
        src.get_manifest()
    assert "anonymous" in one_line(ei.value)


def test_redirect_does_not_leak_credentials(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.require_creds = ("tokuser", "secret")
    front.redirect_blobs = True
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), opts(fast_options, creds="tokuser:secret")) as src:
        _, files = pull_files(src)
    assert files == img.files
    blob_requests = front.requests("blobs")
    assert len(blob_requests) == 3  # two layers and the config, all redirected
    for r in blob_requests:
        assert "Authorization" not in r.headers, r.headers
    # The registry itself got the bearer token for the (redirecting) blob URL.
    front_blobs = front.requests("front", "/blobs/")
    assert front_blobs and all(
        r.headers.get("Authorization", "").startswith("Bearer ") for r in front_blobs
    )


def test_retries_on_5xx(front: Any, oci_images: Any, fast_options: Any) -> None:
    img = oci_images["plain"]
    front.fault("front", "/manifests/", "status", 503, count=2)
    front.fault("front", "/blobs/", "status", 500, count=1)
    front.fault("front", "/token", "status", 502, count=1)
    with reg.open_source(front.ref(img.name), fast_options) as src:
        _, files = pull_files(src)
    assert files == img.files
    assert all(f.hits == f.count for f in front.faults)
    assert len(front.requests("front", "/manifests/v1")) >= 3


def test_retries_are_bounded(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.require_token = False
    f = front.fault("front", "/manifests/", "status", 503, count=None)
    with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
        with pytest.raises(RegistryError) as ei:
            src.get_manifest()
    assert "HTTP 503" in one_line(ei.value)
    assert f.hits == fast_options.retries + 1


@pytest.mark.parametrize("honor_range", [True, False])
@pytest.mark.parametrize("redirect", [False, True])
def test_dropped_connection_resumes(
    front: Any, oci_images: Any, fast_options: Any, honor_range: bool, redirect: bool
) -> None:
    img = oci_images["plain"]
    front.honor_range = honor_range
    front.redirect_blobs = redirect
    with reg.open_source(front.ref(img.name), fast_options) as src:
        resolved = tr.resolve_manifest(src)
        big = max(resolved.manifest.layers, key=lambda d: d.size)
        front.fault(
            "blobs" if redirect else "front", big.digest.split(":")[1], "drop", 70_000, count=2
        )
        with src.open_blob_stream(big.digest, big.size) as blob:
            data = drain(blob, 10_000)
            assert blob.verified
    assert len(data) == big.size
    assert hashlib.sha256(data).hexdigest() == big.digest.split(":")[1]
    where = "blobs" if redirect else "front"
    tries = front.requests(where, big.digest.split(":")[1])
    assert len(tries) == 3
    if honor_range:
        assert tries[1].headers.get("Range") == "bytes=70000-"


def test_short_body_without_length_resumes(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.require_token = False
    img = oci_images["zstd"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        layer = tr.resolve_manifest(src).manifest.layers[0]
        front.fault("front", layer.digest.split(":")[1], "short", 5000, count=1)
        with src.open_blob_stream(layer.digest, layer.size) as blob:
            assert len(drain(blob)) == layer.size and blob.verified


@pytest.mark.parametrize("action", ["drop", "short"])
def test_truncated_forever_fails(
    front: Any, oci_images: Any, fast_options: Any, action: str
) -> None:
    front.require_token = False
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        layer = max(tr.resolve_manifest(src).manifest.layers, key=lambda d: d.size)
        front.honor_range = False  # each retry truncates at the same place again
        front.fault("front", layer.digest.split(":")[1], action, 1000, count=None)
        with src.open_blob_stream(layer.digest, layer.size) as blob:
            with pytest.raises((RegistryError, DigestMismatch)) as ei:
                drain(blob)
            # The consumer never saw a clean end, nor the whole blob.
            assert len(drain.got) < layer.size  # type: ignore[attr-defined]
            assert not blob.verified
            with pytest.raises(RegistryError):
                blob.read(10)
    msg = one_line(ei.value)
    assert "truncated" in msg or "download failed" in msg


@pytest.mark.parametrize(
    ("action", "arg", "words"),
    [
        ("corrupt", 12345, "digest mismatch"),
        ("append", b"trailing junk", "larger than its declared size"),
    ],
)
def test_hostile_blob(
    front: Any, oci_images: Any, fast_options: Any, action: str, arg: Any, words: str
) -> None:
    front.require_token = False
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        layer = max(tr.resolve_manifest(src).manifest.layers, key=lambda d: d.size)
        front.fault("front", layer.digest.split(":")[1], action, arg, count=None)
        with src.open_blob_stream(layer.digest, layer.size) as blob:
            with pytest.raises(DigestMismatch) as ei:
                drain(blob, 65536)
            # The read that would have completed the blob raised instead.
            assert len(drain.got) < layer.size  # type: ignore[attr-defined]
            assert not blob.verified
    assert words in one_line(ei.value)


def test_hostile_blob_finish(front: Any, oci_images: Any, fast_options: Any) -> None:
    """A consumer that stops early (gzip trailer, tar EOF blocks) still gets the check."""
    front.require_token = False
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        layer = max(tr.resolve_manifest(src).manifest.layers, key=lambda d: d.size)
        front.fault("front", layer.digest.split(":")[1], "corrupt", layer.size - 3, count=None)
        with src.open_blob_stream(layer.digest, layer.size) as blob:
            blob.read(1000)
            with pytest.raises(DigestMismatch):
                blob.finish()


@pytest.mark.parametrize(
    ("body", "ctype", "words"),
    [
        (
            b'{"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json"}',
            "application/vnd.example.thing+json",
            "unsupported manifest media type",
        ),
        (b'{"schemaVersion": 2, "layers": [', "application/vnd.oci.image.manifest.v1+json", "JSON"),
        (b"\xff\xfe not json", "application/json", "manifest: not valid JSON"),
        (
            b'{"schemaVersion": 1, "name": "x", "fsLayers": []}',
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "schema 1",
        ),
    ],
)
def test_hostile_manifest(
    front: Any, oci_images: Any, fast_options: Any, body: bytes, ctype: str, words: str
) -> None:
    front.require_token = False
    front.fault("front", "/manifests/", "replace", (body, ctype), count=None)
    with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
        with pytest.raises(OciError) as ei:
            tr.resolve_manifest(src)
    assert words in one_line(ei.value)


def test_manifest_digest_checks(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.require_token = False
    img = oci_images["plain"]
    repo = img.name.split(":")[0]
    # By tag: the registry's Docker-Content-Digest no longer matches the bytes.
    front.fault("front", "/manifests/", "corrupt", 5, count=None)
    with (
        reg.open_source(front.ref(img.name), fast_options) as src,
        pytest.raises(DigestMismatch) as ei,
    ):
        src.get_manifest()
    one_line(ei.value)
    # By digest: the bytes must hash to the pinned digest, header or not.
    front.reset()
    front.require_token = False
    front.fault(
        "front",
        "/manifests/",
        "replace",
        (b'{"schemaVersion":2,"config":{},"layers":[]}', tr.OCI_MANIFEST),
        count=None,
    )
    with reg.open_source(front.ref(f"{repo}@{img.digest}"), fast_options) as src:
        with pytest.raises(DigestMismatch) as ei:
            src.get_manifest()
    assert "digest mismatch" in one_line(ei.value)


def test_oversized_manifest_refused(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.require_token = False
    big = b'{"schemaVersion":2,"x":"' + b"a" * (tr.MAX_JSON_SIZE + 10) + b'"}'
    front.fault("front", "/manifests/", "replace", (big, tr.OCI_MANIFEST), count=None)
    with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
        with pytest.raises(RegistryError) as ei:
            src.get_manifest()
    assert "larger than" in one_line(ei.value)


def test_blob_stream_is_file_like(registry_plain: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_plain.ref(img.name)) as src:
        layer = tr.resolve_manifest(src).manifest.layers[0]
        blob = src.open_blob_stream(layer.digest, layer.size)
        buf = io.BufferedReader(blob, 65536)
        data = buf.read()
        assert len(data) == layer.size and blob.verified
        buf.close()
        assert blob.closed


# ---------------------------------------------------------------- end to end: repository


def _repo(path: Path) -> Any:
    from composefs.repository import Repository

    return Repository.init(path, insecure=True)[0]


def tree_files(repo: Any, manifest_digest: str) -> dict[str, bytes]:
    """Regular files of the stored image, read back through the repository."""
    from composefs.oci import storage
    from composefs.tree import Directory, Leaf, Regular

    root = storage.image_tree(repo, storage.open_image(repo, manifest_digest))
    out: dict[str, bytes] = {}

    def walk(d: Directory, prefix: str) -> None:
        for name, node in d.sorted_entries():
            path = prefix + name.decode()
            if isinstance(node, Directory):
                walk(node, path + "/")
            elif isinstance(node, Leaf) and isinstance(node.content, Regular):
                c = node.content
                if c.data is not None:
                    out[path] = bytes(c.data)
                elif c.size == 0:
                    out[path] = b""
                else:
                    assert c.digest is not None
                    out[path] = repo.read_object(c.digest)

    walk(root, "")
    return out


def assert_clean(repo: Any) -> None:
    from composefs.oci import storage

    result = storage.oci_fsck(repo)
    assert result.ok, str(result)


def layer_gets(front: Any, layers: Any) -> int:
    hexes = [d.digest.split(":")[1] for d in layers]
    return sum(1 for r in front.requests() if r.method == "GET" and any(h in r.path for h in hexes))


def test_pull_into_repository(registry_plain: Any, oci_images: Any, tmp_path: Path) -> None:
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    img = oci_images["plain"]
    result = storage.pull(repo, "docker://" + registry_plain.ref(img.name), "plain")
    assert result.manifest_digest == img.digest
    assert result.image_id is not None
    assert storage.list_tags(repo) == [("plain", img.digest)]
    files = tree_files(repo, img.digest)
    assert {k: v for k, v in files.items() if k in img.files} == img.files
    assert_clean(repo)


@pytest.mark.parametrize("name", ["zstd", "v2s2"])
def test_pull_other_formats_into_repository(
    registry_plain: Any, oci_images: Any, tmp_path: Path, name: str
) -> None:
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    img = oci_images[name]
    result = storage.pull(repo, "docker://" + registry_plain.ref(img.name), name)
    if img.digest:
        assert result.manifest_digest == img.digest
    files = tree_files(repo, result.manifest_digest)
    assert {k: v for k, v in files.items() if k in img.files} == img.files
    assert_clean(repo)


def test_pull_v2s2_same_image_id_as_oci(
    registry_plain: Any, oci_images: Any, tmp_path: Path
) -> None:
    """Docker schema 2 and OCI manifests of the same layers give the same composefs image."""
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    a = storage.pull(repo, "docker://" + registry_plain.ref(oci_images["plain"].name), "a")
    b = storage.pull(repo, "docker://" + registry_plain.ref(oci_images["v2s2"].name), "b")
    assert a.manifest_digest != b.manifest_digest
    assert a.image_ids == b.image_ids


def test_pull_multi_arch_platform(registry_plain: Any, oci_images: Any, tmp_path: Path) -> None:
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    img = oci_images["multi"]
    result = storage.pull(
        repo, "docker://" + registry_plain.ref(img.name), "m", platform="linux/arm/v7"
    )
    assert tree_files(repo, result.manifest_digest)["etc/arch"] == b"armv7\n"
    assert result.manifest_digest in {d["digest"] for d in img.layers}


def test_repeated_pull_fetches_no_layers(
    front: Any, oci_images: Any, fast_options: Any, tmp_path: Path
) -> None:
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    img = oci_images["plain"]
    front.redirect_blobs = True
    with reg.RegistrySource(front.ref(img.name), fast_options) as src:
        first = storage.pull_from_source(repo, src, "one")
        layers = tr.resolve_manifest(src).manifest.layers
    assert layer_gets(front, layers) >= 2
    front.reset()
    with reg.RegistrySource(front.ref(img.name), fast_options) as src:
        again = storage.pull_from_source(repo, src, "two")
    assert again.manifest_digest == first.manifest_digest and again.image_ids == first.image_ids
    assert layer_gets(front, layers) == 0, [r.path for r in front.requests()]
    assert again.stats.layers_already_present == 2
    assert_clean(repo)


@pytest.mark.parametrize(
    ("action", "arg", "words"),
    [
        ("corrupt", 4321, "digest mismatch"),
        ("append", b"x", "larger than its declared size"),
        ("drop", 50_000, "download failed after 4 attempts"),
        ("short", 50_000, "truncated: got 50000 of"),
        ("status", 500, "HTTP 500"),
    ],
)
def test_hostile_pull_leaves_nothing(
    front: Any,
    oci_images: Any,
    fast_options: Any,
    tmp_path: Path,
    action: str,
    arg: Any,
    words: str,
) -> None:
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    img = oci_images["plain"]
    front.require_token = False
    front.honor_range = False
    with reg.RegistrySource(front.ref(img.name), opts(fast_options, max_workers=2)) as src:
        layers = tr.resolve_manifest(src).manifest.layers
        big = max(layers, key=lambda d: d.size)
        front.fault("front", big.digest.split(":")[1], action, arg, count=None)
        with pytest.raises(OciError) as ei:
            storage.pull_from_source(repo, src, "bad")
    msg = one_line(ei.value)
    assert words in msg and big.digest in msg, msg
    assert storage.list_tags(repo) == []
    assert not any(
        name.startswith("oci-layer-") and big.digest in name for name in _stream_names(repo)
    )
    assert_clean(repo)
    # The same repository then pulls the good image fine.
    front.reset()
    front.require_token = False
    with reg.RegistrySource(front.ref(img.name), fast_options) as src:
        assert storage.pull_from_source(repo, src, "good").manifest_digest == img.digest
    assert_clean(repo)


def test_failed_layer_stops_the_others(
    front: Any, oci_images: Any, fast_options: Any, tmp_path: Path
) -> None:
    """One layer fails (HTTP 500) while the other trickles in at 20 B/s:
    the pull fails at once with the first layer's error instead of waiting
    for the other download, and leaves nothing of either behind."""
    import time

    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    img = oci_images["plain"]
    front.require_token = False
    o = opts(fast_options, max_workers=2, retries=0, transfer_timeout=60.0)
    with reg.RegistrySource(front.ref(img.name), o) as src:
        layers = tr.resolve_manifest(src).manifest.layers
        big = max(layers, key=lambda d: d.size)
        small = min(layers, key=lambda d: d.size)
        front.fault("front", big.digest.split(":")[1], "trickle", 0.05, count=None)
        front.fault("front", small.digest.split(":")[1], "status", 500, count=None)
        start = time.monotonic()
        with pytest.raises(OciError) as ei:
            storage.pull_from_source(repo, src, "bad")
        assert time.monotonic() - start < 10
    msg = one_line(ei.value)
    assert "HTTP 500" in msg and small.digest in msg, msg
    assert storage.list_tags(repo) == []
    assert not [n for n in _stream_names(repo) if n.startswith("oci-layer-")]
    assert_clean(repo)


@pytest.mark.parametrize("workers", [1, 2])
def test_pull_stop_from_another_thread(
    front: Any, oci_images: Any, fast_options: Any, tmp_path: Path, workers: int
) -> None:
    """`PullStop.set` from another thread (a service whose client went away)
    while a layer's server is silent: the pull ends at once with
    `Cancelled`, not at the read timeout (30 s); nothing is tagged and the
    repository stays clean."""
    import threading
    import time

    from composefs.errors import Cancelled
    from composefs.oci import storage

    repo = _repo(tmp_path / "repo")
    front.require_token = False
    o = opts(fast_options, max_workers=workers, read_timeout=30.0, retries=3)
    with reg.RegistrySource(front.ref(oci_images["plain"].name), o) as src:
        big = _big_layer(src)
        front.fault("front", big.digest.split(":")[1], "stall", 100, count=None)
        stop = storage.PullStop()
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        start = time.monotonic()
        with pytest.raises(Cancelled, match="pull cancelled"):
            storage.pull_from_source(repo, src, "stopped", stop=stop)
        assert time.monotonic() - start < 5
        timer.join()
    assert storage.list_tags(repo) == []
    assert_clean(repo)


def _stream_names(repo: Any) -> list[str]:
    streams = Path(repo.path) / "streams"
    return [p.name for p in streams.iterdir()] if streams.is_dir() else []


# ---------------------------------------------------------------- end to end: cfsctl


def _cfsctl(*args: str, env: dict[str, str] | None = None) -> Any:
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("cfsctl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "composefs.cli.cfsctl"]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cfsctl_oci_pull(
    registry_plain: Any, registry_auth: Any, oci_images: Any, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    r = _cfsctl("init", "--insecure", str(repo))
    assert r.returncode == 0, r.stderr
    img = oci_images["plain"]
    r = _cfsctl(
        "--repo", str(repo), "oci", "pull", "docker://" + registry_plain.ref(img.name), "mytag"
    )
    assert r.returncode == 0, r.stderr
    assert f"manifest {img.digest}" in r.stdout and "tagged   mytag" in r.stdout
    r = _cfsctl("--repo", str(repo), "oci", "images")
    assert r.returncode == 0 and "mytag" in r.stdout
    r = _cfsctl("--repo", str(repo), "oci", "fsck")
    assert r.returncode == 0, r.stdout + r.stderr

    # basic auth: no credentials -> one clean line; REGISTRY_AUTH_FILE -> works
    ref = "docker://" + registry_auth.ref(oci_images["zstd"].name)
    r = _cfsctl("--repo", str(repo), "oci", "pull", ref, "z", env={"HOME": str(tmp_path)})
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "authentication required" in r.stderr, r.stderr
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps({"auths": {registry_auth.host: {"auth": _b64(registry_auth.creds)}}})
    )
    r = _cfsctl("--repo", str(repo), "oci", "pull", ref, "z", env={"REGISTRY_AUTH_FILE": str(auth)})
    assert r.returncode == 0, r.stderr
    r = _cfsctl(
        "--repo",
        str(repo),
        "oci",
        "pull",
        "docker://" + registry_plain.ref("test/nothing:here"),
        "n",
    )
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "not found" in r.stderr, r.stderr
    r = _cfsctl("--repo", str(repo), "oci", "images")
    assert "mytag" in r.stdout and " n " not in r.stdout


def test_token_revoked_mid_pull(front: Any, oci_images: Any, fast_options: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        resolved = tr.resolve_manifest(src)
        n_tokens = len(front.token_requests)
        with front.lock:
            front.tokens.clear()  # e.g. expired early on the server side
        files = layer_files(src, resolved.manifest.layers[0])
    assert files
    assert len(front.token_requests) == n_tokens + 1


def test_token_never_accepted(front: Any, oci_images: Any, fast_options: Any) -> None:
    front.reject_tokens = True
    with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
        with pytest.raises(RegistryAuthError) as ei:
            src.get_manifest()
    assert "access denied" in one_line(ei.value)
    assert len(front.token_requests) <= 3  # bounded, no loop


def test_bad_certificate_paths(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="certificate directory not found"):
        reg.open_source("127.0.0.1:1/x", cert_dir=str(tmp_path / "nope"))
    with pytest.raises(RegistryError, match="CA file not found"):
        reg.open_source("127.0.0.1:1/x", ca_file=str(tmp_path / "nope.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    src = reg.open_source("registry.example/x", ca_file=str(bad))
    with pytest.raises(RegistryError) as ei:
        src.get_manifest()
    assert "cannot load TLS certificates" in one_line(ei.value)


# ---------------------------------------------------------------- proxies


def test_proxy_rules() -> None:
    o = reg.RegistryOptions(
        env={
            "https_proxy": "proxy.example:3128",
            "NO_PROXY": "internal.example,10.0.0.0/8,.corp,x.example:5000",
        }
    )
    assert reg.proxy_for("https://quay.io/v2/", o) == "http://proxy.example:3128"
    assert reg.proxy_for("http://quay.io/v2/", o) is None  # no http_proxy set
    assert reg.proxy_for("https://internal.example/v2/", o) is None
    assert reg.proxy_for("https://reg.internal.example/v2/", o) is None
    assert reg.proxy_for("https://a.b.corp/v2/", o) is None
    assert reg.proxy_for("https://corp/v2/", o) is None
    assert reg.proxy_for("https://10.1.2.3:5000/v2/", o) is None
    assert reg.proxy_for("https://11.1.2.3/v2/", o) == "http://proxy.example:3128"
    assert reg.proxy_for("https://x.example:5000/v2/", o) is None
    assert reg.proxy_for("https://x.example/v2/", o) == "http://proxy.example:3128"
    assert reg.proxy_for("https://notinternal.example/v2/", o) == "http://proxy.example:3128"
    # loopback is never proxied implicitly; explicit options win
    assert reg.proxy_for("http://127.0.0.1:5000/v2/", o) is None
    o2 = reg.RegistryOptions(env={"ALL_PROXY": "http://p:1", "no_proxy": "*"})
    assert reg.proxy_for("https://quay.io/v2/", o2) is None
    o3 = reg.RegistryOptions(env={"ALL_PROXY": "http://p:1"})
    assert reg.proxy_for("http://quay.io/v2/", o3) == "http://p:1"
    assert (
        reg.proxy_for("http://127.0.0.1/v2/", reg.RegistryOptions(proxy="http://p:2"))
        == "http://p:2"
    )
    assert (
        reg.proxy_for(
            "https://quay.io/", reg.RegistryOptions(proxy="", env={"https_proxy": "http://p:1"})
        )
        is None
    )


def test_proxy_plain_http(registry_plain: Any, oci_images: Any, proxy: Any) -> None:
    img = oci_images["plain"]
    with reg.open_source(registry_plain.ref(img.name), proxy=proxy.url) as src:
        _, files = pull_files(src)
    assert files == img.files
    gets = [r.path for r in proxy.log if r.method == "GET"]
    assert any(p.startswith(f"http://{registry_plain.host}/v2/test/plain/blobs/") for p in gets), (
        gets
    )


def test_proxy_tls_tunnel_with_auth(registry_tls: Any, oci_images: Any, proxy: Any) -> None:
    proxy.require_auth = ("pu", "p@ss")
    img = oci_images["zstd"]
    url = proxy.url.replace("http://", "http://pu:p%40ss@")
    with reg.open_source(
        registry_tls.ref(img.name), proxy=url, ca_file=registry_tls.ca_file
    ) as src:
        _, files = pull_files(src)
    assert files == img.files
    # Only the credential-free plain-HTTP probe of a loopback registry is
    # visible to the proxy; everything else goes through CONNECT tunnels.
    for r in proxy.log:
        if r.method == "GET":
            assert r.path == f"http://{registry_tls.host}/v2/" and "Authorization" not in r.headers
        else:
            assert (r.method, r.path) == ("CONNECT", registry_tls.host)
    assert any(r.method == "CONNECT" for r in proxy.log)

    o = reg.RegistryOptions(proxy=proxy.url, ca_file=registry_tls.ca_file, retries=1, backoff=0.01)
    with reg.open_source(registry_tls.ref(img.name), o) as src, pytest.raises(RegistryError) as ei:
        src.get_manifest()
    msg = one_line(ei.value)
    assert "p@ss" not in msg and "407" in msg, msg


def test_unknown_layer_media_type(
    front: Any, registry_plain: Any, oci_images: Any, fast_options: Any, tmp_path: Path
) -> None:
    from composefs.oci import storage

    img = oci_images["plain"]
    with reg.open_source(registry_plain.ref(img.name)) as src:
        raw, _ = src.get_manifest()
    doc = json.loads(raw)
    doc["layers"][1]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4"
    front.require_token = False
    front.fault(
        "front", "/manifests/", "replace", (json.dumps(doc).encode(), tr.OCI_MANIFEST), count=None
    )
    repo = _repo(tmp_path / "repo")
    with (
        reg.RegistrySource(front.ref(img.name), fast_options) as src,
        pytest.raises(OciError) as ei,
    ):
        storage.pull_from_source(repo, src, "odd")
    assert "application/vnd.example.layer.v1.tar+lz4" in one_line(ei.value)
    assert storage.list_tags(repo) == []
    assert_clean(repo)


class _FakeResponse:
    """Just enough of urllib3's response for the redirect policy (no network)."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers

    def drain_conn(self) -> None:
        pass

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("location", "tls_verify", "refused"),
    [
        ("http://cdn.example/blob", True, True),  # downgrade to plain HTTP off loopback
        ("http://127.0.0.2/blob", True, False),  # loopback is fine
        ("http://cdn.example/blob", False, False),  # the user turned verification off
        ("ftp://cdn.example/blob", True, True),
    ],
)
def test_redirect_policy(location: str, tls_verify: bool, refused: bool) -> None:
    client = reg.RegistryClient(
        "registry.example", options=reg.RegistryOptions(tls_verify=tls_verify)
    )
    client._base = "https://registry.example"
    sent: list[tuple[str, dict[str, str]]] = []

    def fake_send(method: str, url: str, headers: dict[str, str], body: Any = None) -> Any:
        sent.append((url, headers))
        if len(sent) == 1:
            return _FakeResponse(307, {"Location": location})
        return _FakeResponse(200, {})

    client._send = fake_send  # type: ignore[method-assign]
    client.auth._challenge = oauth.Challenge("basic")
    client.auth.credentials = oauth.Credentials("u", "p")
    if refused:
        with pytest.raises(RegistryError) as ei:
            client._request(
                "GET", "https://registry.example/v2/x/blobs/sha256:" + "0" * 64, scope="s"
            )
        one_line(ei.value)
        assert len(sent) == 1
    else:
        resp = client._request(
            "GET", "https://registry.example/v2/x/blobs/sha256:" + "0" * 64, scope="s"
        )
        assert resp.status == 200 and sent[1][0] == location
        assert "Authorization" in sent[0][1] and "Authorization" not in sent[1][1]


# ---------------------------------------------------------------- pushing


def test_push_from_oci_layout(registry_plain: Any, tmp_path: Path) -> None:
    import ocitestlib as L

    files = {"srv/data": b"pushed!\n" * 1000, "srv/big": hashlib.sha256(b"x").digest() * 5000}
    tar = L.tar_layer([L.directory("srv"), *(L.file(n, d) for n, d in sorted(files.items()))])
    built = L.write_oci_layout(
        tmp_path / "layout", [L.ImageSpec([tar], compression="zstd", tag="v1")]
    )
    dest = registry_plain.ref("pushed/layout:v1")
    with tr.open_source(f"oci:{tmp_path / 'layout'}:v1") as src:
        digest = reg.push_image(src, dest)
    assert digest == built[0].manifest_digest
    with reg.open_source(dest) as src:
        resolved, got = pull_files(src)
    assert resolved.digest == digest and got == files
    # Everything is there now: pushing again sends no blob.
    client = reg.RegistryClient(registry_plain.host)
    for d in [built[0].config_digest, *built[0].layer_digests]:
        assert client.blob_exists("pushed/layout", d)
        assert not client.push_blob("pushed/layout", d, 0, lambda: io.BytesIO(b""))


def test_push_registry_to_registry_with_auth(
    registry_plain: Any, registry_auth: Any, oci_images: Any, tmp_path: Path
) -> None:
    """Copy a multi-arch index between registries; digests are preserved."""
    img = oci_images["multi"]
    dest = registry_auth.ref("copied/multi:v2")
    o = reg.RegistryOptions(env={"HOME": str(tmp_path)})
    with (
        reg.open_source(registry_plain.ref(img.name)) as src,
        pytest.raises(RegistryAuthError) as ei,
    ):
        reg.push_image(src, dest, o)
    assert "authentication required" in one_line(ei.value)
    with reg.open_source(registry_plain.ref(img.name)) as src:
        digest = reg.push_image(src, dest, reg.RegistryOptions(creds=registry_auth.creds))
    assert digest == img.digest
    with reg.open_source(dest, creds=registry_auth.creds) as src:
        _, files = pull_files(src, "linux/arm/v7")
    assert files["etc/arch"] == b"armv7\n"
    # One platform only, under its own tag.
    with reg.open_source(registry_plain.ref(img.name)) as src:
        one = reg.push_image(
            src, registry_plain.ref("copied/one:arm64"), platform=tr.Platform.parse("linux/arm64")
        )
    assert one in {d["digest"] for d in img.layers}


def test_push_blob_mount_and_bad_digest(registry_plain: Any, oci_images: Any) -> None:
    client = reg.RegistryClient(registry_plain.host)
    with reg.open_source(registry_plain.ref(oci_images["plain"].name)) as src:
        layer = tr.resolve_manifest(src).manifest.layers[0]
    assert not client.blob_exists("mounted/here", layer.digest)
    # Cross-repository mount: no bytes sent, the blob appears in the new repository.
    assert not client.push_blob(
        "mounted/here", layer.digest, layer.size, lambda: io.BytesIO(b""), mount_from="test/plain"
    )
    assert client.blob_exists("mounted/here", layer.digest)
    # The registry refuses bytes that do not match the digest; one clean line.
    fake = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(RegistryError) as ei:
        client.push_blob("mounted/here", fake, 5, lambda: io.BytesIO(b"hello"))
    assert "digest" in one_line(ei.value).lower()
    assert not client.blob_exists("mounted/here", fake)


def test_push_with_bearer_token(front: Any, oci_images: Any, fast_options: Any) -> None:
    img = oci_images["zstd"]
    dest = front.ref("pushed/bearer:v1")
    with reg.open_source(front.ref(img.name), fast_options) as src:
        digest = reg.push_image(src, dest, fast_options)
    assert digest == img.digest
    scopes = [r.path for r in front.token_requests]
    assert any("repository%3Apushed%2Fbearer%3Apull%2Cpush" in q for q in scopes), scopes
    uploads = [r for r in front.requests("front") if r.method in ("POST", "PUT")]
    assert uploads and all(
        r.headers.get("Authorization", "").startswith("Bearer ") for r in uploads
    )
    with reg.open_source(dest, fast_options) as src:
        _, files = pull_files(src)
    assert files == img.files


def test_push_retries_refused_puts(front: Any, fast_options: Any, tmp_path: Path) -> None:
    """A blob or manifest PUT refused with 503 is sent again (the blob in a
    fresh upload), within the retry bound."""
    import ocitestlib as L

    files = {"srv/data": b"retried\n" * 1000}
    tar = L.tar_layer([L.directory("srv"), *(L.file(n, d) for n, d in files.items())])
    (built,) = L.write_oci_layout(tmp_path / "layout", [L.ImageSpec([tar], tag="v1")])
    source = f"oci:{tmp_path / 'layout'}:v1"
    front.require_token = False
    # the upload's own URL (the PUT), not the POST that starts it
    blob_put = front.fault("front", r"/blobs/uploads/\w", "status", 503, count=1)
    manifest_put = front.fault("front", r"^/v2/pushed/retry/manifests/", "status", 503, count=2)
    dest = front.ref("pushed/retry:v1")
    with tr.open_source(source) as src:
        assert reg.push_image(src, dest, fast_options) == built.manifest_digest
    assert blob_put.hits == 1 and manifest_put.hits == 2
    puts = [r for r in front.requests("front", "^/v2/pushed/retry/manifests/") if r.method == "PUT"]
    assert len(puts) == 3
    uploads = [r for r in front.requests("front", "/blobs/uploads/") if r.method == "POST"]
    assert len(uploads) == len(built.layer_digests) + 2  # config, layers, one fresh upload
    with reg.open_source(dest, fast_options) as src:
        _, got = pull_files(src)
    assert got == files
    # A refusal that persists ends the push with the registry's answer.
    front.fault("front", r"^/v2/pushed/never/manifests/", "status", 503, count=None)
    with tr.open_source(source) as src:
        with pytest.raises(RegistryError) as ei:
            reg.push_image(src, front.ref("pushed/never:v1"), fast_options)
    assert "HTTP 503" in one_line(ei.value)
    never = [
        r for r in front.requests("front", "^/v2/pushed/never/manifests/") if r.method == "PUT"
    ]
    assert len(never) == fast_options.retries + 1


def test_push_within_registry_mounts(front: Any, oci_images: Any, fast_options: Any) -> None:
    img = oci_images["plain"]
    dest = front.ref("mounted/copy:v1")
    with reg.open_source(front.ref(img.name), fast_options) as src:
        assert reg.push_image(src, dest, fast_options) == img.digest
    posts = [r.path for r in front.requests("front") if r.method == "POST"]
    assert posts and all("mount=sha256" in p and "from=test%2Fplain" in p for p in posts), posts
    assert not [r for r in front.requests("front", "/blobs/uploads/") if r.method == "PUT"]
    with reg.open_source(dest, fast_options) as src:
        _, files = pull_files(src)
    assert files == img.files


# ---------------------------------------------------------------- deadlines, token realms


def _big_layer(src: reg.RegistrySource) -> tr.Descriptor:
    return max(tr.resolve_manifest(src).manifest.layers, key=lambda d: d.size)


@pytest.mark.parametrize("action", ["trickle", "stall"])
def test_blob_transfer_deadline(
    front: Any, oci_images: Any, fast_options: Any, action: str
) -> None:
    """1 B per 0.05 s, or a Content-Length never delivered: the transfer
    ends at --transfer-timeout (here 1 s), not at the 30 s read timeout nor
    never, and the error names the host."""
    import time

    front.require_token = False
    o = opts(fast_options, transfer_timeout=1.0, read_timeout=30.0)
    with reg.open_source(front.ref(oci_images["plain"].name), o) as src:
        layer = _big_layer(src)
        arg = 0.05 if action == "trickle" else 10
        front.fault("front", layer.digest.split(":")[1], action, arg, count=None)
        start = time.monotonic()
        with src.open_blob_stream(layer.digest, layer.size) as blob:
            with pytest.raises(RegistryError) as ei:
                drain(blob, 65536)
        assert time.monotonic() - start < 8
    msg = one_line(ei.value)
    assert front.host in msg and "not finished after 1 s" in msg and "--transfer-timeout" in msg


def test_blob_abort_wakes_a_stalled_read(front: Any, oci_images: Any, fast_options: Any) -> None:
    """`BlobStream.abort` from another thread: a read waiting on a silent
    server (30 s read timeout) fails at once, and is not retried."""
    import threading
    import time

    front.require_token = False
    o = opts(fast_options, read_timeout=30.0, retries=3)
    with reg.open_source(front.ref(oci_images["plain"].name), o) as src:
        layer = _big_layer(src)
        hexd = layer.digest.split(":")[1]
        front.fault("front", hexd, "stall", 100, count=None)
        with src.open_blob_stream(layer.digest, layer.size) as blob:
            timer = threading.Timer(0.3, blob.abort)
            timer.start()
            start = time.monotonic()
            with pytest.raises(RegistryError) as ei:
                drain(blob, 65536)
            assert time.monotonic() - start < 5
            timer.join()
    assert "download stopped" in one_line(ei.value)
    assert len([r for r in front.requests("front", hexd) if r.method == "GET"]) == 1


def test_manifest_stall_bounded_by_read_timeout(
    front: Any, oci_images: Any, fast_options: Any
) -> None:
    front.require_token = False
    front.fault("front", "/manifests/", "stall", 5, count=None)
    o = opts(fast_options, read_timeout=1.0, retries=0)
    with reg.open_source(front.ref(oci_images["plain"].name), o) as src:
        with pytest.raises(RegistryError) as ei:
            src.get_manifest()
    assert front.host in one_line(ei.value)


def test_trickled_response_head_bounded_by_read_timeout(
    front: Any, oci_images: Any, fast_options: Any
) -> None:
    """A registry that sends a header byte every 0.1 s (each socket read
    succeeds well within the read timeout) fails the request once the
    head has taken the read timeout (1 s), not after 60 s or never."""
    import time

    front.require_token = False
    front.fault("front", "/manifests/", "trickle-head", 0.1, count=None)
    o = opts(fast_options, read_timeout=1.0, retries=0)
    with reg.open_source(front.ref(oci_images["plain"].name), o) as src:
        start = time.monotonic()
        with pytest.raises(RegistryError) as ei:
            src.get_manifest()
        assert time.monotonic() - start < 10
    msg = one_line(ei.value)
    assert front.host in msg and "response headers not complete after 1 s" in msg


def _foreign_realm(front: Any) -> str:
    return f"http://127.0.0.2:{front.blob_port}/token"


def test_stalled_token_realm_is_named(front: Any, oci_images: Any, fast_options: Any) -> None:
    """The token server on another host stalls: the error names it, not the registry."""
    front.realm = _foreign_realm(front)
    front.fault("blobs", "/token", "stall", 3, count=None)
    o = opts(fast_options, read_timeout=1.0, retries=0)
    with reg.open_source(front.ref(oci_images["plain"].name), o) as src:
        with pytest.raises(RegistryError) as ei:
            src.get_manifest()
    assert f"127.0.0.2:{front.blob_port}" in one_line(ei.value)


def test_no_credentials_to_a_plain_http_realm_on_another_host(
    front: Any, oci_images: Any, fast_options: Any
) -> None:
    front.realm = _foreign_realm(front)
    o = opts(fast_options, creds="tokuser:secret")
    with reg.open_source(front.ref(oci_images["plain"].name), o) as src:
        with pytest.raises(RegistryAuthError) as ei:
            src.get_manifest()
    msg = one_line(ei.value)
    assert "127.0.0.2" in msg and "refusing to send credentials" in msg
    assert not front.token_requests  # nothing was sent anywhere
    # anonymous token requests may go there (nothing secret in them)
    with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
        src.get_manifest()
    assert [r.where for r in front.token_requests] == ["blobs"]


@pytest.mark.parametrize("creds", [None, "tokuser:secret"], ids=["anonymous", "creds"])
def test_user_at_host_realm_refused(
    front: Any, oci_images: Any, fast_options: Any, creds: str | None
) -> None:
    front.realm = f"http://{front.host}@127.0.0.2:{front.blob_port}/token"
    with reg.open_source(
        front.ref(oci_images["plain"].name), opts(fast_options, creds=creds)
    ) as src:
        with pytest.raises(RegistryAuthError) as ei:
            src.get_manifest()
    assert "carries a user name" in one_line(ei.value)
    assert not front.token_requests


def test_hostile_token_answers(front: Any, oci_images: Any, fast_options: Any) -> None:
    """Token JSON nested 100k deep, 5000-digit numbers, expires_in 1e309:
    one line naming the token server, or a working token."""
    import random

    import hostilelib as H

    outcomes = set()
    for cls, body in H.hostile_json(
        random.Random(8), lambda v: '{"token": "x", "expires_in": ' + v + "}"
    ):
        front.reset()
        front.fault("front", "/token", "replace", body)
        with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
            try:
                src.get_manifest()
                outcomes.add("ok")
            except RegistryError as e:
                msg = one_line(e)
                assert f"token server {front.host}" in msg or "access denied" in msg, (cls, msg)
                outcomes.add("refused")
    assert outcomes == {"ok", "refused"}


def test_hostile_manifest_json(front: Any, oci_images: Any, fast_options: Any) -> None:
    import random

    import hostilelib as H

    front.require_token = False
    for _cls, body in H.hostile_json(random.Random(5)):
        front.reset()
        front.require_token = False
        front.fault(
            "front", "/manifests/", "replace", (body, "application/vnd.oci.image.manifest.v1+json")
        )
        with reg.open_source(front.ref(oci_images["plain"].name), fast_options) as src:
            with pytest.raises(OciError) as ei:
                tr.resolve_manifest(src)
        one_line(ei.value)
