"""Repository throughput: `cfsctl compute-id` and `cfsctl create-image` of a real tree.

Runs the library code behind the two commands on a directory tree (default
`/usr`; a tree without a `usr/` subdirectory is read with
`--no-propagate-usr-to-root` rules) and reports files/s and MB/s
(10^6 bytes of regular-file content per second) plus where the time goes:

* compute-id, cold then warm page cache: reading the tree + fs-verity hashing
  every external file (`read`), building the EROFS image (`mkfs`), hashing
  the image (`digest`);
* create-image into a fresh repository: the same read with the object sink
  storing every new file (reflink or in-kernel copy; `sink` is the summed
  time spent in the sink across worker threads), then committing the image
  (`commit`: mkfs + object + syncfs + links); `copy overhead` is the wall
  time the sink adds over the warm compute-id read;
* create-image again into the same repository (every object already there).

The filesystem of `--workdir` matters: on ext4 *without a journal* every new
inode costs a scan past the inodes deleted in the last 60-300 s
(`recently_deleted()` in the kernel's inode allocator; 0.1-0.9 ms per object
on a machine where other processes keep deleting files), so the benchmark
names the filesystem and warns about that case.

Run: `python -m bench repository` or
`python bench/bench_repository.py [--source DIR] [--algorithm sha512|sha256] [--workdir DIR]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from composefs import fs, fsverity  # noqa: E402
from composefs.erofs.format import FormatVersion  # noqa: E402
from composefs.erofs.writer import mkfs  # noqa: E402
from composefs.repository import Repository  # noqa: E402
from composefs.tree import Directory, Leaf, Regular, walk  # noqa: E402


def tree_stats(root: Directory) -> tuple[int, int, int, int]:
    """(entries, regular files, content bytes, external files) counting each inode once."""
    seen: set[int] = set()
    entries = files = size = external = 0
    for _path, node in walk(root):
        entries += 1
        if isinstance(node, Leaf) and isinstance(node.content, Regular) and id(node) not in seen:
            seen.add(id(node))
            files += 1
            size += node.content.size
            if node.content.data is None:
                external += 1
    return entries, files, size, external


def read(
    source: str, algorithm: str, sink: Callable[[str, int, str], None] | None = None
) -> Directory:
    if os.path.isdir(os.path.join(source, "usr")):
        return fs.read_container_root(source, algorithm=algorithm, object_sink=sink)
    return fs.read_filesystem(source, algorithm=algorithm, object_sink=sink)


def describe_fs(path: str) -> str:
    """Filesystem type and source of `path`, flagging ext4 without a journal."""
    import subprocess

    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", path],
            capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
    except OSError:
        return "unknown filesystem"
    if len(out) < 2:
        return "unknown filesystem"
    fstype, source = out[0], out[1]
    text = f"{fstype} on {source}"
    if fstype == "ext4" and os.path.isdir("/proc/fs/jbd2"):
        dev = os.path.basename(os.path.realpath(source))
        if not any(j.startswith(dev + "-") for j in os.listdir("/proc/fs/jbd2")):
            text += (
                " (no journal: inode creation scans recently deleted inodes, "
                "object writes are slow while other processes delete files)"
            )
    return text


def rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "inf"


def compute_id(source: str, algorithm: str) -> tuple[dict[str, float], Directory, str]:
    t0 = time.perf_counter()
    root = read(source, algorithm)
    t1 = time.perf_counter()
    image = mkfs(root, FormatVersion.V2)
    t2 = time.perf_counter()
    digest = fsverity.digest_hex(image, algorithm)
    t3 = time.perf_counter()
    return {"read": t1 - t0, "mkfs": t2 - t1, "digest": t3 - t2, "total": t3 - t0}, root, digest


def create_image(repo: Repository, source: str) -> tuple[dict[str, float], str]:
    inner = repo.object_sink()
    spent = [0.0, 0]
    lock = threading.Lock()

    def sink(path: str, size: int, digest: str) -> None:
        t = time.perf_counter()
        try:
            inner(path, size, digest)
        finally:
            with lock:
                spent[0] += time.perf_counter() - t
                spent[1] += 1

    t0 = time.perf_counter()
    root = read(source, repo.algorithm, sink)
    t1 = time.perf_counter()
    image_id = repo.commit_image(root)
    t2 = time.perf_counter()
    times = {"read": t1 - t0, "sink": spent[0], "sink_calls": spent[1]}
    return {**times, "commit": t2 - t1, "total": t2 - t0}, image_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_repository", description=__doc__.splitlines()[0])
    p.add_argument("--source", default="/usr", help="tree to read (default /usr)")
    p.add_argument("--algorithm", default="sha512", choices=("sha256", "sha512"))
    p.add_argument(
        "--workdir", default="/var/tmp", help="where the scratch repository goes (default /var/tmp)"
    )
    args = p.parse_args(argv)
    source, alg = args.source, args.algorithm
    print(
        f"source {source}, {alg}, {os.cpu_count()} CPUs, {fsverity.default_threads()} hash threads"
    )

    cold, root, digest = compute_id(source, alg)
    entries, files, size, external = tree_stats(root)
    print(
        f"tree: {entries:,} entries, {files:,} regular files ({external:,} external), "
        f"{size / 1e6:,.1f} MB of content"
    )
    warm, _, digest2 = compute_id(source, alg)
    assert digest == digest2
    del root

    def line(what: str, t: dict[str, float], detail: str) -> None:
        print(
            f"{what:<26} {t['total']:7.2f} s  {rate(files, t['total']):>9} files/s  "
            f"{rate(size / 1e6, t['total']):>7} MB/s   {detail}"
        )

    for what, t in (("compute-id (cold cache)", cold), ("compute-id (warm cache)", warm)):
        line(
            what,
            t,
            f"read+hash {t['read']:.2f} s, mkfs {t['mkfs']:.2f} s, digest {t['digest']:.3f} s",
        )

    print(f"repository filesystem: {describe_fs(args.workdir)}")
    scratch = tempfile.mkdtemp(prefix="bench-repo-", dir=args.workdir)
    try:
        repo, _ = Repository.init(os.path.join(scratch, "repo"), algorithm=alg, insecure=True)
        with repo:
            first, image_id = create_image(repo, source)
            if image_id != digest:
                # A live tree (e.g. /usr while packages or tests touch it)
                # can change between the reads: say so, keep the timings.
                print(
                    "warning: create-image and compute-id disagree "
                    "(the source tree changed between the runs?)"
                )
            again, _ = create_image(repo, source)
        for what, t in (
            ("create-image (fresh repo)", first),
            ("create-image (all present)", again),
        ):
            line(
                what,
                t,
                f"read+hash+store {t['read']:.2f} s (sink {t['sink']:.2f} s in threads, "
                f"{1e6 * t['sink'] / max(t['sink_calls'], 1):.0f} us/file), "
                f"commit {t['commit']:.2f} s",
            )
        overhead = first["read"] - warm["read"]
        print(
            f"time split of create-image (fresh): hashing ~{warm['read']:.2f} s, "
            f"copying ~{max(overhead, 0):.2f} s, image writing {first['commit']:.2f} s"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
