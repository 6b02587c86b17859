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
wall and CPU per object at 10 and 100 images (fsck with one thread; the
best of 3 fsck runs and of 2 gc runs, each on a fresh copy).  Target:
within 15%.  The two sizes alternate in every step (100k, 1M, 100k, ...;
10, 100, 10, ...), so a machine whose speed drifts during the benchmark
weighs on both sides of a ratio alike.

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


def _interleaved(sizes: list[int], small_runs: int, big_runs: int) -> list[int]:
    """The order of one step's runs: the smallest size first and last,
    the others in between (e.g. 100k, 1M, 100k, 100k)."""
    if len(sizes) == 1:
        return sizes * small_runs
    small, bigs = sizes[0], sizes[1:]
    order = [small]
    left = small_runs - 1
    for _ in range(big_runs):
        order += bigs
        if left:
            order.append(small)
            left -= 1
    return order + [small] * left


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
        files = {n: (tmp / f"gen-{n}.dump", tmp / f"gen-{n}.img") for n in SIZES}
        entries = {n: gen_dump(files[n][0], n) for n in SIZES}
        samples: dict[tuple[str, int], list[common.Usage]] = {}
        for k, f in steps.items():
            sizes = [n for n in SIZES if n == SIZES[0] or k in BIG_STEPS or common.FULL]
            # The 100k runs last about a second, so one run's noise is
            # ~10-20 % of it: take the median of at least 3 there (the 1M
            # runs are ten times longer and even out on their own). They
            # alternate with the 1M runs, small ones first and last, so a
            # machine that slows down or speeds up during the step weighs
            # on both sizes alike.
            for n in _interleaved(sizes, max(runs, 3), runs):
                samples.setdefault((k, n), []).append(common.run(f(*files[n]), env=env))
        print(f"  {'step':<20} {'entries':>9} {'cpu s':>7} {'us/entry':>9} {'peak MB':>8}"
              f" {'bytes/entry':>11}")  # fmt: skip
        for n in SIZES:
            for k in steps:
                if (k, n) not in samples:
                    continue
                u = common.median_usage(samples[(k, n)])
                per_entry = u.cpu / entries[n]
                per_bytes = max(u.rss - base[k], 0) / entries[n]
                figures[(k, n)] = (per_entry, per_bytes)
                print(f"  {k:<20} {entries[n]:9,} {u.cpu:7.2f} {per_entry * 1e6:9.2f}"
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
    import shutil

    from composefs.repository import Repository

    sizes = (10, 100)
    copies = 2  # gc only deletes the first time: one fresh copy per gc run
    with common.scratch_ext4(2000) as scratch:
        paths: dict[int, list[Path]] = {}
        objects: dict[int, int] = {}
        for n in sizes:
            first = scratch / f"repo{n}-0"
            _build_repo(first, n).close()
            objects[n] = sum(len(files) for _, _, files in os.walk(first / "objects"))
            paths[n] = [first]
            for i in range(1, copies):
                paths[n].append(scratch / f"repo{n}-{i}")
                shutil.copytree(first, paths[n][i], symlinks=True)
        best: dict[tuple[str, int], tuple[float, float]] = {}

        def measure(op: str, n: int, path: Path) -> None:
            repo = Repository.open(path)
            try:
                w0, c0 = time.perf_counter(), time.process_time()
                # fsck in one thread: the per-object cost, without the
                # pool's start-up weighing on the small repository
                repo.fsck(threads=1) if op == "fsck" else repo.gc()
                run = (time.perf_counter() - w0, time.process_time() - c0)
            finally:
                repo.close()
            key = (op, n)
            best[key] = min(best.get(key, run), run, key=lambda t: t[1])

        # The best of several runs (the machine is shared), the two sizes
        # alternating so that a machine that slows down or speeds up
        # meanwhile weighs on both alike. fsck changes nothing.
        for _ in range(3):
            for n in sizes:
                measure("fsck", n, paths[n][0])
        for i in range(copies):
            for n in sizes:
                measure("gc", n, paths[n][i])
    rows: dict[int, tuple[float, ...]] = {}
    for n in sizes:
        times = (*best[("fsck", n)], *best[("gc", n)])
        rows[n] = tuple(t / objects[n] for t in times)
        print(f"  {n:3} images, {objects[n]:6,} objects: fsck {times[0]:.2f} s wall"
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
