"""scripts/system-deps.sh: installs what is missing, and waits for another
apt or dpkg (up to a few minutes) instead of failing on its locks.

Real apt: the test holds apt's own locks (fcntl, as apt takes them) while
the script runs, then releases them; the script must wait and succeed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from testlib import is_root

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-deps.sh"
LOCKS = ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock"]
HOLD = 6.0


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(not is_root(), reason="needs root to run apt-get")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="not a Debian system (no apt-get)")
def test_waits_for_the_apt_and_dpkg_locks() -> None:
    fds = []
    try:
        for path in LOCKS:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            fds.append(fd)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        for fd in fds:
            os.close(fd)
        pytest.skip("another apt or dpkg is running right now")
    release = threading.Timer(HOLD, lambda: [os.close(fd) for fd in fds])
    start = time.monotonic()
    release.start()
    try:
        # erofs-utils is installed already: apt has nothing to change, but
        # the script still updates the lists and runs apt-get install.
        r = subprocess.run(
            ["sh", str(SCRIPT), "demo"],
            env={**os.environ, "SYSTEM_DEPS_EXTRA": "erofs-utils"},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        release.join()
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start >= HOLD
    assert "waiting for another apt or dpkg" in r.stderr, r.stderr
