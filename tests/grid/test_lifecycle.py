"""The task lifecycle on the real local grid: run, fail, retry, cancel, time out, prioritise."""

from __future__ import annotations

import collections
import json
import os
import signal
import time

import pytest
from grid_client import GridClient
from support import FAST, wait_for

from htcgrid_executor import wire
from htcgrid_executor.grid import LocalGrid


def test_tasks_run_and_results_have_the_deployment_shape(client):
    sid = client.submit([{"value": i} for i in range(20)])
    answer = client.wait(sid, 20)
    assert sorted(answer["finished"]) == sorted(wire.task_ids_for(sid, 20))
    assert answer["finished_OUTPUT"] == [wire.OUTPUT_PLACEHOLDER] * 20
    assert answer["failed"] == answer["cancelled"] == []
    assert answer["metadata"] == {"tasks_in_response": 20}
    outputs = client.outputs(sid, answer)
    assert outputs == {f"{sid}_{i}": {"ok": i} for i in range(20)}


def test_a_raising_handler_gives_a_finished_task_with_lambdas_error_document(client):
    sid = client.submit([{"raise": "boom"}])
    answer = client.wait(sid, 1)
    (output,) = client.outputs(sid, answer).values()
    assert output["errorType"] == "ValueError"
    assert output["errorMessage"] == "boom"
    assert any("handlers.py" in line for line in output["stackTrace"])


def test_submitting_the_same_session_twice_runs_its_tasks_once(client, tmp_path):
    log = tmp_path / "runs.log"
    sid = client.submit([{"log": str(log)}, {"log": str(log)}])
    client.submit([{"log": str(log)}, {"log": str(log)}], session_id=sid)  # a retried request
    client.wait(sid, 2)
    time.sleep(0.3)
    assert len(log.read_text().splitlines()) == 2


def test_a_missing_input_finishes_the_task_with_an_error_document(client):
    sid = client.submit([{"value": 1}, {"value": 2}])
    client.wait(sid, 2)
    sid = wire.new_session_id()
    tids = wire.task_ids_for(sid, 1)
    client.grid.redis.set(wire.payload_key(sid), wire.encode_submission(wire.build_submission(sid, tids)))
    client.http.post(client.grid.url + "/submit", params={"submission_content": sid}).raise_for_status()
    answer = client.wait(sid, 1)
    (output,) = client.outputs(sid, answer).values()
    assert output["errorType"] == "Runtime.InputNotFound"


def test_a_long_poll_returns_as_soon_as_a_task_changes(client):
    listener = "listener-long-poll"
    started = time.monotonic()
    sid = client.submit([{"sleep": 0.3}], listener=listener)
    cursor, ended = "0", []
    while not ended:
        answer = client.result(sid, after=cursor, wait_ms=10_000, listener=listener)
        cursor = answer["cursor"]
        ended = answer["finished"]
    assert ended == [f"{sid}_0"]
    assert time.monotonic() - started < 3  # not the 10 s wait


def test_the_listener_reports_processing_then_finished(client):
    listener = "listener-order"
    sid = client.submit([{"sleep": 0.2}], listener=listener)
    seen = []
    cursor = "0"
    while "finished" not in seen:
        answer = client.result(sid, after=cursor, wait_ms=5000, listener=listener)
        cursor = answer["cursor"]
        seen += ["processing"] * len(answer["processing"]) + ["finished"] * len(answer["finished"])
    assert seen == ["processing", "finished"]


def test_a_killed_runner_mid_task_is_retried_and_finishes_once(client, tmp_path):
    log, pidfile, marker = tmp_path / "runs.log", tmp_path / "pid", tmp_path / "marker"
    sid = client.submit([{"log": str(log), "pidfile": str(pidfile), "sleep_unless": str(marker),
                          "sleep": 30, "value": "done"}])
    wait_for(lambda: marker.exists())
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    answer = client.wait(sid, 1)
    assert answer["finished"] == [f"{sid}_0"]
    assert client.outputs(sid, answer) == {f"{sid}_0": {"ok": "done"}}
    assert len(log.read_text().splitlines()) == 2  # the killed attempt and the retry
    events = client.grid.table.read_session_events(sid, None)
    assert [e.state.value for e in events] == ["finished"]  # finished exactly once


def test_a_killed_agent_mid_task_is_noticed_by_the_ttl_checker(client, tmp_path):
    log, pidfile, marker = tmp_path / "runs.log", tmp_path / "pid", tmp_path / "marker"
    sid = client.submit([{"log": str(log), "pidfile": str(pidfile), "sleep_unless": str(marker),
                          "sleep": 30, "value": "survived"}])
    wait_for(lambda: marker.exists())
    runner = int(pidfile.read_text())
    agent = next(pid for pid in client.grid.agent_pids()
                 if str(runner) in open(f"/proc/{pid}/task/{pid}/children").read().split())
    os.kill(agent, signal.SIGKILL)  # the whole agent: no one tells the grid, its lease expires
    answer = client.wait(sid, 1, timeout=20)
    assert client.outputs(sid, answer) == {f"{sid}_0": {"ok": "survived"}}
    wait_for(lambda: not os.path.exists(f"/proc/{runner}"))  # the runner died with its agent
    wait_for(lambda: len(client.grid.agent_pids()) == 2)  # and the grid replaced the agent


def test_a_task_that_keeps_killing_its_worker_fails_with_a_reason(client):
    sid = client.submit([{"exit": 3}], retries=2)
    answer = client.wait(sid, 1)
    assert answer["failed"] == [f"{sid}_0"]
    assert answer["failed_OUTPUT"] == [wire.OUTPUT_PLACEHOLDER]
    (reason,) = answer["failed_reason"]
    assert "runner process died (exit code 3)" in reason
    assert "gave up after 2 retries" in reason


def test_a_task_over_its_time_limit_is_stopped_and_failed(client, tmp_path):
    proof = tmp_path / "ran"
    sid = client.submit([{"sleep": 3, "then_write": str(proof)}], timeout_sec=0.3)
    answer = client.wait(sid, 1)
    assert answer["failed"] == [f"{sid}_0"]
    assert "time limit of 0.3 s" in answer["failed_reason"][0]
    time.sleep(3.2)
    assert not proof.exists()


def test_cancel_stops_running_user_code_and_cancels_pending_tasks(tmp_path):
    with LocalGrid(workers=1, handler="handlers:act", **FAST) as grid:
        client = GridClient(grid)
        proof, marker = tmp_path / "ran", tmp_path / "started"
        sid = client.submit([{"sleep_unless": str(marker), "sleep": 2, "then_write": str(proof)},
                             {"value": "never"}])
        wait_for(lambda: marker.exists())
        runner = grid.runner_pids()
        started = time.monotonic()
        answer = client.cancel([sid])
        assert answer == {sid: {"cancelled_pending": 1, "cancelled_processing": 1,
                                "total_cancelled_tasks": 2}}
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in runner), timeout=1)
        assert time.monotonic() - started < 1
        result = client.wait(sid, 2)
        assert sorted(result["cancelled"]) == sorted(wire.task_ids_for(sid, 2))
        time.sleep(2.2)
        assert not proof.exists()  # the user code never reached its end
        # the agent goes on with the next task, in a new runner
        after = client.submit([{"value": "next"}])
        assert client.outputs(after, client.wait(after, 1)) == {f"{after}_0": {"ok": "next"}}


def test_cancel_by_task_id(client, tmp_path):
    marker = tmp_path / "started"
    sid = client.submit([{"sleep_unless": str(marker), "sleep": 5}, {"value": 1}, {"value": 2}])
    wait_for(lambda: marker.exists())
    answer = client.cancel(tasks=[f"{sid}_0"])
    assert answer["tasks"] == {"cancelled_pending": 0, "cancelled_processing": 1, "total_cancelled_tasks": 1}
    result = client.wait(sid, 3)
    assert result["cancelled"] == [f"{sid}_0"]
    assert sorted(result["finished"]) == [f"{sid}_1", f"{sid}_2"]


def test_cancel_pending_only_leaves_claimed_and_ended_tasks_alone(client, tmp_path):
    # what Future.cancel() asks: cancel what no agent has claimed, and say what it left alone
    busy = client.submit([{"pidfile": str(tmp_path / f"b{i}"), "sleep": 2} for i in range(2)])
    wait_for(lambda: all((tmp_path / f"b{i}").exists() for i in range(2)))  # both agents busy
    done = client.submit([{"value": 0}])
    sid = client.submit([{"value": 1}, {"value": 2}, {"value": 3}])
    answer = client.cancel(tasks=[f"{sid}_0", f"{sid}_2", f"{busy}_1", f"{done}_0", "gone_5"], pending_only=True)
    # done_0 was queued behind the busy ones: still pending, so cancelled with the others
    assert answer["tasks"]["cancelled_pending"] == 3
    assert answer["tasks"]["claimed"] == [f"{busy}_1"]
    assert answer["tasks"]["ended"] == ["gone_5"]
    result = client.wait(sid, 3)
    assert sorted(result["cancelled"]) == [f"{sid}_0", f"{sid}_2"] and result["finished"] == [f"{sid}_1"]
    assert client.wait(busy, 2)["finished"]  # the claimed ones ran to their end
    again = client.cancel(tasks=[f"{sid}_1", f"{sid}_0"], pending_only=True)["tasks"]
    assert again["cancelled_pending"] == 0 and sorted(again["ended"]) == [f"{sid}_0", f"{sid}_1"]


def test_claim_batch_1_makes_each_agent_hold_one_task_at_a_time():
    # what the executor's tests rely on: with claim_batch=1 a task the grid reports processing is
    # the one its agent runs; the claim batch never grows past the setting, even on a deep queue
    # of tasks short enough that an agent would otherwise double its batch after each claim
    with LocalGrid(workers=2, handler="handlers:act", claim_batch=1, **FAST) as grid:
        client = GridClient(grid)
        quick = client.submit([{"value": i} for i in range(40)])
        slow = client.submit([{"sleep": 0.02} for _ in range(10)])
        most = 0  # the most tasks one agent held at once, sampled while they run
        deadline = time.monotonic() + 30
        while (client.result(quick, counts=1)["counts"]["finished"] < 40
               or client.result(slow, counts=1)["counts"]["finished"] < 10):
            assert time.monotonic() < deadline, "the tasks did not finish in time"
            held = collections.Counter(grid.table.processing_owners().values())
            most = max([most, *held.values()])
        assert most <= 1
        wait_for(lambda: sum(s["tasks_claimed"] for s in grid.agent_stats().values()) == 50)
        assert all(s["claims"] == s["tasks_claimed"] for s in grid.agent_stats().values()), grid.agent_stats()


def test_short_tasks_are_claimed_in_batches_and_long_ones_one_at_a_time():
    # a claim costs round trips: 10 ms tasks go several to a claim (about 50 ms of work each),
    # while a task longer than that is claimed alone, so that it stays pending (free for another
    # agent, cancellable as pending) until an agent is ready for it
    with LocalGrid(workers=1, handler="handlers:act", **FAST) as grid:
        client = GridClient(grid)

        def claims() -> tuple[int, int]:
            [stats] = grid.agent_stats().values()
            return stats["claims"], stats["tasks_claimed"]

        short = client.submit([{"sleep": 0.01} for _ in range(60)])
        client.wait(short, 60)
        wait_for(lambda: claims()[1] == 60)
        short_claims = claims()[0]
        assert short_claims <= 40, f"60 tasks of 10 ms took {short_claims} claims"  # one by one: 60
        long = client.submit([{"sleep": 0.12} for _ in range(4)])
        client.wait(long, 4)
        wait_for(lambda: claims()[1] == 64)
        assert claims()[0] - short_claims == 4


def test_higher_priority_sessions_run_first(tmp_path):
    with LocalGrid(workers=1, handler="handlers:act", **FAST) as grid:
        client = GridClient(grid)
        log, marker = tmp_path / "order.log", tmp_path / "started"
        blocker = client.submit([{"sleep_unless": str(marker), "sleep": 0.5}])
        wait_for(lambda: marker.exists())
        low = client.submit([{"log": str(log)}] * 3, priority=0)
        high = client.submit([{"log": str(log)}] * 3, priority=5)
        client.wait(blocker, 1)
        client.wait(low, 3)
        client.wait(high, 3)
        order = [line.split()[0].rsplit("_", 1)[0] for line in log.read_text().splitlines()]
        assert order == [high] * 3 + [low] * 3


def test_a_restarted_grid_on_the_same_folder_keeps_its_tasks(tmp_path):
    folder = tmp_path / "grid"
    with LocalGrid(workers=1, handler="handlers:act", folder=folder, **FAST) as grid:
        client = GridClient(grid)
        done = client.submit([{"value": "before"}])
        client.wait(done, 1)
        marker = tmp_path / "started"
        busy = client.submit([{"sleep_unless": str(marker), "sleep": 30, "value": "busy"}])
        wait_for(lambda: marker.exists())
        waiting = client.submit([{"value": "waiting"}])
        api_key = grid.api_key
    with LocalGrid(workers=1, handler="handlers:act", folder=folder, **FAST) as grid:
        assert grid.api_key == api_key  # clients' credentials stay valid
        client = GridClient(grid)
        assert client.outputs(done, client.result(done)) == {f"{done}_0": {"ok": "before"}}
        assert client.outputs(busy, client.wait(busy, 1)) == {f"{busy}_0": {"ok": "busy"}}
        assert client.outputs(waiting, client.wait(waiting, 1)) == {f"{waiting}_0": {"ok": "waiting"}}
    assert (folder / "credentials.json").stat().st_mode & 0o077 == 0


def test_ended_sessions_are_removed_after_the_retention_period():
    with LocalGrid(workers=1, handler="handlers:act", retention_sec=0.5, **FAST) as grid:
        client = GridClient(grid)
        sid = client.submit([{"value": i} for i in range(3)], listener="retained")
        client.wait(sid, 3)
        wait_for(lambda: not grid.redis.keys(f"*{sid}*"), timeout=5)
        wait_for(lambda: not grid.redis.exists("htcgrid:listener:retained"), timeout=5)


def test_client_config_has_the_deployment_keys(grid):
    config = grid.client_config
    for key in ("grid_storage_service", "s3_bucket", "redis_url", "public_api_gateway_url",
                "private_api_gateway_url", "api_gateway_key", "user_pool_id",
                "cognito_userpool_client_id", "dynamodb_results_pull_interval_sec",
                "task_input_passed_via_external_storage", "region"):
        assert key in config
    assert config["public_api_gateway_url"].startswith("http://127.0.0.1:")
    json.dumps(config)


def test_a_grid_can_use_an_external_redis_that_other_machines_share():
    from htcgrid_executor.grid.redis_server import RedisServer

    with RedisServer() as shared, LocalGrid(workers=1, handler="handlers:act",
                                            redis_url=shared.url, **FAST) as grid:
        assert grid.redis_server is None  # it started none of its own
        client = GridClient(grid)
        sid = client.submit([{"value": "external"}])
        assert client.outputs(sid, client.wait(sid, 1)) == {f"{sid}_0": {"ok": "external"}}
        assert shared.client().exists(f"htcgrid:session:{sid}")


def test_a_stopped_grid_refuses_to_start_again_and_says_what_to_do(tmp_path):
    from htcgrid_executor.grid.local_grid import GridState

    grid = LocalGrid(workers=1, **FAST)
    assert grid.state is GridState.NEW
    grid.start()
    assert grid.start() is grid and grid.state is GridState.RUNNING  # repeatable while it runs
    grid.stop()
    assert grid.state is GridState.STOPPED
    with pytest.raises(RuntimeError, match="make a new one"):
        grid.start()
    grid.stop()  # still idempotent
    assert grid.agent_pids() == []
