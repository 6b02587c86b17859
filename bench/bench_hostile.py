"""Hostile inputs: time and peak memory of the tools on the adversarial
images and dumpfiles of issue 11, next to a benign input of similar size.

* `composefs-info ls` / `dump` of a valid 0.77 MB image of 2,040 nested
  255-byte names (the listing itself is ~530 MB: cost is the output's);
* `composefs-info ls` / `objects` / `dump` and `composefs-dump` of a 10 MB
  image whose 200k inodes share one data block (the readers that need no
  file data read none; the others refuse it at the work bound);
* `mkcomposefs --from-file` of a dumpfile with one 256 MiB line.

Each tool runs as a subprocess (output to /dev/null); figures are wall time
and peak RSS (GNU time). Run: `python -m bench hostile`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import hostilelib as H  # noqa: E402

BIN = Path(sys.executable).parent


def _run(args: list[str], stdin: Path | None = None) -> tuple[float, int, int]:
    """(seconds, peak RSS in MB, exit status) of one child. Peak RSS comes
    from GNU time (a child of this process would inherit its high-water mark)."""
    t0 = time.perf_counter()
    with open(stdin or os.devnull, "rb") as f:
        r = subprocess.run(
            ["/usr/bin/time", "-f", "%M", *args],
            stdin=f,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    return time.perf_counter() - t0, peak_kb // 1024, r.returncode


def _line(what: str, res: tuple[float, int, int]) -> None:
    dt, mb, rc = res
    print(f"  {what:<46} {dt:7.2f} s  peak {mb:5d} MB  exit {rc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        deep = t / "deep.img"
        deep.write_bytes(H.deep_image(2040, 255, 0))
        share = t / "share.img"
        share.write_bytes(H.shared_block_image(200_000, 0))
        benign = t / "benign.img"
        benign.write_bytes(H.mkfs_v(H.deep_chain(20, 8), 0))
        print(f"deep image {deep.stat().st_size} bytes, shared-block image {share.stat().st_size}")
        info = str(BIN / "composefs-info")
        _line("composefs-info ls, benign 20 x 8", _run([info, "ls", str(benign)]))
        _line("composefs-info ls, deep 2040 x 255", _run([info, "ls", str(deep)]))
        _line("composefs-info dump, deep 2040 x 255", _run([info, "dump", str(deep)]))
        for cmd in ("ls", "objects", "dump"):
            _line(f"composefs-info {cmd}, 200k inodes / one block", _run([info, cmd, str(share)]))
        _line(
            "composefs-dump, 200k inodes / one block",
            _run([str(BIN / "composefs-dump"), str(share), str(t / "out.img")]),
        )
        dump = t / "long.dump"
        with open(dump, "wb") as f:
            f.write(b"/ 0 40755 2 0 0 0 0.0 - - -\n/")
            chunk = b"x" * (1 << 20)
            for _ in range(256):
                f.write(chunk)
            f.write(b" 0 100644 1 0 0 0 0.0 - - -\n")
        _line(
            "mkcomposefs --from-file, one 256 MiB line",
            _run([str(BIN / "mkcomposefs"), "--from-file", "-", str(t / "o.img")], stdin=dump),
        )
    print("(no reference tool on this machine: C composefs-info crashes on the deep image;")
    print(" issue 11 measured 70 s / 2.6 GB for ls of the deep image, ~1 GB for the")
    print(" shared-block image, 50 s for the 256 MiB line before these fixes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
