"""A client that is SIGKILLed by test_client_crash.py: it submits work, records its sessions
(one JSON line on stdout, as a real client would write them to a file), lets some results
arrive, says so, and waits to be killed.

Usage: python crash_client.py CONFIG_FILE GATE_FILE QUICK GATED CONSUMED
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait

import fault_tasks

from htcgrid_executor import HTCGridExecutor


def main() -> None:
    config, gate = sys.argv[1], sys.argv[2]
    quick, gated, consumed = (int(arg) for arg in sys.argv[3:6])
    # one session for all the calls: the session is still outstanding when this client dies, with
    # the results it has read inside (a session it had wholly collected it would have deleted)
    executor = HTCGridExecutor(config=config, batch_window=1.0)
    futures = [executor.submit(fault_tasks.square, i) for i in range(quick)]
    futures += [executor.submit(fault_tasks.wait_for_file, gate, f"gated {i}") for i in range(gated)]
    print(json.dumps(executor.sessions(timeout=30)), flush=True)
    pending = set(futures[:quick])
    while quick - len(pending) < consumed:  # results this client has read before it dies
        _, pending = wait(pending, timeout=30, return_when=FIRST_COMPLETED)
    time.sleep(0.5)  # and its poller has moved on past them
    print(json.dumps({"consumed": quick - len(pending)}), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
