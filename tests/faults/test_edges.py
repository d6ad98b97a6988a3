"""The edges of issue 14 on the real local grid: a Redis that refuses writes (full memory, a disk
it cannot save to), a paused Redis, secret files over world-readable ones."""

from __future__ import annotations

import os
import signal
import stat
import tempfile
import threading
import time

import fault_tasks
import pytest
import requests
from fault_helpers import executions
from support import wait_for

from htcgrid_executor import GridError, StorageFullError, wire
from htcgrid_executor.grid.state_table import PREFIX
from htcgrid_executor.grid.state_table import _key_for as key_for


def _refuse_writes_as_a_full_disk_does(grid) -> None:
    """Make Redis fail a save for real, as on a full disk: its folder is gone, so the snapshot
    cannot be written, and with a save point set Redis refuses writes (MISCONF)."""
    gone = tempfile.mkdtemp(prefix="htcgrid-gone-")
    grid.redis.config_set("dir", gone)
    os.rmdir(gone)
    grid.redis.config_set("save", "3600 1")
    grid.redis.bgsave()
    wait_for(lambda: grid.redis.info("persistence")["rdb_last_bgsave_status"] == "err", timeout=10)


def _take_writes_again(grid) -> None:
    grid.redis.config_set("save", "")  # no save point: a failed save no longer stops writes
    grid.redis.config_set("dir", str(grid.redis_server._tmpdir or grid.folder))


def test_a_redis_out_of_memory_fails_new_calls_with_storage_full_error(make_grid, make_executor, figures):
    grid = make_grid(workers=1)
    executor = make_executor(grid)
    assert executor.submit(fault_tasks.square, 2).result(timeout=30) == 4
    grid.redis.config_set("maxmemory", 1)
    try:
        error = executor.submit(fault_tasks.square, 3).exception(timeout=10)
        assert isinstance(error, StorageFullError), repr(error)
        assert "OOM" in str(error) and "refuses writes" in str(error)
    finally:
        grid.redis.config_set("maxmemory", 0)
    assert executor.submit(fault_tasks.square, 4).result(timeout=30) == 16  # works again
    figures["bad_inputs"] += 1


@pytest.mark.timeout(60)
def test_a_queued_call_gets_an_answer_by_its_deadline_while_redis_cannot_save(make_grid, make_executor,
                                                                             figures):
    """Before: reads kept answering "nothing yet", so a queued call waited for ever."""
    grid = make_grid(workers=0)  # nothing runs it: it stays queued
    executor = make_executor(grid, broken_after_sec=3)
    future = executor.submit(fault_tasks.square, 2)
    wait_for(lambda: grid.redis.keys(key_for("session", "*")), timeout=10)
    _refuse_writes_as_a_full_disk_does(grid)
    try:
        started = time.monotonic()
        error = future.exception(timeout=20)
        assert time.monotonic() - started < 3 + 8
        causes = [error, error.__cause__]
        assert isinstance(error, GridError)
        assert any(isinstance(c, StorageFullError) and "MISCONF" in str(c) for c in causes), repr(causes)
    finally:
        _take_writes_again(grid)
    figures["bad_inputs"] += 1


def test_reads_work_while_redis_refuses_writes(make_grid, make_connector, figures):
    """/result on a listener used to trim the stream it read (XTRIM): a 500 on a full disk."""
    grid = make_grid(workers=1)
    connector = make_connector(grid)
    # a plain task (not an executor call): the handler fails it, which ends it as well as any
    sid = connector.send([{"n": 1}], listener="lst-reads")["session_id"]
    headers = {"x-api-key": grid.api_key}
    params = {"submission_content": wire.encode_query({"session_id": sid}), "listener": "lst-reads"}

    def events(after):
        answer = requests.get(grid.url + "/result", params={**params, "after": after}, headers=headers)
        return answer

    wait_for(lambda: events("0").json()["metadata"]["tasks_in_response"] == 1, timeout=20)
    first = events("0").json()
    ended = first["finished"] + first["failed"]
    assert first["processing"] and ended
    # the cursor after the first entry (its start), so the next read has one entry to give
    entries = grid.redis.xrange(key_for("listener", "lst-reads"))
    _refuse_writes_as_a_full_disk_does(grid)
    try:
        answer = events(entries[0][0].decode())
        assert answer.status_code == 200, answer.text
        assert answer.json()["finished"] + answer.json()["failed"] == ended
        wait_for(lambda: grid.control_plane_stats()["write_refusal"] is not None, timeout=5)  # the TTL sweep saw it
        nothing_new = events(answer.json()["cursor"])
        assert nothing_new.status_code == 507 and "MISCONF" in nothing_new.json()["error"]
    finally:
        _take_writes_again(grid)
    wait_for(lambda: grid.control_plane_stats()["write_refusal"] is None, timeout=5)
    assert events("0").status_code == 200
    figures["bad_inputs"] += 1


@pytest.mark.timeout(90)
def test_a_paused_redis_does_not_cost_healthy_agents_their_leases(make_grid, make_executor, tmp_path, figures):
    """SIGSTOP Redis for longer than a lease: agents cannot heart-beat, and the TTL checker
    must not take their tasks (with retries they would run twice, without they would fail)."""
    grid = make_grid(workers=2)  # heartbeat 0.2 s, lease 1 s
    executor = make_executor(grid)
    log = tmp_path / "log"
    futures = [executor.submit(fault_tasks.logged_sleep_square, str(log), x, 4.0) for x in (1, 2)]
    wait_for(lambda: sum(executions(log).values()) == 2, timeout=30)
    time.sleep(0.5)
    pid = grid.redis_server.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [f.result(timeout=30) for f in futures] == [1, 4]
    assert executions(log) == {1: 1, 2: 1}, "a call ran twice"
    assert grid.control_plane_stats()["ttl_stalls"] >= 1
    figures["redis_pauses"] += 1


def test_secret_files_are_written_owner_only_over_world_readable_ones(make_grid, tmp_path):
    folder = tmp_path / "grid"
    folder.mkdir()
    credentials = folder / "credentials.json"
    credentials.write_text("{}")
    os.chmod(credentials, 0o644)  # left by an older version, or by hand
    grid = make_grid(workers=0, folder=folder)
    assert stat.S_IMODE(os.stat(credentials).st_mode) == 0o600
    assert grid.api_key in credentials.read_text()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.timeout(90)
def test_a_killed_redis_is_restarted_and_the_executor_rides_it_out(make_grid, make_executor, tmp_path, figures):
    """SIGKILL (the OOM killer, in real life) used to leave the grid without Redis for good:
    every pending future failed at the executor's deadline. Now the grid's supervisor restarts
    it on the same port and socket, and it reloads its append-only file."""
    grid = make_grid(workers=2, folder=tmp_path / "grid")
    executor = make_executor(grid, broken_after_sec=15)
    assert executor.submit(fault_tasks.square, 2).result(timeout=30) == 4
    log = tmp_path / "log"
    running = executor.submit(fault_tasks.logged_sleep_square, str(log), 5, 2.0)
    wait_for(lambda: executions(log), timeout=30)
    killed = grid.redis_server.pid
    os.kill(killed, signal.SIGKILL)
    later = [executor.submit(fault_tasks.square, x) for x in range(20)]
    assert [f.result(timeout=40) for f in later] == [x * x for x in range(20)]
    assert running.result(timeout=30) == 25
    assert grid.redis_server.pid != killed and grid.redis_server.running
    figures["redis_restarts"] += 1


BUSY_LOOP = """
local t = redis.call('TIME')
local until_us = (tonumber(t[1]) * 1000000 + tonumber(t[2])) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= until_us
return 1
"""


def test_a_redis_busy_with_a_long_script_is_a_503_that_says_so_and_costs_no_lease(make_grid, make_connector,
                                                                                 figures):
    """BUSY used to be a 500 "internal error" (and a long script let the TTL checker take leases)."""
    grid = make_grid(workers=1)
    sid = make_connector(grid).send([{"n": 1}])["session_id"]
    wait_for(lambda: grid.redis.get(PREFIX + "swept_ms"))  # a sweep to measure the stall from
    grid.redis.config_set("lua-time-limit", 100)  # ms: Redis answers BUSY to others after this
    stalls = grid.control_plane_stats()["ttl_stalls"]
    busy = threading.Thread(target=grid.redis.eval, args=(BUSY_LOOP, 0, 1500))
    busy.start()
    try:
        time.sleep(0.5)
        answer = requests.get(grid.url + "/result", headers={"x-api-key": grid.api_key},
                              params={"submission_content": wire.encode_query({"session_id": sid})})
        assert answer.status_code == 503, answer.text
        assert "busy running a long script" in answer.json()["error"]
    finally:
        busy.join()
        grid.redis.config_set("lua-time-limit", 5000)
    wait_for(lambda: grid.control_plane_stats()["ttl_stalls"] > stalls, timeout=5)  # the sweep after it granted leases
    figures["bad_inputs"] += 1
