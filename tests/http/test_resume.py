"""Interrupted fetches (``kill -9``, Ctrl-C) leave only complete objects and
no name; the same command again fetches only what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from httptestlib import REF, TAG, Served, Source, assert_untouched, cfsctl, count_objects, make_repo

import hostile as H
from composefs.oci import storage
from composefs.repository import Repository
from testlib import interrupt_when


def _interrupt_midway(
    served: Served, tmp_path: Path, sig: int
) -> tuple[H.State, H.Server, Path, int, int]:
    state = H.State(served.published_dir, delay=0.1)
    srv = H.Server(state)
    repo = tmp_path / "r"
    make_repo(repo).close()
    p = subprocess.Popen(
        [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo),
         "fetch", "--jobs", "2", srv.url, REF],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while count_objects(repo) < 12:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    return state, srv, repo, p.returncode, err


def _resume(state: H.State, srv: H.Server, repo: Path, source: Source) -> None:
    with Repository.open(repo) as r:
        assert_untouched(r)
    have = count_objects(repo)
    state.delay = 0
    with state.lock:
        state.requests.clear()
    try:
        p = cfsctl("--repo", str(repo), "fetch", srv.url, REF)
    finally:
        srv.stop()
    assert p.returncode == 0, p.stderr
    # Only what was missing was asked for.
    assert state.count("objects/") == count_objects(repo) - have
    assert f"{state.count('objects/')} objects" in p.stderr
    with Repository.open(repo) as r:
        assert [(i.name, i.manifest_digest) for i in storage.list_images(r)] == [
            (TAG, source.image.manifest_digest)
        ]
        assert r.fsck().ok


def test_kill_9_then_resume(served: Served, source: Source, tmp_path: Path) -> None:
    state, srv, repo, rc, _ = _interrupt_midway(served, tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    _resume(state, srv, repo, source)


def test_ctrl_c_then_resume(served: Served, source: Source, tmp_path: Path) -> None:
    state, srv, repo, rc, err = _interrupt_midway(served, tmp_path, signal.SIGINT)
    assert rc == 130
    # the last line is the one-line error (a retry notice may come before it
    # on a loaded machine), never a traceback
    assert err.endswith("cfsctl: interrupted\n") and "Traceback" not in err, err
    _resume(state, srv, repo, source)


def test_ctrl_c_does_not_wait_for_silent_servers(served: Served, tmp_path: Path) -> None:
    """Ctrl-C while the transfers of two objects have gone silent half-way
    (the read timeout is 60 s): cfsctl exits at once, 130, and the
    repository is left as an interrupted fetch leaves it."""
    pub = served.published_dir
    # content objects (fetched by the worker threads), not streams or
    # images (fetched by the main thread, which Ctrl-C interrupts anyway)
    named = {
        (link.parent / os.readlink(link)).resolve()
        for top in ("streams", "images")
        for link in (pub / top).iterdir()
        if link.is_symlink()
    }
    objects = sorted(
        (p for p in (pub / "objects").glob("*/*") if p.is_file() and p.resolve() not in named),
        key=lambda p: -p.stat().st_size,
    )
    slow = [str(o.relative_to(pub)) for o in objects[:2]]
    state = H.State(pub)
    for path in slow:
        state.faults[path] = H.stalled
    srv = H.Server(state)
    repo = tmp_path / "r"
    make_repo(repo).close()
    try:
        rc, err, took = interrupt_when(
            [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo), "fetch",
             srv.url, REF],
            lambda: all(state.count(path) for path in slow),
        )  # fmt: skip
    finally:
        srv.stop()
    assert rc == 130 and err.endswith("cfsctl: interrupted\n"), err
    assert took < 5, took
    with Repository.open(repo) as r:
        assert_untouched(r)
