"""Do costs stay linear? Time and memory per entry at 100k and 1M entries,
and per object in a repository of 10 and 100 images.

Dumpfiles: generated (`gen_dump`), a two-level tree of directories of 100
entries each, mixing external files (some with two hard links), inline
files, symlinks, hard links and files with xattrs.  For each size, whole
processes of ours (medians of RUNS, default 1; FULL 3; at least 3 at 100k):

* `mkcomposefs --from-file DUMP IMAGE`
* `composefs-info dump IMAGE`
* the reader alone (`composefs.erofs.reader.read_image` of the image file;
  at 1M entries only in FULL mode, to keep the default run short)

CPU seconds per entry and peak bytes per entry (peak RSS minus the same
tool's peak on a 10-entry input, so the interpreter's fixed cost does not
count).  Target: the 1M-entry figure within 15% of the 100k one.  FULL mode
also times C's mkcomposefs on the same dumps, for context.

Repository: images of 200 files each (100 shared by every image, 100 of
its own) committed into a fresh repository on a scratch ext4, with 10% of
each image's objects orphaned (so gc deletes something); `gc` and `fsck`
wall and CPU per object at 10 and 100 images (fsck with one thread).  Target: within 15%.

Run: `python -m bench scaling` or `python bench/bench_scaling.py`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

if TYPE_CHECKING:
    from composefs.repository import Repository

SIZES = (100_000, 1_000_000)
TARGET = 1.15
# What the default run times at 1M entries (composefs-info dump includes the
# reader); FULL=1 times every step at both sizes.
BIG_STEPS = ("mkcomposefs", "composefs-info dump")


def gen_dump(path: Path, entries: int) -> int:
    """Write a dumpfile of about `entries` lines; return the exact count."""
    per_dir = 100
    dirs = max(1, entries // (per_dir + 1))
    tops = max(1, int(dirs**0.5))
    written = 0
    digest = "%064x"
    with open(path, "w", encoding="ascii", buffering=1 << 20) as f:
        w = f.write
        w("/ 4096 40755 2 0 0 0 0.0 - - -\n")
        written += 1
        d = 0
        for t in range(tops):
            if d >= dirs:
                break
            w(f"/t{t:04d} 4096 40755 2 0 0 0 1700000000.0 - - -\n")
            written += 1
            for _ in range((dirs + tops - 1) // tops):
                if d >= dirs:
                    break
                base = f"/t{t:04d}/d{d:06d}"
                w(f"{base} 4096 40755 2 0 0 0 1700000000.0 - - - user.dir=d{d}\n")
                written += 1
                for i in range(per_dir):
                    kind = i % 10
                    name = f"{base}/e{i:03d}"
                    if kind in (0, 1, 2, 3, 4):
                        n = d * per_dir + i
                        h = digest % (n * 2654435761 % (1 << 256))
                        nlink = 2 if kind == 0 else 1
                        w(
                            f"{name} {4096 + i} 100644 {nlink} 0 0 0 1700000000.{i} "
                            f"{h[:2]}/{h[2:]} - {h}\n"
                        )
                    elif kind == 5:
                        w(f"{name} 11 100644 1 0 0 0 1700000000.0 - hello\\x20world -\n")
                    elif kind == 6:
                        w(f"{name} 0 100600 1 1000 1000 0 0.0 - - -\n")
                    elif kind == 7:
                        w(f"{name} 9 120777 1 0 0 0 0.0 ../target - -\n")
                    elif kind == 8:
                        w(f"{name} 0 @120777 - - - - 0.0 {base}/e{i - 8:03d} - -\n")
                    else:
                        h = digest % (d * 7919 + i)
                        w(
                            f"{name} 8192 100755 1 0 0 0 1700000000.0 {h[:2]}/{h[2:]} - {h}"
                            f" security.capability=\\x01\\x00\\x00\\x02 user.k{i % 3}=v{d % 5}\n"
                        )
                    written += 1
                d += 1
    return written


def _reader_cmd(image: Path) -> list[str]:
    code = (
        "import sys; from composefs.erofs.reader import read_image;"
        "read_image(open(sys.argv[1], 'rb').read())"
    )
    return [sys.executable, "-c", code, str(image)]


def scaling_dump(runs: int) -> None:
    env = common.our_env()
    c = common.c_tools() if common.FULL else None
    figures: dict[tuple[str, int], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir="/var/tmp") as tmpd:
        tmp = Path(tmpd)
        small_dump, small_img = tmp / "small.dump", tmp / "small.img"
        gen_dump(small_dump, 10)
        common.run([*common.our_tool("mkcomposefs"), "--from-file", str(small_dump),
                    str(small_img)], env=env)  # fmt: skip
        steps: dict[str, Callable[[Path, Path], list[str]]] = {
            "mkcomposefs": lambda dump, img: [
                *common.our_tool("mkcomposefs"), "--from-file", str(dump), str(img)],
            "composefs-info dump": lambda dump, img: [
                *common.our_tool("composefs-info"), "dump", str(img)],
            "reader": lambda dump, img: _reader_cmd(img),
        }  # fmt: skip
        if c is not None:
            steps["C mkcomposefs"] = lambda dump, img: [
                c.mkcomposefs, "--from-file", str(dump), str(tmp / "c.img")]  # fmt: skip
        base = {k: common.run(f(small_dump, small_img), env=env).rss for k, f in steps.items()}
        print(f"  {'step':<20} {'entries':>9} {'cpu s':>7} {'us/entry':>9} {'peak MB':>8}"
              f" {'bytes/entry':>11}")  # fmt: skip
        for n in SIZES:
            dump, img = tmp / "gen.dump", tmp / "gen.img"
            entries = gen_dump(dump, n)
            for k, f in steps.items():
                if n > SIZES[0] and k not in BIG_STEPS and not common.FULL:
                    continue
                # The 100k runs last about a second, so one run's noise is
                # ~10-20 % of it: take the median of at least 3 there (the
                # 1M runs are ten times longer, and evens out on its own).
                n_runs = max(runs, 3) if n == SIZES[0] else runs
                samples = [common.run(f(dump, img), env=env) for _ in range(n_runs)]
                u = common.median_usage(samples)
                per_entry = u.cpu / entries
                per_bytes = max(u.rss - base[k], 0) / entries
                figures[(k, n)] = (per_entry, per_bytes)
                print(f"  {k:<20} {entries:9,} {u.cpu:7.2f} {per_entry * 1e6:9.2f}"
                      f" {u.rss_mb:8.0f} {per_bytes:11.0f}")  # fmt: skip
    small, big = SIZES
    print(f"  1M/100k ratios (target <= {TARGET}):")
    for k in steps:
        if (k, big) not in figures:
            continue
        (t0, b0), (t1, b1) = figures[(k, small)], figures[(k, big)]
        print(f"    {k:<20} time/entry {t1 / t0:.2f}  bytes/entry {b1 / b0:.2f}")
        if k.startswith("C "):
            continue
        common.record("scaling", f"{k}: cpu/entry 1M vs 100k", t1 * 1e6, t0 * 1e6, TARGET, "us")
        common.record("scaling", f"{k}: bytes/entry 1M vs 100k", b1, b0, TARGET, "B")


def _build_repo(path: Path, images: int) -> Repository:
    from composefs.repository import Repository
    from composefs.tree import Directory, Leaf, Regular, Stat

    repo, _ = Repository.init(str(path), insecure=True)
    shared = [repo.ensure_object(b"shared %d\n" % j * 400) for j in range(100)]
    for k in range(images):
        root = Directory(Stat(0o755))
        sub = Directory(Stat(0o755))
        root.entries[b"files"] = sub
        for j in range(200):
            if j < 100:
                oid = shared[j]
                size = len(b"shared %d\n" % j * 400)
            else:
                data = b"image %d file %d\n" % (k, j) * 300
                oid, size = repo.ensure_object(data), len(data)
            sub.entries[b"f%03d" % j] = Leaf(Stat(0o644), Regular(size, digest=oid))
        for j in range(20):  # orphans: gc has something to delete
            repo.ensure_object(b"orphan %d %d\n" % (k, j) * 200)
        repo.commit_image(root, f"img{k:03d}")
    repo.sync()
    return repo


def scaling_repo() -> None:
    rows: dict[int, tuple[float, float, float, float]] = {}
    with common.scratch_ext4(2000) as scratch:
        for n in (10, 100):
            path = scratch / f"repo{n}"
            repo = _build_repo(path, n)
            objects = sum(len(files) for _, _, files in os.walk(path / "objects"))
            times: list[float] = []
            for op, repeat in (("fsck", 3), ("gc", 1)):
                # fsck changes nothing: the best of 3 (the machine is shared);
                # gc only deletes the first time, so it runs once.
                best = (float("inf"), float("inf"))
                for _ in range(repeat):
                    w0, c0 = time.perf_counter(), time.process_time()
                    # fsck in one thread: the per-object cost, without the
                    # pool's start-up weighing on the small repository
                    repo.fsck(threads=1) if op == "fsck" else repo.gc()
                    run = (time.perf_counter() - w0, time.process_time() - c0)
                    best = min(best, run, key=lambda t: t[1])
                times += best
            repo.close()
            rows[n] = (times[0] / objects, times[1] / objects, times[2] / objects,
                       times[3] / objects)  # fmt: skip
            print(f"  {n:3} images, {objects:6,} objects: fsck {times[0]:.2f} s wall"
                  f" {times[1]:.2f} s cpu, gc {times[2]:.2f} s wall {times[3]:.2f} s cpu")  # fmt: skip
    small, big = rows[10], rows[100]
    for i, what in enumerate(("fsck wall", "fsck cpu", "gc wall", "gc cpu")):
        print(f"    {what:<10} per object: {small[i] * 1e6:.1f} us -> {big[i] * 1e6:.1f} us"
              f" ({big[i] / small[i]:.2f}x)")  # fmt: skip
        if "cpu" in what:
            common.record("scaling", f"{what}/object, 100 vs 10 images", big[i] * 1e6,
                          small[i] * 1e6, TARGET, "us")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = int(args[0]) if args else (3 if common.FULL else 1)
    print(
        f"dumpfile tools, whole processes, medians of {max(runs, 3)} runs at "
        f"{SIZES[0]:,} entries and {runs} at {SIZES[1]:,}"
    )
    scaling_dump(runs)
    print("repository maintenance")
    scaling_repo()
    return 0


if __name__ == "__main__":
    rc = main()
    print(common.summary_table())
    raise SystemExit(rc)
