"""One client process of the load test: an HTCGridExecutor that maps ``square`` over ROUNDS x
PER_ROUND calls and reports, as one JSON line, what a test needs to judge it: wrong results,
its resident memory after each round, and what it still holds when done.

Usage: python load_client.py CONFIG_FILE ROUNDS PER_ROUND BATCH_SIZE
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import fault_tasks
import psutil

from htcgrid_executor import HTCGridExecutor


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
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "outstanding_sessions": len(outstanding),
    }), flush=True)


if __name__ == "__main__":
    main()
