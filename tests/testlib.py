"""Helpers shared by test modules: root and tool checks, free ports, where
the vectors live.

Test modules import these as ``from testlib import ...``, never from
``conftest``: pytest loads every directory's conftest.py under the one
module name ``conftest``, so ``from conftest import`` gets whichever
directory's was loaded last (``pytest tests/cli tests/http`` failed so).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = (ROOT.parent / "shared" / "vectors").resolve()


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root for kernel mounts")


def need_tool(name: str) -> str:
    """Path of an external oracle tool, or skip the test naming the package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make system-deps installs it)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def load_module(name: str, path: Path) -> ModuleType:
    """The Python file `path` imported as module `name` (a file that is not
    importable by name: another directory's conftest, a harness script)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def kill_at_objects(
    argv: Sequence[str], objects: Path, threshold: int, env: dict[str, str] | None = None
) -> bool:
    """Run `argv` and SIGKILL it once the repository directory `objects`
    holds `threshold` objects (waiting at most 60 s); True if it was killed,
    False if it finished first. For crash tests: whatever it wrote by then
    must leave a repository that fsck finds clean."""
    p = subprocess.Popen(list(argv), env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        if objects.is_dir() and sum(len(os.listdir(d)) for d in objects.iterdir()) >= threshold:
            break
        time.sleep(0.002)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    return killed


def interrupt_when(
    argv: Sequence[str], started: Callable[[], bool], env: dict[str, str] | None = None
) -> tuple[int, str, float]:
    """Run `argv`, and once `started()` (polled; at most 60 s, the process
    must not end first) and half a second more, send it SIGINT (Ctrl-C).
    Returns its exit status, its stderr and how long it took to exit after
    the signal (at most 30 s: it is killed then)."""
    p = subprocess.Popen(
        list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not started():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "never started"
            time.sleep(0.02)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = p.communicate(timeout=30)
        return p.returncode, err, time.monotonic() - start
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def hung_up(conn: socket.socket) -> bool:
    """For a test server that has gone silent: whether the client closed
    `conn` (it sends nothing else while it waits for the response)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # still connected, still silent
    except OSError:
        return True


def wait_for_hangup(conn: socket.socket, seconds: float = 60) -> None:
    """For a test server that has gone silent: wait until the client closes
    `conn` (or `seconds` pass)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        if hung_up(conn):
            return


def drip(
    out: BinaryIO, first: bytes, byte: bytes, every: float, seconds: float | None = None
) -> None:
    """For a test server that answers too slowly: write `first`, then `byte`
    every `every` seconds until the client hangs up (or `seconds` pass)."""
    end = None if seconds is None else time.monotonic() + seconds
    try:
        out.write(first)
        out.flush()
        while end is None or time.monotonic() < end:
            out.write(byte)
            out.flush()
            time.sleep(every)
    except OSError:
        pass


def record_store_helpers(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every object store helper (`repository._store_helper.StoreHelper`)
    started from now on, in order."""
    from composefs.repository import _store_helper

    started: list[object] = []
    real_init = _store_helper.StoreHelper.__init__

    def init(self: _store_helper.StoreHelper, store: object) -> None:
        real_init(self, store)
        started.append(self)

    monkeypatch.setattr(_store_helper.StoreHelper, "__init__", init)
    return started


@functools.cache
def _nobody_cannot_run_checkout() -> str | None:
    """Why user nobody cannot run this checkout's Python code, or None."""
    if shutil.which("setpriv") is None:
        return "setpriv not available"
    src = str(ROOT / "src")
    # this checkout's composefs, not one an installed .pth points elsewhere
    code = (f"import sys; sys.path.insert(0, {src!r}); import composefs; "
            f"assert composefs.__file__.startswith({src!r}), 'cannot read ' + {src!r}")
    r = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["no message"])[-1][-200:]
    return (f"user nobody cannot run this checkout ({ROOT}) or its Python: a directory "
            f"above it is private (e.g. mktemp -d's 0700): {last}")


def need_checkout_for_nobody() -> None:
    """Skip a test that runs our code as user nobody when nobody cannot
    reach the checkout and its interpreter (a clone under a private
    directory): the test could only fail on the permissions."""
    why = _nobody_cannot_run_checkout()
    if why is not None:
        pytest.skip(why)
