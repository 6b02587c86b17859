"""The varlink service (`cfsctl varlink`): call latency and concurrency.

Builds a repository with 100 OCI images (100 tiny distinct images pulled
from an OCI layout), starts `cfsctl varlink` from this checkout on a
temporary socket and measures, with a raw-socket client (NUL-terminated
JSON, no client library in the way):

* round-trip latency of a trivial call (`org.varlink.service.GetInfo`,
  answered on the event loop) and of `CloseRepository` with an unknown
  handle (the method dispatch and error path);
* round-trip latency of `ListImages` on the 100-image repository (runs in
  the worker pool), compared with what a client without the service does:
  `cfsctl oci images --json` (a process per query);
* throughput of `Check` (OCI fsck of the whole repository): 8 clients at
  once on 8 connections versus one client calling 8 times in a row.

Run: `python -m bench varlink` or `python bench/bench_varlink.py [--images N]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from composefs.oci import storage  # noqa: E402
from composefs.repository import Repository  # noqa: E402

REPO = "org.composefs.Repository"
OCI = "org.composefs.Oci"


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = {"method": method, "parameters": params or {}}
        self.sock.sendall(json.dumps(msg).encode() + b"\0")
        while b"\0" not in self.buf:
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("service closed the connection")
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\0")
        reply: dict[str, Any] = json.loads(raw)
        return reply

    def close(self) -> None:
        self.sock.close()


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_layout(layout: Path, n: int) -> list[str]:
    """An OCI layout with `n` one-layer images tagged img0..img{n-1}."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    manifests = []
    for i in range(n):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in (("etc/id", f"{i}\n".encode()), ("usr/bin/x", os.urandom(8192))):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode = len(data), 1234567890, 0o644
                tar.addfile(ti, io.BytesIO(data))
        tar_bytes = buf.getvalue()
        diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
        layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(layout, tar_bytes)}
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }).encode()  # fmt: skip
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       **_blob(layout, config)},
            "layers": [layer],
        }).encode()  # fmt: skip
        desc = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_blob(layout, manifest),
        }
        desc["annotations"] = {"org.opencontainers.image.ref.name": f"img{i}"}
        manifests.append(desc)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return [f"img{i}" for i in range(n)]


def latency(fn: Any, n: int) -> tuple[float, float, float]:
    """(median, p99, mean) in milliseconds over `n` calls (after a warm-up)."""
    for _ in range(min(20, n)):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1], statistics.fmean(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench varlink", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--calls", type=int, default=2000, help="calls per latency figure")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cfs-bench-varlink-"))
    proc = None
    try:
        layout, repo_path = work / "layout", work / "repo"
        tags = build_layout(layout, args.images)
        t0 = time.perf_counter()
        repo, _ = Repository.init(repo_path, insecure=True)
        for tag in tags:
            storage.pull(repo, f"oci:{layout}:{tag}", tag)
        repo.close()
        print(f"repository: {len(tags)} images pulled in {time.perf_counter() - t0:.1f} s")

        sock = str(work / "bench.sock")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "composefs.cli.cfsctl", "varlink", "--address", sock], env=env
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cfsctl varlink did not start")
            time.sleep(0.05)

        c = Client(sock)
        handle = c.call(f"{REPO}.OpenRepository", {"path": str(repo_path)})["parameters"]["handle"]
        n = args.calls
        med, p99, mean = latency(lambda: c.call("org.varlink.service.GetInfo"), n)
        print(f"GetInfo (trivial):            median {med:.3f} ms  p99 {p99:.3f} ms  "
              f"({1000 / mean:.0f} calls/s on one connection)")  # fmt: skip
        med, p99, mean = latency(lambda: c.call(f"{REPO}.CloseRepository", {"handle": 0}), n)
        print(f"CloseRepository (error path): median {med:.3f} ms  p99 {p99:.3f} ms")

        def list_images() -> None:
            reply = c.call(f"{OCI}.ListImages", {"handle": handle})
            assert len(reply["parameters"]["images"]) == len(tags), reply

        med_l, p99_l, _ = latency(list_images, max(50, n // 20))
        print(f"ListImages ({len(tags)} images):      median {med_l:.2f} ms  p99 {p99_l:.2f} ms")

        cli = [sys.executable, "-m", "composefs.cli.cfsctl", "--repo", str(repo_path),
               "oci", "images", "--json"]  # fmt: skip

        def run_cli() -> None:
            subprocess.run(cli, env=env, check=True, capture_output=True)

        med_c, _p99, _mean = latency(run_cli, 10)
        print(f"  vs `cfsctl oci images --json` (a process per query): median {med_c:.1f} ms "
              f"-> the service is {med_c / med_l:.1f}x faster")  # fmt: skip

        # Check throughput: 8 concurrent clients vs one client 8 times in a row.
        rounds = 8

        def check(client: Client) -> None:
            reply = client.call(f"{OCI}.Check", {"handle": handle})
            assert reply["parameters"]["ok"], reply

        check(c)  # warm the page cache
        t0 = time.perf_counter()
        for _ in range(rounds):
            check(c)
        sequential = time.perf_counter() - t0
        clients = [Client(sock) for _ in range(rounds)]
        barrier = threading.Barrier(rounds + 1)

        def worker(cl: Client) -> None:
            barrier.wait()
            check(cl)

        threads = [threading.Thread(target=worker, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        concurrent = time.perf_counter() - t0
        for cl in clients:
            cl.close()
        objects = c.call(f"{OCI}.Check", {"handle": handle})["parameters"]["repo"]
        print(f"Check ({objects['objects_checked']} objects, {objects['streams_checked']} streams, "
              f"{len(tags)} images):")  # fmt: skip
        print(
            f"  1 client x {rounds} calls: {sequential:.2f} s ({rounds / sequential:.2f} calls/s)"
        )
        print(f"  {rounds} clients at once:   {concurrent:.2f} s ({rounds / concurrent:.2f} calls/s, "
              f"{sequential / concurrent:.2f}x; {os.cpu_count()} CPUs)")  # fmt: skip
        c.close()
        assert proc.poll() is None, "service died"
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
