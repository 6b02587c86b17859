"""``cfsctl oci pull`` registry flags against real registries on loopback.

Fixtures (tests/oci/conftest.py): htpasswd basic-auth and TLS docker-registry
instances sharing the storage of the plain one, test images pushed with
skopeo. Also: the layer fetch skips its own digest check only for sources
that verify (the registry's blob stream), and keeps it for the others.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ocitestlib as L
import pytest

from composefs.errors import DigestMismatch
from composefs.oci import storage
from composefs.oci import transports as tr
from composefs.repository import Repository
from testlib import interrupt_when


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r, _ = Repository.init(tmp_path / "repo", algorithm="sha512", insecure=True)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _no_user_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No auth file of the machine's user may answer for these registries."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)


def cfs(
    capsysbinary: pytest.CaptureFixture[bytes], repo: Repository, *args: str
) -> tuple[int, str, str]:
    return L.run_cfsctl(capsysbinary, repo.path, *args)


def check_one_line(rc: int, err: str, *words: str) -> None:
    assert rc != 0
    assert err.startswith("cfsctl: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


# ---------------------------------------------------------------- basic auth


def test_creds(capsysbinary: Any, repo: Repository, registry_auth: Any, oci_images: Any) -> None:
    img = oci_images["plain"]
    ref = "docker://" + registry_auth.ref(img.name)
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", ref, "anon")
    check_one_line(rc, err, "no credentials found")  # anonymous is refused
    assert storage.list_tags(repo) == []
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", "--creds", "cfsuser:wrong", ref, "bad")
    check_one_line(rc, err)
    rc, out, err = cfs(
        capsysbinary, repo, "oci", "pull", "--creds", registry_auth.creds, ref, "withcreds"
    )
    assert rc == 0, err
    assert L.fields(out)["manifest"] == img.digest
    assert storage.list_tags(repo) == [("withcreds", img.digest)]


def test_authfile(
    capsysbinary: Any, repo: Repository, registry_auth: Any, oci_images: Any, tmp_path: Path
) -> None:
    img = oci_images["plain"]
    token = base64.b64encode(registry_auth.creds.encode()).decode()
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {registry_auth.host: {"auth": token}}}))
    ref = "docker://" + registry_auth.ref(img.name)
    rc, out, err = cfs(capsysbinary, repo, "oci", "pull", "--authfile", str(authfile), ref, "a")
    assert rc == 0, err
    assert L.fields(out)["manifest"] == img.digest
    # --creds wins over the file
    rc, _out, err = cfs(
        capsysbinary, repo, "oci", "pull", "--authfile", str(authfile),
        "--creds", "cfsuser:nope", ref, "b",
    )  # fmt: skip
    check_one_line(rc, err)
    # an auth file for another registry does not help
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"auths": {"registry.example": {"auth": token}}}))
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", "--authfile", str(other), ref, "c")
    check_one_line(rc, err, "no credentials found")


# ---------------------------------------------------------------- TLS


def test_tls_cert_dir(
    capsysbinary: Any, repo: Repository, registry_tls: Any, oci_images: Any, tmp_path: Path
) -> None:
    img = oci_images["zstd"]
    ref = "docker://" + registry_tls.ref(img.name)
    # A self-signed registry: refused without its CA, never retried over HTTP.
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", ref, "x")
    check_one_line(rc, err, "certificate")
    assert storage.list_tags(repo) == []
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(registry_tls.ca_file, certs / "ca.crt")
    rc, out, err = cfs(capsysbinary, repo, "oci", "pull", "--cert-dir", str(certs), ref, "x")
    assert rc == 0, err
    assert L.fields(out)["manifest"] == img.digest
    # A directory without the CA does not help.
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", "--cert-dir", str(empty), ref, "y")
    check_one_line(rc, err, "certificate")


@pytest.mark.parametrize("flag", ["--tls-verify=false", "--tls-verify=FALSE"])
def test_tls_verify_false(
    capsysbinary: Any, repo: Repository, registry_tls: Any, oci_images: Any, flag: str
) -> None:
    img = oci_images["zstd"]
    ref = "docker://" + registry_tls.ref(img.name)
    rc, out, err = cfs(capsysbinary, repo, "oci", "pull", flag, ref, "insecure")
    assert rc == 0, err
    assert L.fields(out)["manifest"] == img.digest
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", "--tls-verify=true", ref, "secure")
    check_one_line(rc, err, "certificate")


def test_plain_registry_and_proxy_flag(
    capsysbinary: Any, repo: Repository, registry_plain: Any, oci_images: Any, proxy: Any
) -> None:
    """Loopback plain HTTP needs no flag; an explicit --proxy is used."""
    img = oci_images["zstd"]
    ref = "docker://" + registry_plain.ref(img.name)
    rc, out, err = cfs(capsysbinary, repo, "oci", "pull", "--proxy", proxy.url, ref, "p")
    assert rc == 0, err
    assert L.fields(out)["manifest"] == img.digest
    assert proxy.log, "the explicit proxy was not used"


# ---------------------------------------------------------------- bad flags


def test_bad_flags_one_line(
    capsysbinary: Any, repo: Repository, registry_plain: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal to ask a password on
    ref = "docker://" + registry_plain.ref("test/plain:v1")
    cases = [
        (("--tls-verify=maybe", ref), "--tls-verify"),
        (("--cert-dir", str(tmp_path / "nope"), ref), "--cert-dir"),
        (("--authfile", str(tmp_path / "nope.json"), ref), "--authfile"),
        (("--creds", ":secret", ref), "--creds"),
        (("--creds", "user", ref), "no password"),
        (("--proxy", "socks5://127.0.0.1:1", ref), "--proxy"),
        (("--creds", "a:b", f"oci:{tmp_path}"), "only for docker://"),
        (("--tls-verify=false", f"oci-archive:{tmp_path}/x.tar"), "only for docker://"),
    ]
    for args, words in cases:
        rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", *args)
        check_one_line(rc, err, words)
    bad_auth = tmp_path / "bad.json"
    bad_auth.write_text("{not json")
    rc, _out, err = cfs(capsysbinary, repo, "oci", "pull", "--authfile", str(bad_auth), ref)
    check_one_line(rc, err, "not valid JSON")
    assert storage.list_tags(repo) == []


# ---------------------------------------------------------------- digest checks on fetch


class _Wrapped(tr.BaseSource):
    """An `oci:` layout whose blob streams claim (or not) to verify digests."""

    def __init__(self, inner: tr.ImageSource, claims: bool) -> None:
        self.inner = inner
        self.claims = claims

    @property
    def reference(self) -> str:
        return self.inner.reference

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]:
        return self.inner.get_manifest(digest)

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        f = self.inner.open_blob(digest, size)
        if self.claims:
            f = _Claims(f)  # type: ignore[assignment]
        return f

    def close(self) -> None:
        self.inner.close()


class _Claims(io.RawIOBase):
    """Says it verifies digests, but never reaches a verified state."""

    verifies_digest = True
    verified = False

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _layout_with_retouched_gzip(tmp_path: Path) -> tuple[Path, L.BuiltImage]:
    """A gzip layer whose blob no longer matches its digest while its content
    (and so the diff_id) stays right: only the blob digest check can tell."""
    layer = L.tar_layer([L.directory("usr"), L.file("usr/data", bytes(range(256)) * 64)])
    path = tmp_path / "layout"
    (built,) = L.write_oci_layout(path, [L.ImageSpec([layer], compression="gzip")])
    blob = path / "blobs" / "sha256" / built.layer_digests[0].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[4:8] = b"\x01\x02\x03\x04"  # the gzip header's MTIME field
    assert gzip.decompress(bytes(data)) == layer
    blob.write_bytes(bytes(data))
    return path, built


@pytest.mark.parametrize("claims", [False, True])
def test_layer_blob_digest_still_checked(repo: Repository, tmp_path: Path, claims: bool) -> None:
    path, built = _layout_with_retouched_gzip(tmp_path)
    source = _Wrapped(tr.open_source(f"oci:{path}"), claims)
    with pytest.raises(DigestMismatch) as ei:
        storage.pull_from_source(repo, source, "bad")
    source.close()
    words = "did not verify" if claims else "layer blob digest mismatch"
    assert words in str(ei.value)
    assert storage.list_tags(repo) == []
    assert repo.has_stream(storage.layer_stream(built.diff_ids[0])) is None


def test_registry_blob_corruption_caught(
    repo: Repository, front: Any, oci_images: Any, fast_options: Any
) -> None:
    """The registry stream verifies (so storage does not hash again): a bad
    blob still fails the pull and leaves nothing named."""
    from composefs.oci import registry as reg

    front.require_token = False
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name), fast_options) as src:
        layer = max(tr.resolve_manifest(src).manifest.layers, key=lambda d: d.size)
    front.fault("front", layer.digest.split(":")[1], "corrupt", 777, count=None)
    with pytest.raises(DigestMismatch):
        storage.pull(repo, "docker://" + front.ref(img.name), "bad", registry_options=fast_options)
    assert storage.list_tags(repo) == []


# ---------------------------------------------------------------- the terminal


def test_ctrl_c_clears_the_progress_line(
    repo: Repository, front: Any, oci_images: Any, tmp_path: Path
) -> None:
    """On a real terminal (pty), with a layer that stalls half-way: Ctrl-C
    (SIGINT) during the progress display clears the line, then the one-line
    error follows; the frame shown before it had the right counts."""
    import os
    import pty
    import re
    import select
    import signal
    import sys
    import time

    from composefs.oci import registry as reg

    front.require_token = False
    img = oci_images["plain"]
    with reg.open_source(front.ref(img.name)) as src:
        layer = max(tr.resolve_manifest(src).manifest.layers, key=lambda d: d.size)
    stall = front.fault("front", layer.digest.split(":")[1], "hold", 100, count=None)
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: cfsctl with the pty as its terminal
        os.execve(
            sys.executable,
            [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", repo.path,
             "oci", "pull", "docker://" + front.ref(img.name), "t"],
            env,
        )  # fmt: skip
    out = b""

    def read_until(pattern: bytes, timeout: float) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while re.search(pattern, out) is None and time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    try:
        # the other layer is done: its line, then the progress line again for
        # the layer still coming, with the bytes that came
        frame = rb"done\r\n\r\x1b\[Kfetching 1 layer\(s\): (\S+ \S+) / (\S+ \S+)$"
        read_until(frame, 60)
        m = re.search(frame, out)
        assert m is not None, out
        assert m.group(1) != m.group(2) and m.group(1) != b"0 B", out
        os.kill(pid, signal.SIGINT)
        stall.release.set()
        read_until(b"interrupted", 60)
    finally:
        stall.release.set()
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, out
    tail = out[out.rindex(b"fetching 1 layer(s)") :]
    # the line is cleared before the error is printed, and nothing else
    assert re.fullmatch(
        rb"fetching 1 layer\(s\): [^\r\n]*\r\x1b\[Kcfsctl: interrupted\r\n", tail
    ), tail
    assert storage.list_tags(repo) == []


@pytest.mark.parametrize(
    ("image", "action", "arg"),
    [("plain", "trickle", 0.05), ("plain", "hold", 100), ("multi", "hold", 100)],
)
def test_ctrl_c_does_not_wait_for_a_slow_layer(
    repo: Repository,
    front: Any,
    oci_images: Any,
    tmp_path: Path,
    image: str,
    action: str,
    arg: Any,
) -> None:
    """Ctrl-C while a layer trickles in at 20 B/s, or while its server has
    gone silent half-way (the read timeout is 120 s): cfsctl exits at once
    (130, "interrupted"), and the repository is left clean (a finished
    layer stays, for a retry). `plain` has two layers, `multi` one."""
    import os
    import sys

    from composefs.oci import registry as reg

    front.require_token = False
    img = oci_images[image]
    with reg.open_source(front.ref(img.name)) as src:
        layers = tr.resolve_manifest(src).manifest.layers
    big = max(layers, key=lambda d: d.size)
    fault = front.fault("front", big.digest.split(":")[1], action, arg, count=None)
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    try:
        # until the slow layer's download has begun
        rc, err, took = interrupt_when(
            [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", repo.path,
             "oci", "pull", "docker://" + front.ref(img.name), "t"],
            lambda: any(r.method == "GET" for r in front.requests("front", big.digest)),
            env=env,
        )  # fmt: skip
    finally:
        if action == "hold":
            fault.release.set()
    assert rc == 130 and err == "cfsctl: interrupted\n", err
    assert took < 5, took
    assert storage.list_tags(repo) == []
    result = storage.oci_fsck(repo)
    assert result.ok, str(result)
