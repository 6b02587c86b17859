"""`repository._store_helper`: a splitstream writer's small objects stored
by a helper process (a big layer's import), in order, with errors and a
dead helper reported, and nothing written after the writer is done."""

from __future__ import annotations

import errno
import io
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.errors import RepositoryError
from composefs.repository import Repository, _store_helper, streams
from composefs.splitstream import CONTENT_OCI_LAYER
from testlib import record_store_helpers


def _blobs(n: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    # sizes around the fs-verity block size, some repeated (already present)
    out = [rnd.randbytes(rnd.choice([65, 100, 4096, 4097, 9000, 70_000])) for _ in range(n)]
    return out + out[:20]


def _queue(w: streams.RepoStreamWriter, data: bytes) -> None:
    """Queue one object; once the helper is starting, wait until it runs
    (so that the next objects go to it)."""
    w.queue_external_stream(io.BytesIO(data), len(data))
    starting = w._starting
    if starting is not None:
        deadline = time.monotonic() + 30
        try:
            while not starting.ready() and time.monotonic() < deadline:
                time.sleep(0.01)
        except _store_helper.HelperUnavailable:
            pass  # the writer finds out with its next object


def test_helper_stores_what_the_thread_would(repo: Repository) -> None:
    blobs = _blobs(streams._HELPER_AFTER_OBJECTS + 100)
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.reference_log = []
    used_helper = False
    for i, data in enumerate(blobs):
        w.write_inline(b"h%d" % i)
        _queue(w, data)
        used_helper = used_helper or w._helper is not None
    assert used_helper
    helper = w._helper
    assert helper is not None
    stream_id = repo.write_stream(w, "oci-layer-sha256:helper")
    # the helper is gone once the stream is finished
    assert helper.proc.returncode is not None
    expected = [fsverity.digest_hex(d, repo.algorithm) for d in blobs]
    assert w.reference_log == expected
    assert all(repo.has_object(o) for o in expected)
    assert w.objects_new == len(set(expected))
    assert w.objects_present == len(blobs) - len(set(expected))
    out = io.BytesIO()
    repo.cat_stream("oci-layer-sha256:helper", out)
    assert out.getvalue() == b"".join(b"h%d" % i + d for i, d in enumerate(blobs))
    assert repo.has_stream("oci-layer-sha256:helper") == stream_id
    assert not repo.fsck().errors


def test_helper_death_is_an_error(repo: Repository) -> None:
    blobs = _blobs(streams._HELPER_AFTER_OBJECTS + 10)
    w = repo.create_stream(CONTENT_OCI_LAYER)
    with pytest.raises(RepositoryError, match="helper process died"):
        for data in blobs:
            _queue(w, data)
            if w._helper is not None:
                w._helper.proc.kill()
                w._helper.proc.wait()
        w.objects_new  # noqa: B018 (waits for every queued object)
    w.close()
    assert w._helper is None


def test_close_waits_for_the_helper(repo: Repository) -> None:
    blobs = _blobs(streams._HELPER_AFTER_OBJECTS + 200, seed=2)
    w = repo.create_stream(CONTENT_OCI_LAYER)
    for data in blobs:
        _queue(w, data)
    helper = w._helper
    assert helper is not None
    w.close()  # an abandoned import: nothing is written after this returns
    assert helper.proc.returncode is not None
    before = sorted(os.listdir(repo.objects_dir))
    assert sorted(os.listdir(repo.objects_dir)) == before
    assert not repo.fsck().errors


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a tmpfs remounted read-only)")
def test_helper_write_error_is_reported(tmp_path: Path) -> None:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        repo = Repository.init(mnt / "repo", insecure=True)[0]
        blobs = _blobs(streams._HELPER_AFTER_OBJECTS + 600, seed=3)
        w = repo.create_stream(CONTENT_OCI_LAYER)
        read_only = False
        with pytest.raises(OSError) as info:
            for data in blobs:
                if w._helper is not None and not read_only:
                    # busy while the helper has an object open: try again later
                    remount = ["mount", "-o", "remount,ro", str(mnt)]
                    read_only = subprocess.run(remount, capture_output=True).returncode == 0
                _queue(w, data)
            w.objects_new  # noqa: B018
        # the helper's own error, not "helper died"
        assert read_only
        assert info.value.errno == errno.EROFS
        w.close()
        repo.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_helper_that_does_not_start_is_not_an_error(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper that exits at once (a broken interpreter, say): the writer
    stores everything in-process instead."""
    monkeypatch.setattr(_store_helper, "_SCRIPT", "import sys; sys.exit(3)")
    blobs = _blobs(streams._HELPER_AFTER_OBJECTS + 50, seed=4)
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.reference_log = []
    for data in blobs:
        _queue(w, data)
    assert w._helper is None and w._helper_failed
    repo.write_stream(w, "oci-layer-sha256:nohelper")
    assert w.reference_log == [fsverity.digest_hex(d, repo.algorithm) for d in blobs]
    assert not repo.fsck().errors


def _spawned(monkeypatch: pytest.MonkeyPatch) -> list[_store_helper.StoreHelper]:
    """Every StoreHelper started from now on."""
    return record_store_helpers(monkeypatch)  # type: ignore[return-value]


def test_a_writer_takes_the_helper_started_ahead(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = _spawned(monkeypatch)
    blobs = _blobs(streams._HELPER_AFTER_OBJECTS + 50, seed=5)
    with repo.helper_ahead(), repo.helper_ahead():  # nested: still one
        assert len(started) == 1
        ahead = started[0]
        w = repo.create_stream(CONTENT_OCI_LAYER)
        w.reference_log = []
        for data in blobs:
            _queue(w, data)
        assert w._helper is ahead
        repo.write_stream(w, "oci-layer-sha256:ahead")
    assert len(started) == 1  # the writer started none of its own
    assert ahead.proc.returncode == 0  # closed by the writer, not killed
    assert w.reference_log == [fsverity.digest_hex(d, repo.algorithm) for d in blobs]
    assert not repo.fsck().errors


def test_a_helper_nobody_took_is_killed_at_once(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing big was written (a pull of an image already stored, a failed
    one): the helper goes on exit, without waiting for its start-up, and
    the next writer starts its own."""
    started = _spawned(monkeypatch)
    # a start-up that would take a minute: exit must not wait for it
    slow = "import time; time.sleep(60)\n" + _store_helper._SCRIPT
    monkeypatch.setattr(_store_helper, "_SCRIPT", slow)
    t0 = time.monotonic()
    with pytest.raises(KeyError), repo.helper_ahead():
        w = repo.create_stream(CONTENT_OCI_LAYER)
        w.write_inline(b"small")
        repo.write_stream(w, "oci-layer-sha256:small")  # no helper wanted
        raise KeyError("the pull failed")
    assert time.monotonic() - t0 < 10
    assert len(started) == 1
    assert started[0].proc.returncode is not None  # gone, and reaped
    monkeypatch.setattr(_store_helper, "_SCRIPT", slow.split("\n", 1)[1])
    w = repo.create_stream(CONTENT_OCI_LAYER)
    for data in _blobs(streams._HELPER_AFTER_OBJECTS + 10, seed=6):
        _queue(w, data)
    assert w._helper is not None and w._helper is not started[0]
    repo.write_stream(w, "oci-layer-sha256:later")
    assert not repo.fsck().errors


def test_a_helper_ahead_that_cannot_start_is_not_an_error(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store_helper.sys, "executable", "")
    with repo.helper_ahead():
        w = repo.create_stream(CONTENT_OCI_LAYER)
        for data in _blobs(streams._HELPER_AFTER_OBJECTS + 10, seed=7):
            _queue(w, data)
        assert w._helper is None
        repo.write_stream(w, "oci-layer-sha256:inprocess")
    assert not repo.fsck().errors


def test_the_socket_buffer_is_forced_when_allowed(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's socket asks for SO_SNDBUFFORCE first (Linux's 32, which
    Python's socket module lacks): root may exceed net.core.wmem_max, whose
    stock value (208 KiB) is smaller than one batch of requests."""
    import socket

    asked: list[int] = []
    real = socket.socket.setsockopt

    def setsockopt(self: socket.socket, level: int, opt: int, value: int) -> None:
        asked.append(opt)
        real(self, level, opt, value)

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    helper = _store_helper.StoreHelper(repo.objects)
    try:
        assert asked[0] == 32
        if os.geteuid() == 0:
            assert asked == [32]  # forced: no fallback needed
            got = helper.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            assert got >= _store_helper._SOCKET_BUFFER
    finally:
        helper.discard()
