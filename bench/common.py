"""Shared bench machinery: the summary table, FULL mode, the C reference,
scratch filesystems, cold page cache and child-process measurements.

* `FULL` (environment `FULL=1`): run the long variants too.
* `record()` adds a row to the summary that `python -m bench` prints at the
  end: our figure, the reference's (same run), the ratio and the target.
* `c_tools()`: C composefs 1.0.8's `mkcomposefs` / `composefs-info`, built
  once from Debian's source package (`composefs_1.0.8.orig.tar.gz`, checked
  against its sha256) into the bench cache.  The tarball is taken from the
  cache, $COMPOSEFS_C_SOURCE, or fetched with `apt-get source` through a
  private apt configuration pointing at Debian unstable's deb-src (the host's
  apt setup is untouched).  It also carries C's `tests/assets` dumps.
* `scratch_ext4()`: a fresh journaled ext4 on a loop device, so the
  figures do not depend on the host filesystem (or its free-inode state).
* `drop_cache()`: evicts files from the page cache (POSIX_FADV_DONTNEED on
  each file, not the machine-wide `drop_caches`, which would tax the other
  users of a shared machine).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "composefs-py" / "bench"
FULL = os.environ.get("FULL", "") not in ("", "0")

C_VERSION = "1.0.8"
C_TARBALL = f"composefs_{C_VERSION}.orig.tar.gz"
C_TARBALL_SHA256 = "2b2b11f9a25744c82e9e12b098eefd0ab42d56ae6322634c15f966b3a64926ef"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the summary


@dataclass
class Row:
    area: str
    what: str
    ours: float
    ref: float | None  # None: an absolute target (ref column empty)
    target: float  # ratio ours/ref to stay at or below (or the absolute bound)
    unit: str

    @property
    def ratio(self) -> float | None:
        if self.ref is None:
            return None
        return self.ours / self.ref if self.ref > 0 else float("inf")

    @property
    def met(self) -> bool:
        value = self.ratio if self.ratio is not None else self.ours
        return value <= self.target


SUMMARY: list[Row] = []


def record(
    area: str, what: str, ours: float, ref: float | None, target: float, unit: str = "s"
) -> None:
    """One summary row: `ours` against `ref` (same run) must give a ratio
    <= `target`; with `ref` None, `ours` itself must be <= `target`."""
    SUMMARY.append(Row(area, what, ours, ref, target, unit))


def _fmt(v: float, unit: str) -> str:
    if unit == "MB":
        return f"{v:.0f} MB"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    return f"{v:.3g} {unit}"


def summary_table(rows: Sequence[Row] | None = None) -> str:
    rows = SUMMARY if rows is None else rows
    if not rows:
        return ""
    head = f"{'area':<12} {'figure':<48} {'ours':>10} {'reference':>10} {'ratio':>6} {'target':>8}  met"
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = _fmt(r.ref, r.unit) if r.ref is not None else ""
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        target = f"<={r.target:g}x" if r.ref is not None else f"<={_fmt(r.target, r.unit)}"
        lines.append(
            f"{r.area:<12} {r.what:<48} {_fmt(r.ours, r.unit):>10} {ref:>10} {ratio:>6}"
            f" {target:>8}  {'yes' if r.met else 'NO'}"
        )
    load = os.getloadavg()
    lines.append(
        f"(load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs;"
        f" {'FULL' if FULL else 'default'} mode)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring


@dataclass
class Usage:
    wall: float
    cpu: float
    rss: int  # peak resident set, bytes

    @property
    def rss_mb(self) -> float:
        return self.rss / 1e6


GNU_TIME = "/usr/bin/time"


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: int | None = subprocess.DEVNULL,
) -> Usage:
    """Run `cmd` to completion: its wall time, user+sys CPU and peak RSS."""
    return run_capture(cmd, env=env, stdout=stdout)[0]


def run_capture(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: int | None = subprocess.DEVNULL,
) -> tuple[Usage, bytes]:
    """`run`, also returning the standard output when `stdout` is PIPE.

    The peak RSS comes from GNU time, a small process that starts `cmd`:
    the ru_maxrss that wait4() reports for our own child counts the memory
    of this (large) Python process at fork/exec time as the child's.
    """
    rss_file = None
    argv = list(cmd)
    if os.path.exists(GNU_TIME):
        fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        argv = [GNU_TIME, "-f", "%M", "-o", rss_file, *argv]
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stdin=subprocess.DEVNULL)
        out = proc.stdout.read() if proc.stdout is not None else b""
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"bench: {' '.join(cmd)} failed with status {proc.returncode}")
        rss = ru.ru_maxrss * 1024
        if rss_file is not None:
            lines = Path(rss_file).read_text().split()
            rss = int(lines[-1]) * 1024
    finally:
        if rss_file is not None:
            os.unlink(rss_file)
    return Usage(wall, ru.ru_utime + ru.ru_stime, rss), out


def median_usage(samples: Sequence[Usage]) -> Usage:
    import statistics

    return Usage(
        statistics.median(u.wall for u in samples),
        statistics.median(u.cpu for u in samples),
        int(statistics.median(u.rss for u in samples)),
    )


def our_tool(name: str) -> list[str]:
    """argv prefix running this checkout's CLI tool `name` as a user would."""
    script = Path(sys.executable).with_name(name)
    if script.exists():  # the venv's entry point (an editable install of this checkout)
        return [str(script)]
    module = name.replace("-", "_").replace(".", "_")
    return [
        sys.executable,
        "-c",
        f"import sys; from composefs.cli.{module} import main; sys.exit(main())",
    ]


def our_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def drop_cache(*paths: str | Path) -> None:
    """Evict the files under `paths` from the page cache."""
    for top in paths:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                try:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


@contextmanager
def scratch_ext4(size_mb: int, where: str = "/var/tmp") -> Iterator[Path]:
    """A fresh journaled ext4 (loop device), mounted on a temporary directory."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        # Not root: a plain directory (the figures then depend on the host fs).
        d = Path(tempfile.mkdtemp(prefix="bench-scratch-", dir=where))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-ext4-", dir=where))
    img, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^metadata_csum_seed", str(img)],
        check=True,
    )
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the C reference


@dataclass
class CTools:
    mkcomposefs: str
    composefs_info: str
    assets: Path  # C 1.0.8's tests/assets (cs9-developer, f36-silverblue dumps)


def _c_tarball() -> Path | None:
    cached = CACHE / C_TARBALL
    env = os.environ.get("COMPOSEFS_C_SOURCE")
    candidates = [Path(env)] if env else []
    candidates.append(cached)
    for c in candidates:
        if c.is_file() and hashlib.sha256(c.read_bytes()).hexdigest() == C_TARBALL_SHA256:
            return c
    if shutil.which("apt-get") is None:
        return None
    # Debian's source package, fetched with apt's own client and a private
    # configuration (bookworm has no composefs; unstable carries 1.0.8).
    apt = CACHE / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
        " http://deb.debian.org/debian sid main\n"
    )
    opts = [
        f"-oDir::Etc::SourceList={apt / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
    ]
    log("fetching Debian's composefs source package (once; cached)")
    dl = Path(tempfile.mkdtemp(prefix="csrc-", dir=CACHE))
    try:
        subprocess.run(["apt-get", *opts, "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", *opts, "source", "--download-only", f"composefs={C_VERSION}-3"],
            check=True, cwd=dl, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        got = dl / C_TARBALL
        if hashlib.sha256(got.read_bytes()).hexdigest() != C_TARBALL_SHA256:
            return None
        os.replace(got, cached)
        return cached
    except (subprocess.CalledProcessError, OSError):
        return None
    finally:
        shutil.rmtree(dl, ignore_errors=True)


def c_tools() -> CTools | None:
    """C composefs 1.0.8's tools (built once), or None with a message."""
    prefix = CACHE / f"composefs-c-{C_VERSION}"
    tools = prefix / "build" / "tools"
    if not (tools / "mkcomposefs").exists():
        for need in ("meson", "ninja", "cc"):
            if shutil.which(need) is None:
                log(f"C reference: needs {need} (scripts/system-deps.sh installs it)")
                return None
        tarball = _c_tarball()
        if tarball is None:
            log(f"C reference: {C_TARBALL} not available (set COMPOSEFS_C_SOURCE)")
            return None
        log(f"building C composefs {C_VERSION} (once; cached in {prefix})")
        work = Path(tempfile.mkdtemp(prefix="cbuild-", dir=CACHE))
        try:
            subprocess.run(["tar", "-xzf", str(tarball), "-C", str(work)], check=True)
            src = work / f"composefs-{C_VERSION}"
            subprocess.run(
                ["meson", "setup", "build", "--buildtype=release", "-Dman=disabled",
                 "-Dfuse=disabled", "-Ddefault_library=static"],
                cwd=src, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            subprocess.run(["ninja", "-C", "build"], cwd=src, check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(prefix, ignore_errors=True)
            os.replace(src, prefix)
        except (subprocess.CalledProcessError, OSError) as e:
            log(f"C reference: build failed: {e}")
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return CTools(
        str(tools / "mkcomposefs"), str(tools / "composefs-info"), prefix / "tests" / "assets"
    )
