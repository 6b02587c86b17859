"""Run the benchmarks: `python -m bench [--list] [NAME...]`.

Every `bench/bench_*.py` module with a `main(argv)` function is a benchmark;
NAME is its file name with or without the `bench_` prefix (`fsverity` or
`bench_fsverity`).  Without names all of them run, in name order.  Each
prints its own figures; a benchmark that raises is reported and the others
still run (the exit status is then 1).  At the end a summary table lists
every figure a benchmark recorded (`bench.common.record`): ours, the
reference's from the same run, the ratio and the target.  `FULL=1` in the
environment runs the long variants as well, and the benchmarks that take
minutes on their own (a module with `FULL_ONLY = True`, e.g. `boot`: run
those by name or with FULL=1).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))


def run_one(name: str) -> bool:
    module = importlib.import_module(f"bench.bench_{name}")
    main = getattr(module, "main", None)
    if not callable(main):
        print(f"bench: bench_{name} has no main(); skipped", file=sys.stderr)
        return True
    print(f"== {name} ==", flush=True)
    t0 = time.perf_counter()
    try:
        # Pass an empty argv: the benchmark must not see our own arguments.
        result = main([]) if inspect.signature(main).parameters else main()
    except Exception:
        traceback.print_exc()
        print(f"== {name}: FAILED ==", flush=True)
        return False
    ok = result in (None, 0)
    print(
        f"== {name}: {'done' if ok else f'exit {result}'} in {time.perf_counter() - t0:.1f} s ==\n",
        flush=True,
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    wanted = [n.removeprefix("bench_").removesuffix(".py") for n in args.names]
    if not wanted:
        # Everything, except the benchmarks that take minutes on their own
        # (`FULL_ONLY = True` in the module) unless FULL=1.
        from bench import common

        sys.path.insert(0, str(ROOT / "src"))
        wanted = [
            n
            for n in names
            if common.FULL
            or not getattr(importlib.import_module(f"bench.bench_{n}"), "FULL_ONLY", False)
        ]
        skipped = sorted(set(names) - set(wanted))
        if skipped:
            print(f"bench: FULL=1 also runs: {', '.join(skipped)}", flush=True)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (available: {', '.join(names)})")
    # Benchmarks measure this checkout, installed or not.
    sys.path.insert(0, str(ROOT / "src"))
    from bench import common

    t0 = time.perf_counter()
    failed = [n for n in wanted if not run_one(n)]
    table = common.summary_table()
    if table:
        print(f"== summary ({time.perf_counter() - t0:.0f} s) ==")
        print(table, flush=True)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
