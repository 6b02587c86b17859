"""Storing a directory tree: `cfsctl create-image` and `mkcomposefs --digest-store`
against C composefs 1.0.8's `mkcomposefs --digest-store`, same run.

Trees (each copied first onto a fresh journaled ext4 loop filesystem, so the
run does not depend on the host's files staying unchanged):

* default: the Debian bookworm minbase root that `bench_oci_pull` builds
  (debootstrap, cached; ~6.6k files, 116 MB);
* FULL=1: also a snapshot of the host's `/usr` (>= 100k entries).

For each tree, whole processes alternate RUNS times (default 3), each into a
fresh object directory / repository on the same scratch filesystem, with the
source evicted from the page cache first (cold): C `mkcomposefs
--digest-store` (its default `--threads`), ours `mkcomposefs
--digest-store`, ours `cfsctl create-image` (sha512 repository, the default,
insecure: no fs-verity on the loop fs) and the same into a sha256 repository
(C's algorithm: sha512 costs about twice as much to hash, so this row shows
our overhead apart from the algorithm's).  Medians of wall, CPU and peak
RSS.  Target: ours <= 1.0x C in wall and CPU.

Run: `python -m bench repository` or `python bench/bench_repository.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common


def debian_root_tar() -> Path | None:
    tar = common.CACHE / "debian-bookworm-minbase.tar"
    if not tar.exists():
        from bench import bench_oci_pull

        try:
            bench_oci_pull.prepare(False)
        except bench_oci_pull.BenchSkip as e:
            print(f"bench_repository: {e}")
            return None
    return tar


def copy_tree(kind: str, dest: Path) -> None:
    if kind == "debian":
        tar = debian_root_tar()
        assert tar is not None
        dest.mkdir()
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xf", str(tar),
             "-C", str(dest)],
            check=True,
        )  # fmt: skip
    else:
        # A snapshot of /usr (the host may change it while we run), as the
        # /usr of an otherwise empty root: create-image gives the root /usr's
        # metadata, as composefs-rs does, and refuses a tree without /usr.
        dest.mkdir()
        subprocess.run(["cp", "-a", "--reflink=auto", "/usr", str(dest / "usr")], check=True)


def count(tree: Path) -> tuple[int, int]:
    entries = size = 0
    for dirpath, dirs, files in os.walk(tree):
        entries += len(dirs) + len(files)
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if not os.path.islink(os.path.join(dirpath, f)):
                size += st.st_size
    return entries, size


def bench_tree(kind: str, runs: int, c: common.CTools) -> None:
    size_mb = 12_000 if kind == "usr" else 2_000
    with common.scratch_ext4(size_mb) as scratch:
        src = scratch / "src"
        common.log(f"repository: copying the {kind} tree onto a scratch ext4")
        copy_tree(kind, src)
        entries, size = count(src)
        print(f"tree {kind}: {entries:,} entries, {size / 1e6:,.0f} MB of file content")
        env = common.our_env()
        results: dict[str, list[common.Usage]] = {
            "C": [],
            "mkcomposefs": [],
            "create-image": [],
            "create-image-sha256": [],
        }
        for i in range(runs):
            for what in results:
                out = scratch / f"{what}-{i}"
                out.mkdir()
                if what.startswith("create-image"):
                    alg = "sha256" if what.endswith("sha256") else "sha512"
                    common.run(
                        [*common.our_tool("cfsctl"), "init", "--algorithm", f"fsverity-{alg}-12",
                         "--insecure", str(out / "repo")],
                        env=env,
                    )  # fmt: skip
                    cmd = [
                        *common.our_tool("cfsctl"), "--repo", str(out / "repo"), "create-image",
                        str(src),
                    ]  # fmt: skip
                else:
                    tool = [c.mkcomposefs] if what == "C" else common.our_tool("mkcomposefs")
                    cmd = [*tool, f"--digest-store={out / 'objects'}", str(src), str(out / "img")]
                subprocess.run(["sync"], check=True)
                common.drop_cache(src)
                results[what].append(common.run(cmd, env=env))
                shutil.rmtree(out)
        ref = common.median_usage(results["C"])
        print(f"  {'':28} {'wall':>7} {'cpu':>7} {'rss MB':>7}  cpu of each run")
        for what, samples in results.items():
            u = common.median_usage(samples)
            label = "C mkcomposefs --digest-store" if what == "C" else f"ours {what}"
            # Every sample, in run order: the spread shows how far this
            # machine's noise moves a median (run i of each row ran together).
            each = ", ".join(f"{s.cpu:.2f}" for s in samples)
            print(f"  {label:28} {u.wall:7.2f} {u.cpu:7.2f} {u.rss_mb:7.0f}  {each}")
            if what != "C":
                common.record("directory", f"{what} {kind} ({entries // 1000}k) wall", u.wall,
                              ref.wall, 1.0)  # fmt: skip
                common.record("directory", f"{what} {kind} ({entries // 1000}k) cpu", u.cpu,
                              ref.cpu, 1.0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_repository", description=__doc__.splitlines()[0])
    # Three alternating runs even by default: one sample of a 1-2 s
    # process on this shared machine is off by 10-20 %.
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    c = common.c_tools()
    if c is None:
        print("bench_repository: no C reference (see bench/common.py); skipped")
        return 0
    if debian_root_tar() is None:
        return 0
    for kind in ("debian", "usr") if common.FULL else ("debian",):
        bench_tree(kind, args.runs, c)
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    print(common.summary_table())
    raise SystemExit(rc)
