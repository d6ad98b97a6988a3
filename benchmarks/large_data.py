"""``python -m benchmarks.large_data``: one big argument and one big result, ProcessPoolExecutor(2)
beside HTCGridExecutor on a LocalGrid(2), in paired rounds (each round times both, one after the
other, so that a busy machine slows both alike). Runs in well under a minute.

The argument is a numpy array when numpy is installed (a ``bytes`` of the same size otherwise),
sent to a task that returns its size; the result is made by the task and returned whole.
Options: ``--arg-mb`` (default 200), ``--result-mb`` (default 100), ``--rounds`` (default 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

from htcgrid_executor import HTCGridExecutor
from htcgrid_executor.grid import LocalGrid

MB = 1024 * 1024


def size_of(value: Any) -> int:
    return int(getattr(value, "nbytes", None) or len(value))


def make_value(nbytes: int) -> Any:
    try:
        import numpy
    except ImportError:
        return os.urandom(nbytes)
    return numpy.frombuffer(os.urandom(nbytes), dtype=numpy.uint8).copy()


def _timed(executor: Executor, fn: Any, arg: Any, expected: int) -> float:
    start = time.perf_counter()
    answer = executor.submit(fn, arg).result(timeout=300)
    elapsed = time.perf_counter() - start
    got = answer if isinstance(answer, int) else size_of(answer)
    if got != expected:
        raise AssertionError(f"wrong answer: {got} bytes, not {expected}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arg-mb", type=int, default=200)
    parser.add_argument("--result-mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args(argv)
    argument = make_value(options.arg_mb * MB)
    times: dict[tuple[str, str], list[float]] = {}
    with ProcessPoolExecutor(2) as ppe, LocalGrid(2) as grid, \
            HTCGridExecutor(config=grid.client_config) as htcgrid:
        pools: dict[str, Executor] = {"ProcessPoolExecutor(2)": ppe, "HTCGridExecutor(LocalGrid(2))": htcgrid}
        for pool in pools.values():  # workers started, imports done: not part of the figures
            pool.submit(size_of, b"warm").result(timeout=120)
        for _ in range(options.rounds):
            for name, pool in pools.items():
                times.setdefault((name, "arg"), []).append(
                    _timed(pool, size_of, argument, options.arg_mb * MB))
            for name, pool in pools.items():
                times.setdefault((name, "result"), []).append(
                    _timed(pool, make_value, options.result_mb * MB, options.result_mb * MB))
    print(f"## Large data ({options.rounds} paired rounds, median seconds per call)\n")
    print(f"| executor | {options.arg_mb} MB argument | {options.result_mb} MB result |")
    print("|---|---|---|")
    for name in pools:
        arg, result = (statistics.median(times[(name, kind)]) for kind in ("arg", "result"))
        print(f"| {name} | {arg:.2f} | {result:.2f} |")
    ratio = [statistics.median(times[(list(pools)[1], k)]) / statistics.median(times[(list(pools)[0], k)])
             for k in ("arg", "result")]
    print(f"\nHTCGridExecutor / ProcessPoolExecutor: argument {ratio[0]:.1f}x, result {ratio[1]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
