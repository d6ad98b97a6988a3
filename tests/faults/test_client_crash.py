"""A client process is SIGKILLed with work on the grid; another process picks its sessions up
(``HTCGridExecutor.attach`` or the connector's ``get_results``) and collects every result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fault_helpers import HERE, data_plane_keys, subprocess_env
from support import wait_for

from htcgrid_executor import BrokenGridExecutor, GridError, HTCGridExecutor
from htcgrid_executor.codec import decode_output


def _crash_a_client(grid, tmp_path, *, quick: int, gated: int, consumed: int):
    """Run crash_client.py, read its session records, SIGKILL it; returns (records, consumed)."""
    config = grid.write_client_config(tmp_path / "client.json")
    gate = tmp_path / "gate"
    client = subprocess.Popen(
        [sys.executable, str(HERE / "crash_client.py"), str(config), str(gate), str(quick), str(gated),
         str(consumed)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        records = json.loads(client.stdout.readline())
        report = json.loads(client.stdout.readline())
    finally:
        client.kill()
        client.wait()
    assert client.returncode == -9
    return records, report["consumed"], gate


def _expected(quick: int, gated: int) -> list:
    return [i * i for i in range(quick)] + [f"gated {i}" for i in range(gated)]


@pytest.mark.timeout(90)
def test_attach_collects_every_result_of_a_killed_client(make_grid, tmp_path, figures):
    grid = make_grid(workers=0)  # nothing runs before the client dies: it has read no result
    quick, gated = 200, 4
    records, _, gate = _crash_a_client(grid, tmp_path, quick=quick, gated=gated, consumed=0)
    figures["clients_killed"] += 1
    grid.add_agents(2)
    gate.write_text("open")
    futures = HTCGridExecutor.attach(records, config=grid.client_config, broken_after_sec=10)
    assert len(futures) == quick + gated
    assert [f.result(timeout=30) for f in futures] == _expected(quick, gated)
    figures["tasks_run"] += quick + gated
    # the attached executor cleans up the collected sessions, as the dead client would have
    wait_for(lambda: not data_plane_keys(grid, [r["session_id"] for r in records]), timeout=10)


@pytest.mark.timeout(90)
def test_the_connector_collects_a_killed_clients_results_by_session_id(make_grid, make_connector, tmp_path,
                                                                         figures):
    grid = make_grid(workers=2)
    quick, gated = 300, 2
    records, consumed, gate = _crash_a_client(grid, tmp_path, quick=quick, gated=gated, consumed=250)
    assert consumed >= 250
    figures["clients_killed"] += 1
    gate.write_text("open")
    connector = make_connector(grid)
    key = grid.payload_signing_key
    values: dict[str, object] = {}
    for record in records:
        answer = connector.get_results(record, timeout_sec=30)
        assert answer["failed"] == answer["cancelled"] == []
        for tid, text in zip(answer["finished"], answer["finished_OUTPUT"], strict=True):
            ok, value = decode_output(text, key)
            assert ok
            values[tid] = value
    ordered = [values[tid] for record in records for tid in record["task_ids"]]
    assert ordered == _expected(quick, gated)
    figures["tasks_run"] += quick + gated


@pytest.mark.timeout(90)
def test_attach_collects_results_the_killed_client_had_already_read(make_grid, tmp_path, figures):
    """The dead client had read most results (and its polls let the grid trim its listener's
    stream): a second client still gets every one of them."""
    grid = make_grid(workers=2)
    quick, gated = 400, 2
    records, consumed, gate = _crash_a_client(grid, tmp_path, quick=quick, gated=gated, consumed=350)
    assert consumed >= 350 and len(records) == 1  # the results it read are in the session attached
    figures["clients_killed"] += 1
    gate.write_text("open")
    futures = HTCGridExecutor.attach(records, config=grid.client_config, broken_after_sec=5)
    assert [f.result(timeout=8) for f in futures] == _expected(quick, gated)
    figures["tasks_run"] += quick + gated


@pytest.mark.timeout(60)
def test_attaching_to_an_unknown_session_fails_fast_with_a_clear_error(make_grid, figures):
    grid = make_grid(workers=1)
    record = {"session_id": "no-such-session", "task_ids": ["no-such-session_0"], "listener": None}
    (future,) = HTCGridExecutor.attach([record], config=grid.client_config, broken_after_sec=15)
    error = future.exception(timeout=4)  # a 404 is an answer: no need to wait for a deadline
    assert isinstance(error, GridError) and not isinstance(error, BrokenGridExecutor)
    assert "unknown session" in str(error)
    figures["bad_inputs"] += 1


@pytest.mark.timeout(60)
def test_attaching_to_an_unknown_session_with_a_listener_does_not_hang(make_grid, figures):
    grid = make_grid(workers=1)
    record = {"session_id": "no-such-session", "task_ids": ["no-such-session_0"],
              "listener": "some-listener"}
    (future,) = HTCGridExecutor.attach([record], config=grid.client_config, broken_after_sec=5)
    error = future.exception(timeout=6)
    assert isinstance(error, GridError) and not isinstance(error, BrokenGridExecutor)
    figures["bad_inputs"] += 1
