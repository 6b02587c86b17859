"""cfsctl publish: a self-contained static tree with nothing private, served
by nginx and fetched back; the OCI image works on the fetching side."""

from __future__ import annotations

import os
from pathlib import Path

import nginxlib
import pytest
from httptestlib import REF, TAG, Served, Source, build_layout, cfsctl, det_bytes, make_repo

from composefs.http.fetch import fetch
from composefs.http.publish import publish
from composefs.oci import storage
from composefs.repository import Repository


def tree_objects(root: Path) -> set[str]:
    return {p.parent.name + p.name for p in (root / "objects").glob("*/*")}


def test_published_tree_has_only_what_the_ref_needs(source: Source, tmp_path: Path) -> None:
    # A second repository: the shared image plus another image and a secret object.
    repo_path = tmp_path / "repo"
    other = build_layout(tmp_path / "other", nfiles=3)
    with make_repo(repo_path) as repo:
        storage.pull(repo, f"oci:{source.layout}:latest", TAG)
        storage.pull(repo, f"oci:{tmp_path / 'other'}:latest", "other")
        secret = repo.ensure_object(b"private data nobody referenced" * 10)
        result = publish(repo, str(tmp_path / "pub"), [REF])
        assert result.refs == [REF]
        needed = set(repo.objects_for_image(source.image_id))
    pub = tmp_path / "pub"
    got = tree_objects(pub)
    assert needed <= got
    assert secret not in got
    assert not (pub / "meta.json").exists()
    assert sorted(os.listdir(pub)) == ["images", "objects", "streams"]
    assert os.listdir(pub / "streams" / "refs" / "oci") == ["demo%2Fapp:1.0"]
    # only this image's config, manifest and layers
    streams = sorted(p for p in os.listdir(pub / "streams") if p != "refs")
    assert len([s for s in streams if s.startswith("oci-layer-")]) == 2
    assert [s for s in streams if s.startswith("oci-manifest-")] == [
        "oci-manifest-" + source.image.manifest_digest
    ]
    assert os.listdir(pub / "images") == [source.image_id]
    # the other image's config is nowhere
    assert not any(other.config_digest in s for s in streams)
    # hardlinked from the repository (same filesystem), and republishing adds nothing
    obj = next(iter(needed))
    a = (pub / "objects" / obj[:2] / obj[2:]).stat()
    b = (repo_path / "objects" / obj[:2] / obj[2:]).stat()
    assert a.st_ino == b.st_ino
    with Repository.open(repo_path) as repo:
        again = publish(repo, str(pub), [REF])
    assert again.objects_written == 0 and again.objects_present == len(got)


def test_link_files_mode(served: Served) -> None:
    pub = served.published_dir.parent / "pub-files"
    ref = pub / "streams" / REF
    assert ref.is_file() and not ref.is_symlink()
    target = ref.read_text()
    assert target.startswith("../../oci-manifest-sha256:")
    assert (ref.parent / target).resolve().is_file()


def test_publish_everything_by_default_and_errors(source: Source, tmp_path: Path) -> None:
    p = cfsctl("--repo", str(source.repo), "publish", str(tmp_path / "all"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("published ")
    assert (tmp_path / "all" / "streams" / REF).is_symlink()
    p = cfsctl("--repo", str(source.repo), "publish", str(tmp_path / "x"), "refs/oci/nope")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not found" in p.stderr
    assert not (tmp_path / "x").exists()  # nothing written before every name resolved
    # a repository is not a publish directory
    p = cfsctl("--repo", str(source.repo), "publish", str(source.repo))
    assert p.returncode == 1 and "is a repository" in p.stderr


def test_cli_fetch_prints_digest_and_verity(served: Served, source: Source, tmp_path: Path) -> None:
    make_repo(tmp_path / "r").close()
    p = cfsctl("--repo", str(tmp_path / "r"), "fetch", served.published, REF)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"content {source.image.manifest_digest}"
    assert lines[1].startswith("verity ") and len(lines[1]) == len("verity ") + 128
    assert "objects/s" in p.stderr
    p = cfsctl("--repo", str(tmp_path / "r"), "oci", "images")
    assert TAG in p.stdout
    p = cfsctl("--repo", str(tmp_path / "r"), "fsck")
    assert p.returncode == 0, p.stdout + p.stderr


def test_fetch_by_config_content_id(served: Served, source: Source, dest_repo: Repository) -> None:
    """A content id names the stream on the server: the config stream brings
    the layers and the composefs image (which the repository can mount)."""
    name = "oci-config-" + source.image.config_digest
    result = fetch(dest_repo, served.link_files, name)
    assert result.content_id == name
    assert result.content_digest == source.image.config_digest
    assert result.images == [source.image_id]
    assert dest_repo.has_stream(name) == result.verity
    assert dest_repo.objects_for_image(source.image_id)
    assert storage.list_images(dest_repo) == []  # no tag was fetched
    assert dest_repo.fsck().ok


def test_wrong_content_id_is_refused(served: Served, source: Source, dest_repo: Repository) -> None:
    """The server's ``streams/oci-config-X`` must hash to X."""
    from composefs.errors import HttpError

    pub = served.published_dir
    fake = "oci-config-sha256:" + "0" * 64
    (pub / "streams" / fake).symlink_to(
        os.readlink(pub / "streams" / f"oci-config-{source.image.config_digest}")
    )
    try:
        with pytest.raises(HttpError, match="referenced as sha256:0000"):
            fetch(dest_repo, served.published, fake)
    finally:
        (pub / "streams" / fake).unlink()
    assert dest_repo.list_stream_refs("") == []
    assert dest_repo.has_stream(fake) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for kernel mounts")
def test_oci_mount_on_the_fetching_side(served: Served, source: Source, tmp_path: Path) -> None:
    from composefs.mount import unmount

    repo = tmp_path / "r"
    make_repo(repo).close()
    assert cfsctl("--repo", str(repo), "fetch", served.raw_repo, REF).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = cfsctl("--repo", str(repo), "oci", "mount", TAG, str(mnt))
    assert p.returncode == 0, p.stderr
    try:
        assert (mnt / "etc/big").read_bytes() == det_bytes(1000, 3 << 20)
        assert (mnt / "etc/new").read_bytes() == det_bytes(8, 70000)
        assert (mnt / "etc/small").read_bytes() == b"tiny"
        assert not (mnt / "etc/gone").exists()
        assert os.readlink(mnt / "usr/bin/link") == "tool1"
    finally:
        unmount(str(mnt))


def test_nginx_site_config_is_what_the_readme_shows() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = nginxlib.site_config("/srv/composefs", 8080, link_files=True)
    for line in snippet.splitlines():
        if "listen" in line or "root" in line:
            continue
        assert line.strip() in readme, line


def test_publish_an_image_alone(source: Source, tmp_path: Path) -> None:
    with Repository.open(source.repo) as repo:
        result = publish(repo, str(tmp_path / "img"), images=[source.image_id])
        needed = set(repo.objects_for_image(source.image_id)) | {source.image_id}
    assert result.images == [source.image_id] and result.streams == []
    assert tree_objects(tmp_path / "img") == needed
    link = tmp_path / "img" / "images" / source.image_id
    assert link.is_symlink() and link.resolve().is_file()
    assert not (tmp_path / "img" / "streams").exists()


def test_publish_refuses_an_object_that_is_no_regular_file(
    source: Source, tmp_path: Path
) -> None:
    # A FIFO where an object should be is not linked into the published
    # tree (nor opened: that would block).
    import shutil

    from composefs.errors import RepositoryError

    copy = tmp_path / "repo"
    shutil.copytree(source.repo, copy, symlinks=True)
    with Repository.open(copy) as repo:
        victim = sorted(repo.objects_for_image(source.image_id))[0]
        path = Path(repo.objects_dir) / victim[:2] / victim[2:]
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(RepositoryError, match="not a regular file"):
            publish(repo, str(tmp_path / "img"), images=[source.image_id])
    assert not (tmp_path / "img" / "objects" / victim[:2] / victim[2:]).exists()
