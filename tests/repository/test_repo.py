"""The `Repository` facade: init, open rules, meta.json upgrade, secure and read-only repositories.

See repotestlib for the shared helpers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from repotestlib import (
    RUST_META_V2,
    objpath,
    populated,
    tree_with,
    write_meta,
)

from composefs import fsverity
from composefs.errors import RepositoryError
from composefs.repository import (
    FormatConfig,
    Repository,
    peek_algorithm,
)


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


@pytest.mark.vm
def test_secure_repository(tmp_path: Path) -> None:
    """With kernel fs-verity (`tests/vm/run.py tests/repository`):
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
