"""fs-verity digest throughput: composefs.fsverity against Debian's `fsverity digest`.

Two cases, both for sha256 and sha512, files in the page cache (both sides
read the same cached data, so this measures hashing, not the disk):

* one large file (default 1 GiB): `digest_file` (default: all CPUs) and
  `digest_file(threads=1)` (this thread only) against `fsverity digest FILE`;
* several files (default 4 x 256 MiB): `digest_files` against
  `fsverity digest F1 F2 ...` (one process, as a user would run it) and
  against one `fsverity digest` process per file, run concurrently.

Each figure is the best of RUNS (default 3 in FULL mode, else 2, with
128 MiB / 4 x 32 MiB files instead of 1 GiB / 4 x 256 MiB) runs, ours and theirs
interleaved, in MB/s (10^6 bytes per second).

Run: `python -m bench fsverity` or
`python bench/bench_fsverity.py [--size-mib N] [--files N] [--file-mib N] [--runs N] [--dir D]`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _make_file(path: Path, size: int) -> None:
    """Random-ish content without paying for `size` bytes of urandom."""
    seed = os.urandom(16 << 20)
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            n = min(len(seed), size - written)
            # A per-chunk prefix keeps the chunks distinct.
            f.write(i.to_bytes(8, "little") + seed[8:n])
            written += n
            i += 1


def _warm(paths: list[Path]) -> None:
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _helper_cpu() -> float:
    """CPU seconds of composefs.fsverity's idle (kept-alive) helper processes."""
    from composefs import fsverity

    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for h in list(fsverity._helpers.idle):
        try:
            with open(f"/proc/{h.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _cpu() -> float:
    """CPU seconds used by this process, its reaped children (tools) and its
    live hashing helpers."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _helper_cpu()


def _best(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(best wall time, CPU time of that run)."""
    best = (float("inf"), 0.0)
    for _ in range(runs):
        c0 = _cpu()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        best = min(best, (wall, _cpu() - c0))
    return best


def _tool(args: list[str]) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run(args, check=True, stdout=subprocess.DEVNULL)

    return run


def _tool_parallel(argss: list[list[str]]) -> Callable[[], object]:
    def run() -> object:
        procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL) for a in argss]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"{p.args!r} failed")
        return None

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_fsverity")
    from bench import common

    full = common.FULL  # the default run stays short (make bench: <= 3 minutes in all)
    ap.add_argument(
        "--size-mib", type=int, default=1024 if full else 128, help="the single large file (MiB)"
    )
    ap.add_argument("--files", type=int, default=4, help="how many files in the parallel case")
    ap.add_argument(
        "--file-mib", type=int, default=256 if full else 32, help="size of each of those (MiB)"
    )
    ap.add_argument("--runs", type=int, default=3 if full else 2)
    ap.add_argument("--dir", default=None, help="where to put the test files (default: $TMPDIR)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    sys.path.insert(0, str(ROOT / "src"))
    from composefs import fsverity

    tool = shutil.which("fsverity")
    if tool is None:
        print("fsverity (Debian package fsverity) is not installed: nothing to compare against")
        return 1
    ncpu = fsverity.default_threads()
    with tempfile.TemporaryDirectory(prefix="bench-fsverity-", dir=args.dir) as tmp:
        big = Path(tmp) / "big"
        _make_file(big, args.size_mib << 20)
        small = [Path(tmp) / f"part{i}" for i in range(args.files)]
        for p in small:
            _make_file(p, args.file_mib << 20)
        _warm([big, *small])
        rows: list[tuple[str, str, str, int, tuple[float, float], tuple[float, float]]] = []
        nbig = big.stat().st_size
        nsmall = sum(p.stat().st_size for p in small)
        for alg in ("sha256", "sha512"):
            # Correctness first: the figures mean nothing if the answers differ.
            want = subprocess.run(
                [tool, "digest", f"--hash-alg={alg}", "--compact", str(big)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            if fsverity.digest_file(big, alg).hex() != want:
                raise AssertionError(f"{alg}: our digest of {big} differs from fsverity's")
            one = f"1 x {args.size_mib} MiB"
            theirs = _best(_tool([tool, "digest", f"--hash-alg={alg}", str(big)]), args.runs)
            ours = _best(partial(fsverity.digest_file, big, alg), args.runs)
            ours1 = _best(partial(fsverity.digest_file, big, alg, threads=1), args.runs)
            rows.append((one, alg, f"digest_file ({ncpu} CPUs) / fsverity", nbig, ours, theirs))
            rows.append((one, alg, "digest_file (1 thread) / fsverity", nbig, ours1, theirs))

            many = f"{args.files} x {args.file_mib} MiB"
            seq = _best(_tool([tool, "digest", f"--hash-alg={alg}", *map(str, small)]), args.runs)
            argss = [[tool, "digest", f"--hash-alg={alg}", str(p)] for p in small]
            par = _best(_tool_parallel(argss), args.runs)
            oursn = _best(partial(fsverity.digest_files, small, alg), args.runs)
            rows.append((many, alg, "digest_files / fsverity F1..Fn", nsmall, oursn, seq))
            rows.append(
                (many, alg, f"digest_files / {args.files} fsverity procs", nsmall, oursn, par)
            )

    print(
        f"fs-verity digest throughput, MB/s of wall time (best of {args.runs}; {ncpu} CPUs; "
        "page cache warm); CPU = CPU seconds per GiB hashed"
    )
    header = (
        f"{'case':<14} {'alg':<7} {'ours / theirs':<36} {'ours':>6} {'theirs':>7} {'ratio':>6}"
        f" {'CPU ours':>9} {'CPU theirs':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, alg, what, nbytes, (ow, oc), (tw, tc) in rows:
        gib = nbytes / (1 << 30)
        print(
            f"{label:<14} {alg:<7} {what:<36} {nbytes / ow / 1e6:6.0f} {nbytes / tw / 1e6:7.0f}"
            f" {tw / ow:6.2f} {oc / gib:9.2f} {tc / gib:10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
