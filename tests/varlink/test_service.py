"""Every method of org.composefs.Repository and org.composefs.Oci against a
running ``cfsctl varlink``, called with the `varlink` package's client (an
implementation independent of the server's asyncvarlink) and with the raw
socket client, checked against the CLI and the repository on disk."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from varlinklib import IMAGE_FILES, Layout, Service, cfsctl
from vlclient import CallError, RawClient

import varlink
from composefs import mount as _mount
from composefs.errors import MountError
from testlib import needs_root

REPO = "org.composefs.Repository"
OCI = "org.composefs.Oci"


@pytest.fixture
def client(service: Service) -> Iterator[varlink.Client]:
    with varlink.Client(service.address) as c:
        yield c


@pytest.fixture
def raw(service: Service) -> Iterator[RawClient]:
    with RawClient(service.socket) as c:
        yield c


def open_handle(raw: RawClient, path: Path) -> int:
    handle: int = raw.call(f"{REPO}.OpenRepository", {"path": str(path)})["handle"]
    return handle


def expect_error(raw: RawClient, method: str, params: dict[str, Any]) -> CallError:
    with pytest.raises(CallError) as e:
        raw.call(method, params)
    return e.value


# -- org.composefs.Repository ----------------------------------------------------


def test_init_open_close(client: varlink.Client, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "repo"
    with client.open(REPO) as r:
        assert r.InitRepository(path=str(path), insecure=True) == {"created": True}
        assert r.InitRepository(path=str(path), insecure=True) == {"created": False}
        meta = json.loads((path / "meta.json").read_text())
        assert meta["algorithm"] == "fsverity-sha512-12"
        opened = r.OpenRepository(path=str(path))
        assert opened["hash_algorithm"] == "sha512"
        assert opened["objects_device_id"] == os.stat(path / "objects").st_dev
        h = opened["handle"]
        assert r.OpenRepository(path=str(path))["handle"] != h  # never reused
        r.CloseRepository(handle=h)
        with pytest.raises(varlink.VarlinkError) as e:
            r.CloseRepository(handle=h)
        assert e.value.error() == f"{REPO}.InvalidHandle"
        assert e.value.parameters() == {"handle": h}
        with pytest.raises(varlink.VarlinkError) as e:
            r.Fsck(handle=h)
        assert e.value.error() == f"{REPO}.InvalidHandle"


def test_init_sha256_and_conflict(raw: RawClient, tmp_path: Path) -> None:
    path = tmp_path / "repo"
    params = {"path": str(path), "algorithm": "fsverity-sha256-12", "insecure": True}
    assert raw.call(f"{REPO}.InitRepository", params) == {"created": True}
    assert raw.call(f"{REPO}.OpenRepository", {"path": str(path)})["hash_algorithm"] == "sha256"
    # Same path, other algorithm: refused, repository untouched.
    params["algorithm"] = "fsverity-sha512-12"
    err = expect_error(raw, f"{REPO}.InitRepository", params)
    assert err.error == f"{REPO}.InternalError"
    assert "different configuration" in err.parameters["message"]
    assert "sha256" in (path / "meta.json").read_text()
    err = expect_error(raw, f"{REPO}.InitRepository", {"path": str(path), "algorithm": "md5"})
    assert err.error == f"{REPO}.InvalidSpec"


def test_ensure_repository(raw: RawClient, tmp_path: Path) -> None:
    path = tmp_path / "a" / "repo"
    params = {"path": str(path), "insecure": True}
    assert raw.call(f"{REPO}.EnsureRepository", params) == {"status": "Created"}
    assert raw.call(f"{REPO}.EnsureRepository", params) == {"status": "Opened"}
    # Another algorithm requested: the existing repository is kept, not an error.
    params["algorithm"] = "fsverity-sha256-12"
    assert raw.call(f"{REPO}.EnsureRepository", params) == {"status": "Opened"}
    assert "sha512" in (path / "meta.json").read_text()
    # A legacy repository (objects, no meta.json) is upgraded in place.
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    (tree / "usr" / "f").write_bytes(b"x" * 8192)
    cfsctl("--repo", str(path), "create-image", str(tree))
    (path / "meta.json").unlink()
    assert raw.call(f"{REPO}.EnsureRepository", params) == {"status": "Upgraded"}
    assert (path / "meta.json").exists()


def test_list_image_refs(raw: RawClient, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cfsctl("--repo", str(repo), "init", "--insecure")
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    (tree / "usr" / "f").write_text("x\n")
    image_id = cfsctl("--repo", str(repo), "create-image", str(tree), "base").stdout.strip()
    cfsctl("--repo", str(repo), "create-image", str(tree), "sub/other")
    h = open_handle(raw, repo)
    hexid = image_id.split(":", 1)[-1]
    assert raw.call(f"{REPO}.ListImageRefs", {"handle": h}) == {
        "images": [{"name": "base", "digest": hexid}, {"name": "sub/other", "digest": hexid}]
    }


def test_open_errors(raw: RawClient, tmp_path: Path) -> None:
    err = expect_error(raw, f"{REPO}.OpenRepository", {"path": str(tmp_path / "nope")})
    assert err.error == f"{REPO}.RepoNotFound"
    assert "nope" in err.parameters["message"]
    for params in ({}, {"path": str(tmp_path), "system": True}, {"user": True, "system": True}):
        err = expect_error(raw, f"{REPO}.OpenRepository", params)
        assert err.error == f"{REPO}.InvalidSpec"
        assert err.parameters == {"message": "exactly one of `path`, `user`, `system` must be set"}


def test_handles_valid_on_every_connection(service: Service, pulled: Path) -> None:
    """As the reference: a handle is the service's, not the connection's
    (the `varlink` package opens one connection per interface)."""
    with RawClient(service.socket) as a:
        h = open_handle(a, pulled)
    with RawClient(service.socket) as b:
        assert b.call(f"{OCI}.ListImages", {"handle": h})["images"][0]["name"] == "one"
        b.call(f"{REPO}.CloseRepository", {"handle": h})
    with RawClient(service.socket) as c:
        err = expect_error(c, f"{OCI}.ListImages", {"handle": h})
        assert err.error == f"{OCI}.InvalidHandle"


def test_fsck(raw: RawClient, pulled: Path) -> None:
    h = open_handle(raw, pulled)
    reply = raw.call(f"{REPO}.Fsck", {"handle": h})
    cli = json.loads(cfsctl("--repo", str(pulled), "fsck", "--json").stdout)
    assert reply["ok"] is True and reply["errors"] == []
    assert reply["objects_checked"] > 0 and reply["images_checked"] == 1
    for key in ("objects_checked", "streams_checked", "images_checked", "has_metadata"):
        assert reply[key] == cli[key]
    meta = raw.call(f"{REPO}.Fsck", {"handle": h, "metadata_only": True})
    assert meta["ok"] is True and meta["objects_checked"] == 0

    # Corrupt one object: the reply says so (the call still succeeds).
    victim = next(p for p in (pulled / "objects").rglob("*") if p.is_file())
    os.chmod(victim, 0o644)
    victim.write_bytes(b"corrupted")
    bad = raw.call(f"{REPO}.Fsck", {"handle": h})
    assert bad["ok"] is False and bad["objects_corrupted"] == 1
    assert any(e.startswith("fsck: ") for e in bad["errors"])


def test_gc(raw: RawClient, pulled: Path, layout: Layout) -> None:
    h = open_handle(raw, pulled)
    dry = raw.call(f"{REPO}.Gc", {"handle": h, "dry_run": True, "roots": []})
    assert dry == {
        "result": {"objects_removed": 0, "objects_bytes": 0, "images_pruned": 0,
                   "streams_pruned": 0},
        "dry_run": True,
    }  # fmt: skip
    raw.call(f"{OCI}.Untag", {"handle": h, "name": "one"})
    before = sum(1 for p in (pulled / "objects").rglob("*") if p.is_file())
    dry = raw.call(f"{REPO}.Gc", {"handle": h, "dry_run": True, "roots": []})["result"]
    assert dry["objects_removed"] > 0
    assert sum(1 for p in (pulled / "objects").rglob("*") if p.is_file()) == before
    real = raw.call(f"{REPO}.Gc", {"handle": h, "dry_run": False, "roots": []})
    assert real["dry_run"] is False and real["result"] == dry
    after = sum(1 for p in (pulled / "objects").rglob("*") if p.is_file())
    assert after == before - dry["objects_removed"]
    assert raw.call(f"{REPO}.Fsck", {"handle": h})["ok"] is True


def test_image_objects(raw: RawClient, pulled: Path) -> None:
    h = open_handle(raw, pulled)
    inspect = raw.call(f"{OCI}.Inspect", {"handle": h, "image": "one"})
    image_id = inspect["composefs_erofs"]
    reply = raw.call(f"{REPO}.ImageObjects", {"handle": h, "name": image_id})
    cli = cfsctl("--repo", str(pulled), "image-objects", image_id).stdout.split()
    assert reply["object_ids"] == sorted(cli) and reply["object_ids"]
    err = expect_error(raw, f"{REPO}.ImageObjects", {"handle": h, "name": "missing"})
    assert (err.error, err.parameters) == (f"{REPO}.NoSuchRef", {"reference": "missing"})


# -- org.composefs.Oci ---------------------------------------------------------------


def test_list_images_inspect_tag_untag(client: varlink.Client, pulled: Path) -> None:
    with client.open(REPO) as r, client.open(OCI) as o:
        h = r.OpenRepository(path=str(pulled))["handle"]
        images = o.ListImages(handle=h)["images"]
        cli = json.loads(cfsctl("--repo", str(pulled), "oci", "images", "--json").stdout)
        assert images == cli["images"]
        (entry,) = images
        assert entry["name"] == "one" and entry["layer_count"] == 2
        assert entry["architecture"] == "amd64" and entry["is_container"] is True

        o.Tag(handle=h, manifest_digest=entry["manifest_digest"], name="alias:v2")
        names = sorted(i["name"] for i in o.ListImages(handle=h)["images"])
        assert names == ["alias:v2", "one"]
        assert [i["name"] for i in o.ListImages(handle=h, filter="alias")["images"]] == ["alias:v2"]
        assert o.ListImages(handle=h, filter="zzz")["images"] == []

        got = o.Inspect(handle=h, image="alias:v2")
        cli_inspect = json.loads(cfsctl("--repo", str(pulled), "oci", "inspect", "one").stdout)
        # The `varlink` package's client drops null fields (the raw test below sees them).
        assert got == {k: v for k, v in cli_inspect.items() if v is not None}
        assert json.loads(got["manifest"])["schemaVersion"] == 2
        by_digest = o.Inspect(handle=h, image=entry["manifest_digest"])
        assert by_digest == got

        o.Untag(handle=h, name="alias:v2")
        assert [i["name"] for i in o.ListImages(handle=h)["images"]] == ["one"]
        with pytest.raises(varlink.VarlinkError) as e:
            o.Inspect(handle=h, image="alias:v2")
        assert e.value.error() == f"{OCI}.NoSuchImage"
        assert e.value.parameters() == {"image": "alias:v2"}
        with pytest.raises(varlink.VarlinkError) as e:
            o.Untag(handle=h, name="alias:v2")
        assert e.value.error() == f"{OCI}.InternalError"
        with pytest.raises(varlink.VarlinkError) as e:
            o.Tag(handle=h, manifest_digest="sha256:" + "0" * 64, name="x")
        assert e.value.error() == f"{OCI}.InternalError"


def test_check(raw: RawClient, pulled: Path) -> None:
    h = open_handle(raw, pulled)
    reply = raw.call(f"{OCI}.Check", {"handle": h})
    assert reply["ok"] is True and reply["images_checked"] == 1 and reply["errors"] == []
    assert reply["repo"]["ok"] is True and reply["repo"]["objects_checked"] > 0
    one = raw.call(f"{OCI}.Check", {"handle": h, "image": "one"})
    assert one["images_checked"] == 1 and one["ok"] is True
    missing = raw.call(f"{OCI}.Check", {"handle": h, "image": "nope"})
    assert missing["ok"] is False and missing["images_corrupted"] == 1


def test_compute_id(raw: RawClient, pulled: Path) -> None:
    h = open_handle(raw, pulled)
    reply = raw.call(f"{OCI}.ComputeId", {"handle": h, "image": "one", "bootable": False})
    cli = cfsctl("--repo", str(pulled), "oci", "compute-id", "one").stdout.strip()
    assert reply == {"image_id": cli}
    inspect = raw.call(f"{OCI}.Inspect", {"handle": h, "image": "one"})
    assert reply["image_id"] == inspect["composefs_erofs"]
    assert inspect["composefs_boot_erofs"] is None  # on the wire as null, like serde's Option
    err = expect_error(raw, f"{OCI}.ComputeId", {"handle": h, "image": "no", "bootable": False})
    assert err.error == f"{OCI}.NoSuchImage"


def test_pull_streams_progress(raw: RawClient, repo: Path, layout: Layout) -> None:
    h = open_handle(raw, repo)
    params = {"handle": h, "image": layout.ref("one"), "name": "one", "local_fetch": "auto",
              "bootable": False}  # fmt: skip
    frames = raw.call_more(f"{OCI}.Pull", params)
    *progress, last = frames
    kinds = [next(iter(f)) for f in progress]
    assert kinds.count("started") == 2 and kinds.count("done") == 2
    assert set(kinds) <= {"started", "progress", "skipped", "done", "message"}
    for f in progress:
        assert len(f) == 1  # exactly one variant per frame
    started = [f["started"] for f in progress if "started" in f]
    assert all(s["unit"] == "Bytes" and s["total"] > 0 for s in started)
    done = {f["done"]["id"]: f["done"]["transferred"] for f in progress if "done" in f}
    assert done == {s["id"]: s["total"] for s in started}
    completed = last["completed"]
    assert completed["manifest_digest"] == layout.digests["one"]
    assert completed["boot_image"] is None
    assert "new" in completed["stats"]

    # The image is there, tagged, and what the CLI would have pulled.
    cli_repo = repo.parent / "cli"
    cfsctl("--repo", str(cli_repo), "init", "--insecure")
    cfsctl("--repo", str(cli_repo), "oci", "pull", layout.ref("one"), "one")
    mine = raw.call(f"{OCI}.Inspect", {"handle": h, "image": "one"})
    theirs = json.loads(cfsctl("--repo", str(cli_repo), "oci", "inspect", "one").stdout)
    assert mine == theirs
    assert completed["config_verity"] and completed["manifest_verity"]

    # Again: every layer is skipped now.
    frames = raw.call_more(f"{OCI}.Pull", params)
    assert [next(iter(f)) for f in frames[:-1]].count("skipped") == 2


def test_pull_without_more(client: varlink.Client, repo: Path, layout: Layout) -> None:
    """Without ``more`` the reply is the single ``completed`` frame. Without
    ``name`` nothing is tagged (as the reference); the image is there by digest."""
    with client.open(REPO) as r, client.open(OCI) as o:
        h = r.OpenRepository(path=str(repo))["handle"]
        reply = o.Pull(handle=h, image=layout.ref("two"), local_fetch="disabled", bootable=False)
        assert set(reply) == {"completed"}
        assert reply["completed"]["manifest_digest"] == layout.digests["two"]
        assert o.ListImages(handle=h)["images"] == []
        inspect = o.Inspect(handle=h, image=layout.digests["two"])
        assert json.loads(inspect["manifest"])["schemaVersion"] == 2


def test_pull_more_with_varlink_package(client: varlink.Client, repo: Path, layout: Layout) -> None:
    with client.open(REPO) as r, client.open(OCI) as o:
        h = r.OpenRepository(path=str(repo))["handle"]
        frames = list(o.Pull(handle=h, image=layout.ref("one"), name="one", local_fetch="auto",
                             bootable=False, _more=True))  # fmt: skip
        assert "completed" in frames[-1] and all("completed" not in f for f in frames[:-1])
        assert sum("started" in f for f in frames) == 2


def test_pull_from_registry(raw: RawClient, repo: Path, oci_images: dict[str, Any],
                            registry_plain: Any) -> None:  # fmt: skip
    img = oci_images["plain"]
    h = open_handle(raw, repo)
    params = {"handle": h, "image": f"docker://{registry_plain.ref(img.name)}", "name": "reg",
              "local_fetch": "auto", "bootable": False}  # fmt: skip
    frames = raw.call_more(f"{OCI}.Pull", params)
    assert frames[-1]["completed"]["manifest_digest"] == img.digest
    assert any("progress" in f for f in frames)
    assert raw.call(f"{OCI}.Check", {"handle": h, "image": "reg"})["ok"] is True


def test_failed_bootable_pull_tags_nothing(raw: RawClient, repo: Path, layout: Layout) -> None:
    """The image has no boot entries: Pull --bootable fails and the name is
    not tagged (the boot image is committed before the tag)."""
    pytest.importorskip("composefs.boot")
    h = open_handle(raw, repo)
    params = {"handle": h, "image": layout.ref("two"), "name": "b",
              "local_fetch": "auto", "bootable": True}  # fmt: skip
    with pytest.raises(CallError):
        raw.call_more(f"{OCI}.Pull", params)
    assert raw.call(f"{OCI}.ListImages", {"handle": h}) == {"images": []}


def test_gc_root_naming_nothing_is_an_error(raw: RawClient, pulled: Path) -> None:
    h = open_handle(raw, pulled)
    raw.call(f"{OCI}.Untag", {"handle": h, "name": "one"})
    before = sorted(p for p in (pulled / "objects").rglob("*") if p.is_file())
    with pytest.raises(CallError):
        raw.call(f"{REPO}.Gc", {"handle": h, "dry_run": False, "roots": ["no-such-image"]})
    assert sorted(p for p in (pulled / "objects").rglob("*") if p.is_file()) == before


def test_pull_errors(raw: RawClient, repo: Path, tmp_path: Path) -> None:
    h = open_handle(raw, repo)
    params = {"handle": h, "image": f"oci:{tmp_path}/missing:x", "name": "bad",
              "local_fetch": "auto", "bootable": False}  # fmt: skip
    with pytest.raises(CallError) as e:
        raw.call_more(f"{OCI}.Pull", params)
    assert e.value.error == f"{OCI}.InternalError"
    params["handle"] = 9999
    with pytest.raises(CallError) as e:
        raw.call_more(f"{OCI}.Pull", params)
    assert (e.value.error, e.value.parameters) == (f"{OCI}.InvalidHandle", {"handle": 9999})
    assert raw.call(f"{OCI}.ListImages", {"handle": h}) == {"images": []}


# -- mounts: the fd comes over the socket -----------------------------------------


def _unmount(target: str) -> None:
    """Unmount; the service closes its copy of the mount fd just after
    sending it, so a client this quick may briefly find the mount busy."""
    for _ in range(50):
        try:
            _mount.unmount(target)
            return
        except MountError as e:
            if "busy" not in str(e):
                raise
            time.sleep(0.1)
    _mount.unmount(target)


def _attach_and_read(mnt_fd: int, relpath: str) -> bytes:
    """move_mount the fd onto a temporary directory (closing the fd, which
    would keep the mount busy) and read `relpath` there."""
    with tempfile.TemporaryDirectory() as target:
        try:
            _mount.move_mount(mnt_fd, "", -100, target, _mount.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mnt_fd)
        try:
            return (Path(target) / relpath).read_bytes()
        finally:
            _unmount(target)


@needs_root
def test_mount_returns_fd(raw: RawClient, pulled: Path) -> None:
    h = open_handle(raw, pulled)
    image_id = raw.call(f"{OCI}.Inspect", {"handle": h, "image": "one"})["composefs_erofs"]
    reply = raw.call(f"{REPO}.Mount", {"handle": h, "name": image_id, "options": {}})
    assert reply == {"fd_index": 0}
    (fd,) = raw.take_fds()
    try:
        # Usable without attaching (openat through the fd) and after move_mount.
        with open(os.open("etc/hostname", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == IMAGE_FILES["etc/hostname"]
    except BaseException:
        os.close(fd)
        raise
    assert _attach_and_read(fd, "usr/bin/tool") == IMAGE_FILES["usr/bin/tool"]
    err = expect_error(raw, f"{REPO}.Mount", {"handle": h, "name": "nope", "options": {}})
    assert err.error == f"{REPO}.NoSuchRef"
    assert raw.take_fds() == []


@needs_root
def test_oci_mount_overlay_with_passed_fds(raw: RawClient, pulled: Path, tmp_path: Path) -> None:
    h = open_handle(raw, pulled)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    dirfds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (upper, work)]
    try:
        params = {"handle": h, "image": "one", "bootable": False,
                  "options": {"overlay": True, "read_write": True}}  # fmt: skip
        assert raw.call(f"{OCI}.OciMount", params, fds=dirfds) == {"fd_index": 0}
    finally:
        for fd in dirfds:
            os.close(fd)
    (fd,) = raw.take_fds()
    with tempfile.TemporaryDirectory() as target:
        try:
            _mount.move_mount(fd, "", -100, target, _mount.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(fd)
        try:
            assert (Path(target) / "etc/hostname").read_bytes() == b"varlink-test\n"
            (Path(target) / "etc/new").write_text("written\n")
        finally:
            _unmount(target)
    assert (upper / "etc" / "new").read_text() == "written\n"

    # Overlay without the two fds, or fds without overlay: refused, no fd back.
    for options, fds in (({"overlay": True}, []), ({}, [0])):
        params = {"handle": h, "image": "one", "bootable": False, "options": options}
        with pytest.raises(CallError) as e:
            raw.call(f"{OCI}.OciMount", params, fds=fds or None)
        assert e.value.error == f"{OCI}.InternalError"
        assert "fds" in e.value.parameters["message"]
        assert raw.take_fds() == []
    err = expect_error(raw, f"{OCI}.OciMount",
                       {"handle": h, "image": "gone", "bootable": False, "options": {}})  # fmt: skip
    assert err.error == f"{OCI}.NoSuchImage"


# -- robustness -------------------------------------------------------------------


def test_concurrent_clients(service: Service, repo: Path, layout: Layout) -> None:
    """8 clients at once: two pulls, checks, fscks and listings; every
    result is consistent and the repository ends clean with both tags."""
    with RawClient(service.socket) as c:
        h = open_handle(c, repo)
    errors: list[BaseException] = []
    results: dict[str, Any] = {}

    def pull(tag: str) -> None:
        with RawClient(service.socket) as c:
            params = {"handle": h, "image": layout.ref(tag), "name": tag, "local_fetch": "auto",
                      "bootable": False}  # fmt: skip
            results[tag] = c.call_more(f"{OCI}.Pull", params)[-1]["completed"]

    def check(i: int) -> None:
        with RawClient(service.socket) as c:
            for _ in range(3):
                method = f"{OCI}.Check" if i % 2 else f"{REPO}.Fsck"
                reply = c.call(method, {"handle": h})
                assert reply["ok"] is True, reply

    def listing(i: int) -> None:
        with RawClient(service.socket) as c:
            for _ in range(10):
                names = {x["name"] for x in c.call(f"{OCI}.ListImages", {"handle": h})["images"]}
                assert names <= {"one", "two"}

    def guard(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:
            errors.append(e)

    jobs = [(pull, "one"), (pull, "two"), (check, 0), (check, 1), (check, 2),
            (listing, 0), (listing, 1), (listing, 2)]  # fmt: skip
    threads = [threading.Thread(target=guard, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results["one"]["manifest_digest"] == layout.digests["one"]
    assert results["two"]["manifest_digest"] == layout.digests["two"]
    with RawClient(service.socket) as c:
        names = sorted(x["name"] for x in c.call(f"{OCI}.ListImages", {"handle": h})["images"])
        assert names == ["one", "two"]
        assert c.call(f"{OCI}.Check", {"handle": h})["ok"] is True
    assert service.alive()


@pytest.mark.parametrize("more", [True, False])
def test_disconnect_mid_pull(service: Service, repo: Path, tmp_path: Path, more: bool) -> None:
    """The client hangs up while a layer is arriving: the pull stops (the
    rest of the layer is never fetched), nothing is tagged, fsck is clean.
    Without ``more`` no frame is sent that could fail: the service must
    notice the hang-up by itself."""
    from slowregistry import SlowRegistry

    lay, big = _slow_layout(tmp_path)
    reg = SlowRegistry(lay)
    try:
        # Control: with the client staying, the same pull completes.
        with RawClient(service.socket) as c:
            h = open_handle(c, repo)
            params = {"handle": h, "image": f"docker://{reg.host}/test/slow:slow",
                      "name": "control", "local_fetch": "auto", "bootable": False}  # fmt: skip
            reg.release.set()
            assert c.call_more(f"{OCI}.Pull", params)[-1]["completed"]
            assert big in reg.finished
            c.call(f"{OCI}.Untag", {"handle": h, "name": "control"})
            c.call(f"{REPO}.Gc", {"handle": h, "dry_run": False, "roots": []})
        reg.release.clear()
        reg.finished.clear()

        c = RawClient(service.socket)
        h = open_handle(c, repo)
        params["name"] = "slow"
        c.send(f"{OCI}.Pull", params, more=more)
        if more:
            while "progress" not in c.recv()["parameters"]:
                pass
        else:
            deadline = time.monotonic() + 60
            while big not in reg.sent and time.monotonic() < deadline:
                time.sleep(0.05)
        c.close()  # hang up mid-layer
        time.sleep(1)  # the service notices (it polls every 0.2 s) and cancels
        # The rest of the layer trickles (~10 s in all) so a loaded machine
        # still cancels before the end; a cancelled pull aborts at once.
        reg.chunk_delay = 0.2
        reg.release.set()
        deadline = time.monotonic() + 60
        while big not in reg.aborted | reg.finished and time.monotonic() < deadline:
            time.sleep(0.1)
        assert big in reg.aborted, "the layer was fetched to the end after the hang-up"
        assert reg.sent[big] < len((lay / "blobs/sha256" / big.split(":")[1]).read_bytes())
    finally:
        reg.close()
    _assert_untagged_and_clean(service, h)


def _assert_untagged_and_clean(service: Service, handle: int) -> None:
    """After a cancelled pull: no image tagged, fsck clean, the service alive."""
    with RawClient(service.socket) as c:
        assert c.call(f"{OCI}.ListImages", {"handle": handle}) == {"images": []}
        assert c.call(f"{REPO}.Fsck", {"handle": handle})["ok"] is True
    assert service.alive()


def _slow_layout(tmp_path: Path) -> tuple[Path, str]:
    """An OCI layout tagged "slow" with one 4 MiB uncompressed layer: (layout, layer digest)."""
    from varlinklib import LayoutBuilder, det_bytes, layer

    lay = tmp_path / "slow"
    b = LayoutBuilder(lay)
    desc = b.image([layer({"big.bin": det_bytes(99, 4 << 20)})], compression="none")
    b.tag(desc, "slow")
    manifest = json.loads((lay / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
    return lay, manifest["layers"][0]["digest"]


def test_disconnect_while_registry_silent(service: Service, repo: Path, tmp_path: Path) -> None:
    """The client hangs up while the registry holds a layer back and sends
    nothing, so no progress callback runs: the pull still stops within
    seconds (its download is aborted), not after the registry's silence
    (60 s here) or the read timeout (120 s). Nothing is tagged, fsck is clean."""
    from slowregistry import SlowRegistry

    lay, big = _slow_layout(tmp_path)
    reg = SlowRegistry(lay)
    try:
        c = RawClient(service.socket)
        h = open_handle(c, repo)
        params = {"handle": h, "image": f"docker://{reg.host}/test/slow:slow",
                  "name": "silent", "local_fetch": "auto", "bootable": False}  # fmt: skip
        c.send(f"{OCI}.Pull", params, more=False)
        deadline = time.monotonic() + 60
        while big not in reg.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert big in reg.sent
        c.close()  # hang up while the registry is silent
        deadline = time.monotonic() + 20
        while big not in reg.aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert big in reg.aborted, "the pull kept waiting on the silent registry"
        assert big not in reg.finished
    finally:
        reg.close()
    _assert_untagged_and_clean(service, h)


def test_pull_bootable(raw: RawClient, repo: Path, tmp_path: Path) -> None:
    """``bootable``: the boot image is generated, recorded (Inspect shows it),
    equals ComputeId(bootable) and the CLI's, and OciMount can mount it."""
    from varlinklib import LayoutBuilder, layer

    lay = tmp_path / "bootlay"
    b = LayoutBuilder(lay)
    files = {"usr/lib/os-release": b"ID=test\n", "boot/vmlinuz-1": b"K" * 5000}
    b.tag(b.image([layer(files, dirs=("sysroot",))]), "boot")
    h = open_handle(raw, repo)
    params = {"handle": h, "image": f"oci:{lay}:boot", "name": "boot", "local_fetch": "auto",
              "bootable": True}  # fmt: skip
    completed = raw.call_more(f"{OCI}.Pull", params)[-1]["completed"]
    boot_image = completed["boot_image"]
    assert boot_image and completed["boot_image_format_version"]
    inspect = raw.call(f"{OCI}.Inspect", {"handle": h, "image": "boot"})
    assert inspect["composefs_boot_erofs"] == boot_image != inspect["composefs_erofs"]
    computed = raw.call(f"{OCI}.ComputeId", {"handle": h, "image": "boot", "bootable": True})
    assert computed == {"image_id": boot_image}
    cli = cfsctl("--repo", str(repo), "oci", "compute-id", "--bootable", "boot").stdout.strip()
    assert cli == boot_image
    if os.geteuid() == 0:
        params = {"handle": h, "image": "boot", "bootable": True, "options": {}}
        assert raw.call(f"{OCI}.OciMount", params) == {"fd_index": 0}
        (fd,) = raw.take_fds()
        try:
            boot = os.open("boot", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                assert os.listdir(boot) == []  # emptied for boot
            finally:
                os.close(boot)
        finally:
            os.close(fd)
