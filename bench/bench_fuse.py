"""Benchmark: the FUSE server against the kernel composefs mount of the same image.

    python -m bench fuse          (or: python bench/bench_fuse.py [--runs N])

Same run, same images, fresh mounts for every measurement (so FUSE's page
cache starts cold; the backing objects are warm for both, as after a first
use):

* sequential read of a 1 GiB external file (MB/s; goal: FUSE >= 50% of the
  kernel), with FUSE passthrough (root mounts) and without (``-o
  nopassthrough``: data spliced by the server, as for unprivileged users).
  FUSE checks the object's fs-verity digest in userspace at the
  first open of the file in a mount: reported on its own line, and done
  before the timed read;
* a Debian bookworm minbase image (``bench oci_pull`` builds it once, cached)
  pulled into a repository and mounted with ``cfsctl oci mount`` (kernel)
  and ``--fuse yes``: ``tar -cf /dev/null`` (GNU tar then skips file data),
  ``tar -cf - | cat`` (reads every file; FUSE also hashes each object once),
  ``find -ls`` (metadata ops/s) and the mount command's time.

Needs root (kernel mounts). Best of ``--runs`` (default 3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
GIB = 1 << 30


class BenchSkip(Exception):
    pass


def log(msg: str) -> None:
    print(f"[fuse] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload, no-any-return]


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def umount(path: Path) -> None:
    run("umount", str(path))
    end = time.monotonic() + 10
    while is_mounted(path) and time.monotonic() < end:
        time.sleep(0.02)


def best(runs: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(runs))


def read_file(path: Path) -> float:
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- 1 GiB file


def bench_sequential(work: Path, runs: int) -> dict[str, float]:
    src = work / "src"
    src.mkdir()
    log("writing a 1 GiB file and its image")
    with open(src / "big", "wb") as f:
        for _ in range(GIB >> 24):
            f.write(os.urandom(1 << 24))
    objects, image = work / "objects", work / "big.cfs"
    run(str(BIN / "mkcomposefs"), f"--digest-store={objects}", str(src), str(image))
    (src / "big").unlink()
    mnt = work / "mnt"
    mnt.mkdir()

    def kernel() -> float:
        run(str(BIN / "mount.composefs"), "-o", f"basedir={objects}", str(image), str(mnt))
        try:
            return read_file(mnt / "big")
        finally:
            umount(mnt)

    verify: list[float] = []

    def fuse(*extra: str) -> Callable[[], float]:
        def once() -> float:
            opts = f"source={image},basedir={objects}" + "".join("," + e for e in extra)
            run(str(BIN / "composefs-fuse"), "-o", opts, str(mnt))
            try:
                verify.append(timed(lambda: open(mnt / "big", "rb").close()))
                return read_file(mnt / "big")
            finally:
                umount(mnt)

        return once

    kernel()  # warm the object in the page cache
    k = best(runs, kernel)
    f = best(runs, fuse())
    s = best(runs, fuse("nopassthrough"))
    return {
        "kernel_mbs": GIB / k / 1e6,
        "fuse_mbs": GIB / f / 1e6,
        "splice_mbs": GIB / s / 1e6,
        "verify_s": min(verify),
    }


# ---------------------------------------------------------------- Debian minbase


def debian_layout() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "composefs-py"
    layout = cache / "bench" / "oci-bookworm-minbase"
    if not (layout / "index.json").exists():
        sys.path.insert(0, str(ROOT))
        from bench.bench_oci_pull import prepare

        prepare(False)
    return layout


def bench_debian(work: Path, runs: int) -> dict[str, float]:
    layout = debian_layout()
    repo = work / "repo"
    cfsctl = str(BIN / "cfsctl")
    run(cfsctl, "--repo", str(repo), "init", "--insecure", stdout=subprocess.DEVNULL)
    log("pulling the Debian minbase image")
    run(cfsctl, "--repo", str(repo), "oci", "pull", f"oci:{layout}:a", "debian",
        stdout=subprocess.DEVNULL)  # fmt: skip
    mnt = work / "dmnt"
    mnt.mkdir()
    modes = {"kernel": [], "fuse": ["--fuse", "yes"]}

    def mounted(mode: str, body: Callable[[], float]) -> Callable[[], float]:
        def once() -> float:
            run(cfsctl, "--repo", str(repo), "oci", "mount", *modes[mode], "debian", str(mnt))
            try:
                return body()
            finally:
                umount(mnt)

        return once

    def mount_time(mode: str) -> float:
        t = timed(
            lambda: run(cfsctl, "--repo", str(repo), "oci", "mount", *modes[mode], "debian",
                        str(mnt))
        )  # fmt: skip
        umount(mnt)
        return t

    def tar_null() -> float:
        return timed(lambda: run("tar", "-cf", "/dev/null", "-C", str(mnt), "."))

    def tar_pipe() -> float:
        return timed(lambda: run("sh", "-c", f"tar -cf - -C '{mnt}' . | cat > /dev/null"))

    entries: list[int] = []

    def find_ls() -> float:
        t0 = time.perf_counter()
        out = subprocess.run(["find", str(mnt), "-ls"], check=True, capture_output=True).stdout
        t = time.perf_counter() - t0
        entries.append(out.count(b"\n"))
        return t

    out: dict[str, float] = {}
    for mode in modes:
        mounted(mode, tar_pipe)()  # warm objects and image
    for mode in modes:
        out[f"{mode}_mount_s"] = best(runs, lambda m=mode: mount_time(m))  # type: ignore[misc]
        out[f"{mode}_tar_null_s"] = best(runs, mounted(mode, tar_null))
        out[f"{mode}_tar_pipe_s"] = best(runs, mounted(mode, tar_pipe))
        out[f"{mode}_find_s"] = best(runs, mounted(mode, find_ls))
    out["entries"] = float(max(entries))
    return out


# ---------------------------------------------------------------- main


def report(seq: dict[str, float] | None, deb: dict[str, float] | None) -> None:
    print(f"{'':34} {'kernel':>12} {'FUSE':>12} {'FUSE/kernel':>12}")
    if seq:
        k, f = seq["kernel_mbs"], seq["fuse_mbs"]
        print(
            f"{'1 GiB sequential read (MB/s)':34} {k:12.0f} {f:12.0f} {f / k:11.0%}  (goal >= 50%)"
        )
        s = seq["splice_mbs"]
        print(f"{'  without passthrough (non-root)':34} {'':12} {s:12.0f} {s / k:11.0%}")
        print(f"{'  first open: fs-verity check (s)':34} {'-':>12} {seq['verify_s']:12.2f}")
    if deb:
        n = deb["entries"]
        for label, key, goal in (
            ("minbase tar -cf /dev/null (s)", "tar_null_s", "  (goal <= 4x)"),
            ("minbase tar -cf - | cat (s)", "tar_pipe_s", ""),
            ("minbase find -ls (s)", "find_s", ""),
            ("mount (s)", "mount_s", ""),
        ):
            k, f = deb[f"kernel_{key}"], deb[f"fuse_{key}"]
            print(f"{label:34} {k:12.3f} {f:12.3f} {f / k:11.1f}x{goal}")
        kops, fops = n / deb["kernel_find_s"], n / deb["fuse_find_s"]
        print(f"{'minbase find -ls (entries/s)':34} {kops:12.0f} {fops:12.0f} {fops / kops:11.0%}"
              f"  ({n:.0f} entries)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_fuse")
    # FULL=1 (environment): 3 runs each; the default `make bench` keeps it short.
    full = os.environ.get("FULL", "") not in ("", "0")
    ap.add_argument("--runs", type=int, default=3 if full else 1)
    ap.add_argument("--only", choices=("sequential", "debian"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench fuse: skipped: needs root for the kernel mounts")
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    from composefs.fuse.server import available

    why = available()
    if why is not None:
        print(f"bench fuse: skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-fuse-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        seq = bench_sequential(work, args.runs) if args.only != "debian" else None
        deb = bench_debian(work, args.runs) if args.only != "sequential" else None
    report(seq, deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
