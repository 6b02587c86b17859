"""`mkcomposefs --from-file` throughput: dumpfile parse and EROFS write, split.

Inputs are the real-world trees shipped with the known-answer vectors
(`cs9-x86_64-minimal.dump.gz`, ~20k entries, and `config.dump.gz`). For each,
V0 (C default) and V2 (composefs-rs) images are built several times and the
median and best wall times printed; when the image reader and the dumpfile
writer are available, the `composefs-info dump` path (read image + dump) is
timed too. Reference: C mkcomposefs 1.0.8 needs ~0.25 s for a 64k-entry dump.

Run: `python -m bench` (all benchmarks) or `python bench/bench_mkcomposefs.py [RUNS]`.
"""

from __future__ import annotations

import gzip
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VECTORS = (ROOT.parent / "shared" / "vectors" / "c-mkcomposefs").resolve()
INPUTS = ("cs9-x86_64-minimal.dump.gz", "config.dump.gz")


def _timed(fn: Callable[[], object], runs: int) -> tuple[str, object]:
    """Run `fn` `runs` times: "wall median / wall best / cpu best" and the result.
    CPU time is reported too because shared machines make wall time noisy."""
    wall: list[float] = []
    cpu: list[float] = []
    result: object = None
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return f"{statistics.median(wall):.3f} / {min(wall):.3f} / cpu {min(cpu):.3f}", result


def _info_dump(dumps: Callable[..., bytes], read: Callable[[bytes], Any], img: bytes) -> bytes:
    return dumps(read(img))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = int(args[0]) if args else 5
    sys.path.insert(0, str(ROOT / "src"))
    from composefs import dumpfile
    from composefs.erofs.format import FormatVersion
    from composefs.erofs.writer import mkfs

    try:
        from composefs.erofs.reader import read_image
    except ImportError:  # the reader lands separately
        read_image = None  # type: ignore[assignment]

    if not VECTORS.is_dir():
        print(f"bench_mkcomposefs: vectors not found at {VECTORS}; skipped")
        return 0
    print(f"mkcomposefs --from-file, seconds: wall median / wall best / cpu best of {runs} runs")
    for name in INPUTS:
        path = VECTORS / name
        if not path.exists():
            print(f"  {name}: missing, skipped")
            continue
        data = gzip.decompress(path.read_bytes())
        entries = data.count(b"\n")
        figures, tree = _timed(partial(dumpfile.parse, data), runs)
        print(f"  {name} ({entries} entries): parse {figures}")
        expected = (VECTORS / f"{name}.sha256").read_text().split()[0]
        for version in (FormatVersion.V0, FormatVersion.V2):
            figures, image = _timed(partial(mkfs, tree, version), runs)  # type: ignore[arg-type]
            assert isinstance(image, bytes)
            note = ""
            if version == FormatVersion.V0:
                ok = hashlib.sha256(image).hexdigest() == expected
                note = " (matches C)" if ok else " (DIFFERS FROM C!)"
            print(f"    mkfs {version.name}: {figures}  [{len(image)} bytes]{note}")
            if read_image is not None:
                img = image
                try:
                    figures, _ = _timed(partial(_info_dump, dumpfile.dumps, read_image, img), runs)
                except Exception as e:  # report, don't die: the reader is another module
                    print(f"    composefs-info dump {version.name}: failed: {e}")
                else:
                    print(f"    composefs-info dump {version.name}: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
