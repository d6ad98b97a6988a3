"""Paired A/B runs of two source trees: ``python -m benchmarks.paired OTHER_TREE``.

On a shared machine a figure taken in one run says little: the load moves more than most
changes do. This runs the same short measurement on this checkout and on ``OTHER_TREE`` (e.g. a
``git worktree`` of the base commit), alternately, ``--rounds`` times, each in a fresh child
process importing ``htcgrid_executor`` from its tree (``PYTHONPATH``), and prints both side by
side per round, then the medians: judge a change by the pairs (and by the CPU per task, which
the load moves less than wall time).

Per run: ``submit(noop).result()`` one at a time (p50, p99, CPU per task of the client and of
each grid process, psutil), a chunksize-1 and a chunksize-100 ``map`` of no-ops (items/s, CPU
per chunksize-1 task), and the chunksize-1 map consumed while the main thread spins (share of
the idle rate).

Usage::

    python -m benchmarks.paired /tmp/base [--rounds 3] [--single 400] [--map-items 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "measure"]

ROOT = Path(__file__).resolve().parent.parent


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) of this process and of each role of its descendants."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    out = {"client": times.user + times.system}
    for child in me.children(recursive=True):
        try:
            times, cmdline = child.cpu_times(), " ".join(child.cmdline())
        except psutil.Error:
            continue
        role = ("redis" if "redis" in cmdline else "control plane" if "control_plane" in cmdline
                else "agent" if "grid.agent" in cmdline else "runner")
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def _per_task_us(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, int]:
    return {role: round((after[role] - before.get(role, 0.0)) / count * 1e6) for role in after}


def measure(single: int, map_items: int) -> dict[str, Any]:
    """One run's figures (in this process: a child started by :func:`main`)."""
    import threading
    import time

    from htcgrid_executor import HTCGridExecutor

    from .tasks import noop

    figures: dict[str, Any] = {}
    with HTCGridExecutor(max_workers=2) as ex:
        for i in range(50):  # warm-up: every worker and runner started
            ex.submit(noop, i).result()
        list(ex.map(noop, range(1000)))
        before, latencies = _cpu_by_role(), []
        for i in range(single):
            started = time.perf_counter()
            ex.submit(noop, i).result()
            latencies.append(time.perf_counter() - started)
        figures["single_cpu_us"] = _per_task_us(before, _cpu_by_role(), single)
        latencies.sort()
        figures["p50_ms"] = latencies[len(latencies) // 2] * 1e3
        figures["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
        before, started = _cpu_by_role(), time.perf_counter()
        list(ex.map(noop, range(map_items)))
        figures["map1_per_s"] = map_items / (time.perf_counter() - started)
        figures["map1_cpu_us"] = _per_task_us(before, _cpu_by_role(), map_items)
        started = time.perf_counter()
        list(ex.map(noop, range(map_items * 10), chunksize=100))
        figures["map100_per_s"] = map_items * 10 / (time.perf_counter() - started)
        took: list[float] = []

        def consume() -> None:
            began = time.perf_counter()
            list(ex.map(noop, range(map_items)))
            took.append(time.perf_counter() - began)

        consumer = threading.Thread(target=consume)
        consumer.start()
        spins = 0
        while consumer.is_alive():  # the client computing while the grid works
            spins += 1
        consumer.join()
        figures["busy_share"] = map_items / took[0] / figures["map1_per_s"]
    figures["load"] = os.getloadavg()[0]
    figures["package"] = str(Path(sys.modules["htcgrid_executor"].__file__).parent.parent)
    return figures


def _run(tree: Path, single: int, map_items: int) -> dict[str, Any]:
    # htcgrid_executor from the tree (first on the path), this module and the tasks from here
    # (the other tree may have no paired.py): loaded by file, not as the tree's `benchmarks`
    code = ("import importlib.util, json, sys; "
            f"sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(ROOT)!r}); "
            "import benchmarks.tasks; "
            f"spec = importlib.util.spec_from_file_location('benchmarks.paired', {str(Path(__file__))!r}); "
            "paired = importlib.util.module_from_spec(spec); spec.loader.exec_module(paired); "
            f"print('FIGURES ' + json.dumps(paired.measure({single}, {map_items})))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, check=False, cwd=tree)
    for line in proc.stdout.splitlines():
        if line.startswith("FIGURES "):
            return json.loads(line[len("FIGURES "):])
    raise RuntimeError(f"the run on {tree} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


_COLUMNS = ("p50 ms", "p99 ms", "CPU/single task µs", "map c1 /s", "CPU/c1 task µs", "map c100 /s",
            "busy % of idle", "load")


def _cells(f: dict[str, Any]) -> list[str]:
    def split(cpu: dict[str, int]) -> str:
        parts = ", ".join(f"{role} {us:,}" for role, us in sorted(cpu.items(), key=lambda kv: -kv[1]))
        return f"{sum(cpu.values()):,} ({parts})"

    return [f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}", split(f["single_cpu_us"]), f"{f['map1_per_s']:,.0f}",
            split(f["map1_cpu_us"]), f"{f['map100_per_s']:,.0f}", f"{f['busy_share'] * 100:.0f}",
            f"{f['load']:.1f}"]


def table(runs: list[tuple[str, int, dict[str, Any]]]) -> str:
    """Markdown: one row per run (tree, round), then each tree's medians."""
    lines = ["| tree | round | " + " | ".join(_COLUMNS) + " |", "|---|---|" + "---|" * len(_COLUMNS)]
    for name, index, figures in runs:
        lines.append(f"| {name} | {index} | " + " | ".join(_cells(figures)) + " |")
    for name in dict.fromkeys(name for name, _, _ in runs):
        mine = [f for n, _, f in runs if n == name]
        median = {key: statistics.median(f[key] for f in mine) for key in
                  ("p50_ms", "p99_ms", "map1_per_s", "map100_per_s", "busy_share", "load")}
        for key in ("single_cpu_us", "map1_cpu_us"):
            roles = dict.fromkeys(role for f in mine for role in f[key])
            median[key] = {role: round(statistics.median(f[key].get(role, 0) for f in mine)) for role in roles}
        lines.append(f"| {name} | median | " + " | ".join(_cells(median)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree (holding htcgrid_executor/)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternately (3)")
    parser.add_argument("--single", type=int, default=400, help="submit().result() calls per run (400)")
    parser.add_argument("--map-items", type=int, default=5000, help="items of the chunksize-1 maps (5000)")
    args = parser.parse_args(argv)
    if not (args.other / "htcgrid_executor").is_dir():
        parser.error(f"{args.other} holds no htcgrid_executor/")
    runs = []
    for index in range(1, args.rounds + 1):
        for name, tree in (("other", args.other.resolve()), ("this", ROOT)):
            runs.append((name, index, _run(tree, args.single, args.map_items)))
    print(f"this: {runs[-1][2]['package']}; other: {runs[0][2]['package']}\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
