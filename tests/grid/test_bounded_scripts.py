"""Issue 14: no state-table script holds Redis long, whatever the size of a submit or a cancel.

A big submit or session cancel is a series of scripts of at most ``SUBMIT_CHUNK`` /
``CANCEL_CHUNK`` tasks; these tests check that other clients are served meanwhile (no BUSY) and
that the chunks keep what a user relies on: every task queued once, a failed submit completed by
its retry, every task of a cancelled session cancelled once and none claimed or finished while
the cancel walks the session.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FAST, wait_for

from htcgrid_executor import wire
from htcgrid_executor.grid import LocalGrid, state_table
from htcgrid_executor.grid.state_table import StateTable
from htcgrid_executor.grid.state_table import _key_for as key_for

BIG = 100_000  # one script for this many tasks held Redis 0.3-0.5 s (submit), 0.6-1.1 s (cancel)


class _BusyProbe:
    """Another client of the grid's Redis: a GET every few ms, counting BUSY answers."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.busy = 0
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.get(key_for("swept_ms"))
                self.reads += 1
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("BUSY"):
                    raise
                self.busy += 1
            time.sleep(0.002)

    def __enter__(self) -> _BusyProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(120)
def test_a_big_submit_and_cancel_never_make_another_client_see_busy(tmp_path):
    with LocalGrid(workers=2, handler="handlers:act", **FAST) as grid:
        http = requests.Session()
        http.headers["x-api-key"] = grid.api_key
        # two healthy agents each run a long task through the big submit and cancel
        log = tmp_path / "log"
        long_sid = wire.new_session_id()
        long_tids = wire.task_ids_for(long_sid, 2)
        for tid in long_tids:
            grid.redis.set(wire.input_key(tid), wire.encode_task({"log": str(log), "sleep": 6}))
        _post_submit(grid, http, long_sid, long_tids)
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2, timeout=30)

        big_sid = wire.new_session_id()
        big_tids = wire.task_ids_for(big_sid, BIG)  # no inputs: nothing claims them before the cancel
        admin = redis.Redis(unix_socket_path=grid.redis_server.unix_socket, password=grid.redis_server.password)
        admin.config_set("lua-time-limit", 400)  # ms: past it, Redis answers BUSY to every other client
        try:
            with _BusyProbe(admin) as probe:
                _post_submit(grid, http, big_sid, big_tids)
                answer = http.post(grid.url + "/cancel", params={"submission_content": wire.encode_query(
                    {"session_ids_to_cancel": [big_sid]})})
                # the long tasks end; the agents' next claims skip the cancelled entries queued
                wait_for(lambda: not admin.exists(key_for("queue", "0")), timeout=60)
        finally:
            admin.config_set("lua-time-limit", 5000)
            admin.close()
        assert answer.status_code == 200, answer.text
        assert answer.json()[big_sid]["total_cancelled_tasks"] == BIG
        assert probe.busy == 0 and probe.reads > 10, f"{probe.busy} BUSY answers in {probe.reads} reads"

        table = StateTable(grid.redis)
        ended = Counter(e.task_id for e in table.read_session_events(big_sid, None, count=2 * BIG))
        assert len(ended) == BIG and set(ended.values()) == {1}, "a task ended twice, or not at all"
        info = table.session_info(big_sid)
        assert (info["cancelled"], info["pending"], info["processing"]) == (BIG, 0, 0)
        # the long tasks kept their leases: each ran once and finished
        wait_for(lambda: table.session_info(long_sid)["finished"] == 2, timeout=30)
        assert len(log.read_text().splitlines()) == 2, "a task ran twice"


def _post_submit(grid: LocalGrid, http: requests.Session, sid: str, tids: list[str]) -> None:
    grid.redis.set(wire.payload_key(sid), wire.encode_submission(wire.build_submission(sid, tids)))
    answer = http.post(grid.url + "/submit", params={"submission_content": sid})
    assert answer.status_code == 200, answer.text
    assert answer.json()["task_ids"] == tids


# -- the chunks' boundaries, on a bare Redis -------------------------------------------------------
@pytest.fixture
def table(redis_client):
    redis_client.flushall()
    return StateTable(redis_client)


def _queued(client: redis.Redis) -> list[str]:
    return [t.decode() for t in client.lrange(key_for("queue", "0"), 0, -1)]


def _ended(table: StateTable, sid: str) -> Counter[str]:
    return Counter(e.task_id for e in table.read_session_events(sid, None) if e.state.value == "cancelled")


@pytest.mark.parametrize("extra", [-1, 0, 1, state_table.SUBMIT_CHUNK])
def test_a_submit_of_about_a_chunk_queues_every_task_once(table, extra):
    count = state_table.SUBMIT_CHUNK + extra
    assert table.submit("s", count)
    assert not table.submit("s", count)  # repeated: nothing twice
    assert _queued(table.redis) == wire.task_ids_for("s", count)
    assert table.session_info("s")["pending"] == count
    assert table.cancel_sessions(["s"])["s"]["cancelled_pending"] == count
    assert table.cancel_sessions(["s"])["s"]["total_cancelled_tasks"] == 0
    assert set(_ended(table, "s").values()) == {1} and len(_ended(table, "s")) == count
    assert table.redis.hget(key_for("session", "s"), "remaining") == b"0"


def _submit_chunk(table: StateTable, sid: str, count: int, chunk: int) -> int:
    """One call of the submit script, as a submit does it: what a submit failing after it left."""
    return table._run("submit", sid, count, 0, 5, 0, "", chunk)[1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(1, 12), chunk=st.integers(1, 5), stopped_after=st.integers(1, 3),
       claimed_first=st.integers(0, 4), claims=st.lists(st.integers(1, 3), max_size=4),
       cancel_before_retry=st.booleans())
def test_chunked_submits_and_cancels_keep_every_task_once(table, count, chunk, stopped_after, claimed_first,
                                                           claims, cancel_before_retry):
    """A submit that stopped after some chunks (a Redis failure) is completed by its retry, or
    stopped by a cancel. A cancel walked chunk by chunk acts as one step: between its chunks no
    task of the session is claimed or finished (an agent claims another session's), each task
    is cancelled once, and the agents running some are told."""
    table.redis.flushall()
    table.heartbeat("agent", [], 60_000)
    for _ in range(stopped_after):
        _submit_chunk(table, "s", count, chunk)
    if not cancel_before_retry:
        table.submit("s", count + 7)  # the retry: the session's own count wins
        assert _queued(table.redis) == wire.task_ids_for("s", count)
    running = {c.task_id for c in table.claim("agent", claimed_first, 60_000)} if claimed_first else set()
    table.submit("other", 20)
    start, cancelled, moves = 0, Counter(), list(claims)
    while start >= 0:
        pending, processing, start = table._run("cancel", "session", "s", start, chunk)
        cancelled.update(pending=pending, processing=processing)
        if moves:  # between two chunks of the walk, an agent claims and finishes what it runs
            claimed = {c.task_id for c in table.claim("agent", moves.pop(), 60_000)}
            assert all(t.startswith("other_") for t in claimed)
            assert table.complete("agent", {t: b"out" for t in running}) == []
    if cancel_before_retry:
        table.submit("s", count)  # too late: the cancel stopped this submit
    assert sum(cancelled.values()) == count
    ended = _ended(table, "s")
    assert sorted(ended) == sorted(wire.task_ids_for("s", count)) and set(ended.values()) == {1}
    told = {t.decode() for t in table.redis.lrange(key_for("agent_cancelled", "agent"), 0, -1)}
    assert told == running and cancelled["processing"] == len(running)
    assert table.session_info("s")["cancelled"] == count
    assert table.cancel_sessions(["s"])["s"]["total_cancelled_tasks"] == 0  # repeated: none twice


def test_a_claim_behind_many_cancelled_entries_still_finds_the_next_task(table):
    count = 2 * state_table.CLAIM_LOOK + 1
    table.heartbeat("agent", [], 60_000)
    table.submit("dead", count)
    table.cancel_tasks(wire.task_ids_for("dead", count))
    table.submit("live", 1)
    assert [c.task_id for c in table.claim("agent", 1, 60_000)] == ["live_0"]
    assert table.claim("agent", 1, 60_000) == []
