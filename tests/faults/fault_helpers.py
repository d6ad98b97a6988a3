"""Helpers of the fault tests (a uniquely named module: another folder's ``conftest`` cannot
shadow it)."""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

#: heart-beat fast, so that a killed agent's tasks come back within a second

HERE = Path(__file__).parent




class DoneCounter:
    """Counts the done-callbacks of futures: each must fire exactly once."""

    def __init__(self, futures: Iterable[Future] = ()) -> None:
        self.futures: list[Future] = []
        self.calls: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self.add(futures)

    def add(self, futures: Iterable[Future]) -> None:
        """Count these futures too."""
        for future in futures:
            with self._lock:
                index = len(self.futures)
                self.futures.append(future)
            future.add_done_callback(lambda _f, i=index: self._count(i))

    def _count(self, index: int) -> None:
        with self._lock:
            self.calls[index] += 1

    def assert_each_once(self) -> None:
        with self._lock:
            missing = [i for i in range(len(self.futures)) if self.calls[i] == 0]
            twice = {i: n for i, n in self.calls.items() if n > 1}
        FIGURES["duplicate_resolutions"] += len(twice)
        assert not missing, f"{len(missing)} futures never resolved, e.g. {missing[:5]}"
        assert not twice, f"futures resolved more than once: {twice}"


def executions(log: Path) -> collections.Counter[int]:
    """How often each item ran, from a log of one line per execution."""
    if not log.exists():
        return collections.Counter()
    return collections.Counter(int(line) for line in log.read_text().split())


def older_than(pids: Iterable[int], age_sec: float) -> list[int]:
    """The pids of live processes started more than ``age_sec`` ago."""
    now = time.time()
    old = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and now - process.create_time() > age_sec:
                old.append(pid)
        except psutil.Error:
            pass
    return old


def sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def terminal_events(grid: Any) -> collections.Counter[str]:
    """How many terminal events the grid recorded per task id, over every session it knows.

    Each session's event stream holds one entry per task that reached a terminal state: a task
    that appears twice was finished (or failed) twice.
    """
    counts: collections.Counter[str] = collections.Counter()
    for key in grid.redis.scan_iter(match="htcgrid:session:*:events", count=1000):
        sid = key.decode().removeprefix("htcgrid:session:").removesuffix(":events")
        for event in grid.table.read_session_events(sid, None):
            counts[event.task_id] += 1
    return counts


def data_plane_keys(grid: Any, session_ids: Iterable[str]) -> list[str]:
    """The ``-input``/``-output``/``-payload`` keys of those sessions still in the grid's Redis."""
    found = []
    for sid in session_ids:
        found += [k.decode() for k in grid.redis.scan_iter(match=f"{sid}*", count=1000)
                  if not k.startswith(b"htcgrid:")]
    return found


def subprocess_env() -> dict[str, str]:
    """Environment of a client subprocess: this process's ``sys.path``, so that it imports
    ``fault_tasks`` and the package exactly as the test does."""
    paths = [p for p in sys.path if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))


#: figures for docs/reliability.md, added up by the tests and printed at the end of the run
FIGURES: collections.Counter[str] = collections.Counter()

FIGURE_LABELS = {
    "tasks_run": "tasks run (futures resolved and checked)",
    "results_lost": "results lost or wrong",
    "duplicate_resolutions": "futures resolved more than once",
    "runners_killed": "runner processes SIGKILLed mid-run",
    "agents_killed": "agent processes SIGKILLed mid-run",
    "control_plane_restarts": "control-plane restarts survived",
    "redis_restarts": "Redis restarts survived",
    "redis_pauses": "Redis pauses (SIGSTOP past a lease) ridden out, no lease lost",
    "clients_killed": "client processes SIGKILLed and re-attached",
    "tasks_timed_out": "hung calls stopped at their time limit",
    "bad_inputs": "bad inputs tried (each a clear error, grid still serving)",
    "tampered_payloads_refused": "tampered or forged payloads refused",
    "unauthorised_requests_refused": "requests without valid credentials refused",
    "sessions": "sessions (one send each) in the load test",
}
