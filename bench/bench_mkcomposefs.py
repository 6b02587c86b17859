"""`mkcomposefs --from-file` speed: dumpfile parse, EROFS write, whole CLI.

Inputs: the real-world trees shipped with the known-answer vectors
(`cs9-x86_64-minimal.dump.gz`, 22k entries, and `config.dump.gz`, 8.8k
entries with xattrs) and, when available, C composefs' 64k-entry
`cs9-x86_64-developer.dump.gz` (tests/assets of C v1.0.8: found in
$COMPOSEFS_BENCH_DEVELOPER_DUMP, /tmp, or the local git mirror of C
composefs, and checked against its sha256).

For each: process_time medians of parse, mkfs (V0, checked against C's
image digest) and their sum, then the user+sys CPU of whole
`mkcomposefs --from-file DUMP IMAGE` runs (a fresh interpreter each, with
cached bytecode as an installed package has). CPU time, because the machines
are shared and wall time is noise. The reference is C mkcomposefs 1.0.8:
about 0.25 s for the 64k-entry dump, scaled by entry count; the goal is to be
within 2x of it.

Run: `python -m bench mkcomposefs` or `python bench/bench_mkcomposefs.py [RUNS]`.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = (ROOT.parent / "shared" / "vectors" / "c-mkcomposefs").resolve()
INPUTS = ("cs9-x86_64-minimal.dump.gz", "config.dump.gz")
DEVELOPER = "cs9-x86_64-developer.dump.gz"
DEVELOPER_IMAGE_SHA256 = "8c61b21852d6abfdd3a7a3da71a5ccb56fae2ad099bebe7d564fcaa842cb9532"
C_MIRROR = ROOT.parent / ".mirror" / "composefs+composefs" / "repo"
C_SECONDS_PER_ENTRY = 0.25 / 64_000  # C mkcomposefs 1.0.8 on these machines


def _developer_dump() -> tuple[bytes, str] | None:
    """(gzipped developer dump, expected image sha256), or None."""
    candidates = [os.environ.get("COMPOSEFS_BENCH_DEVELOPER_DUMP", ""), f"/tmp/{DEVELOPER}"]
    for c in candidates:
        if c and os.path.isfile(c):
            return Path(c).read_bytes(), DEVELOPER_IMAGE_SHA256
    if C_MIRROR.is_dir() and shutil.which("git"):

        def show(path: str) -> bytes:
            return subprocess.run(
                ["git", "-C", str(C_MIRROR), "show", f"v1.0.8:tests/assets/{path}"],
                capture_output=True,
                check=True,
            ).stdout

        try:
            data = show(DEVELOPER)
            expected = show(f"{DEVELOPER}.sha256").split()[0].decode()
        except (subprocess.CalledProcessError, IndexError):
            return None
        try:  # cache for the next run
            Path(f"/tmp/{DEVELOPER}").write_bytes(data)
        except OSError:
            pass
        return data, expected
    return None


def _cpu_median(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times: list[float] = []
    result: object = None
    for _ in range(runs):
        gc.collect()
        c0 = time.process_time()
        result = fn()
        times.append(time.process_time() - c0)
    return statistics.median(times), result


def _cli_median(tool: str, args: list[str], pycache: str, runs: int) -> float:
    """Median user+sys CPU of whole processes of one of our CLI tools."""
    script = Path(sys.executable).with_name(tool)
    module = tool.replace("-", "_")
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", f"from composefs.cli.{module} import main; main()"]
    )
    cmd += args
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.DEVNULL  # composefs-info dump prints the whole tree
    subprocess.run(cmd, env=env, check=True, stdout=out)  # warm-up: writes the bytecode cache
    times: list[float] = []
    for _ in range(runs):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, env=env, check=True, stdout=out)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = int(args[0]) if args else 5
    sys.path.insert(0, str(ROOT / "src"))
    from composefs import dumpfile
    from composefs.erofs.format import FormatVersion
    from composefs.erofs.reader import read_image
    from composefs.erofs.writer import mkfs

    inputs: list[tuple[str, bytes, str]] = []
    if VECTORS.is_dir():
        for name in INPUTS:
            path = VECTORS / name
            if path.exists():
                expected = (VECTORS / f"{name}.sha256").read_text().split()[0]
                inputs.append((name, path.read_bytes(), expected))
    dev = _developer_dump()
    if dev is not None:
        inputs.append((DEVELOPER, *dev))
    else:
        print(f"bench_mkcomposefs: {DEVELOPER} not found (see the module docstring); skipped")
    if not inputs:
        print(f"bench_mkcomposefs: vectors not found at {VECTORS}; skipped")
        return 0

    print(f"mkcomposefs --from-file, CPU seconds, median of {runs} runs (V0 image)")
    print(
        f"  {'input':34} {'entries':>7} {'parse':>7} {'mkfs':>7} {'sum':>7} {'CLI':>7} {'C ref':>7}"
    )
    info_rows: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-mkcfs-") as tmp:
        for name, gz, expected in inputs:
            data = gzip.decompress(gz)
            entries = data.count(b"\n")
            t_parse, tree = _cpu_median(partial(dumpfile.parse, data), runs)
            t_mkfs, image = _cpu_median(partial(mkfs, tree, FormatVersion.V0), runs)  # type: ignore[arg-type]
            assert isinstance(image, bytes)
            match = hashlib.sha256(image).hexdigest() == expected
            ok = ok and match
            dump = Path(tmp) / "in.dump"
            dump.write_bytes(data)
            img = Path(tmp) / "out.img"
            pycache = str(Path(tmp) / "pycache")
            t_cli = _cli_median("mkcomposefs", ["--from-file", str(dump), str(img)], pycache, runs)
            t_read, back = _cpu_median(partial(read_image, image), runs)
            t_dump, _ = _cpu_median(partial(dumpfile.dumps, back), runs)  # type: ignore[arg-type]
            t_info = _cli_median("composefs-info", ["dump", str(img)], pycache, runs)
            info_rows.append(
                f"  {name:34} {entries:7} {t_read:7.3f} {t_dump:7.3f} {t_read + t_dump:7.3f}"
                f" {t_info:7.3f}"
            )
            ref = entries * C_SECONDS_PER_ENTRY
            print(
                f"  {name:34} {entries:7} {t_parse:7.3f} {t_mkfs:7.3f} {t_parse + t_mkfs:7.3f}"
                f" {t_cli:7.3f} {ref:7.3f}  (CLI {t_cli / ref:.1f}x C)"
                + ("" if match else "  IMAGE DIFFERS FROM C!")
            )
    print(f"composefs-info dump of those images, CPU seconds, median of {runs} runs")
    print(f"  {'input':34} {'entries':>7} {'read':>7} {'dumps':>7} {'sum':>7} {'CLI':>7}")
    print("\n".join(info_rows))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
