"""Shared data by reference (``executor.share``) against passing the object with every call.

``python -m benchmarks.share [--mb 200] [--tasks 200] [--workers 2] [--quick]`` runs, on one
embedded local grid, a ``map`` of ``--tasks`` calls that each read one ``--mb`` MB object, twice:
with the object shared once (``executor.share``) and with the object passed as an argument of
every call (``buffersize`` keeps that sweep's data plane bounded). It prints the wall time and the
bytes that crossed the grid's Redis (its ``total_net_input_bytes`` + ``total_net_output_bytes``),
the data plane's own count of what moved. ``--quick``: 20 MB and 40 tasks.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from htcgrid_executor import HTCGridExecutor, LocalGrid


def checksum(data: bytes, i: int) -> tuple[int, int]:
    """The call of the sweep: touch the object (its length and one byte), as a real task would."""
    return len(data) + data[i % len(data)], os.getpid()


def _net_bytes(grid: LocalGrid) -> int:
    stats: dict[str, Any] = grid.redis.info("stats")
    return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])


def _sweep(grid: LocalGrid, executor: HTCGridExecutor, how: str, data: bytes, tasks: int,
           workers: int) -> dict[str, Any]:
    before, started = _net_bytes(grid), time.perf_counter()
    if how == "shared":
        with executor.share(data) as handle:
            results = list(executor.map(checksum, [handle] * tasks, range(tasks)))
    else:
        results = list(executor.map(checksum, [data] * tasks, range(tasks), buffersize=2 * workers))
    elapsed = time.perf_counter() - started
    assert len(results) == tasks
    return {"how": how, "seconds": elapsed, "moved": _net_bytes(grid) - before,
            "processes": len({pid for _, pid in results})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.share", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the object in MB (default 200)")
    parser.add_argument("--tasks", type=int, default=200, help="calls in the sweep (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="agents (default 2)")
    parser.add_argument("--quick", action="store_true", help="20 MB, 40 tasks")
    args = parser.parse_args(argv)
    mb, tasks = (20, 40) if args.quick else (args.mb, args.tasks)
    data = os.urandom(mb * 1_000_000)
    with LocalGrid(workers=args.workers) as grid, HTCGridExecutor(config=grid.client_config) as executor:
        list(executor.map(checksum, [b"warm"] * (2 * args.workers), range(2 * args.workers)))  # runners up
        rows = [_sweep(grid, executor, how, data, tasks, args.workers) for how in ("shared", "each call")]
    print(f"map of {tasks} calls over one {mb} MB object, {args.workers} workers")
    print(f"{'object':<11} {'wall (s)':>9} {'data plane moved':>18} {'x object':>9} {'worker processes':>17}")
    for row in rows:
        print(f"{row['how']:<11} {row['seconds']:9.2f} {row['moved'] / 1e6:15,.0f} MB "
              f"{row['moved'] / len(data):9.1f} {row['processes']:>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
