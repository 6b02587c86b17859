"""Benchmark: pulling a real image from a local registry.

    python -m bench oci_pull          (or: python bench/bench_oci_pull.py)

A Debian bookworm minbase rootfs (debootstrap, cached under
``~/.cache/composefs-py/bench``) becomes a one-gzip-layer OCI image, plus a
second image that shares that layer and adds a small one. Both are pushed to
a docker-registry started on 127.0.0.1 for the run. Then, in the same run:

* ours:  pull into a fresh repository and build the composefs image
         through the library API (a child process, so its peak RSS is
         measured on its own; context, once by default)
* ours, repeated pull of the same image (everything is already there)
* ours, the second image (only its small layer is new)
* ours as a user runs it: ``cfsctl oci pull docker://…`` (cold, then again);
  the summary rows use these
* reference: ``skopeo copy`` to an OCI layout + ``umoci unpack`` of it

Both sides write onto the same fresh journaled ext4 (a loop filesystem,
`bench.common.scratch_ext4`), and the registry's blobs are evicted from the
page cache before every cold pull (ours and the reference's).

Targets: a cold pull <= 0.5x the time of skopeo + umoci, a repeated pull
< 0.3 s, peak memory < 100 MB; the summary table gets those rows.
Options: ``--rebuild`` remakes the cached rootfs/image, ``--json FILE``
writes the figures, ``--runs N`` (default 4) sets how many cold pulls of the
reference and of ``cfsctl`` alternate (``--api-runs``, default 1, of them
also through the API); the figures are their medians (peak RSS: the
largest). Four, not three: this machine's speed drifts during a run, and a
median of three pairs moved the ratio by several hundredths from run to run
(five cost make bench too much of its 3 minutes).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "composefs-py" / "bench"
SUITE = "bookworm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TARGET_SECONDS_NOTE = "skopeo+umoci"
MEMORY_TARGET_MB = 100
REPEAT_TARGET_S = 0.3
RATIO_TARGET = 0.5


class BenchSkip(Exception):
    """A prerequisite is missing: the benchmark says so and does not run."""


def log(msg: str) -> None:
    print(f"[oci_pull] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- preparing the image


def apt_mirror() -> str:
    """The Debian mirror apt already uses (from `apt-cache policy`)."""
    out = subprocess.run(
        ["apt-cache", "policy"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        m = re.search(r"(https?://\S+)\s+" + SUITE + r"/main\b", line)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def build_rootfs_tar(dest: Path) -> None:
    """debootstrap --variant=minbase, then a deterministic tar of it."""
    if os.geteuid() != 0:
        raise BenchSkip("building the Debian rootfs needs root (debootstrap)")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(debootstrap):
        raise BenchSkip("needs debootstrap (apt-get install debootstrap)")
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=dest.parent))
    try:
        rootfs = work / "rootfs"
        mirror = apt_mirror()
        log(f"debootstrap --variant=minbase {SUITE} from {mirror} (once; cached)")
        t0 = time.monotonic()
        subprocess.run(
            [debootstrap, "--variant=minbase", SUITE, str(rootfs), mirror],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        log(f"debootstrap done in {time.monotonic() - t0:.0f} s")
        # apt caches are not part of an image
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        tmp = work / "rootfs.tar"
        subprocess.run(
            [
                "tar",
                "--sort=name",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--format=pax",
                "--pax-option=delete=atime,delete=ctime",
                "-C",
                str(rootfs),
                "-cf",
                str(tmp),
                ".",
            ],
            check=True,
        )
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    h = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / h).write_bytes(data)
    return {"digest": "sha256:" + h, "size": len(data)}


def _blob_file(layout: Path, path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    os.replace(path, layout / "blobs" / "sha256" / h.hexdigest())
    return {"digest": "sha256:" + h.hexdigest(), "size": size}


def _diff_id(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _gzip_file(src: Path, dest: Path) -> None:
    with (
        open(src, "rb") as fin,
        open(dest, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
    ):
        shutil.copyfileobj(fin, gz, 1 << 20)


def _extra_layer_tar(dest: Path) -> None:
    """A small application layer on top of the base (about 2 MB)."""
    import io
    import random

    rnd = random.Random(7)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as t:
        for d in ("opt", "opt/app", "opt/app/lib"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            t.addfile(ti)
        for i in range(40):
            data = rnd.randbytes(50_000) if i % 2 else (b"config line %d\n" % i) * 100
            ti = tarfile.TarInfo(f"opt/app/lib/file{i:02d}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
            t.addfile(ti, io.BytesIO(data))


def build_layout(layout: Path, rootfs_tar: Path) -> None:
    """OCI layout with tag `a` (one gzip layer) and `b` (same layer + a small one)."""
    tmp = Path(tempfile.mkdtemp(prefix="layout-", dir=layout.parent))
    try:
        (tmp / "blobs" / "sha256").mkdir(parents=True)
        (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        log("compressing the base layer (gzip -6, once; cached)")
        base_diff = _diff_id(rootfs_tar)
        gz = tmp / "base.tar.gz"
        _gzip_file(rootfs_tar, gz)
        base = {"mediaType": LAYER_GZIP, **_blob_file(tmp, gz)}
        extra_tar = tmp / "extra.tar"
        _extra_layer_tar(extra_tar)
        extra_diff = _diff_id(extra_tar)
        egz = tmp / "extra.tar.gz"
        _gzip_file(extra_tar, egz)
        extra_tar.unlink()
        extra = {"mediaType": LAYER_GZIP, **_blob_file(tmp, egz)}
        index = []
        for tag, layers, diffs in (
            ("a", [base], [base_diff]),
            ("b", [base, extra], [base_diff, extra_diff]),
        ):
            cfg = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": {"Env": ["PATH=/usr/bin:/bin"]},
                    "rootfs": {"type": "layers", "diff_ids": diffs},
                },
                separators=(",", ":"),
            ).encode()
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, **_blob(tmp, cfg)},
                    "layers": layers,
                },
                separators=(",", ":"),
            ).encode()
            index.append(
                {
                    "mediaType": OCI_MANIFEST,
                    **_blob(tmp, manifest),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            )
        (tmp / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": index}))
        shutil.rmtree(layout, ignore_errors=True)
        os.replace(tmp, layout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(rebuild: bool) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs_tar = CACHE / f"debian-{SUITE}-minbase.tar"
    layout = CACHE / f"oci-{SUITE}-minbase"
    if rebuild:
        rootfs_tar.unlink(missing_ok=True)
        shutil.rmtree(layout, ignore_errors=True)
    if not rootfs_tar.exists():
        build_rootfs_tar(rootfs_tar)
    if not (layout / "index.json").exists():
        build_layout(layout, rootfs_tar)
    return layout


# ---------------------------------------------------------------- registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that it gets SIGTERM when the process that started it
    dies: a killed run must not leave a registry listening behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


@contextmanager
def local_registry(workdir: Path) -> Iterator[str]:
    exe = shutil.which("docker-registry")
    if exe is None:
        raise BenchSkip("needs docker-registry (apt-get install docker-registry)")
    port = _free_port()
    storage = workdir / "storage"
    storage.mkdir()
    conf = workdir / "registry.yml"
    conf.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench-only\n"
    )
    logf = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(
        _die_with_parent([exe, "serve", str(conf)]),
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    logf.close()
    try:
        url = f"http://127.0.0.1:{port}/v2/"
        for _ in range(200):
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("oci_pull: docker-registry died") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _skopeo(*args: str) -> None:
    policy = CACHE / "skopeo-policy.json"
    if not policy.exists():
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    subprocess.run(
        ["skopeo", "--policy", str(policy), *args], check=True, env=env, stdout=subprocess.DEVNULL
    )


# ---------------------------------------------------------------- measuring


def run_child(args: list[str]) -> tuple[float, int, dict[str, Any]]:
    """Run this file as a child; wall seconds, peak RSS (bytes), its JSON report
    (plus the child's CPU seconds as "cpu": the machine is often shared)."""
    usage, out = common.run_capture(
        [sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE
    )
    rep = json.loads(out or b"{}")
    rep["cpu"] = usage.cpu
    return usage.wall, usage.rss, rep


def _pull_cmd(cfsctl: list[str], repo: Path, ref: str) -> list[str]:
    return [*cfsctl, "--repo", str(repo), "oci", "pull", "--tls-verify=false",
            f"docker://{ref}", "bench"]  # fmt: skip


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a command."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"oci_pull: {' '.join(cmd)} failed")
    return time.monotonic() - t0, usage.ru_utime + usage.ru_stime


def skopeo_umoci(d: Path, ref: str) -> tuple[float, float, float, float]:
    """The reference: skopeo copy to an OCI layout, then umoci unpack (wall, cpu each)."""
    d.mkdir()
    copy = [
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"oci:{d}/layout:img",
    ]
    t_copy, c_copy = run_timed(copy)
    umoci = ["umoci", "unpack", "--image", f"{d}/layout:img", f"{d}/bundle"]
    if os.geteuid() != 0:
        umoci.insert(2, "--rootless")
    t_unpack, c_unpack = run_timed(umoci)
    # Kept until the whole run ends: on ext4 without a journal (these
    # machines) creating inodes right after deleting thousands is several
    # times slower, which would tax whichever pull comes next.
    return t_copy, c_copy, t_unpack, c_unpack


def child_main(argv: list[str]) -> int:
    """In the child: one pull with the library API; prints a small JSON report."""
    kind, repo_path, ref = argv
    t0 = time.monotonic()
    report: dict[str, Any] = {}
    if kind == "pull":
        from composefs.oci import registry, storage  # OCI-A's pull API
        from composefs.repository import Repository

        if os.path.exists(repo_path):
            repo = Repository.open(repo_path)
        else:
            repo = Repository.init(repo_path, insecure=True)[0]
        with registry.open_source(ref) as src:
            result = storage.pull_from_source(repo, src, "bench")
        report["result"] = repr(result)[:400]
    elif kind == "fetch":
        # Transport only: download, verify and decompress every layer (with
        # isal, the pull's inflater).
        from isal import isal_zlib

        from composefs.oci import image, registry

        with registry.open_source(ref) as src:
            resolved = image.resolve_manifest(src)
            total = 0
            for layer in resolved.manifest.layers:
                d = isal_zlib.decompressobj(31)
                with src.open_blob_stream(layer.digest, layer.size) as blob:
                    while chunk := blob.read(1 << 20):
                        total += len(d.decompress(chunk))
                    blob.finish()
            report["uncompressed"] = total
    report["seconds"] = time.monotonic() - t0
    sys.stdout.write(json.dumps(report))
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    try:
        return _main(argv)
    except BenchSkip as e:
        print(f"oci_pull: skipped: {e}")
        return 0


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench oci_pull", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached rootfs and image")
    ap.add_argument(
        "--runs", type=int, default=4, help="cold pulls, reference and cfsctl (medians)"
    )
    ap.add_argument(
        "--api-runs", type=int, default=1, help="of those, also through the library API (context)"
    )
    ap.add_argument("--json", help="write figures to this file")
    args = ap.parse_args(argv)
    for tool in ("skopeo", "umoci", "docker-registry"):
        if shutil.which(tool) is None:
            raise BenchSkip(f"needs {tool}")

    layout = prepare(args.rebuild)
    figures: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-oci-pull-") as tmpd,
        common.scratch_ext4(4000) as scratch,
    ):
        tmp = Path(tmpd)
        (tmp / "reg").mkdir()
        with local_registry(tmp / "reg") as host:
            for tag in ("a", "b"):
                _skopeo(
                    "copy",
                    "--quiet",
                    "--dest-tls-verify=false",
                    "--preserve-digests",
                    f"oci:{layout}:{tag}",
                    f"docker://{host}/bench/minbase:{tag}",
                )
            ref_a, ref_b = f"{host}/bench/minbase:a", f"{host}/bench/minbase:b"

            have_pull = _have_pull_api()
            cfsctl = common.our_tool("cfsctl")
            env = common.our_env()
            # Cold runs alternate between the reference and ours as a user
            # runs it (`cfsctl oci pull docker://…`, interpreter start and
            # CLI included), the first also through the API; medians of N
            # each: the machine is shared, so load drifts during the run.
            refs: list[tuple[float, float, float, float]] = []
            pulls: list[tuple[float, int, Path, float]] = []
            clis: list[tuple[common.Usage, Path]] = []
            storage = tmp / "reg" / "storage"
            for i in range(args.runs):
                subprocess.run(["sync"], check=True)
                common.drop_cache(storage)
                refs.append(skopeo_umoci(scratch / f"ref{i}", ref_a))
                if not have_pull:
                    continue
                if i < args.api_runs:
                    repo = scratch / f"repo{i}"
                    subprocess.run(["sync"], check=True)
                    common.drop_cache(storage)
                    wall, rss, rep = run_child(["pull", str(repo), ref_a])
                    pulls.append((wall, rss, repo, rep["cpu"]))
                cli_repo = scratch / f"repo-cli{i}"
                common.run([*cfsctl, "init", "--insecure", str(cli_repo)], env=env)
                subprocess.run(["sync"], check=True)
                common.drop_cache(storage)
                clis.append((common.run(_pull_cmd(cfsctl, cli_repo, ref_a), env=env), cli_repo))
            figures["runs"] = args.runs
            figures["skopeo_copy_s"] = median(r[0] for r in refs)
            figures["umoci_unpack_s"] = median(r[2] for r in refs)
            figures["skopeo_umoci_s"] = median(r[0] + r[2] for r in refs)
            figures["skopeo_umoci_cpu_s"] = median(r[1] + r[3] for r in refs)

            # transport alone (download + verify + gunzip), for context
            wall, rss, rep = run_child(["fetch", "-", ref_a])
            figures["fetch_only_s"], figures["fetch_only_cpu_s"] = wall, rep["cpu"]
            figures["fetch_only_rss"] = rss

            if pulls:
                figures["pull_cold_s"] = median(p[0] for p in pulls)
                figures["pull_cold_rss"] = max(p[1] for p in pulls)
                figures["pull_cold_cpu_s"] = median(p[3] for p in pulls)
                repo = pulls[0][2]
                wall, rss, rep = run_child(["pull", str(repo), ref_a])
                figures["pull_repeat_s"], figures["pull_repeat_rss"] = wall, rss
                figures["pull_repeat_cpu_s"] = rep["cpu"]
                wall, rss, rep = run_child(["pull", str(repo), ref_b])
                figures["pull_shared_base_s"], figures["pull_shared_base_rss"] = wall, rss
                figures["pull_shared_base_cpu_s"] = rep["cpu"]
                u = common.median_usage([c[0] for c in clis])
                figures["cli_cold_s"], figures["cli_cold_cpu_s"] = u.wall, u.cpu
                figures["cli_cold_rss"] = max(c[0].rss for c in clis)
                figures["cli_cold_samples"] = sorted(c[0].wall for c in clis)
                figures["ref_samples"] = sorted(r[0] + r[2] for r in refs)
                u = common.run(_pull_cmd(cfsctl, clis[0][1], ref_a), env=env)
                figures["cli_repeat_s"], figures["cli_repeat_cpu_s"] = u.wall, u.cpu
                figures["cli_repeat_rss"] = u.rss
            figures["load_average"] = os.getloadavg()[0]

    report(figures)
    if "cli_cold_s" in figures:
        f = figures
        common.record("oci pull", "cfsctl oci pull vs skopeo+umoci, wall", f["cli_cold_s"],
                      f["skopeo_umoci_s"], RATIO_TARGET)  # fmt: skip
        common.record("oci pull", "cfsctl oci pull again (stored), wall", f["cli_repeat_s"],
                      None, REPEAT_TARGET_S)  # fmt: skip
        common.record("oci pull", "cfsctl oci pull peak RSS", f["cli_cold_rss"] / 1e6, None,
                      MEMORY_TARGET_MB, "MB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _have_pull_api() -> bool:
    try:
        from composefs.oci import storage

        return hasattr(storage, "pull_from_source")
    except ImportError:
        log("composefs.oci.storage.pull not available yet: timing the transport only")
        return False


def report(f: dict[str, Any]) -> None:
    def row(label: str, key: str, extra: str = "") -> str:
        rss = f" peak {_mb(f[key + '_rss'])}" if key + "_rss" in f else ""
        return f"{label:<36}{f[key + '_s']:6.2f} s wall {f[key + '_cpu_s']:6.2f} s cpu{rss}{extra}"

    lines = [
        row(
            "skopeo copy + umoci unpack",
            "skopeo_umoci",
            f"  (copy {f['skopeo_copy_s']:.2f} + unpack {f['umoci_unpack_s']:.2f})",
        ),
        row("ours: fetch+verify+gunzip only", "fetch_only"),
    ]
    if "pull_cold_s" in f:
        ok_t = f"{f['pull_cold_s'] / f['skopeo_umoci_s']:.2f}x the time of"
        ok_m = "OK" if f["pull_cold_rss"] < MEMORY_TARGET_MB * 1e6 else "OVER"
        lines += [
            row(
                "ours: pull + image, fresh repo",
                "pull_cold",
                f"  [{ok_t} skopeo+umoci; memory {ok_m} (< {MEMORY_TARGET_MB} MB)]",
            ),
            row("ours: repeated pull", "pull_repeat"),
            row("ours: 2nd image, shared base", "pull_shared_base"),
        ]
    if "cli_cold_s" in f:
        lines += [
            row(
                "cfsctl oci pull, fresh repo",
                "cli_cold",
                f"  [{f['cli_cold_s'] / f['skopeo_umoci_s']:.2f}x the time of skopeo+umoci]",
            ),
            row("cfsctl oci pull, again", "cli_repeat"),
        ]
    if "cli_cold_samples" in f:
        lines.append(
            f"(medians of {f['runs']} alternating cold runs; cfsctl "
            + ", ".join(f"{x:.2f}" for x in f["cli_cold_samples"])
            + " s, skopeo+umoci "
            + ", ".join(f"{x:.2f}" for x in f["ref_samples"])
            + " s)"
        )
    lines.append(
        f"(1-min load average during the run: {f['load_average']:.1f} on {os.cpu_count()} CPUs)"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
