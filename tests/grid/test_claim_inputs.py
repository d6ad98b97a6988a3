"""A claim brings the inputs of the tasks it claims: small ones whole, in the claim's own round
trip; bigger ones as their length, for the agent to read them after (as big inputs always were);
missing ones as missing, so the task still fails with ``Runtime.InputNotFound``."""

from __future__ import annotations

import time

from grid_client import GridClient
from support import FAST

from htcgrid_executor import wire
from htcgrid_executor.grid import LocalGrid
from htcgrid_executor.grid.redis_server import GRID_ROLES, RedisServer
from htcgrid_executor.grid.state_table import Claim, StateTable
from htcgrid_executor.grid.task_inputs import INLINE_INPUT_BYTES, SMALL_INPUT_BYTES


def test_a_claim_brings_small_inputs_and_the_length_of_bigger_ones_under_the_agent_role():
    users = {name: (f"pw-{name}", rules) for name, rules in GRID_ROLES.items()}
    with RedisServer(users=users) as server:
        admin = server.client()
        table = StateTable(server.client("agent"))  # the ACL the grid's agents have
        table.heartbeat("agent", [], 60_000)
        table.submit("s", 4)
        small, edge, bigger = b"small", b"e" * 100, b"b" * 101
        for tid, value in zip(wire.task_ids_for("s", 3), (small, edge, bigger), strict=True):
            admin.set(wire.input_key(tid), value)  # s_3 has no input
        claims = table.claim("agent", 4, 60_000, inline_bytes=100)
        assert claims == [Claim("s_0", 0, small, 5), Claim("s_1", 0, edge, 100), Claim("s_2", 0, None, 101),
                          Claim("s_3", 0, None, 0)]
        assert table.task_state("s_0").value == "processing"
        admin.close()


def test_a_claim_without_inline_bytes_brings_only_lengths(redis_client):
    redis_client.flushall()
    table = StateTable(redis_client)
    table.heartbeat("agent", [], 60_000)
    table.submit("t", 1)
    redis_client.set(wire.input_key("t_0"), b"abc")
    assert table.claim("agent", 1, 60_000) == [Claim("t_0", 0, None, 3)]


def test_small_bigger_and_big_inputs_of_one_session_all_reach_their_tasks(client):
    # one with the claim, one read by the agent after it, one read by the runner in pieces
    values = ["s", "m" * (INLINE_INPUT_BYTES + 1), "b" * (SMALL_INPUT_BYTES + 1)]
    sid = client.submit([{"value": v} for v in values])
    answer = client.wait(sid, 3)
    assert client.outputs(sid, answer) == {f"{sid}_{i}": {"ok": v} for i, v in enumerate(values)}


def test_a_task_submitted_while_the_only_agent_is_busy_starts_when_it_is_done():
    # the busy agent's claim emptied the queue, so it waits on the doorbell after its task
    # instead of claiming again: the submit made meanwhile must have rung it (a lost ring
    # would leave the task queued until the agent's one-second wait ends)
    with LocalGrid(workers=1, handler="handlers:act", **FAST) as grid:
        client = GridClient(grid)
        client.wait(client.submit([{"value": 0}]), 1)  # the agent and its runner are up
        for _ in range(3):
            busy = client.submit([{"sleep": 0.3}])
            time.sleep(0.1)  # the agent runs it
            started = time.monotonic()
            client.wait(client.submit([{"value": 1}]), 1)
            assert time.monotonic() - started < 0.2 + 0.6
            client.wait(busy, 1)
