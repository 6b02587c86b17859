"""Boot benchmarks: how long the boot examples take to build, and to boot to
multi-user.target under QEMU/TCG (2 vCPUs, no KVM).

* build: `examples/bls/build.sh` and `examples/uki/build.sh`, timed by
  `make test-boot`'s builder (the debootstrapped base root and the Python
  wheels are cached there and not counted; `--rebuild` builds afresh);
* boot: each example booted BOOTS times (default 2, disk snapshots): the
  time composefs-setup-root takes in the initramfs (start to done, as the
  initramfs-tools script prints it), kernel uptime when multi-user.target is
  reached, and the wall time from QEMU start; BLS with the initramfs-tools
  initramfs and with the dracut one, UKI through OVMF.

There is no reference implementation that boots a whole system here; the
ratio printed is setup-root's share of the time to multi-user.target.

Run: `python -m bench boot` or `python bench/bench_boot.py [--boots N] [--rebuild]`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Booting VMs under TCG takes minutes: `python -m bench` runs this only with
# FULL=1 (or when named).
FULL_ONLY = True
sys.path.insert(0, str(ROOT / "tests" / "boot"))
import vm_boot  # noqa: E402


def _median(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f}" if xs else "     -"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench boot", description=__doc__.splitlines()[0])
    p.add_argument("--boots", type=int, default=2)
    p.add_argument("--rebuild", action="store_true", help="build the examples afresh")
    args = p.parse_args(argv or [])
    report = vm_boot.Report()
    outs: dict[str, Path] = {}
    for example in ("bls", "uki"):
        if args.rebuild:
            for old in vm_boot.cache_root().glob(f"{example}-*"):
                shutil.rmtree(old, ignore_errors=True)
        out = vm_boot.build(example, report)
        if out is None:
            print(f"bench boot: {example} does not build", file=sys.stderr)
            return 1
        outs[example] = out
    rundir = Path(tempfile.mkdtemp(prefix="bench-", dir=vm_boot.cache_root()))
    rows = []
    try:
        entry = vm_boot.bls_entry(outs["bls"])
        dracut = vm_boot.Entry(entry.linux, outs["bls"] / "dracut-initramfs.img", entry.options)
        append = f"{entry.options} {vm_boot.EXTRA} cfs.test=bench"
        cases: list[tuple[str, Path, dict[str, Any]]] = [
            ("bls (initramfs-tools)", outs["bls"] / "disk.img",
             {"entry": entry, "append": append}),
            ("bls (dracut)", outs["bls"] / "disk.img", {"entry": dracut, "append": append}),
            ("uki (OVMF)", outs["uki"] / "disk.img",
             {"esp": outs["uki"] / "esp.img", "fw_cfg": {"cfs.test": "bench"}}),
        ]
        for label, disk, kw in cases:
            setup: list[float] = []
            multi: list[float] = []
            wall: list[float] = []
            for i in range(args.boots):
                b = vm_boot.qemu_boot(f"bench-{len(rows)}-{i}", rundir, disk,
                                      snapshot=True, **kw)
                for line in b.lines("composefs: root set up in "):
                    setup.append(float(line.split("s", 1)[0]))
                m = re.search(r"multi-user-uptime=([\d.]+)s", b.console)
                if m and b.done:
                    multi.append(float(m.group(1)))
                    wall.append(b.wall)
            rows.append((label, setup, multi, wall))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    print()
    for example, out in outs.items():
        secs = (out / "build-seconds").read_text().strip() if (out / "build-seconds").exists() else "?"
        print(f"build {example:4}: {secs} s  (base root and wheels cached)")
    title = f"boot (median of {args.boots})"
    print(f"\n{title:24} {'setup-root s':>12} {'multi-user s':>12} "
          f"{'wall s':>8} {'setup-root share':>17}")
    for label, setup, multi, wall in rows:
        share = (f"{statistics.median(setup) / statistics.median(multi):16.1%}"
                 if setup and multi else "               -")
        print(f"{label:24} {_median(setup):>12} {_median(multi):>12} {_median(wall):>8} {share:>17}")
    print("\n(setup-root under dracut runs as a systemd unit; its time is in the journal, not printed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
