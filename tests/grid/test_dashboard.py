"""The dashboard in a real headless Chromium, during a running map on the real local grid; its
cancel route; and its refusal of requests without the grid's key."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from itertools import repeat
from pathlib import Path

import pytest
import redis
import requests
from chromium import BINARY, Chromium
from dashboard_tasks import gated

from htcgrid_executor import HTCGridExecutor
from htcgrid_executor.grid import LocalGrid
from htcgrid_executor.grid.dashboard import GridView
from htcgrid_executor.grid.state_table import StateTable

TASKS = 12


@pytest.fixture(scope="module")
def grid() -> Iterator[LocalGrid]:
    # agents claim one task at a time: the grid's processing count is exactly the busy agents
    with LocalGrid(workers=2, claim_batch=1) as local_grid:
        yield local_grid


@pytest.fixture
def running_map(grid: LocalGrid, tmp_path: Path) -> Iterator[tuple[str, HTCGridExecutor, Iterator[int]]]:
    """A map of TASKS calls: call 0 raises at once, the others wait for a gate (opened at the
    end). Yields (session id, executor, results) once both agents run a call and call 0 failed."""
    gate = tmp_path / "gate"
    before = _sessions(grid)
    executor = HTCGridExecutor(config=grid.client_config, batch_window=0.5)  # the map is one session
    try:
        results = executor.map(gated, range(TASKS), repeat(str(gate)))
        sid = _wait(lambda: next(iter(_sessions(grid) - before), None))
        _wait(lambda: _state(grid, sid) if _state(grid, sid)["processing"] == 2 and
              _state(grid, sid)["finished"] == 1 else None)
        yield sid, executor, results
    finally:
        gate.write_text("open")
        executor.shutdown(wait=True, cancel_futures=True)


def _wait(probe, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, "the grid did not get there in time"
        time.sleep(0.05)
    return found


def _sessions(grid: LocalGrid) -> set[str]:
    cursor, found = grid.table.scan_sessions()
    while cursor:
        cursor, more = grid.table.scan_sessions(cursor)
        found += more
    return set(found)


def _state(grid: LocalGrid, sid: str) -> dict[str, int]:
    return grid.table.sessions_overview([sid])[sid]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    if BINARY is None:
        pytest.skip("no Chromium binary on this machine (Debian: apt-get install -y chromium)")
    chromium = Chromium(tmp_path / "profile")
    yield chromium
    chromium.close()


def _texts(selector: str) -> str:
    return f"Array.from(document.querySelectorAll({json.dumps(selector)}), e => e.textContent)"


def test_the_page_shows_a_running_map_and_cancels_it_in_chromium(grid, running_map, browser):
    sid, _, results = running_map
    row = f'tr[data-session="{sid}"]'
    browser.open(grid.dashboard_url)
    # the page draws what it polls; wait until it has seen both agents heart-beat
    browser.wait_for(f"document.querySelector('{row}') && "
                     f"{_texts('td.heartbeat')}.filter(t => t.endsWith('ago')).length == 2")

    # the session: its counts per state and its progress bar
    cells = browser.evaluate(f"Object.fromEntries(Array.from(document.querySelectorAll('{row} td[data-state]'),"
                             " td => [td.dataset.state, td.textContent]))")
    assert cells == {"count": str(TASKS), "pending": str(TASKS - 3), "processing": "2",
                     "finished": "1 (1 raised)", "failed": "0", "cancelled": "0"}  # call 0 raised
    widths = browser.evaluate(f"Array.from(document.querySelectorAll('{row} .bar span'), "
                              "s => parseFloat(s.style.width))")
    # finished, failed, cancelled, running: percent of the session's tasks
    assert widths == pytest.approx([100 / TASKS, 0, 0, 200 / TASKS], abs=0.01)

    # both agents, each running one of the session's calls, with a fresh heartbeat
    assert browser.evaluate("document.querySelectorAll('tr.agent').length") == 2
    held = browser.evaluate(_texts("tr.agent td.tasks"))
    assert sorted(t.rpartition("_")[0] for t in held) == [sid, sid], held

    # the failure: the task, its reason and the remote traceback from the output envelope
    assert browser.evaluate(f"document.querySelector('li.failure[data-task=\"{sid}_0\"]') !== null")
    assert browser.evaluate(_texts("li.failure .reason")) == ["ValueError: bad input 0"]
    traceback = browser.evaluate(_texts("li.failure pre.traceback"))
    assert len(traceback) == 1 and "dashboard_tasks.py" in traceback[0] and "raise ValueError" in traceback[0]
    assert browser.evaluate(_texts("li.failure pre.task-logs")) == ["checking input 0\n"]  # what it printed

    # the throughput chart: one task ended in the last minute, drawn as a bar
    assert browser.evaluate("document.getElementById('chart').dataset.lastMinute") == "1"
    assert browser.evaluate("document.querySelectorAll('#chart svg rect').length") == 1

    # cancel from the page: the first click only arms the button, the second cancels the session
    button = f"document.querySelector('{row} button.cancel')"
    browser.evaluate(f"{button}.click()")
    assert browser.evaluate(f"{button}.textContent") == "confirm cancel"
    assert _state(grid, sid)["cancelled"] == 0
    browser.evaluate(f"{button}.click()")
    _wait(lambda: True if _state(grid, sid)["cancelled"] == TASKS - 1 else None, timeout=10)
    state = _state(grid, sid)
    assert (state["pending"], state["processing"]) == (0, 0)
    browser.wait_for(f"document.querySelector('{row} td[data-state=cancelled]').textContent == '{TASKS - 1}'")
    assert browser.evaluate(f"{button}.hidden")  # nothing left to cancel
    assert f"cancelled {TASKS - 1} tasks" in browser.evaluate("document.getElementById('status').textContent")
    # the agents were told: both are idle again at once, not after the gate
    browser.wait_for(f"{_texts('tr.agent td.tasks')}.every(t => t == 'idle')", timeout=10)

    with pytest.raises(ValueError, match="bad input 0"):  # the map's first call, then it ends
        next(results)


def test_the_cancel_route_cancels_a_running_session_and_refuses_bad_requests(grid, running_map):
    sid, _, results = running_map
    cancel = grid.url + "/dashboard/cancel"
    refused = requests.post(cancel, params={"session": sid}, headers={"x-api-key": "not-the-key"})
    assert refused.status_code == 403
    assert _state(grid, sid)["cancelled"] == 0  # a refused request cancels nothing

    answer = requests.post(cancel, params={"session": sid}, headers={"x-api-key": grid.api_key})
    assert answer.status_code == 200, answer.text
    assert answer.json()[sid] == {"cancelled_pending": TASKS - 3, "cancelled_processing": 2,
                                  "total_cancelled_tasks": TASKS - 1}
    state = _state(grid, sid)
    assert (state["pending"], state["processing"], state["cancelled"]) == (0, 0, TASKS - 1)
    with pytest.raises(ValueError, match="bad input 0"):
        next(results)

    for params, status in (({"session": "no-such-session"}, 404), ({"session": "bad_id"}, 400), ({}, 400)):
        answer = requests.post(cancel, params=params, headers={"x-api-key": grid.api_key})
        assert answer.status_code == status and answer.json()["error"]
    assert requests.get(cancel, params={"session": sid}, headers={"x-api-key": grid.api_key}).status_code == 405


ROUTES = [("GET", "/dashboard"), ("GET", "/dashboard/state"), ("POST", "/dashboard/cancel"),
          ("GET", "/dashboard/anything")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_a_missing_or_wrong_key_is_refused_with_no_data(grid, method, path):
    missing = requests.request(method, grid.url + path, params={"session": "s"})
    assert missing.status_code == 401 and set(missing.json()) == {"error"}
    for params, headers in (({"key": "not-the-key"}, {}), ({}, {"x-api-key": "not-the-key"}),
                            ({"key": grid.api_key}, {"x-api-key": "not-the-key"})):
        wrong = requests.request(method, grid.url + path, params=params | {"session": "s"}, headers=headers)
        assert wrong.status_code == 403 and set(wrong.json()) == {"error"}


def test_the_page_and_its_state_need_the_key_and_keep_it_out_of_the_log(grid, caplog):
    caplog.set_level(logging.DEBUG, logger="htcgrid_executor")
    grid.control_plane_stats()  # the control plane's process takes the new level now, not in 0.5 s
    page = requests.get(grid.dashboard_url)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    state = requests.get(grid.url + "/dashboard/state", headers={"x-api-key": grid.api_key})
    assert state.status_code == 200 and {"sessions", "agents", "throughput", "failures"} <= set(state.json())
    grid.control_plane_stats()  # by its answer, every record the control plane logged is logged here
    assert any("/dashboard" in record.getMessage() for record in caplog.records)  # the request is logged
    assert not any(grid.api_key in record.getMessage() for record in caplog.records)  # its key is not
    # a body is refused (no dashboard route reads one) and the API routes still work afterwards
    with_body = requests.post(grid.url + "/dashboard/cancel", params={"key": grid.api_key, "session": "s"},
                              data=b"x" * 10)
    assert with_body.status_code == 400 and "body" in with_body.json()["error"]
    assert requests.get(grid.url + "/result", headers={"x-api-key": grid.api_key},
                        params={"submission_content": "x"}).status_code == 400


def test_a_task_the_grid_failed_is_listed_with_the_grids_reason(grid, tmp_path):
    before = _sessions(grid)
    with HTCGridExecutor(config=grid.client_config, task_timeout_sec=0.3) as executor:
        future = executor.submit(gated, 1, str(tmp_path / "never-opened"))
        assert future.exception(timeout=30) is not None  # the grid stopped it at its time limit
    [sid] = _sessions(grid) - before

    def failure_shown():  # polled as the page does: an answer may be half a second old
        state = requests.get(grid.url + "/dashboard/state", headers={"x-api-key": grid.api_key}).json()
        return state if any(f["session_id"] == sid for f in state["failures"]) else None

    state = _wait(failure_shown)
    [session] = [s for s in state["sessions"] if s["id"] == sid]
    assert (session["count"], session["failed"]) == (1, 1)
    [failure] = [f for f in state["failures"] if f["session_id"] == sid]
    assert failure["task_id"] == f"{sid}_0"
    assert failure["reason"] == "ran over its time limit of 0.3 s and was stopped"
    assert failure["traceback"] == ""  # the grid's failure: no output, so no traceback


def test_what_the_page_shows_is_read_by_a_redis_user_that_may_not_write(grid, running_map):
    """The dashboard's view of the grid only reads: it works as a Redis user whose ACL refuses
    every write (commands run from its script included), and shows the running map."""
    sid, _, _ = running_map
    grid.redis.acl_setuser("dashboard-reader", enabled=True, passwords=["+reader-secret"], keys=["*"],
                           commands=["-@all", "+@read", "+@connection", "+time", "+scan", "+eval",
                                     "+evalsha", "+script", "+client"])
    reader = redis.Redis(unix_socket_path=grid.redis_server.unix_socket, username="dashboard-reader",
                         password="reader-secret")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):  # the ACL does bite
            reader.set("htcgrid:probe", b"1")
        view = GridView(StateTable(reader)).snapshot()
        [session] = [s for s in view["sessions"] if s["id"] == sid]
        assert (session["processing"], session["finished"], session["raised"]) == (2, 1, 1)
        assert [f["reason"] for f in view["failures"] if f["session_id"] == sid] == ["ValueError: bad input 0"]
        assert sorted(len(agent["tasks"]) for agent in view["agents"]) == [1, 1]
    finally:
        reader.close()
        grid.redis.acl_deluser("dashboard-reader")
