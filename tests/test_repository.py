"""Repository: layout, meta.json, objects, streams, images, refs, locking, gc, fsck.

These run on the real filesystem under pytest's tmp_path (no fs-verity on
these machines, so repositories are insecure; `fsverity digest` is the
independent oracle for object names).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.errors import NotFoundError, RepositoryError, SplitstreamError
from composefs.repository import (
    FormatConfig,
    Repository,
    StoreMethod,
    peek_algorithm,
)
from composefs.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_LAYER, SplitStreamReader
from composefs.tree import Directory, Leaf, Regular, Stat, Symlink
from conftest import need_tool, needs_root

RUST_META_V2 = b"""{
  "version": 1,
  "algorithm": "fsverity-sha512-12",
  "features": {
    "compatible": [],
    "read-only-compatible": [],
    "incompatible": []
  },
  "erofs_formats": {
    "default": 2
  }
}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r, created = Repository.init(tmp_path / "repo", insecure=True)
    assert created
    return r


def tree_with(repo: Repository, files: dict[str, bytes]) -> Directory:
    """A tree whose large files are stored as objects in `repo`."""
    root = Directory(Stat(0o755, mtime=1000))
    root.insert(b"/usr", Directory(Stat(0o755, mtime=1000)))
    root.insert(b"/usr/lnk", Leaf(Stat(0o777), Symlink(b"target")))
    for name, data in files.items():
        if len(data) > 64:
            content = Regular(len(data), digest=repo.ensure_object(data))
        else:
            content = Regular(len(data), data=data)
        root.insert(f"/usr/{name}".encode(), Leaf(Stat(0o644, mtime=1000), content))
    return root


def stray_files(repo: Repository) -> list[str]:
    return [n for n in os.listdir(repo.path) if n.startswith((".tmp-", ".symlink-"))]


# -- meta.json and opening ---------------------------------------------------


def test_init_layout_and_meta_json(tmp_path: Path) -> None:
    r, created = Repository.init(tmp_path / "repo", insecure=True)
    assert created and r.insecure and r.algorithm == "sha512"
    assert (tmp_path / "repo/meta.json").read_bytes() == RUST_META_V2
    assert (tmp_path / "repo").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "repo/objects").is_dir()
    r.close()

    r, created = Repository.init(tmp_path / "repo", insecure=True)
    assert not created  # same configuration: idempotent
    r.close()
    with pytest.raises(RepositoryError, match="different configuration"):
        Repository.init(tmp_path / "repo", insecure=True, algorithm="sha256")

    r, _ = Repository.init(
        tmp_path / "v1",
        insecure=True,
        algorithm="fsverity-sha256-12",
        formats=FormatConfig(1, (2,)),
    )
    meta = json.loads((tmp_path / "v1/meta.json").read_bytes())
    assert meta["algorithm"] == "fsverity-sha256-12"
    assert meta["features"]["read-only-compatible"] == ["v1_erofs"]
    assert meta["erofs_formats"] == {"default": 1, "extra": [2]}
    assert r.format_config().versions() == [1, 2]
    r.close()


def test_init_secure_needs_verity(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        fsverity.enable_verity(fd, "sha512")
        pytest.skip("this filesystem supports fs-verity")
    except fsverity.VerityNotSupported:
        pass
    finally:
        os.close(fd)
    with pytest.raises(RepositoryError, match="--insecure"):
        Repository.init(tmp_path / "secure")
    assert not (tmp_path / "secure/meta.json").exists()


def test_reset_metadata_keeps_objects(repo: Repository) -> None:
    oid = repo.ensure_object(b"x" * 100)
    repo.write_image(b"not really an image", "img")
    path = repo.path
    repo.close()
    r, created = Repository.init(path, insecure=True, algorithm="sha256", reset_metadata=True)
    assert created and r.algorithm == "sha256"
    assert not os.path.exists(f"{path}/images")
    assert os.path.exists(f"{path}/objects/{oid[:2]}/{oid[2:]}")
    r.close()


def write_meta(path: Path, **changes: object) -> None:
    meta = json.loads(RUST_META_V2)
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_open_rules(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="cannot open repository"):
        Repository.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="cfsctl init"):
        Repository.open(tmp_path / "empty")

    d = tmp_path / "r"
    d.mkdir()
    write_meta(d, version=2)
    with pytest.raises(RepositoryError, match="unsupported repository format version 2"):
        Repository.open(d)
    write_meta(d, features={"incompatible": ["future"]})
    with pytest.raises(RepositoryError, match="unknown incompatible features: future"):
        Repository.open(d)
    write_meta(d, features={"compatible": ["whatever"]})
    Repository.open(d).close()
    write_meta(d, algorithm="fsverity-sha1-12")
    with pytest.raises(RepositoryError, match=r"meta\.json"):
        Repository.open(d)
    (d / "meta.json").write_text("{")
    with pytest.raises(RepositoryError, match=r"failed to parse meta\.json"):
        Repository.open(d)

    write_meta(d, features={"read-only-compatible": ["v9_thing"]})
    r = Repository.open(d)
    assert r.read_only_features == ["v9_thing"]
    with pytest.raises(RepositoryError, match="read-only"):
        r.ensure_object(b"data")
    r.close()

    write_meta(d)
    with pytest.raises(RepositoryError, match="--hash sha256"):
        Repository.open(d, hash="sha256")
    r = Repository.open(d, hash="sha512")
    assert r.erofs_version == 2
    r.close()
    with pytest.raises(RepositoryError, match="fs-verity"):
        Repository.open(d, require_verity=True)


def test_legacy_meta_without_erofs_formats(tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    meta = json.loads(RUST_META_V2)
    del meta["erofs_formats"]
    meta["features"]["read-only-compatible"] = ["v1_erofs"]
    (d / "meta.json").write_text(json.dumps(meta))
    with Repository.open(d) as r:
        assert r.format_config() == FormatConfig(1)
        r.set_erofs_version(0)
        assert r.format_config() == FormatConfig(0)


def test_upgrade_legacy_repository(tmp_path: Path) -> None:
    d = tmp_path / "old"
    oid = fsverity.digest_hex(b"legacy object", "sha256")
    (d / "objects" / oid[:2]).mkdir(parents=True)
    (d / "objects" / oid[:2] / oid[2:]).write_bytes(b"legacy object")
    assert peek_algorithm(d) == "sha256"
    with pytest.raises(RepositoryError, match="old-format"):
        Repository.open(d, upgrade=False)
    assert not (d / "meta.json").exists()
    with Repository.open(d) as r:
        assert r.algorithm == "sha256" and r.insecure
        assert r.read_object(oid) == b"legacy object"
    meta = json.loads((d / "meta.json").read_bytes())
    assert meta["algorithm"] == "fsverity-sha256-12"
    (tmp_path / "none/objects").mkdir(parents=True)
    with pytest.raises(RepositoryError, match="no objects found"):
        Repository.open(tmp_path / "none")


# -- objects -----------------------------------------------------------------


def test_objects(repo: Repository, tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)
    oid = repo.ensure_object(data)
    assert oid == fsverity.digest_hex(data, "sha512")
    path = Path(repo.path) / "objects" / oid[:2] / oid[2:]
    assert path.read_bytes() == data
    oracle = need_tool("fsverity")
    out = subprocess.run(
        [oracle, "digest", "--hash-alg=sha512", str(path)], capture_output=True, text=True
    )
    assert out.stdout.split()[0] == f"sha512:{oid}"
    assert repo.ensure_object(data) == oid
    assert repo.ensure_object_from_stream(io.BytesIO(data)) == oid
    assert repo.ensure_object(io.BytesIO(data)) == oid
    src = tmp_path / "src"
    src.write_bytes(data)
    assert repo.ensure_object_from_file(src) == (oid, StoreMethod.ALREADY_PRESENT)
    other = tmp_path / "other"
    other.write_bytes(data + b"!")
    oid2, method = repo.ensure_object_from_file(other)
    assert method in (StoreMethod.COPIED, StoreMethod.REFLINKED)
    assert repo.read_object(oid2) == data + b"!"
    assert repo.store_file_with_digest(str(src), oid) is False
    empty = repo.ensure_object(b"")
    assert empty == "00" * 64 or len(empty) == 128
    with pytest.raises(NotFoundError):
        repo.open_object("ab" * 64)
    with pytest.raises(RepositoryError, match="invalid sha512 object id"):
        repo.open_object("../../etc/passwd")
    assert stray_files(repo) == []


@needs_root
def test_copy_across_filesystems_falls_back(repo: Repository, tmp_path: Path) -> None:
    """A source on another filesystem (a tmpfs): FICLONE and copy_file_range
    fail with EXDEV, the content is copied by read/write instead."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        big = os.urandom(2 * 1024 * 1024 + 4097)  # more than one copy block
        small = os.urandom(5000)
        (mnt / "big").write_bytes(big)
        (mnt / "small").write_bytes(small)
        probe = tmp_path / "probe"
        with open(mnt / "small", "rb") as src, open(probe, "wb") as dst:
            try:
                os.copy_file_range(src.fileno(), dst.fileno(), len(small))
            except OSError as e:
                assert e.errno == errno.EXDEV, e
            else:
                pytest.skip("this kernel copies across filesystems: no EXDEV to fall back from")
        probe.unlink()
        big_id = fsverity.digest_hex(big, "sha512")
        assert repo.store_file_with_digest(str(mnt / "big"), big_id) is True
        # The second file takes the remembered fallback directly.
        small_id = fsverity.digest_hex(small, "sha512")
        repo.object_sink()(str(mnt / "small"), len(small), small_id)
        assert objpath(repo, big_id).read_bytes() == big
        assert objpath(repo, small_id).read_bytes() == small
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    report = repo.fsck()
    assert report.ok, str(report)
    assert stray_files(repo) == []


def test_object_sink_write_only_descriptor(repo: Repository, tmp_path: Path) -> None:
    """A write-only ``/proc/self/fd/N`` cannot be read: the sink reopens it
    by path, and the caller's descriptor keeps its offset."""
    data = os.urandom(70_000)
    fd = os.open(tmp_path / "wo", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.lseek(fd, 1234, os.SEEK_SET)
        oid = fsverity.digest_hex(data, "sha512")
        repo.object_sink()(f"/proc/self/fd/{fd}", len(data), oid)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1234
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
    finally:
        os.close(fd)
    assert repo.read_object(oid) == data
    assert repo.fsck().ok
    assert stray_files(repo) == []


def test_concurrent_writers(repo: Repository) -> None:
    """Two processes storing the same objects, images and refs at once."""
    script = textwrap.dedent(
        f"""
        from composefs.erofs.writer import mkfs
        from composefs.repository import Repository
        from composefs.tree import Directory, Leaf, Regular, Stat
        r = Repository.open({repo.path!r})
        for i in range(150):
            data = (b"shared object %d " % i) * 50
            oid = r.ensure_object(data)
            if i % 10 == 0:
                root = Directory()
                root.insert(b"/f", Leaf(Stat(0o644), Regular(len(data), digest=oid)))
                r.write_image(mkfs(root), "same/ref")
        w = r.create_stream(0)
        w.write_external(b"z" * 5000)
        r.write_stream(w, "shared-stream", "shared")
        print("done")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == b"done"
    result = repo.fsck()
    assert result.ok, str(result)
    assert result.objects_checked == 150 + 15 + 2
    assert result.images_checked == 15
    assert stray_files(repo) == []


# -- symlinks, streams, images --------------------------------------------------


def test_symlink_layout(repo: Repository) -> None:
    oid = repo.write_image(b"x" * 100, "some/deep/name")
    root = Path(repo.path)
    assert os.readlink(root / "images" / oid) == f"../objects/{oid[:2]}/{oid[2:]}"
    assert os.readlink(root / "images/refs/some/deep/name") == f"../../../{oid}"
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"abc")
    sid = repo.write_stream(w, "oci-layer-sha256:1234", "tag/one")
    assert os.readlink(root / "streams/oci-layer-sha256:1234") == f"../objects/{sid[:2]}/{sid[2:]}"
    assert os.readlink(root / "streams/refs/tag/one") == "../../oci-layer-sha256:1234"
    # Replacing a ref is atomic and leaves no temporaries.
    oid2 = repo.write_image(b"y" * 100, "some/deep/name")
    assert os.readlink(root / "images/refs/some/deep/name") == f"../../../{oid2}"
    for bad in ("../escape", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(RepositoryError):
            repo.write_image(b"z" * 100, bad)
    with pytest.raises(RepositoryError):
        repo.write_stream(repo.create_stream(), "has/slash")
    assert stray_files(repo) == []


def test_streams(repo: Repository) -> None:
    layer = os.urandom(200_000)
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"tar header")
    ext = w.write_external(layer)
    w.write_external_stream(io.BytesIO(b"q" * 9000), 9000)
    w.write_inline(b"trailer")
    layer_id = repo.write_stream(w, "oci-layer-sha256:aa")
    assert repo.has_stream("oci-layer-sha256:aa") == layer_id
    assert repo.has_stream("oci-layer-sha256:bb") is None

    calls = []

    def build(writer: object) -> str:
        calls.append(1)
        assert hasattr(writer, "write_external")
        writer.write_external(b"{config json padded out to be external}" * 3)  # type: ignore[attr-defined]
        writer.add_named_stream_ref("sha256:aa", layer_id)  # type: ignore[attr-defined]
        return "built"

    cid, extra = repo.ensure_stream("oci-config-x", CONTENT_OCI_CONFIG, build, "img:latest")
    assert extra == "built" and calls == [1]
    cid2, extra2 = repo.ensure_stream("oci-config-x", CONTENT_OCI_CONFIG, build, "img:latest")
    assert (cid2, extra2, calls) == (cid, None, [1])
    assert repo.has_named_stream("img:latest")
    assert repo.list_stream_refs() == [("img:latest", "../oci-config-x")]
    assert repo.stream_id("refs/img:latest") == cid

    out = io.BytesIO()
    repo.cat_stream("oci-layer-sha256:aa", out, expected_content_type=CONTENT_OCI_LAYER)
    assert out.getvalue() == b"tar header" + layer + b"q" * 9000 + b"trailer"
    with repo.open_stream("refs/img:latest") as reader:
        assert isinstance(reader, SplitStreamReader)
        assert reader.named_refs == {"sha256:aa": layer_id}
    with (
        pytest.raises(SplitstreamError, match="content type"),
        repo.open_stream("oci-config-x", expected_content_type=CONTENT_OCI_LAYER),
    ):
        pass
    with repo.open_stream("ignored", verity=layer_id) as reader:
        assert ext in reader.object_refs
    assert repo.remove_stream_ref("img:latest")
    assert not repo.remove_stream_ref("img:latest")
    with pytest.raises(NotFoundError):
        repo.open_stream("refs/img:latest")


def test_images(repo: Repository) -> None:
    root = tree_with(repo, {"a": b"A" * 5000, "small": b"tiny"})
    oid = repo.commit_image(root, "mine")
    fd, verity = repo.open_image(oid)
    os.close(fd)
    assert verity is False  # insecure repository: overlayfs won't require verity
    assert repo.objects_for_image("refs/mine") == [fsverity.digest_hex(b"A" * 5000, "sha512")]
    assert repo.read_image("refs/mine") == repo.read_image(oid)
    with pytest.raises(NotFoundError, match="image not found"):
        repo.open_image("refs/nope")
    os.symlink(f"../objects/{oid[:2]}/{oid[2:]}", Path(repo.path) / "images/deadbeef")
    with pytest.raises(RepositoryError, match="not a sha512 id"):
        repo.open_image("deadbeef")
    os.unlink(Path(repo.path) / "images/deadbeef")
    # By id the digest is checked (in userspace here); by ref it is not.
    path = Path(repo.path) / "objects" / oid[:2] / oid[2:]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match="mismatch"):
        repo.open_image(oid)
    os.close(repo.open_image("refs/mine")[0])

    img = io.BytesIO(b"raw image bytes" * 10)
    iid = repo.import_image(img, "imported")
    assert repo.read_image("refs/imported") == b"raw image bytes" * 10
    assert iid == fsverity.digest_hex(b"raw image bytes" * 10, "sha512")


def test_commit_all_formats(tmp_path: Path) -> None:
    r, _ = Repository.init(tmp_path / "r", insecure=True, formats=FormatConfig(1, (2,)))
    root = tree_with(r, {"f": b"F" * 100})
    ids = r.commit_images(root, "both")
    assert list(ids) == [1, 2] and ids[1] != ids[2]
    assert os.readlink(tmp_path / "r/images/refs/both") == f"../{ids[1]}"
    assert (tmp_path / "r/images" / ids[2]).is_symlink()
    r.close()


# -- gc ----------------------------------------------------------------------


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


# -- fsck ----------------------------------------------------------------------


def populated(repo: Repository) -> dict[str, str]:
    big = b"B" * 10_000
    img = repo.commit_image(tree_with(repo, {"big": big}), "img")
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"x" * 100)
    ext = w.write_external(b"E" * 5000)
    named = repo.ensure_object(b"N" * 500)
    w.add_named_stream_ref("other", named)
    stream = repo.write_stream(w, "layer", "layer-ref")
    return {
        "img": img,
        "big": fsverity.digest_hex(big, "sha512"),
        "ext": ext,
        "named": named,
        "stream": stream,
    }


def objpath(repo: Repository, oid: str) -> Path:
    return Path(repo.path) / "objects" / oid[:2] / oid[2:]


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


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


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


def test_without_o_tmpfile(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filesystems without O_TMPFILE: named temporaries in the repository
    root, removed after use; leftovers of killed writers go with gc."""
    real_open = os.open

    def no_tmpfile(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_tmpfile)
    other, created = Repository.init(Path(repo.path).parent / "other", insecure=True)
    assert created and (Path(other.path) / "meta.json").read_bytes() == RUST_META_V2
    assert stray_files(other) == []
    other.close()
    oid = repo.ensure_object(b"fallback" * 100)
    assert repo.read_object(oid) == b"fallback" * 100
    w = repo.create_stream(0)
    w.write_external(b"more" * 100)
    repo.write_stream(w, "s", "r")
    assert stray_files(repo) == []
    monkeypatch.undo()
    (Path(repo.path) / ".tmp-leftover").write_bytes(b"half")
    assert repo.fsck().ok
    repo.gc()
    assert stray_files(repo) == []


@pytest.mark.vm
def test_secure_repository(tmp_path: Path) -> None:
    """With kernel fs-verity (`tests/vm/run.py tests/test_repository.py`):
    objects get verity, ids come from the kernel, missing verity is caught."""
    scratch = os.environ.get("COMPOSEFS_VERITY_SCRATCH")
    if not scratch:
        pytest.skip("COMPOSEFS_VERITY_SCRATCH is unset: needs kernel fs-verity (make test-vm)")
    path = Path(scratch) / f"repo-{os.getpid()}-{tmp_path.name}"
    repo, created = Repository.init(path)
    assert created and not repo.insecure
    with open(path / "meta.json", "rb") as f:
        assert fsverity.measure_verity(f.fileno())[0] == "sha512"
    data = os.urandom(10_000)
    oid = repo.ensure_object(data)
    with open(objpath(repo, oid), "rb") as f:
        assert fsverity.measure_verity(f.fileno()) == ("sha512", bytes.fromhex(oid))
    src = tmp_path / "src"
    src.write_bytes(b"file content" * 1000)
    fid = fsverity.digest_hex(src.read_bytes(), "sha512")
    assert repo.store_file_with_digest(str(src), fid)
    with pytest.raises(RepositoryError, match=r"mismatch|changed"):
        repo.store_file_with_digest(str(src), "ab" * 64)
    img = repo.commit_image(tree_with(repo, {"x": data}), "img")
    fd, verity = repo.open_image(img)
    os.close(fd)
    assert verity is True
    assert repo.fsck().ok
    # An object without fs-verity (swapped in behind our back) is refused.
    victim = objpath(repo, oid)
    victim.unlink()
    victim.write_bytes(data)
    assert repo.fsck().kinds() == {"object-verity-missing"}
    with pytest.raises(RepositoryError, match="verification"):
        repo.open_object(oid)
    repo.close()
    Repository.open(path, require_verity=True).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a read-only bind mount")
def test_read_only_mount(repo: Repository, tmp_path: Path) -> None:
    """A repository on a read-only mount can be read and checked, not written."""
    ids = populated(repo)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", repo.path, str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with Repository.open(ro) as r:
            assert r.fsck().ok
            assert r.read_object(ids["ext"]) == b"E" * 5000
            out = io.BytesIO()
            r.cat_stream("refs/layer-ref", out)
            assert out.getvalue() == b"x" * 100 + b"E" * 5000
            with pytest.raises(RepositoryError, match="read-only file system"):
                r.ensure_object(b"new data")
            with pytest.raises(RepositoryError, match="read-only file system"):
                r.gc()
            assert r.gc(dry_run=True).objects_removed == 0
    finally:
        subprocess.run(["umount", str(ro)], check=True)
