"""``python -m benchmarks.startup``: what making an executor costs, ProcessPoolExecutor(2) beside
HTCGridExecutor() (an embedded grid of 2), in one fresh process per executor kind.

For each, three figures: the *first* executor of the process (construction, first result,
shutdown), the *next* one made right after the last one's shutdown (an embedded grid is then
taken again with runners that are still being renewed), and one made *later*, after a pause
(``--pause``, default 1 s: the renewed runners are up). Medians over ``--rounds`` (default 5).
Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _one(kind: str) -> dict[str, float]:
    start = time.perf_counter()
    if kind == "process":
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(2)
    else:
        from htcgrid_executor import HTCGridExecutor

        executor = HTCGridExecutor(max_workers=2)
    made = time.perf_counter()
    executor.submit(abs, -1).result(timeout=120)
    first = time.perf_counter()
    executor.shutdown()
    done = time.perf_counter()
    return {"create": made - start, "first result": first - made, "shutdown": done - first}


def child(kind: str, rounds: int, pause: float) -> dict[str, list[dict[str, float]]]:
    figures: dict[str, list[dict[str, float]]] = {"first": [_one(kind)], "next": [], "later": []}
    for _ in range(rounds):
        figures["next"].append(_one(kind))
        time.sleep(pause)
        figures["later"].append(_one(kind))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--child", choices=["process", "htcgrid"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.pause)))
        return 0
    print(f"executor creation, first result and shutdown (s); 2 workers; medians of {args.rounds}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'executor':<22} {'which':<6} {'create':>8} {'first result':>13} {'shutdown':>9} {'total':>8}")
    for kind, label in (("process", "ProcessPoolExecutor"), ("htcgrid", "HTCGridExecutor()")):
        out = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--child", kind,
                              "--rounds", str(args.rounds), "--pause", str(args.pause)],
                             capture_output=True, text=True, check=True, timeout=600)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        for which in ("first", "next", "later"):
            runs = figures[which]
            cells = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            total = sum(cells.values())
            print(f"{label:<22} {which:<6} {cells['create']:>8.3f} {cells['first result']:>13.3f} "
                  f"{cells['shutdown']:>9.3f} {total:>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
