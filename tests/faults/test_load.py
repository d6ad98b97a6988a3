"""Load: 100+ concurrent sessions from several threads and processes, 20,000 tasks in all. Every
result is right, the clients' memory does not grow with the work done, and the data plane and
state table of collected sessions are emptied (by the clients at once, by retention after)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import fault_tasks
import pytest
from fault_helpers import HERE, subprocess_env
from support import wait_for

from htcgrid_executor.codec import decode_output, make_task, pickle_args, pickle_function
from htcgrid_executor.connector import AWSConnector


class SessionWatcher(threading.Thread):
    """Samples the grid's sessions every 50 ms: how many exist, how many are still running."""

    def __init__(self, grid) -> None:
        super().__init__(name="test-session-watcher", daemon=True)
        self.grid = grid
        self.stop = threading.Event()
        self.seen: set[bytes] = set()
        self.peak_running = 0

    def run(self) -> None:
        client = self.grid.redis
        while not self.stop.wait(0.05):
            keys = [k for k in client.scan_iter(match="htcgrid:session:*", count=1000)
                    if not k.endswith(b":events")]
            self.seen.update(keys)
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, "count", "finished", "failed", "cancelled")
            running = 0
            for count, *ended in pipe.execute():
                if count is not None and int(count) > sum(int(e or 0) for e in ended):
                    running += 1
            self.peak_running = max(self.peak_running, running)


def _thread_client(grid, sessions: int, per_session: int, errors: list, counts: list,
                   gate: str, all_sent: threading.Barrier) -> None:
    """Send every session first, then collect each. The calls wait for ``gate``, which the test
    opens once every thread has sent (``all_sent``): all the sessions are in flight together,
    however fast the agents are."""
    try:
        key = grid.payload_signing_key
        fn = pickle_function(fault_tasks.gated_square, key)
        with AWSConnector(grid.client_config) as connector:
            sent = []
            for s in range(sessions):
                base = s * per_session
                sent.append((base, connector.send([
                    make_task(fn, pickle_args(fault_tasks.gated_square, (gate, base + i), {}, key))
                    for i in range(per_session)])))
            all_sent.wait(timeout=60)
            for base, response in sent:
                answer = connector.get_results(response, timeout_sec=60)
                values = [decode_output(text, key) for text in answer["finished_OUTPUT"]]
                expected = [(True, (base + i) ** 2) for i in range(per_session)]
                counts.append(sum(1 for got, want in zip(values, expected, strict=False) if got == want))
                connector.delete_session_data(response)
    except BaseException as exc:  # reported to the test thread
        all_sent.abort()  # the test thread opens the gate at once
        errors.append(exc)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_100_sessions_from_threads_and_processes_20000_tasks_bounded_memory_nothing_left(
        make_grid, tmp_path, figures):
    grid = make_grid(workers=2, retention_sec=5.0)  # outlives the run: keys gone were deleted by clients
    config = grid.write_client_config(tmp_path / "client.json")
    wait_for(lambda: len(grid.agent_stats()) == 2)  # each agent's counters hash is one key that stays
    baseline_keys = grid.redis.dbsize()
    baseline_memory = grid.redis.info("memory")["used_memory"]
    watcher = SessionWatcher(grid)
    watcher.start()

    # 2 processes: each an executor mapping 2 rounds of 2,500 calls (sessions of at most 200)
    processes = [subprocess.Popen([sys.executable, str(HERE / "load_client.py"), str(config), "2", "2500", "200"],
                                  stdout=subprocess.PIPE, text=True, env=subprocess_env())
                 for _ in range(2)]
    # 5 threads: each a connector sending 10 sessions of 200 tasks
    errors: list[BaseException] = []
    counts: list[int] = []
    gate = tmp_path / "gate"
    all_sent = threading.Barrier(6)  # the 5 threads and this one
    threads = [threading.Thread(target=_thread_client, args=(grid, 10, 200, errors, counts, str(gate), all_sent))
               for _ in range(5)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        all_sent.wait(timeout=60)
        time.sleep(0.2)  # a few of the watcher's samples while all 50 are held
    except threading.BrokenBarrierError:
        pass  # a thread failed: its error is asserted below
    finally:
        gate.touch()
    for thread in threads:
        thread.join(120)
    reports = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        reports.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.monotonic() - started
    watcher.stop.set()
    watcher.join()

    assert not errors, errors
    thread_tasks = 5 * 10 * 200
    process_tasks = sum(r["calls"] for r in reports)
    lost = (thread_tasks - sum(counts)) + sum(r["wrong"] for r in reports)
    figures["tasks_run"] += thread_tasks + process_tasks
    figures["results_lost"] += lost
    figures["sessions"] += len(watcher.seen)
    assert thread_tasks + process_tasks == 20_000
    assert lost == 0
    assert len(watcher.seen) >= 100
    assert watcher.peak_running >= 40  # the thread clients' 50 sessions were in flight together
    for report in reports:
        assert report["outstanding_sessions"] == 0
        first, second = report["rss_after_round"]
        assert second - first < 20 * 2**20, report  # a second round of the same work: no growth
        assert report["max_rss"] < 150 * 2**20, report  # about 50 MiB on CPython 3.11
    # collected sessions' data-plane keys were deleted by their clients at once ...
    leftover = [k for k in grid.redis.scan_iter(count=10_000) if not k.startswith(b"htcgrid:")]
    assert leftover == []
    # ... and the state table forgets ended sessions after the retention period
    wait_for(lambda: grid.redis.dbsize() <= baseline_keys + 2, timeout=15, interval=0.2)
    assert grid.redis.info("memory")["used_memory"] < baseline_memory + 5 * 2**20
    print(f"\nload: {thread_tasks + process_tasks:,} tasks, {len(watcher.seen)} sessions "
          f"(peak {watcher.peak_running} running) in {elapsed:.1f}s; client max RSS "
          f"{max(r['max_rss'] for r in reports) / 2**20:.0f} MiB")
