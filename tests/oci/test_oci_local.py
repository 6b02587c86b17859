"""Pulling from local transports (oci:, oci-archive:, docker-archive:) and the
``cfsctl oci`` commands, on real repositories; as root, real mounts.

Images are built here with `ocitestlib` (tarfile + json). Oracles: the
merged tree computed directly from the same layer tars, composefs-rs's
pinned image ids, the original tar bytes, and the kernel's view of the
mounted image.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ocitestlib as L
import pytest

from composefs import dumpfile, fsverity
from composefs.cli import cfsctl
from composefs.erofs.format import FormatVersion
from composefs.erofs.writer import mkfs
from composefs.errors import DigestMismatch, OciError
from composefs.oci import storage
from composefs.oci import tar as T
from composefs.oci.layers import merge_layers
from composefs.repository import FormatConfig, Repository
from composefs.splitstream import CONTENT_OCI_CONFIG
from composefs.tree import Directory
from testlib import kill_at_objects, needs_root

BIG = bytes(range(256)) * 40  # 10240 bytes, external


def base_layer() -> bytes:
    return L.tar_layer(
        [
            L.directory("usr", mtime=1000),
            L.directory("usr/bin"),
            L.file("usr/bin/tool", BIG, mode=0o755),
            L.file("usr/bin/small", b"#!/bin/sh\necho hi\n", mode=0o755),
            L.hardlink("usr/bin/tool-link", "usr/bin/tool"),
            L.symlink("bin", "usr/bin"),
            L.directory("etc"),
            L.file("etc/hostname", b"base\n"),
            L.file("etc/removed", b"gone soon"),
            L.directory("etc/opaque"),
            L.file("etc/opaque/old", b"old"),
            L.file("etc/xattr", b"x", xattrs={"user.key": b"value\x00\xff"}),
            L.fifo("etc/fifo"),
            L.chardev("etc/null", 1, 3, mode=0o666),
            L.directory("run"),
            L.file("run/junk", b"j"),
        ]
    )


def top_layer() -> bytes:
    return L.tar_layer(
        [
            L.whiteout("etc/removed"),
            L.opaque("etc/opaque"),
            L.file("etc/opaque/new", b"new"),
            L.file("etc/hostname", b"top\n", mode=0o600),
            L.file("usr/bin/added", BIG[::-1]),
        ]
    )


def expected_tree(layers: list[bytes]):  # type: ignore[no-untyped-def]
    return merge_layers(
        [T.read_members([t]) for t in layers],
        large_inline=lambda d: fsverity.digest_hex(d, "sha512"),
    )


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r, _ = Repository.init(tmp_path / "repo", algorithm="sha512", insecure=True)
    yield r
    r.close()


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, list[L.BuiltImage]]:
    path = tmp_path / "layout"
    built = L.write_oci_layout(
        path, [L.ImageSpec([base_layer(), top_layer()], compression=["gzip", "zstd"])]
    )
    return path, built


Run = Callable[..., tuple[int, bytes, bytes]]


@pytest.fixture
def cfs(repo: Repository, capsysbinary: pytest.CaptureFixture[bytes]) -> Run:
    """Run ``cfsctl --repo REPO ARGS…`` in-process: (status, stdout, stderr)."""

    def run(*args: str, repo_path: str | None = None) -> tuple[int, bytes, bytes]:
        capsysbinary.readouterr()
        try:
            rc = cfsctl.main(["--repo", repo_path or repo.path, *args])
        except SystemExit as e:
            rc = int(e.code or 0)
        out, err = capsysbinary.readouterr()
        return rc, out, err

    return run


def image_id_of(repo: Repository, tree_layers: list[bytes], version: int = 2) -> str:
    return fsverity.digest_hex(
        mkfs(expected_tree(tree_layers), FormatVersion(version)), repo.algorithm
    )


# -- pulling ---------------------------------------------------------------------


def test_pull_oci_layout(repo: Repository, layout: tuple[Path, list[L.BuiltImage]]) -> None:
    path, (built,) = layout
    result = storage.pull(repo, f"oci:{path}", "myimage")
    assert result.manifest_digest == built.manifest_digest
    assert result.config_digest == built.config_digest
    assert result.image_ids == {2: image_id_of(repo, [base_layer(), top_layer()])}
    assert result.stats.layers == 2 and result.stats.objects_copied == 2
    assert result.manifest_verity == repo.has_stream(storage.manifest_stream(built.manifest_digest))
    img = storage.open_image_ref(repo, "myimage")
    assert img.image_id(2) == result.image_id
    assert img.layer_refs.keys() == set(built.diff_ids)
    # the committed image is in the repository and names the objects it needs
    assert set(repo.objects_for_image(result.image_ids[2])) >= {fsverity.digest_hex(BIG, "sha512")}
    assert storage.oci_fsck(repo).ok


def test_pull_starts_a_store_helper_ahead_for_a_new_tag_only(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull under a new tag starts the store helper before it opens the
    source (stopped unused here: the layers are small); pulling a tag the
    repository has starts none, as its layers are mostly stored."""
    from testlib import record_store_helpers

    started: list[Any] = record_store_helpers(monkeypatch)
    path, _ = layout
    storage.pull(repo, f"oci:{path}", "first")
    assert len(started) == 1 and started[0].proc.returncode is not None
    storage.pull(repo, f"oci:{path}", "first")
    assert len(started) == 1
    storage.pull(repo, f"oci:{path}", "second")
    assert len(started) == 2 and started[1].proc.returncode is not None
    assert storage.oci_fsck(repo).ok


def test_composefs_rs_known_image_ids(tmp_path: Path) -> None:
    path = tmp_path / "layout"
    L.write_oci_layout(path, [L.ImageSpec([L.composefs_rs_test_layer()], compression="none")])
    r, _ = Repository.init(tmp_path / "r2", insecure=True, formats=FormatConfig(2, (1,)))
    with r:
        result = storage.pull(r, f"oci:{path}", "test-image")
        assert result.image_ids == {2: L.OCI_LAYOUT_V2_SHA512, 1: L.OCI_LAYOUT_V1_SHA512}
        img = storage.open_image_ref(r, "test-image")
        assert img.image_refs == {
            "composefs.image": L.OCI_LAYOUT_V2_SHA512,
            "composefs.image.v1": L.OCI_LAYOUT_V1_SHA512,
        }
        rc = cfsctl.main(["--repo", r.path, "oci", "compute-id", f"@{result.config_digest}"])
        assert rc == 0


def test_oci_archive_and_docker_archive_give_the_same_image(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]], tmp_path: Path
) -> None:
    path, (built,) = layout
    L.write_oci_archive(path, tmp_path / "img.tar")
    L.write_docker_archive(
        tmp_path / "docker.tar", [base_layer(), top_layer()], repo_tags=["demo:1", "demo:2"]
    )
    a = storage.pull(repo, f"oci-archive:{tmp_path / 'img.tar'}:latest", "a")
    b = storage.pull(repo, f"docker-archive:{tmp_path / 'docker.tar'}", "b")
    c = storage.pull(repo, f"docker-archive:{tmp_path / 'docker.tar'}:demo:2", "c")
    assert a.manifest_digest == built.manifest_digest
    assert a.image_ids == b.image_ids == c.image_ids
    assert b.stats.layers_already_present == 2  # same diff_ids: nothing imported again
    assert [i.name for i in storage.list_images(repo)] == ["a", "b", "c"]
    with pytest.raises(OciError, match="no image tagged"):
        storage.pull(repo, f"docker-archive:{tmp_path / 'docker.tar'}:demo:9", "d")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layer_compressions(repo: Repository, tmp_path: Path, compression: str) -> None:
    layers = [base_layer(), top_layer()]
    L.write_oci_layout(tmp_path / "l", [L.ImageSpec(layers, compression=compression)])
    result = storage.pull(repo, f"oci:{tmp_path / 'l'}", "x")
    assert result.image_id == image_id_of(repo, layers)
    for diff_id, tar in zip(storage.open_image_ref(repo, "x").diff_ids, layers, strict=True):
        out = io.BytesIO()
        storage.layer_tar(repo, diff_id, out)
        assert out.getvalue() == tar


def test_multi_member_gzip_layer(repo: Repository, tmp_path: Path) -> None:
    tar = base_layer()
    half = len(tar) // 2
    blob = gzip.compress(tar[:half]) + gzip.compress(tar[half:])
    spec = L.ImageSpec([tar], compression="none")
    built = L.write_oci_layout(tmp_path / "l", [spec])[0]
    # swap in the two-member gzip blob
    layout = tmp_path / "l"
    digest = L._write_blob(layout, blob)
    manifest = json.loads(built.manifest)
    manifest["layers"][0] = {
        "mediaType": L.LAYER_MEDIA_TYPES["gzip"],
        "digest": digest,
        "size": len(blob),
    }
    raw = L.dumps(manifest)
    mdigest = L._write_blob(layout, raw)
    (layout / "index.json").write_bytes(
        L.dumps(
            {
                "schemaVersion": 2,
                "manifests": [{"mediaType": L.OCI_MANIFEST, "digest": mdigest, "size": len(raw)}],
            }
        )
    )
    result = storage.pull(repo, f"oci:{layout}", "x")
    assert result.image_id == image_id_of(repo, [tar])


def test_platform_selection(repo: Repository, tmp_path: Path) -> None:
    amd = L.tar_layer([L.directory("usr"), L.file("arch", b"amd64")])
    arm = L.tar_layer([L.directory("usr"), L.file("arch", b"arm64")])
    L.write_oci_layout(
        tmp_path / "l",
        [
            L.ImageSpec([amd], tag=None, architecture="amd64"),
            L.ImageSpec([arm], tag=None, architecture="arm64", variant="v8"),
        ],
    )
    ref = f"oci:{tmp_path / 'l'}"
    arm_result = storage.pull(repo, ref, "arm", platform="linux/arm64")
    assert arm_result.image_id == image_id_of(repo, [arm])
    arm2 = storage.pull(repo, ref, "arm2", platform="linux/arm64/v8")
    assert arm2.manifest_digest == arm_result.manifest_digest
    if os.uname().machine == "x86_64":
        host = storage.pull(repo, ref, "host")
        assert host.image_id == image_id_of(repo, [amd])
    with pytest.raises(
        OciError,
        match=r"no image for platform linux/s390x \(available: linux/amd64, linux/arm64/v8\)",
    ):
        storage.pull(repo, ref, "none", platform="linux/s390x")


def test_single_image_layout_for_another_platform(
    repo: Repository, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """composefs-rs `oci_layout.rs::test_wrong_platform_rejected`: a layout
    whose only image is for another platform is refused (one line naming
    both platforms), tagged or not; `--platform` takes it explicitly."""
    layer = L.tar_layer([L.directory("usr"), L.file("arch", b"s390x")])
    L.write_oci_layout(tmp_path / "l", [L.ImageSpec([layer], tag="t", architecture="s390x")])
    want = "linux/arm64" if os.uname().machine == "s390x" else "linux/amd64"
    for ref in (f"oci:{tmp_path / 'l'}", f"oci:{tmp_path / 'l'}:t"):
        with pytest.raises(OciError) as ei:
            storage.pull(repo, ref, "foreign", platform=want)
        assert str(ei.value) == f"no image for platform {want} (available: linux/s390x)"
        assert "foreign" not in [t for t, _ in storage.list_tags(repo)]
    rc, _, err = L.run_cfsctl(capsysbinary, repo.path, "oci", "pull", f"oci:{tmp_path / 'l'}", "x")
    if os.uname().machine != "s390x":  # the host platform is wanted here
        assert rc == 1 and "(available: linux/s390x)" in err and err.count("\n") == 1, err
    result = storage.pull(repo, f"oci:{tmp_path / 'l'}", "foreign", platform="linux/s390x")
    assert result.image_id == image_id_of(repo, [layer])
    rc, _, err = L.run_cfsctl(
        capsysbinary, repo.path, "oci", "pull", "--platform", "linux/s390x",
        f"oci:{tmp_path / 'l'}", "y",
    )  # fmt: skip
    assert rc == 0, err


# composefs-rs 0.9 `oci_layout.rs::test_parse_oci_layout_ref`, every row
PARSE_OCI_LAYOUT_REF = [
    ("/path/to/oci", ("/path/to/oci", None)),
    ("./local/oci", ("./local/oci", None)),
    ("ocidir", ("ocidir", None)),
    ("/path/to/oci:latest", ("/path/to/oci", "latest")),
    ("/path/to/oci:v1.0.0", ("/path/to/oci", "v1.0.0")),
    ("./local/oci:mytag", ("./local/oci", "mytag")),
    ("ocidir:latest", ("ocidir", "latest")),
    ("C:/path/to/oci", ("C:/path/to/oci", None)),
    ("C:/path/to/oci:latest", ("C:/path/to/oci", "latest")),
    ("/path/to/oci:tag:with:colons", ("/path/to/oci:tag:with", "colons")),
    ("/path/to/oci:", ("/path/to/oci", "")),
    ("ocidir:", ("ocidir", "")),
    ("/path:middle/to/oci", ("/path:middle/to/oci", None)),
    ("/path:middle/to/oci:tag", ("/path:middle/to/oci", "tag")),
]


@pytest.mark.parametrize(("ref", "expected"), PARSE_OCI_LAYOUT_REF)
def test_parse_oci_layout_ref_matches_composefs_rs(
    ref: str, expected: tuple[str, str | None]
) -> None:
    from composefs.oci.transports import split_path_tag

    assert split_path_tag(ref) == expected


def test_empty_tag_is_kept(repo: Repository, tmp_path: Path) -> None:
    """`oci:DIR:` asks for the image tagged "" (and finds none), it does not
    fall back to the layout's only image."""
    L.write_oci_layout(tmp_path / "l", [L.ImageSpec([base_layer()], tag="latest")])
    with pytest.raises(OciError, match=r"no image tagged '' \(tags: latest\)"):
        storage.pull(repo, f"oci:{tmp_path / 'l'}:", "x")
    assert storage.list_tags(repo) == []


def test_layout_tags(repo: Repository, tmp_path: Path) -> None:
    one = L.tar_layer([L.file("v", b"1")])
    two = L.tar_layer([L.file("v", b"2")])
    L.write_oci_layout(tmp_path / "l", [L.ImageSpec([one], tag="v1"), L.ImageSpec([two], tag="v2")])
    r1 = storage.pull(repo, f"oci:{tmp_path / 'l'}:v1", "one")
    r2 = storage.pull(repo, f"oci:{tmp_path / 'l'}:v2", "two")
    assert r1.image_id == image_id_of(repo, [one])
    assert r2.image_id == image_id_of(repo, [two])
    with pytest.raises(OciError, match=r"no image tagged 'v3' \(tags: v1, v2\)"):
        storage.pull(repo, f"oci:{tmp_path / 'l'}:v3", "three")


def test_repull_is_cheap_and_retags(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]]
) -> None:
    path, _ = layout
    first = storage.pull(repo, f"oci:{path}", "one")
    second = storage.pull(repo, f"oci:{path}", "two")
    assert second.stats.layers == 0 and second.stats.layers_already_present == 2
    assert second.image_ids == first.image_ids
    assert second.manifest_verity == first.manifest_verity
    assert [t for t, _ in storage.list_tags(repo)] == ["one", "two"]


def test_pull_names_after_one_sync(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layer stream is named after a sync; then one sync makes the image
    and the config and manifest streams durable before any of them is named
    (a name is never durable before what it names). A re-pull names nothing
    new and syncs nothing."""
    from composefs.repository import objects

    events: list[str] = []
    real_sync, real_symlink = objects.syncfs, objects.ObjectStore.symlink

    def sync(fd: int) -> None:
        events.append("sync")
        real_sync(fd)

    def symlink(self: objects.ObjectStore, link: str, target: str) -> None:
        events.append(link.split(":")[0])  # streams/oci-layer-sha256:… -> streams/oci-layer-sha256
        real_symlink(self, link, target)

    monkeypatch.setattr(objects, "syncfs", sync)
    monkeypatch.setattr(objects.ObjectStore, "symlink", symlink)
    path, _ = layout
    storage.pull(repo, f"oci:{path}", "one")
    layer, config, manifest = (f"streams/oci-{k}-sha256" for k in ("layer", "config", "manifest"))
    image = next(e for e in events if e.startswith("images/"))
    assert events == [
        "sync", layer, "sync", layer,  # the two layers, each as it is stored
        "sync", image, config, manifest, "streams/refs/oci/one",
    ]  # fmt: skip
    events.clear()
    storage.pull(repo, f"oci:{path}", "two")
    assert events == ["streams/refs/oci/two"]


def test_pull_summary_counts_are_true(
    repo: Repository, tmp_path: Path, layout: tuple[Path, list[L.BuiltImage]]
) -> None:
    """New objects vs objects already present, bytes stored vs file content
    inlined, layers already present: counted from what the repository had."""
    path, _ = layout
    # the repository already holds BIG (as base_layer's /usr/bin/tool)
    pre = storage.pull(repo, f"oci:{path}", "first")
    assert (pre.stats.objects_copied, pre.stats.objects_already_present) == (2, 0)
    assert pre.stats.bytes_copied == 2 * len(BIG)
    small = b"#!/bin/sh\necho hi\n" + b"base\n" + b"gone soon" + b"old" + b"x" + b"j"
    assert pre.stats.bytes_inlined == len(small) + len(b"new") + len(b"top\n")
    # a new image: one layer already stored, one new layer holding BIG
    # (present), BIG reversed (present), a new big file and a small one
    fresh = BIG[:5000] + b"fresh"
    third = L.tar_layer(
        [L.file("a", BIG), L.file("b", BIG[::-1]), L.file("c", fresh), L.file("d", b"tiny")]
    )
    L.write_oci_layout(tmp_path / "l2", [L.ImageSpec([base_layer(), third])])
    result = storage.pull(repo, f"oci:{tmp_path / 'l2'}", "second")
    st = result.stats
    assert (st.layers, st.layers_already_present) == (1, 1)
    assert (st.objects_copied, st.objects_already_present) == (1, 2)
    assert st.bytes_copied == len(fresh)
    assert st.bytes_inlined == len(b"tiny")
    assert str(st) == (
        "1 new + 2 already present objects; 4.89 KiB stored, 4 B inlined; "
        "1 new + 1 already present layers"
    )


def test_artifact(repo: Repository, tmp_path: Path) -> None:
    layout = tmp_path / "art"
    art = L.write_artifact_layout(layout)
    payload, blob = art.payload, art.blob
    result = storage.pull(repo, f"oci:{layout}", "art")
    assert result.image_ids == {}
    (info,) = storage.list_images(repo)
    assert (info.is_container, info.architecture, info.layer_count) == (False, "", 1)
    img = storage.open_image_ref(repo, "art")
    obj = repo.open_stream(storage.layer_stream(blob), img.layer_refs[blob]).object_refs
    assert repo.read_object(obj[0]) == payload
    assert storage.oci_fsck(repo).ok


def test_boot_images_are_recorded(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]]
) -> None:
    path, _ = layout
    result = storage.pull(repo, f"oci:{path}", "demo")
    img = storage.open_image_ref(repo, "demo")

    def transform(root: Directory) -> None:
        del root.entries[b"etc"]

    ids = storage.commit_boot_images(repo, img, transform)
    tree = expected_tree([base_layer(), top_layer()])
    del tree.entries[b"etc"]
    assert ids == {2: fsverity.digest_hex(mkfs(tree, FormatVersion.V2), "sha512")}
    again = storage.open_image_ref(repo, "demo")
    assert again.boot_image_id(2) == ids[2]
    assert again.image_id(2) == result.image_id
    assert storage.inspect_json(repo, again)["composefs_boot_erofs"] == ids[2]
    repo.gc()  # the boot image is rooted through the tag
    assert repo.has_object(ids[2])
    assert storage.oci_fsck(repo).ok


# -- failures leave nothing behind -------------------------------------------------


def assert_untouched(repo: Repository) -> None:
    assert storage.list_tags(repo) == []
    streams = os.path.join(repo.path, "streams")
    names = os.listdir(streams) if os.path.isdir(streams) else []
    assert not [n for n in names if n.startswith(("oci-manifest-", "oci-config-"))]
    assert storage.oci_fsck(repo).ok


def test_failed_bootable_pull_tags_nothing(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`oci pull --bootable` of an image without boot entries fails and
    leaves no tag (the library's pull(boot=...) likewise); a tag that
    already named another image keeps naming it."""
    pytest.importorskip("composefs.boot")
    path, _ = layout
    rc, _, err = L.run_cfsctl(capsysbinary, repo.path, "oci", "pull", "--bootable", f"oci:{path}", "b")
    assert rc == 1 and err.count("\n") == 1, err
    assert storage.list_tags(repo) == []

    def no_boot(root: Directory) -> None:
        raise OciError("No boot entries!")

    with pytest.raises(OciError, match="No boot entries"):
        storage.pull(repo, f"oci:{path}", "b", boot=no_boot)
    assert storage.list_tags(repo) == []
    other = tmp_layout = path.parent / "other"
    L.write_oci_layout(tmp_layout, [L.ImageSpec([base_layer()])])
    before = storage.pull(repo, f"oci:{other}", "b")
    with pytest.raises(OciError, match="No boot entries"):
        storage.pull(repo, f"oci:{path}", "b", boot=no_boot)
    assert storage.resolve_tag(repo, "b")[0] == before.manifest_digest


def test_pull_stop_set_during_the_boot_image_tags_nothing(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]]
) -> None:
    """A `PullStop` set after the layers, while the boot image is built
    (the last step before the tag): the pull raises `Cancelled` and the tag
    is not set; what was stored stays consistent."""
    from composefs.errors import Cancelled

    path, _ = layout
    stop = storage.PullStop()

    def boot(root: Directory) -> None:
        stop.set()  # as a service would from another thread

    with pytest.raises(Cancelled, match="pull cancelled"):
        storage.pull(repo, f"oci:{path}", "b", boot=boot, stop=stop)
    assert storage.list_tags(repo) == []
    assert storage.oci_fsck(repo).ok


def test_corrupt_layer_blob(repo: Repository, layout: tuple[Path, list[L.BuiltImage]]) -> None:
    path, (built,) = layout
    blob = path / "blobs" / "sha256" / built.layer_digests[1].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(OciError):
        storage.pull(repo, f"oci:{path}", "bad")
    assert_untouched(repo)
    assert repo.has_stream(storage.layer_stream(built.diff_ids[1])) is None


def test_wrong_diff_id(repo: Repository, tmp_path: Path) -> None:
    spec = L.ImageSpec([base_layer()], compression="gzip", config_extra={})
    built = L.write_oci_layout(tmp_path / "l", [spec])[0]
    layout = tmp_path / "l"
    config = json.loads(built.config)
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    raw_config = L.dumps(config)
    cdigest = L._write_blob(layout, raw_config)
    manifest = json.loads(built.manifest)
    manifest["config"] = {"mediaType": L.OCI_CONFIG, "digest": cdigest, "size": len(raw_config)}
    raw = L.dumps(manifest)
    mdigest = L._write_blob(layout, raw)
    (layout / "index.json").write_bytes(
        L.dumps(
            {
                "schemaVersion": 2,
                "manifests": [{"mediaType": L.OCI_MANIFEST, "digest": mdigest, "size": len(raw)}],
            }
        )
    )
    with pytest.raises(DigestMismatch, match="diff_id mismatch"):
        storage.pull(repo, f"oci:{layout}", "bad")
    assert_untouched(repo)


@pytest.mark.parametrize(
    "entries, match",
    [
        ([L.file("../../etc/passwd", b"x")], r"'\.\.'"),
        ([L.symlink("lib", "/usr/lib"), L.file("lib/evil", b"x")], "not a directory"),
        ([L.hardlink("x", "/etc/shadow")], "does not exist"),
    ],
)
def test_hostile_layers_fail_cleanly(
    repo: Repository, tmp_path: Path, entries: list[L.Member], match: str
) -> None:
    L.write_oci_layout(tmp_path / "l", [L.ImageSpec([L.tar_layer(entries)])])
    with pytest.raises(OciError, match=match):
        storage.pull(repo, f"oci:{tmp_path / 'l'}", "evil")
    assert_untouched(repo)


def test_truncated_and_garbage_layers(repo: Repository, tmp_path: Path) -> None:
    tar = base_layer()
    for name, blob in [("trunc", gzip.compress(tar[:3000])), ("garbage", b"not gzip at all" * 10)]:
        layout = tmp_path / name
        built = L.write_oci_layout(layout, [L.ImageSpec([tar], compression="gzip")])[0]
        (layout / "blobs" / "sha256" / built.layer_digests[0].split(":")[1]).write_bytes(blob)
        with pytest.raises(OciError):
            storage.pull(repo, f"oci:{layout}", name)
    assert_untouched(repo)


def test_bad_references(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(OciError, match="unsupported transport"):
        storage.pull(repo, "ftp:foo")
    with pytest.raises(OciError, match="no such directory"):
        storage.pull(repo, f"oci:{tmp_path / 'missing'}")
    (tmp_path / "notlayout").mkdir()
    with pytest.raises(OciError, match="not an OCI image layout"):
        storage.pull(repo, f"oci:{tmp_path / 'notlayout'}")
    with pytest.raises(OciError, match="reserved"):
        storage.pull(repo, f"oci:{tmp_path}", "@bad")
    (tmp_path / "x.tar").write_bytes(b"junk" * 1000)
    with pytest.raises(OciError):
        storage.pull(repo, f"oci-archive:{tmp_path / 'x.tar'}")
    with pytest.raises(OciError, match="no such file"):
        storage.pull(repo, f"docker-archive:{tmp_path / 'nope.tar'}")


def test_containers_storage_without_skopeo(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(OciError, match="needs skopeo"):
        storage.pull(repo, "containers-storage:busybox")


# -- the command line ----------------------------------------------------------------


def test_cli_pull_images_inspect(
    cfs: Run, layout: tuple[Path, list[L.BuiltImage]], repo: Repository
) -> None:
    path, (built,) = layout
    rc, out, _ = cfs("oci", "pull", f"oci:{path}", "demo")
    assert rc == 0
    lines = out.decode().splitlines()
    assert lines[0] == f"manifest {built.manifest_digest}"
    assert lines[1] == f"config   {built.config_digest}"
    verity = repo.has_stream(storage.manifest_stream(built.manifest_digest))
    assert lines[2] == f"verity   {verity}"  # the final value (composefs-rs prints a stale one)
    assert lines[3] == "tagged   demo"
    assert lines[4].startswith("objects  2 new + 0 already present objects; 20.00 KiB stored, ")

    rc, out, _ = cfs("oci", "images")
    text = out.decode()
    assert "│ NAME ┆ DIGEST       ┆ ARCH  ┆ LAYERS ┆ REFS │" in text
    assert f"│ demo ┆ {built.manifest_digest[7:19]} ┆ amd64 ┆ 2      ┆ 0    │" in text
    rc, out, _ = cfs("oci", "images", "--json")
    (entry,) = json.loads(out)["images"]
    assert entry == {
        "name": "demo", "manifest_digest": built.manifest_digest, "is_container": True,
        "architecture": "amd64", "os": "linux", "created": "2009-02-13T23:31:30Z",
        "layer_count": 2, "referrer_count": 0,
    }  # fmt: skip

    rc, out, _ = cfs("oci", "inspect", "demo", "--manifest")
    assert out == built.manifest + b"\n"
    rc, out, _ = cfs("oci", "inspect", "demo", "--config")
    assert out == built.config + b"\n"
    rc, out, _ = cfs("oci", "inspect", "demo")
    info = json.loads(out)
    assert info["manifest"] == built.manifest.decode() and info["config"] == built.config.decode()
    assert info["referrers"] == [] and info["composefs_boot_erofs"] is None
    assert info["composefs_erofs"] == image_id_of(repo, [base_layer(), top_layer()])
    # @digest: manifest or config digest, same image
    for ref in (f"@{built.manifest_digest}", f"@{built.config_digest}"):
        rc, out2, _ = cfs("oci", "inspect", ref)
        assert rc == 0 and json.loads(out2) == info


def test_cli_images_empty(cfs: Run) -> None:
    assert cfs("oci", "images")[1] == b"No images found\n"
    assert json.loads(cfs("oci", "images", "--json")[1]) == {"images": []}


def test_cli_tag_untag(cfs: Run, layout: tuple[Path, list[L.BuiltImage]], repo: Repository) -> None:
    path, (built,) = layout
    cfs("oci", "pull", f"oci:{path}", "demo")
    rc, out, _ = cfs("oci", "tag", built.manifest_digest, "registry.example/ns/img:v1%x")
    assert (rc, out) == (
        0,
        f"Tagged {built.manifest_digest} as registry.example/ns/img:v1%x\n".encode(),
    )
    assert os.path.islink(
        os.path.join(repo.path, "streams/refs/oci/registry.example%2Fns%2Fimg:v1%25x")
    )
    assert [t for t, _ in storage.list_tags(repo)] == ["demo", "registry.example/ns/img:v1%x"]
    rc, out, _ = cfs("oci", "untag", "demo")
    assert (rc, out) == (0, b"Removed tag demo\n")
    rc, _, err = cfs("oci", "untag", "demo")
    assert rc == 1 and err == b"cfsctl: OCI reference not found: demo\n"
    rc, _, err = cfs("oci", "tag", built.manifest_digest, "@nope")
    assert rc == 1 and b"reserved for digest references" in err
    rc, _, err = cfs("oci", "tag", "sha256:" + "1" * 64, "x")
    assert rc == 1 and b"not found" in err


def test_cli_layer(cfs: Run, layout: tuple[Path, list[L.BuiltImage]]) -> None:
    path, (built,) = layout
    cfs("oci", "pull", f"oci:{path}", "demo")
    diff_id = built.diff_ids[0]
    rc, out, _ = cfs("oci", "layer", diff_id)
    assert rc == 0 and out == base_layer()
    rc, out, _ = cfs("oci", "layer", diff_id, "--json")
    info = json.loads(out)
    assert info["diffId"] == diff_id and info["size"] == len(base_layer())
    assert info["entryCount"] == 16
    assert info["splitstream"] == {
        "externalObjects": 1,
        "externalSize": len(BIG),
        "inlineSize": len(base_layer()) - len(BIG),
    }
    rc, out, _ = cfs("oci", "layer", diff_id, "--dumpfile")
    lines = out.decode().splitlines()
    assert len(lines) == 16
    assert "/usr/bin/tool-link 0 @120000 - - - - 0.0 /usr/bin/tool - -" in lines
    assert "/etc/hostname 5 100644 1 0 0 0 1234567890.0 - base\\n -" in lines
    assert "/etc/xattr 1 100644 1 0 0 0 1234567890.0 - x - user.key=value\\x00\\xff" in lines
    rc, _, err = cfs("oci", "layer", "sha256:" + "2" * 64)
    assert rc == 1 and b"not found" in err


def test_cli_dump_and_compute_id(
    cfs: Run, layout: tuple[Path, list[L.BuiltImage]], repo: Repository
) -> None:
    path, (built,) = layout
    cfs("oci", "pull", f"oci:{path}", "demo")
    want = dumpfile.dumps(expected_tree([base_layer(), top_layer()]), style="rust")
    for ref in ("demo", f"@{built.config_digest}", f"@{built.manifest_digest}"):
        rc, out, _ = cfs("oci", "dump", ref)
        assert rc == 0 and out == want
    img = storage.open_image_ref(repo, "demo")
    rc, out, _ = cfs("oci", "dump", f"@{built.config_digest}", img.config_verity)
    assert out == want
    expected_id = image_id_of(repo, [base_layer(), top_layer()])
    assert cfs("oci", "compute-id", "demo")[1] == f"{expected_id}\n".encode()
    v1 = image_id_of(repo, [base_layer(), top_layer()], 1)
    assert cfs("--erofs-version", "1", "oci", "compute-id", "demo")[1] == f"{v1}\n".encode()
    # the dump shows what the layers say
    text = want.decode()
    assert "/etc/removed" not in text and "/etc/opaque/old" not in text and "/run/junk" not in text
    assert "/etc/hostname 4 100600 1 0 0 0 1234567890.0 - top\\n -" in text


def test_cli_import_layer(cfs: Run, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    tar = base_layer()
    diff_id = L.sha256(tar)

    def feed(data: bytes, *args: str) -> tuple[int, bytes, bytes]:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))  # type: ignore[arg-type]
        return cfs("oci", "import-layer", *args)

    rc, out, _ = feed(gzip.compress(tar), diff_id, "mylayer")
    verity = repo.has_stream(storage.layer_stream(diff_id))
    assert rc == 0 and out == f"sha512:{verity}\n".encode()
    assert repo.stream_id("refs/mylayer") == verity
    rc, _, err = feed(tar + b"x", "sha256:" + "3" * 64)
    assert rc == 1 and b"diff_id mismatch" in err
    assert repo.has_stream(storage.layer_stream("sha256:" + "3" * 64)) is None


def test_cli_fsck_detects_corruption(
    cfs: Run, layout: tuple[Path, list[L.BuiltImage]], repo: Repository
) -> None:
    path, (built,) = layout
    cfs("oci", "pull", f"oci:{path}", "demo")
    rc, out, _ = cfs("oci", "fsck")
    assert rc == 0 and out.decode().endswith("oci images: 1/1 ok\n")
    rc, out, _ = cfs("oci", "fsck", "--json")
    report = json.loads(out)
    assert report["ok"] and report["images_checked"] == 1 and report["repo"]["ok"]
    # corrupt the stored manifest object
    reader = repo.open_stream(storage.manifest_stream(built.manifest_digest))
    obj = reader.object_refs[0]
    reader.close()
    objpath = os.path.join(repo.path, "objects", obj[:2], obj[2:])
    os.chmod(objpath, 0o644)
    with open(objpath, "r+b") as f:
        f.write(b"[")
    rc, out, err = cfs("oci", "fsck")
    text = out.decode()
    assert rc == 1 and err == b"cfsctl: OCI integrity check failed\n"
    assert "oci images: 0/1 ok" in text and "fsck: manifest-digest-mismatch: demo: " in text
    rc, out, _ = cfs("oci", "fsck", "--json")
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False
    assert (report["images_checked"], report["images_corrupted"]) == (1, 1)
    (error,) = report["errors"]  # the first failure ends that image's checks
    assert error.startswith("fsck: manifest-digest-mismatch: demo: ")
    rc, out, _ = cfs("oci", "fsck", "nosuchtag")
    assert "fsck: ref-resolve-failed: nosuchtag" in out.decode()
    rc, out, _ = cfs("oci", "fsck", "--json", "nosuchtag")
    report = json.loads(out)
    assert (report["images_checked"], report["images_corrupted"]) == (1, 1)
    # --help states the exit status that was just seen
    rc, out, _ = cfs("oci", "fsck", "--help")
    text = " ".join(out.decode().split())
    assert rc == 0 and "exit 0" not in text
    assert "exit status 1 on any problem, with or without --json" in text


def test_gc_keeps_tagged_and_drops_untagged(
    cfs: Run, layout: tuple[Path, list[L.BuiltImage]], repo: Repository
) -> None:
    path, _ = layout
    result = storage.pull(repo, f"oci:{path}", "demo")
    repo.gc()
    assert storage.oci_fsck(repo).ok
    assert repo.has_object(result.image_id or "")
    storage.untag_image(repo, "demo")
    gc = repo.gc()
    assert gc.objects_removed > 0
    assert not repo.has_object(result.image_id or "")
    assert storage.oci_fsck(repo).ok


def test_cli_errors_are_one_line(cfs: Run, tmp_path: Path) -> None:
    for args in (
        ("oci", "pull", "nosuch:thing"),
        ("oci", "pull", f"oci:{tmp_path}/missing"),
        ("oci", "inspect", "missing"),
        ("oci", "inspect", "@sha256:zz"),
        ("oci", "layer", "notadigest"),
        ("oci", "mount", "missing", str(tmp_path)),
        ("oci", "dump", "@sha256:" + "4" * 64),
    ):
        rc, _out, err = cfs(*args)
        assert rc != 0 and err.startswith(b"cfsctl: ") and err.count(b"\n") == 1, (args, err)


def test_cfsctl_subprocess(tmp_path: Path, layout: tuple[Path, list[L.BuiltImage]]) -> None:
    """The installed console script, end to end (no tty: no progress)."""
    path, _ = layout
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    repo = str(tmp_path / "r")
    subprocess.run(
        ["cfsctl", "--repo", repo, "init", "--insecure"], check=True, env=env, capture_output=True
    )
    p = subprocess.run(
        ["cfsctl", "--repo", repo, "oci", "pull", f"oci:{path}"], env=env, capture_output=True
    )
    assert p.returncode == 0 and p.stderr == b""
    assert f"tagged   oci:{path}".encode() in p.stdout


# -- mounting (root) --------------------------------------------------------------------


@needs_root
def test_mount_matches_layers(
    cfs: Run, layout: tuple[Path, list[L.BuiltImage]], tmp_path: Path
) -> None:
    from composefs.mount import unmount

    path, _ = layout
    assert cfs("oci", "pull", f"oci:{path}", "demo")[0] == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc, _, err = cfs("oci", "mount", "demo", str(mnt))
    assert rc == 0, err
    try:
        assert sorted(os.listdir(mnt)) == ["bin", "etc", "run", "usr"]
        assert (mnt / "usr/bin/tool").read_bytes() == BIG
        assert (mnt / "usr/bin/added").read_bytes() == BIG[::-1]
        assert (mnt / "etc/hostname").read_bytes() == b"top\n"
        assert stat.S_IMODE((mnt / "etc/hostname").stat().st_mode) == 0o600
        assert os.readlink(mnt / "bin") == "usr/bin"
        assert sorted(os.listdir(mnt / "etc/opaque")) == ["new"]
        assert not (mnt / "etc/removed").exists()
        assert os.listdir(mnt / "run") == []
        a, b = (mnt / "usr/bin/tool").stat(), (mnt / "usr/bin/tool-link").stat()
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert stat.S_ISFIFO((mnt / "etc/fifo").lstat().st_mode)
        null = (mnt / "etc/null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert os.getxattr(mnt / "etc/xattr", "user.key") == b"value\x00\xff"
        assert int((mnt / "usr/bin/tool").stat().st_mtime) == L.MTIME
        # the root took /usr's metadata
        assert int(mnt.stat().st_mtime) == 1000
    finally:
        unmount(str(mnt))


@needs_root
def test_containers_storage_via_skopeo(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]], tmp_path: Path
) -> None:
    """A private containers-storage (vfs driver under tmp_path): skopeo copies
    the image in, we pull it back out through skopeo; same filesystem."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo not installed (make system-deps installs it)")
    path, _ = layout
    store = f"containers-storage:[vfs@{tmp_path}/storage+{tmp_path}/run]localhost/demo:latest"
    subprocess.run(
        [skopeo, "copy", "--quiet", f"oci:{path}:latest", store], check=True, timeout=120
    )
    result = storage.pull(repo, store, "cs")
    # storage re-exports the layers, so compare trees rather than digests
    img = storage.open_image_ref(repo, "cs")
    assert dumpfile.dumps(storage.image_tree(repo, img), style="rust") == dumpfile.dumps(
        expected_tree([base_layer(), top_layer()]), style="rust"
    )
    assert result.image_id == image_id_of(repo, [base_layer(), top_layer()])


def test_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    from composefs.cli.oci import _Progress
    from composefs.oci.transports import ProgressEvent

    p = _Progress()
    p(ProgressEvent("started", "sha256:abcdef0123456789abcdef", total=2048))
    p(ProgressEvent("progress", "sha256:abcdef0123456789abcdef", total=2048, fetched=1024))
    # the update came inside the redraw interval: it is drawn when that ends,
    # so the last frame on screen shows the latest counts
    time.sleep(3 * p.INTERVAL)
    err = capsys.readouterr().err
    assert err.endswith("\r\x1b[Kfetching 1 layer(s): 1.00 KiB / 2.00 KiB"), repr(err)
    p(ProgressEvent("started", "sha256:1111111111111111111111", total=1024))
    p(ProgressEvent("done", "sha256:abcdef0123456789abcdef", total=2048, fetched=2048))
    p(ProgressEvent("skipped", "sha256:0000000000000000000000"))
    err = capsys.readouterr().err
    assert "sha256:abcdef012345: 2.00 KiB done\n" in err
    assert "sha256:000000000000: already present\n" in err
    # the layer still coming keeps its line, with the right counts
    assert err.endswith("\r\x1b[Kfetching 1 layer(s): 2.00 KiB / 3.00 KiB"), repr(err)
    p.close()
    assert capsys.readouterr().err == "\r\x1b[K"
    p(ProgressEvent("progress", "sha256:1111111111111111111111", total=1024, fetched=1))
    time.sleep(3 * p.INTERVAL)
    assert capsys.readouterr().err == ""  # nothing after close


def test_archives_written_by_skopeo(repo: Repository, tmp_path: Path) -> None:
    """skopeo as an independent producer of docker-archive (legacy layout,
    layer.tar symlinks) and oci-archive files."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo not installed (make system-deps installs it)")
    path = tmp_path / "layout"  # gzip only: docker-archive cannot hold zstd layers
    L.write_oci_layout(path, [L.ImageSpec([base_layer(), top_layer()], compression="gzip")])
    want = image_id_of(repo, [base_layer(), top_layer()])
    for dest, ref in (
        (f"docker-archive:{tmp_path}/d.tar:demo:v1", f"docker-archive:{tmp_path}/d.tar"),
        (f"oci-archive:{tmp_path}/o.tar:tagged", f"oci-archive:{tmp_path}/o.tar:tagged"),
    ):
        subprocess.run(
            [skopeo, "copy", "--quiet", f"oci:{path}:latest", dest], check=True, timeout=120
        )
        assert storage.pull(repo, ref, ref).image_id == want
    assert storage.pull(repo, f"docker-archive:{tmp_path}/d.tar:demo:v1", "x").image_id == want
    assert storage.oci_fsck(repo).ok


def test_repull_with_other_format_keeps_earlier_refs(
    repo: Repository, layout: tuple[Path, list[L.BuiltImage]]
) -> None:
    path, _ = layout
    first = storage.pull(repo, f"oci:{path}", "demo")
    storage.commit_boot_images(repo, storage.open_image_ref(repo, "demo"), lambda root: None)
    repo.set_erofs_version(1)
    second = storage.pull(repo, f"oci:{path}", "demo")
    assert second.image_ids == {1: image_id_of(repo, [base_layer(), top_layer()], 1)}
    img = storage.open_image_ref(repo, "demo")
    assert img.image_id(2) == first.image_id and img.image_id(1) == second.image_id
    assert img.boot_image_id(2) == first.image_id  # identity transform: same image
    repo.gc()
    assert repo.has_object(first.image_id or "") and repo.has_object(second.image_id or "")


def test_cli_pull_options(cfs: Run, tmp_path: Path, repo: Repository) -> None:
    amd = L.tar_layer([L.directory("usr"), L.file("arch", b"amd64")])
    arm = L.tar_layer([L.directory("usr"), L.file("arch", b"arm64")])
    L.write_oci_layout(
        tmp_path / "l",
        [L.ImageSpec([amd], tag=None), L.ImageSpec([arm], tag=None, architecture="arm64")],
    )
    ref = f"oci:{tmp_path / 'l'}"
    rc, out, _ = cfs("oci", "pull", "--platform", "linux/arm64", ref, "arm")
    assert rc == 0
    rc, out, _ = cfs("oci", "dump", "arm")
    assert b"/arch 5 100644 1 0 0 0 1234567890.0 - arm64 -" in out
    rc, _, err = cfs("oci", "pull", "--platform", "bogus/", ref, "x")
    assert rc == 1 and b"invalid platform" in err
    rc, _, err = cfs("oci", "pull", "--local-fetch", "zerocopy", ref, "x")
    assert rc == 1 and b"zerocopy" in err
    import importlib

    try:
        boot = importlib.import_module("composefs.boot")
    except ImportError:
        boot = None
    if getattr(boot, "transform_for_boot", None) is None:
        rc, _, err = cfs("oci", "pull", "--bootable", ref, "boot")
        assert rc == 1 and err == b"cfsctl: --bootable is not available in this installation\n"
        assert "boot" not in [t for t, _ in storage.list_tags(repo)]
    rc, _, err = cfs("oci", "mount", "--bootable", "arm", str(tmp_path))
    assert rc == 1 and b"try pulling with --bootable" in err


def test_layer_dumpfile_matches_composefs_rs(tmp_path: Path) -> None:
    """composefs-rs's `test_layer` (crates/composefs-oci/src/lib.rs): the
    per-entry dump of an imported layer, in a sha256 repository."""
    entries = []
    for size in (0, 4095, 4096, 4097):
        ti, data = L.file(f"file{size}", bytes(size), mode=0o700, mtime=0)
        entries.append((ti, data))
    tar = L.tar_layer(entries, format=tarfile.USTAR_FORMAT)
    r, _ = Repository.init(tmp_path / "r", algorithm="sha256", insecure=True)
    with r:
        storage.import_layer(r, L.sha256(tar), io.BytesIO(tar), name="name")
        out = io.BytesIO()
        storage.layer_dumpfile(r, L.sha256(tar), out)
    assert out.getvalue().decode() == (
        "/file0 0 100700 1 0 0 0 0.0 - - -\n"
        "/file4095 4095 100700 1 0 0 0 0.0 53/72beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719 - 5372beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719\n"
        "/file4096 4096 100700 1 0 0 0 0.0 ba/bc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e - babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e\n"
        "/file4097 4097 100700 1 0 0 0 0.0 09/3756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743 - 093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743\n"
    )


def _tar_rs_file(name: str, size: int) -> bytes:
    """One member as the Rust `tar` crate (0.4.38) writes it:
    `Header::new_ustar` (mtime 0), uid/gid 0, mode 0o700, `append_data`."""
    h = bytearray(512)

    def octal(off: int, length: int, value: int) -> None:  # tar-rs `octal_into`
        h[off : off + length - 1] = f"{value:o}".rjust(length - 1, "0").encode()

    h[0 : len(name)] = name.encode()
    octal(100, 8, 0o700)
    octal(108, 8, 0)
    octal(116, 8, 0)
    octal(124, 12, size)
    octal(136, 12, 0)
    h[156] = ord("0")
    h[257:265] = b"ustar\x0000"
    octal(148, 8, sum(h) + 8 * ord(" "))  # the checksum field counts as spaces
    return bytes(h) + bytes(size) + bytes(-size % 512)


def test_config_stream_id_matches_composefs_rs(tmp_path: Path) -> None:
    """composefs-rs 0.7.0's `test_config_verity_deterministic`
    (crates/composefs-oci/src/lib.rs): three one-file layers and a config
    naming them give a config stream with a pinned id. The layer streams have
    no named refs, so this pins the encoding of an empty named-refs section."""
    r, _ = Repository.init(tmp_path / "r", algorithm="sha256", insecure=True)
    with r:
        layers = []
        for name, size in (("alpha", 1000), ("beta", 2000), ("gamma", 3000)):
            tar = _tar_rs_file(name, size) + bytes(1024)
            verity, _ = storage.import_layer(r, L.sha256(tar), io.BytesIO(tar))
            layers.append((L.sha256(tar), verity))
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
            },
            separators=(",", ":"),
        ).encode()
        writer = r.create_stream(CONTENT_OCI_CONFIG)
        for diff_id, verity in layers:
            writer.add_named_stream_ref(diff_id, verity)
        writer.write_external(config)
        config_verity = r.write_stream(writer, storage.config_stream(L.sha256(config)))
    assert config_verity == "4839518dea22749f8ff233e7f7baec65f23dd5336462f46ad6884769af84bf95"


def test_failed_pull_removes_the_failed_layers_objects(tmp_path: Path) -> None:
    """An OCI layout whose config names a wrong diff_id: cfsctl oci pull
    fails with one line and leaves no object behind."""
    import hashlib
    import json
    import os
    import subprocess
    import sys

    from composefs.repository import Repository

    layout = tmp_path / "layout"
    big = os.urandom(200000)
    L.write_oci_layout(layout, [L.ImageSpec([L.tar_layer([L.file("big", big)])])])
    # corrupt the diff_id in the config (manifest and index follow)

    index = json.loads((layout / "index.json").read_text())
    mdig = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / mdig).read_bytes())
    cdig = manifest["config"]["digest"].split(":")[1]
    config = json.loads((layout / "blobs/sha256" / cdig).read_bytes())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    raw = json.dumps(config).encode()
    newc = hashlib.sha256(raw).hexdigest()
    (layout / "blobs/sha256" / newc).write_bytes(raw)
    manifest["config"]["digest"] = "sha256:" + newc
    manifest["config"]["size"] = len(raw)
    mraw = json.dumps(manifest).encode()
    newm = hashlib.sha256(mraw).hexdigest()
    (layout / "blobs/sha256" / newm).write_bytes(mraw)
    index["manifests"][0]["digest"] = "sha256:" + newm
    index["manifests"][0]["size"] = len(mraw)
    (layout / "index.json").write_text(json.dumps(index))

    repo = tmp_path / "repo"
    Repository.init(repo, insecure=True)[0].close()
    cfsctl = str(Path(sys.executable).parent / "cfsctl")
    r = subprocess.run(
        [cfsctl, "--repo", str(repo), "oci", "pull", f"oci:{layout}:latest", "img"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    objects = [p for p in (repo / "objects").rglob("*") if p.is_file()]
    assert objects == [], objects


def _helpers_of(repo: Path) -> list[int]:
    """Pids of object store helpers still working on `repo`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(repo).encode() in cmdline and any(b"_store_helper" in a for a in cmdline):
            found.append(int(pid))
    return found


def test_kill9_during_big_layer_pull(tmp_path: Path) -> None:
    """kill -9 of `cfsctl oci pull` while a layer big enough for the object
    store helper process is imported: the helper dies with it, fsck is
    clean, and the pull then succeeds."""
    files = {f"usr/d{i % 7}/f{i:04}": os.urandom(200 + (i * 37) % 9000) for i in range(1500)}
    layout = tmp_path / "layout"
    L.write_oci_layout(layout, [L.ImageSpec([L.tar_layer([L.file(n, d) for n, d in files.items()])])])
    repo = tmp_path / "repo"
    Repository.init(repo, insecure=True)[0].close()
    cfs = str(Path(sys.executable).parent / "cfsctl")
    pull = [cfs, "--repo", str(repo), "oci", "pull", f"oci:{layout}:latest", "img"]
    killed = 0
    for threshold in (100, 700, 1300):
        killed += kill_at_objects(pull, repo / "objects", threshold)
        for _ in range(200):
            if not _helpers_of(repo):
                break
            time.sleep(0.01)
        assert _helpers_of(repo) == []
        fsck = subprocess.run([cfs, "--repo", str(repo), "fsck"], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
    assert killed >= 2
    subprocess.run(pull, check=True, stdout=subprocess.DEVNULL)
    r = Repository.open(repo)
    try:
        assert not r.fsck().errors
        stored = {m.entry.path.decode(): m for m in storage.layer_members(r, L.sha256(
            L.tar_layer([L.file(n, d) for n, d in files.items()])))}  # fmt: skip
        for name, data in files.items():
            m = stored[name]
            assert m.external is None or r.read_object(m.external) == data
    finally:
        r.close()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"x": 10**5000}, "integer of"),
        ({"x": float("inf")}, "not JSON"),
    ],
    ids=["5000-digits", "infinity"],
)
def test_hostile_config_json_is_one_line(tmp_path: Path, extra: dict[str, Any], words: str) -> None:
    """Deeply nested or huge-number JSON in a layout's config: one line."""
    import sys as _sys

    _sys.set_int_max_str_digits(0)  # so the test can write the 5000-digit number
    try:
        layout = tmp_path / "layout"
        L.write_oci_layout(
            layout, [L.ImageSpec([L.tar_layer([L.file("f", b"x")])], config_extra=extra)]
        )
    finally:
        _sys.set_int_max_str_digits(4300)
    repo = tmp_path / "repo"
    Repository.init(repo, insecure=True)[0].close()
    cfsctl = str(Path(_sys.executable).parent / "cfsctl")
    r = subprocess.run(
        [cfsctl, "--repo", str(repo), "oci", "pull", f"oci:{layout}:latest", "img"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "not valid JSON" in r.stderr and words in r.stderr, r.stderr


def test_deeply_nested_config_json_is_one_line(tmp_path: Path) -> None:
    nested: Any = 1
    for _ in range(500):
        nested = {"a": nested}
    layout = tmp_path / "layout"
    L.write_oci_layout(
        layout, [L.ImageSpec([L.tar_layer([L.file("f", b"x")])], config_extra={"n": nested})]
    )
    repo = tmp_path / "repo"
    Repository.init(repo, insecure=True)[0].close()
    r = subprocess.run(
        [str(Path(sys.executable).parent / "cfsctl"), "--repo", str(repo), "oci", "pull",
         f"oci:{layout}:latest", "img"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "nested deeper than 64 levels" in r.stderr
