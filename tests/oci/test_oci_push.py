"""``cfsctl oci push``: stored images back out to a registry or an OCI layout.

Round trips go through independent readers: the real docker-registry
(which checks every blob digest on upload), ``skopeo inspect`` and
``umoci`` on the written layout, and our own pull into a fresh repository
(same config digest, same composefs image id).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ocitestlib as L
import pytest

from composefs.errors import DigestMismatch
from composefs.oci import export, storage
from composefs.repository import Repository

BIG = bytes(range(256)) * 40


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name}")
    return path


def layers() -> list[bytes]:
    base = L.tar_layer(
        [
            L.directory("usr"),
            L.directory("usr/bin"),
            L.file("usr/bin/tool", BIG, mode=0o755),
            L.file("usr/bin/small", b"#!/bin/sh\n", mode=0o755),
            L.hardlink("usr/bin/tool2", "usr/bin/tool"),
            L.symlink("bin", "usr/bin"),
            L.directory("etc"),
            L.file("etc/hostname", b"base\n", xattrs={"user.k": b"v"}),
        ]
    )
    top = L.tar_layer([L.whiteout("etc/hostname"), L.file("etc/motd", BIG[::-1])])
    return [base, top]


def new_repo(path: Path) -> Repository:
    r, _ = Repository.init(path, algorithm="sha512", insecure=True)
    return r


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = new_repo(tmp_path / "repo")
    yield r
    r.close()


def cfs(
    capsysbinary: pytest.CaptureFixture[bytes], repo: Repository, *args: str
) -> tuple[int, str, str]:
    return L.run_cfsctl(capsysbinary, repo.path, *args)


def pull_fresh(tmp_path: Path, name: str, imgref: str) -> storage.PullResult:
    r = new_repo(tmp_path / name)
    try:
        return storage.pull(r, imgref, "again")
    finally:
        r.close()


def first_manifest(repo: Repository) -> bytes:
    return storage.open_image_ref(repo, "orig").manifest_raw


@pytest.fixture
def uncompressed(tmp_path: Path) -> tuple[Path, L.BuiltImage]:
    path = tmp_path / "src-layout"
    (built,) = L.write_oci_layout(path, [L.ImageSpec(layers(), compression="none", tag="t")])
    return path, built


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "tar_type"),
    [
        ("plain", "application/vnd.oci.image.layer.v1.tar"),
        ("v2s2", "application/vnd.docker.image.rootfs.diff.tar"),
    ],
)
def test_push_compressed_image_to_registry(
    capsysbinary: Any,
    repo: Repository,
    registry_plain: Any,
    oci_images: Any,
    tmp_path: Path,
    name: str,
    tar_type: str,
) -> None:
    """gzip layers come back uncompressed: new manifest digest, same config
    digest, same image id; the registry accepted every blob digest."""
    img = oci_images[name]
    first = storage.pull(repo, "docker://" + registry_plain.ref(img.name), "orig")
    dest = "docker://" + registry_plain.ref(f"pushed/{name}:v1")
    rc, out, err = cfs(capsysbinary, repo, "oci", "push", "orig", dest)
    assert rc == 0, err
    got = L.fields(out)
    assert got["config"] == first.config_digest
    assert got["pushed"] == dest
    assert got["manifest"] != first.manifest_digest
    assert "uncompressed" in err and err.count("\n") == 1
    again = pull_fresh(tmp_path, "r2", dest)
    assert again.manifest_digest == got["manifest"]
    assert again.config_digest == first.config_digest
    assert again.image_ids == first.image_ids
    # The rewritten manifest names plain tars whose digests are the diff_ids.
    src = export.StoredImageSource(repo, "orig")
    manifest = json.loads(src.manifest_raw)
    config = json.loads(src.image.config_raw)
    assert [d["digest"] for d in manifest["layers"]] == config["rootfs"]["diff_ids"]
    assert {d["mediaType"] for d in manifest["layers"]} == {tar_type}
    assert manifest["mediaType"] == json.loads(first_manifest(repo))["mediaType"]
    src.close()
    # Pushing again sends nothing new and names the same manifest.
    rc, out2, err = cfs(capsysbinary, repo, "oci", "push", "@" + first.manifest_digest, dest)
    assert rc == 0, err
    assert L.fields(out2)["manifest"] == got["manifest"]


def test_push_uncompressed_keeps_manifest_digest(
    capsysbinary: Any,
    repo: Repository,
    registry_plain: Any,
    tmp_path: Path,
    uncompressed: tuple[Path, L.BuiltImage],
) -> None:
    path, built = uncompressed
    first = storage.pull(repo, f"oci:{path}:t", "orig")
    assert first.manifest_digest == built.manifest_digest
    dest = "docker://" + registry_plain.ref("pushed/plain-tar:v1")
    # by config digest this time
    rc, out, err = cfs(capsysbinary, repo, "oci", "push", "@" + built.config_digest, dest)
    assert rc == 0, err
    assert err == ""
    assert L.fields(out)["manifest"] == built.manifest_digest
    again = pull_fresh(tmp_path, "r2", dest)
    assert again.manifest_digest == built.manifest_digest
    assert again.image_ids == first.image_ids


def test_push_with_creds(
    capsysbinary: Any,
    repo: Repository,
    registry_auth: Any,
    uncompressed: tuple[Path, L.BuiltImage],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    path, built = uncompressed
    storage.pull(repo, f"oci:{path}:t", "orig")
    dest = "docker://" + registry_auth.ref("pushed/auth:v1")
    rc, _out, err = cfs(capsysbinary, repo, "oci", "push", "orig", dest)
    assert rc != 0 and err.startswith("cfsctl: ") and err.count("\n") == 1
    rc, out, err = cfs(
        capsysbinary, repo, "oci", "push", "--creds", registry_auth.creds, "orig", dest
    )
    assert rc == 0, err
    assert L.fields(out)["manifest"] == built.manifest_digest


# ---------------------------------------------------------------- OCI layout


def test_push_to_oci_layout(
    capsysbinary: Any, repo: Repository, tmp_path: Path, uncompressed: tuple[Path, L.BuiltImage]
) -> None:
    path, built = uncompressed
    first = storage.pull(repo, f"oci:{path}:t", "orig")
    out_dir = tmp_path / "exported"
    rc, out, err = cfs(capsysbinary, repo, "oci", "push", "orig", f"oci:{out_dir}:v1")
    assert rc == 0, err
    assert L.fields(out)["manifest"] == built.manifest_digest
    # byte for byte: the blobs are the source layout's blobs
    for digest in (built.manifest_digest, built.config_digest, *built.layer_digests):
        rel = Path("blobs", "sha256", digest.split(":")[1])
        assert (out_dir / rel).read_bytes() == (path / rel).read_bytes()
    index = json.loads((out_dir / "index.json").read_text())
    assert [e["annotations"]["org.opencontainers.image.ref.name"] for e in index["manifests"]] == [
        "v1"
    ]
    # independent readers
    skopeo = need_tool("skopeo")
    p = subprocess.run(
        [skopeo, "inspect", f"oci:{out_dir}:v1"], capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["Digest"] == built.manifest_digest
    assert info["Layers"] == built.layer_digests
    umoci = need_tool("umoci")
    bundle = tmp_path / "bundle"
    p = subprocess.run(
        [umoci, "unpack", "--rootless", "--image", f"{out_dir}:v1", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert (bundle / "rootfs" / "usr" / "bin" / "tool").read_bytes() == BIG
    assert (bundle / "rootfs" / "etc" / "motd").read_bytes() == BIG[::-1]
    assert not (bundle / "rootfs" / "etc" / "hostname").exists()
    # and back in: same image id
    again = pull_fresh(tmp_path, "r2", f"oci:{out_dir}:v1")
    assert again.manifest_digest == built.manifest_digest
    assert again.image_ids == first.image_ids


def test_pushed_layout_is_readable_by_others(
    capsysbinary: Any, repo: Repository, tmp_path: Path, uncompressed: tuple[Path, L.BuiltImage]
) -> None:
    """Every file of a pushed layout is 0644 (index.json, oci-layout and
    all blobs, as skopeo writes them), also after a second push updates it;
    a user other than the writer can read it (skopeo as nobody)."""
    path, _ = uncompressed
    storage.pull(repo, f"oci:{path}:t", "orig")
    out_dir = tmp_path / "exported"
    old = os.umask(0o022)
    try:
        for tag in ("v1", "v2"):
            rc, _, err = cfs(capsysbinary, repo, "oci", "push", "orig", f"oci:{out_dir}:{tag}")
            assert rc == 0, err
            files = [p for p in out_dir.rglob("*") if p.is_file()]
            assert {p.name for p in files} >= {"index.json", "oci-layout"}
            assert {
                str(p.relative_to(out_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            } == {str(p.relative_to(out_dir)): "0o644" for p in files}
    finally:
        os.umask(old)
    if os.geteuid() == 0 and shutil.which("setpriv") and shutil.which("skopeo"):
        # pytest's tmp_path is private to root: a world-traversable place
        public = Path(tempfile.mkdtemp(prefix="composefs-push-"))
        try:
            os.chmod(public, 0o755)
            rc, _, err = cfs(capsysbinary, repo, "oci", "push", "orig", f"oci:{public}/l:v1")
            assert rc == 0, err
            p = subprocess.run(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 "skopeo", "inspect", f"oci:{public}/l:v1"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr
        finally:
            shutil.rmtree(public)


def test_push_compressed_to_oci_layout_and_back(
    capsysbinary: Any, repo: Repository, tmp_path: Path
) -> None:
    path = tmp_path / "gz"
    (built,) = L.write_oci_layout(
        path, [L.ImageSpec(layers(), compression=["gzip", "zstd"], tag="t")]
    )
    first = storage.pull(repo, f"oci:{path}:t", "orig")
    out_dir = tmp_path / "exported"
    rc, out, err = cfs(capsysbinary, repo, "oci", "push", "orig", f"oci:{out_dir}")
    assert rc == 0, err
    digest = L.fields(out)["manifest"]
    assert digest != built.manifest_digest
    # every blob of the new manifest is present and is what it claims
    manifest = json.loads((out_dir / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    for d in manifest["layers"]:
        data = (out_dir / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes()
        assert L.sha256(data) == d["digest"] and len(data) == d["size"]
    assert manifest["config"]["digest"] == built.config_digest
    again = pull_fresh(tmp_path, "r2", f"oci:{out_dir}")
    assert again.manifest_digest == digest
    assert again.config_digest == built.config_digest
    assert again.image_ids == first.image_ids


def test_layout_gets_more_tags(
    capsysbinary: Any, repo: Repository, tmp_path: Path, uncompressed: tuple[Path, L.BuiltImage]
) -> None:
    path, _built = uncompressed
    storage.pull(repo, f"oci:{path}:t", "a")
    other = tmp_path / "other"
    (built2,) = L.write_oci_layout(
        other, [L.ImageSpec([L.tar_layer([L.file("x", b"y")])], compression="none", tag="t")]
    )
    storage.pull(repo, f"oci:{other}:t", "b")
    out_dir = tmp_path / "exported"
    for ref, tag in (("a", "one"), ("b", "two"), ("b", "one")):
        rc, _out, err = cfs(capsysbinary, repo, "oci", "push", ref, f"oci:{out_dir}:{tag}")
        assert rc == 0, err
    index = json.loads((out_dir / "index.json").read_text())
    names = {
        e["annotations"]["org.opencontainers.image.ref.name"]: e["digest"]
        for e in index["manifests"]
    }
    assert names == {"one": built2.manifest_digest, "two": built2.manifest_digest}
    assert not [n for n in os.listdir(out_dir / "blobs" / "sha256") if n.startswith(".")]


# ---------------------------------------------------------------- errors


def _corrupt_a_layer_object(repo: Repository, img: storage.OciImage) -> None:
    for diff_id in img.diff_ids:
        for m in storage.layer_members(repo, diff_id):
            if m.external is not None:
                obj = Path(repo.path, "objects", m.external[:2], m.external[2:])
                os.chmod(obj, 0o644)
                data = bytearray(obj.read_bytes())
                data[0] ^= 1
                obj.write_bytes(bytes(data))
                return
    raise AssertionError("no external object")


def test_corrupt_repository_is_refused(
    capsysbinary: Any,
    repo: Repository,
    registry_plain: Any,
    tmp_path: Path,
    uncompressed: tuple[Path, L.BuiltImage],
) -> None:
    path, _built = uncompressed
    storage.pull(repo, f"oci:{path}:t", "orig")
    _corrupt_a_layer_object(repo, storage.open_image_ref(repo, "orig"))
    out_dir = tmp_path / "exported"
    rc, _out, err = cfs(capsysbinary, repo, "oci", "push", "orig", f"oci:{out_dir}")
    assert rc == 1 and err.count("\n") == 1 and "does not reassemble" in err, err
    assert not out_dir.exists()  # nothing half-written left behind
    with pytest.raises(DigestMismatch):
        export.export_image(repo, "orig", "docker://" + registry_plain.ref("pushed/corrupt:v1"))
    r = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false",
         "docker://" + registry_plain.ref("pushed/corrupt:v1")],
        capture_output=True, check=False,
    )  # fmt: skip
    assert r.returncode != 0  # no manifest was pushed


def test_push_errors_one_line(capsysbinary: Any, repo: Repository, tmp_path: Path) -> None:
    path = tmp_path / "l"
    L.write_oci_layout(path, [L.ImageSpec(layers(), compression="none", tag="t")])
    storage.pull(repo, f"oci:{path}:t", "orig")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("x")
    cases = [
        (("missing", f"oci:{tmp_path}/o"), "not found"),
        (("@sha256:" + "1" * 64, f"oci:{tmp_path}/o"), "not found"),
        (("orig", "dir:/tmp/x"), "unsupported destination"),
        (("orig", f"oci:{junk}"), "neither empty nor an OCI layout"),
        (("--creds", "a:b", "orig", f"oci:{tmp_path}/o"), "only for docker://"),
        (("orig", "docker://127.0.0.1:1/UPPER/case"), "invalid image reference"),
    ]
    for args, words in cases:
        rc, _out, err = cfs(capsysbinary, repo, "oci", "push", *args)
        assert rc != 0 and err.startswith("cfsctl: ") and err.count("\n") == 1, (args, err)
        assert words in err, (args, err)
    assert not (tmp_path / "o").exists()


def test_push_artifact_keeps_everything(
    capsysbinary: Any, repo: Repository, registry_plain: Any, tmp_path: Path
) -> None:
    """Artifact blobs are stored whole: manifest and blobs come back unchanged."""
    layout = tmp_path / "art"
    art = L.write_artifact_layout(layout)
    mdigest, blob, config = art.manifest_digest, art.blob, art.config
    storage.pull(repo, f"oci:{layout}", "art")
    out_dir = tmp_path / "out"
    rc, out, err = cfs(capsysbinary, repo, "oci", "push", "art", f"oci:{out_dir}:sig")
    assert rc == 0 and err == "", err
    assert L.fields(out)["manifest"] == mdigest
    for d in (mdigest, blob, config):
        rel = Path("blobs", "sha256", d.split(":")[1])
        assert (out_dir / rel).read_bytes() == (layout / rel).read_bytes()
    dest = "docker://" + registry_plain.ref("pushed/artifact:sig")
    rc, out, err = cfs(capsysbinary, repo, "oci", "push", "art", dest)
    assert rc == 0, err
    assert L.fields(out)["manifest"] == mdigest
    assert pull_fresh(tmp_path, "r2", dest).manifest_digest == mdigest
