"""`repository.maintenance`: garbage collection and fsck.

See repotestlib for the shared helpers.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from repotestlib import (
    bare_store,
    flip,
    objpath,
    populated,
    tree_with,
)

from composefs import fsverity
from composefs.errors import RepositoryError
from composefs.repository import (
    FormatConfig,
    ImageStore,
    Maintenance,
    Repository,
    StreamStore,
)
from composefs.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_LAYER


def test_gc_images(repo: Repository) -> None:
    shared, only_a, only_b = b"S" * 1000, b"A" * 1000, b"B" * 1000
    ids = {
        k: fsverity.digest_hex(v, "sha512")
        for k, v in (("s", shared), ("a", only_a), ("b", only_b))
    }
    img_a = repo.commit_image(tree_with(repo, {"s": shared, "a": only_a}), "keep")
    img_b = repo.commit_image(tree_with(repo, {"s": shared, "b": only_b}))
    loose = repo.ensure_object(b"L" * 300)

    dry = repo.gc(dry_run=True)
    assert sorted(dry.removed_objects) == sorted([ids["b"], img_b, loose])
    assert dry.images_pruned == 1
    assert repo.has_object(ids["b"])  # nothing deleted

    kept = repo.gc(roots=[img_b], dry_run=True)
    assert kept.removed_objects == [loose]

    result = repo.gc()
    assert sorted(result.removed_objects) == sorted([ids["b"], img_b, loose])
    assert result.objects_removed == 3
    assert result.objects_bytes == 1000 + 300 + os.path.getsize(Path(repo.path) / "images" / img_a)
    assert result.images_pruned == 1 and result.streams_pruned == 0
    for k in ("s", "a"):
        assert repo.has_object(ids[k])
    assert not (Path(repo.path) / "images" / img_b).exists()
    assert repo.fsck().ok
    assert repo.gc().objects_removed == 0


def test_gc_streams_and_dangling_refs(repo: Repository) -> None:
    w = repo.create_stream(CONTENT_OCI_LAYER)
    o_layer = w.write_external(b"layer file" * 100)
    layer = repo.write_stream(w, "oci-layer-1")
    w = repo.create_stream(CONTENT_OCI_CONFIG)
    o_conf = w.write_external(b"config" * 100)
    w.add_named_stream_ref("sha256:1", layer)
    # An unnamed image kept alive by a named ref (OCI `composefs.image`):
    # it keeps its files too, so it stays mountable.
    image_obj = repo.commit_image(tree_with(repo, {"only-in-image": b"I" * 700}))
    image_file = fsverity.digest_hex(b"I" * 700, "sha512")
    w.add_named_stream_ref("composefs.image", image_obj)
    repo.write_stream(w, "oci-config-1", "tagged")
    w = repo.create_stream(0)
    o_junk = w.write_external(b"junk" * 100)
    junk = repo.write_stream(w, "unreferenced")
    # A dangling ref (target stream never existed) is pruned, not fatal.
    repo.symlink("streams/refs/dangling", "streams/missing")

    result = repo.gc()
    assert sorted(result.removed_objects) == sorted([o_junk, junk])
    assert result.streams_pruned == 2  # streams/unreferenced + refs/dangling
    for oid in (o_layer, layer, o_conf, image_obj, image_file):
        assert repo.has_object(oid)
    assert (Path(repo.path) / "images" / image_obj).exists()
    assert not os.path.lexists(Path(repo.path) / "streams/refs/dangling")
    assert repo.fsck().ok


def test_gc_waits_for_transactions(repo: Repository) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_SH); print('locked', flush=True); sys.stdin.read()",
            repo.path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(RepositoryError, match="in use"):
            repo.gc(wait=False)
        repo.gc(dry_run=True)  # a dry run only needs the shared lock
    finally:
        holder.communicate(b"")
    repo.gc(wait=False)
    # Our own shared lock is back after GC: an exclusive attempt fails.
    fd = os.open(repo.path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_fsck_clean_and_report_format(repo: Repository) -> None:
    populated(repo)
    result = repo.fsck()
    assert result.ok and result.has_metadata
    assert (result.objects_checked, result.streams_checked, result.images_checked) == (5, 1, 1)
    assert (
        str(result)
        == "meta.json: ok\nobjects: 5/5 ok\nstreams: 1/1 ok\nimages: 1/1 ok\nstatus: ok\n"
    )
    assert repo.fsck(metadata_only=True).objects_checked == 0
    reply = result.to_reply()
    assert list(reply) == [
        "ok", "has_metadata", "objects_checked", "objects_corrupted", "streams_checked",
        "streams_corrupted", "images_checked", "images_corrupted", "broken_links",
        "missing_objects", "errors",
    ]  # fmt: skip


def test_fsck_corrupted_object(repo: Repository) -> None:
    ids = populated(repo)
    flip(objpath(repo, ids["big"]))
    result = repo.fsck()
    assert result.kinds() == {"object-digest-mismatch"}
    assert result.objects_corrupted == 1
    assert str(result.errors[0]).startswith(
        f"fsck: object-digest-mismatch: objects/{ids['big'][:2]}/"
    )
    assert repo.fsck(metadata_only=True).ok  # content not hashed


def test_fsck_missing_objects(repo: Repository) -> None:
    ids = populated(repo)
    for k in ("big", "ext", "named"):
        objpath(repo, ids[k]).unlink()
    result = repo.fsck(metadata_only=True)
    assert result.kinds() == {"image-missing-object", "missing-object-ref", "missing-named-ref"}
    assert result.missing_objects == 3
    assert f"fsck: missing-named-ref: streams/layer: ref other: {ids['named']}" in map(
        str, result.errors
    )
    text = str(result)
    assert "missing objects: 3\nstatus: 3 error(s)\n  - fsck: " in text


def test_fsck_broken_symlinks(repo: Repository) -> None:
    ids = populated(repo)
    objpath(repo, ids["img"]).unlink()
    result = repo.fsck()
    assert result.kinds() == {"broken-symlink"}
    assert result.broken_links == 2  # images/<id> and images/refs/img
    assert result.images_corrupted == 1
    assert {e.path for e in result.errors} == {f"images/{ids['img']}", "images/refs/img"}


def test_fsck_bad_splitstream(repo: Repository) -> None:
    ids = populated(repo)
    data = bytearray(objpath(repo, ids["stream"]).read_bytes())
    data[-3] ^= 0xFF  # inside the zstd-compressed chunk stream
    objpath(repo, ids["stream"]).write_bytes(bytes(data))
    result = repo.fsck(metadata_only=True)
    assert result.kinds() == {"stream-read-failed"}
    assert result.streams_corrupted == 1
    objpath(repo, ids["stream"]).write_bytes(b"garbage" * 20)
    result = repo.fsck()
    assert result.kinds() == {"stream-open-failed", "object-digest-mismatch"}


def test_fsck_bad_image(repo: Repository) -> None:
    populated(repo)
    repo.write_image(b"\0" * 4096, "bogus")
    result = repo.fsck()
    assert result.kinds() == {"image-invalid"}
    assert result.images_corrupted == 1 and result.images_checked == 2


def test_fsck_structure_errors(repo: Repository) -> None:
    populated(repo)
    root = Path(repo.path)
    (root / "objects/ab").mkdir(exist_ok=True)
    (root / "objects/ab/not-a-digest").write_bytes(b"")
    (root / "images/stray-file").write_bytes(b"")
    (root / "streams/refs/plain-file").write_bytes(b"")
    os.symlink(b"../nowhere", os.fsencode(root / "streams") + b"/\xffbad")
    result = repo.fsck()
    assert result.kinds() == {
        "object-invalid-name", "entry-not-symlink", "unexpected-file-type", "broken-symlink",
    }  # fmt: skip
    assert "fsck: broken-symlink: streams/\ufffdbad" in str(result)
    json.dumps(result.to_reply())


def test_fsck_metadata(repo: Repository) -> None:
    populated(repo)
    meta = Path(repo.path) / "meta.json"
    meta.write_text(meta.read_text().replace("sha512", "sha256"))
    result = repo.fsck(metadata_only=True)
    assert [str(e) for e in result.errors] == [
        "fsck: metadata-algorithm-mismatch: meta.json: expected fsverity-sha256-12, "
        "repository opened as sha512"
    ]
    assert str(result).startswith("meta.json: error\n")
    meta.write_text("{oops")
    assert repo.fsck(metadata_only=True).kinds() == {"metadata-parse-failed"}
    meta.unlink()
    result = repo.fsck(metadata_only=True)
    assert result.kinds() == {"metadata-parse-failed"} and not result.has_metadata


def test_maintenance_alone(tmp_path: Path) -> None:
    """gc and fsck over bare parts: unreferenced objects go, named ones stay."""
    store = bare_store(tmp_path / "store")
    streams = StreamStore(store)
    images = ImageStore(store, FormatConfig(1))
    m = Maintenance(store, streams, images)
    kept = store.ensure_object(b"K" * 100)
    lost = store.ensure_object(b"L" * 100)
    w = streams.create_stream(CONTENT_OCI_LAYER)
    w.add_named_stream_ref("k", kept)
    streams.write_stream(w, "s", "s-ref")
    assert m.fsck().objects_checked == 3
    result = m.gc()
    assert result.removed_objects == [lost]
    assert store.has_object(kept) and not store.has_object(lost)
    assert m.fsck().ok is False  # no meta.json in a bare store: fsck says so
    store.close()


def _cfsctl(repo: Repository, *args: str) -> subprocess.CompletedProcess[str]:
    # A child with a timeout: what this guards against is a hang.
    return subprocess.run(
        [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", repo.path, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "what", ["fifo-object", "device-object", "fifo-image", "fifo-stream", "fifo-meta"]
)
def test_special_files_in_the_repository_fail_cleanly(repo: Repository, what: str) -> None:
    """A FIFO (whose open blocks) or a character device (whose content never
    ends) where the repository has a regular file: fsck, gc and the readers
    report it in one line instead of hanging (composefs-rs would block)."""
    ids = populated(repo)
    key = {"fifo-object": "big", "device-object": "big", "fifo-image": "img"}.get(what, "stream")
    path = Path(repo.path) / "meta.json" if what == "fifo-meta" else objpath(repo, ids[key])
    path.unlink()
    if what == "device-object":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    else:
        os.mkfifo(path)
    repo.close()
    fsck = _cfsctl(repo, "fsck")
    assert fsck.returncode == 1 and "Traceback" not in fsck.stderr
    if what == "fifo-meta":
        assert fsck.stderr == "cfsctl: cannot read meta.json: not a regular file\n"
    else:
        assert f"object-open-failed: objects/{ids[key][:2]}/" in fsck.stdout
        assert "not a regular file" in fsck.stdout
    for args in (["gc", "--dry-run"], ["image-objects", "img"], ["cat", "layer"]):
        r = _cfsctl(repo, *args)
        assert "Traceback" not in r.stderr
        if r.returncode:
            assert r.stderr.count("\n") == 1 and "not a regular file" in r.stderr, r.stderr
    # What reads the special file fails; what does not read it still works.
    assert (_cfsctl(repo, "image-objects", "img").returncode != 0) == (
        what in ("fifo-image", "fifo-meta")
    )
    assert (_cfsctl(repo, "cat", "layer").returncode != 0) == (
        what in ("fifo-stream", "fifo-meta")
    )
