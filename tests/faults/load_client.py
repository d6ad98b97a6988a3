"""One client process of the load test: an HTCGridExecutor that maps ``square`` over ROUNDS x
PER_ROUND calls and reports, as one JSON line, what a test needs to judge it: wrong results,
its resident memory after each round, and what it still holds when done.

Usage: python load_client.py CONFIG_FILE ROUNDS PER_ROUND BATCH_SIZE
"""

from __future__ import annotations

import gc
import json
import sys

import fault_tasks
import psutil

from htcgrid_executor import HTCGridExecutor


def _peak_rss() -> int:
    """Peak resident memory of this process since exec (VmHWM). Not getrusage's ru_maxrss: on
    Linux that keeps the peak of the forked parent (here a big pytest process) across exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    config = sys.argv[1]
    rounds, per_round, batch_size = (int(arg) for arg in sys.argv[2:5])
    wrong = 0
    rss = []
    with HTCGridExecutor(config=config, batch_size=batch_size) as executor:
        for _ in range(rounds):
            for i, value in enumerate(executor.map(fault_tasks.square, range(per_round))):
                wrong += value != i * i
            gc.collect()
            rss.append(psutil.Process().memory_info().rss)
        outstanding = executor.sessions()
    print(json.dumps({
        "calls": rounds * per_round,
        "wrong": wrong,
        "rss_after_round": rss,
        "max_rss": _peak_rss(),
        "outstanding_sessions": len(outstanding),
    }), flush=True)


if __name__ == "__main__":
    main()
