"""Big arguments and results on the real local grid: they round-trip whole (raw, in pieces, read
by the runner), an oversized one fails at once with a PayloadError naming its size and the limit
while the executor runs the next call, the agent keeps its leases meanwhile, and a tampered big
input is refused before anything in it is unpickled. Tens of MB, not hundreds: the suite stays fast.
"""

from __future__ import annotations

import os
import pickle

import fault_tasks
import pytest

from htcgrid_executor import PayloadError, SignatureError
from htcgrid_executor.grid.task_inputs import SMALL_INPUT_BYTES
from htcgrid_executor.payload import SignedPickle
from htcgrid_executor.wire import decode_task, encode_raw, input_key, is_raw

MB = 1024 * 1024


@pytest.mark.timeout(120)
def test_a_big_argument_and_a_big_result_round_trip_whole_within_a_short_lease(make_grid, make_executor,
                                                                              figures):
    """40 MB goes out (over a Redis piece, so written in pieces, and read by the runner itself)
    and comes back; with a one-second lease and no retry allowed, so the agent's heartbeats kept
    its lease all along. A 40 MB argument takes about 40 MB in the data plane: no base64."""
    grid = make_grid(workers=1)
    executor = make_executor(grid, retry_count=0)
    data = os.urandom(40 * MB)
    sizes: list[int] = []
    future = executor.submit(fault_tasks.identity, data)
    (record,) = executor.sessions(timeout=30)
    value = grid.redis.get(input_key(record["task_ids"][0]))
    if value is not None:  # not yet cleaned up after the task: then it is raw, and about the data's size
        assert is_raw(value)
        sizes.append(len(value))
    assert future.result(timeout=90) == data
    assert all(len(data) < size < len(data) + MB for size in sizes)
    assert executor.submit(fault_tasks.square, 7).result(timeout=30) == 49
    figures["tasks_run"] += 2


@pytest.mark.timeout(120)
def test_oversized_arguments_and_results_fail_at_once_and_the_executor_runs_the_next_call(
        make_grid, make_executor, figures):
    grid = make_grid(workers=1)
    limit = 12_000_000
    executor = make_executor(grid, max_payload_bytes=limit)
    before = set(grid.redis.keys("*-input"))
    # 8 MiB of bytes is ~14.9 MB as the JSON wire format counts it (limits mean the same on both formats)
    with pytest.raises(PayloadError, match=r"call to 'identity' is too large for the grid: 14,9\d\d,\d{3} "
                       r"bytes .* over the limit of 12,000,000 bytes \(max_payload_bytes\)"):
        executor.submit(fault_tasks.identity, b"x" * (8 * MB))
    assert set(grid.redis.keys("*-input")) == before  # nothing of it reached Redis
    with pytest.raises(PayloadError, match=r"result of the call is too large for the grid: .* over the "
                       r"limit of 12,000,000 bytes \(max_payload_bytes\)"):
        executor.submit(fault_tasks.return_bytes, 8 * MB).result(timeout=60)
    assert executor.submit(fault_tasks.return_bytes, 6 * MB).result(timeout=60) == b"x" * (6 * MB)
    assert executor.submit(fault_tasks.square, 8).result(timeout=30) == 64
    figures["bad_inputs"] += 2
    figures["tasks_run"] += 2


@pytest.mark.timeout(60)
def test_a_tampered_big_raw_input_is_refused_before_it_is_unpickled(make_grid, make_executor, tmp_path,
                                                                   figures):
    """An input too big to travel through the agent (the runner reads it from Redis): its pickle
    swapped for a trap, its MAC kept. The worker checks the MAC over the raw bytes first."""
    grid = make_grid(workers=0)  # nothing runs until the input has been tampered with
    executor = make_executor(grid)
    trap = tmp_path / "trap"
    future = executor.submit(fault_tasks.identity, b"y" * (2 * SMALL_INPUT_BYTES))
    (record,) = executor.sessions(timeout=30)
    key = input_key(record["task_ids"][0])
    task = decode_task(grid.redis.get(key))
    forged = fault_tasks.Trap(str(trap)), b"z" * (2 * SMALL_INPUT_BYTES)
    task["args"] = SignedPickle(task["args"].mac, pickle.dumps(((forged,), {})))
    grid.redis.set(key, encode_raw(task))
    grid.add_agents(1)
    with pytest.raises(SignatureError, match="refusing to unpickle"):
        future.result(timeout=30)
    assert not trap.exists(), "the forged pickle was loaded"
    assert executor.submit(fault_tasks.square, 9).result(timeout=30) == 81
    figures["tampered_payloads_refused"] += 1
