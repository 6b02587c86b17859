"""Benchmark: `cfsctl fetch` of a published image from nginx on loopback.

    python -m bench http          (or: python bench/bench_http.py)

The Debian minbase OCI image of `bench_oci_pull` (debootstrap, cached) is
pulled into a source repository, published (`composefs.http.publish`) and
served by Debian's nginx on 127.0.0.1, all on a fresh journaled ext4 (loop
device, as the other benchmarks). Then, in the same run:

* ours: fetch ``refs/oci/minbase`` into an empty repository, for several
  ``--jobs`` widths (a child process each, so peak RSS is its own)
* ours: the same fetch again with everything present (library call, and
  the whole ``cfsctl fetch`` command)
* ours: ``oci pull`` of the same image from a local docker-registry
* reference: ``wget`` (one kept-alive connection) and ``curl --parallel``
  downloading the same files from the same nginx (no verification, no
  repository)

Every measurement is repeated ``--runs`` times (default 2 with FULL=1,
else 1, and only ``--jobs 32`` unless FULL=1), alternating
with the others, and the best is kept: the machine is usually shared.

Targets: re-fetch < 0.3 s, peak RSS < 150 MB.
Options: ``--jobs 4,8,16,32`` widths to try, ``--runs N``, ``--json FILE``
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "http"))

from bench import bench_oci_pull as P  # noqa: E402  (image building, registry, child runs)
from bench import common  # noqa: E402

REFETCH_TARGET_S = 0.3
MEMORY_TARGET_MB = 150
REF = "refs/oci/minbase"


def child_main(argv: list[str]) -> int:
    """In the child: one fetch with the library API; prints a JSON report."""
    repo_path, url, jobs = argv
    from composefs.http.client import HttpOptions
    from composefs.http.fetch import fetch
    from composefs.repository import Repository

    if os.path.exists(repo_path):
        repo = Repository.open(repo_path)
    else:
        repo = Repository.init(repo_path, insecure=True)[0]
    t0 = time.monotonic()
    with repo:
        r = fetch(repo, url, REF, HttpOptions(max_workers=int(jobs)))
    sys.stdout.write(
        json.dumps(
            {
                "seconds": time.monotonic() - t0,
                "fetched": r.objects_fetched,
                "present": r.objects_present,
                "bytes": r.bytes_fetched,
            }
        )
    )
    return 0


def run_child(args: list[str]) -> tuple[float, int, dict[str, Any]]:
    # Peak RSS through GNU time (`common.run_capture`): wait4()'s ru_maxrss
    # would count this process's own size at fork time as the child's, and
    # after other benchmarks in the same `python -m bench` run that is GBs.
    usage, out = common.run_capture(
        [sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE
    )
    rep = json.loads(out or b"{}")
    rep["cpu"] = usage.cpu
    return usage.wall, usage.rss, rep


def _quiet_timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a command (its output discarded)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"http: {cmd[0]} failed")
    return time.monotonic() - t0, usage.ru_utime + usage.ru_stime


def tree_files(root: Path) -> list[str]:
    """Every file a fetch reads (streams and images answered through their
    symlinks, as nginx does)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    try:
        return _main(argv)
    except P.BenchSkip as e:
        print(f"http: skipped: {e}")
        return 0


def _main(argv: list[str]) -> int:
    import nginxlib

    ap = argparse.ArgumentParser(prog="python -m bench http", description=__doc__.split("\n")[0])

    # The default `make bench` stays short (FULL=1: every width, twice).
    ap.add_argument(
        "--jobs",
        default="4,8,16,32" if common.FULL else "32",
        help="fetch widths to try (comma-separated)",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=2 if common.FULL else 1,
        help="repeat every measurement, keep the best",
    )
    ap.add_argument("--json", help="write figures to this file")
    args = ap.parse_args(argv)
    widths = [int(j) for j in args.jobs.split(",")]
    if nginxlib.NGINX is None:
        raise P.BenchSkip("needs nginx")
    for tool in ("skopeo", "docker-registry", "wget", "curl"):
        if shutil.which(tool) is None:
            raise P.BenchSkip(f"needs {tool}")

    from composefs.http.publish import publish
    from composefs.oci import storage
    from composefs.repository import Repository

    layout = P.prepare(False)
    f: dict[str, Any] = {}
    # Everything (repositories, wget's and curl's files) on a fresh ext4, as
    # the pull and directory benchmarks do: creating a file costs ~300 us of
    # CPU on this machine's root filesystem, ~20 us there, which would make
    # the figures about the host's disk more than about the transfer.
    with common.scratch_ext4(4000) as tmp:
        with Repository.init(tmp / "src", insecure=True)[0] as repo:
            storage.pull(repo, f"oci:{layout}:a", "minbase")
            t0 = time.monotonic()
            pub = publish(repo, str(tmp / "pub"), [REF])
            f["publish_s"] = time.monotonic() - t0
        f["objects"] = pub.objects_written + pub.objects_present
        f["bytes"] = pub.bytes_written
        files = tree_files(tmp / "pub")
        ng = nginxlib.Nginx(tmp / "nginx")
        url = ng.serve(tmp / "pub")
        with ng:
            (tmp / "urls").write_text("".join(f"{url}{p}\n" for p in files))
            cfg = "".join(f'url = "{url}{p}"\noutput = "{tmp}/curl/{p}"\n' for p in files)
            (tmp / "curl.cfg").write_text(cfg)
            wget = ["wget", "-q", "-x", "-nH", "-P", str(tmp / "wget"), "-i", str(tmp / "urls")]
            curl = ["curl", "-sS", "--parallel", "--parallel-max", "16", "--create-dirs",
                    "-K", str(tmp / "curl.cfg")]  # fmt: skip
            # The machine is shared: every measurement alternates with the
            # others and the best of --runs is kept.
            f["widths"] = {}
            for run in range(args.runs):
                for name, cmd in (("wget", wget), ("curl", curl)):
                    t, c = _quiet_timed(cmd)
                    if t < f.get(f"{name}_s", 1e9):
                        f[f"{name}_s"], f[f"{name}_cpu_s"] = t, c
                    shutil.rmtree(tmp / name)
                for j in widths:
                    dst = tmp / f"dst{j}-{run}"
                    wall, rss, rep = run_child([str(dst), url, str(j)])
                    w = f["widths"].get(j)
                    if w is None or wall < w["wall"]:
                        f["widths"][j] = {"wall": wall, "rss": rss, "cpu": rep["cpu"],
                                          "fetched": rep["fetched"], "repo": str(dst)}  # fmt: skip
            j = min(f["widths"], key=lambda k: f["widths"][k]["wall"])
            f["best_jobs"] = j
            w = f["widths"][j]
            f["fetch_s"], f["fetch_rss"], f["fetch_cpu_s"] = w["wall"], w["rss"], w["cpu"]
            f["fetch_objects"] = w["fetched"]
            # everything present: library call (in a child) and the whole command
            best_lib = best_cli = 1e9
            for _ in range(3):
                wall, rss, rep = run_child([w["repo"], url, str(j)])
                best_lib = min(best_lib, rep["seconds"])
                f["refetch_rss"] = rss
                cfsctl = [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", w["repo"]]
                t0 = time.monotonic()
                subprocess.run([*cfsctl, "fetch", url, REF], check=True, capture_output=True)
                best_cli = min(best_cli, time.monotonic() - t0)
            f["refetch_lib_s"], f["refetch_cli_s"] = best_lib, best_cli
            for d in tmp.glob("dst*"):
                shutil.rmtree(d, ignore_errors=True)

        # oci pull of the same image from a local registry
        (tmp / "reg").mkdir()
        with P.local_registry(tmp / "reg") as host:
            P._skopeo("copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                      f"oci:{layout}:a", f"docker://{host}/bench/minbase:a")  # fmt: skip
            for run in range(args.runs):
                repo = tmp / f"pulled{run}"
                wall, rss, rep = P.run_child(["pull", str(repo), f"{host}/bench/minbase:a"])
                if wall < f.get("pull_s", 1e9):
                    f["pull_s"], f["pull_rss"], f["pull_cpu_s"] = wall, rss, rep["cpu"]
                shutil.rmtree(repo)
    f["load_average"] = os.getloadavg()[0]
    report(f)
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=2))
    return 0


def report(f: dict[str, Any]) -> None:
    mb = P._mb
    n = f["objects"]
    lines = [f"published tree: {n} objects, {mb(f['bytes'])} (publish {f['publish_s']:.2f} s)"]
    for j, w in sorted(f["widths"].items()):
        lines.append(
            f"  fetch --jobs {j:<3} {w['wall']:6.2f} s wall {w['cpu']:6.2f} s cpu "
            f"{w['fetched'] / w['wall']:7.0f} objects/s  peak {mb(w['rss'])}"
        )
    ok_t = "OK" if f["refetch_lib_s"] < REFETCH_TARGET_S else "OVER"
    ok_m = "OK" if f["fetch_rss"] < MEMORY_TARGET_MB * 1e6 else "OVER"
    lines += [
        f"ours: fetch, empty repo (--jobs {f['best_jobs']})".ljust(40)
        + f"{f['fetch_s']:6.2f} s  {f['fetch_objects'] / f['fetch_s']:.0f} objects/s  "
        f"peak {mb(f['fetch_rss'])} [memory {ok_m} (< {MEMORY_TARGET_MB} MB)]",
        "ours: re-fetch, all present".ljust(40)
        + f"{f['refetch_lib_s']:6.3f} s library [{ok_t} (< {REFETCH_TARGET_S} s)], "
        f"{f['refetch_cli_s']:.2f} s whole cfsctl command",
        "ours: oci pull from local registry".ljust(40)
        + f"{f['pull_s']:6.2f} s  peak {mb(f['pull_rss'])}  "
        f"(fetch/pull {f['fetch_s'] / f['pull_s']:.2f})",
        "wget, same files, 1 connection".ljust(40)
        + f"{f['wget_s']:6.2f} s  (fetch/wget {f['fetch_s'] / f['wget_s']:.2f})",
        "curl --parallel-max 16, same files".ljust(40)
        + f"{f['curl_s']:6.2f} s  (fetch/curl {f['fetch_s'] / f['curl_s']:.2f})",
        f"(1-min load average during the run: {f['load_average']:.1f} on {os.cpu_count()} CPUs)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
