"""``executor.share(obj)``: one copy of a large object in the data plane, loaded once per worker
process however many tasks use it (counted in Redis), freed on release and at shutdown."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from executor_tasks import size_and_pid

from htcgrid_executor import wire
from htcgrid_executor.errors import PayloadError
from htcgrid_executor.executor import HTCGridExecutor, SharedHandle

pytestmark = pytest.mark.timeout(90)

T = 30


class _Reads:
    count = 0


@contextlib.contextmanager
def reads_of(grid, key: str) -> Iterator[_Reads]:
    """Count the commands any Redis client sends that name ``key`` (Redis's MONITOR)."""
    reads, ready = _Reads(), threading.Event()
    stop = f"stop-monitoring-{uuid.uuid4()}"

    def watch() -> None:
        with grid.redis.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                text = command["command"]
                if stop in text:
                    return
                if key in text:
                    reads.count += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield reads
    finally:
        grid.redis.exists(stop)
        thread.join(10)


def test_a_map_over_a_shared_object_moves_it_once_per_worker_process(grid):
    with HTCGridExecutor(config=grid.client_config) as executor:
        handle = executor.share(bytes(3_000_000))
        key = wire.shared_key(handle.share_id)
        assert grid.redis.exists(key) == 1
        with reads_of(grid, key) as reads:
            results = list(executor.map(size_and_pid, [handle] * 60, range(60)))
        processes = {pid for _, pid in results}
        assert [size for size, _ in results] == [3_000_000] * 60
        assert 1 <= reads.count <= len(processes) <= 2 + 1  # 2 agents (a runner may be replaced once)
    assert grid.redis.exists(key) == 0  # the executor's shutdown freed it


def test_a_closure_over_a_handle_loads_the_object_and_release_frees_it(grid_executor, grid):
    with grid_executor.share({"offset": 100}) as handle:
        assert isinstance(handle, SharedHandle) and not handle.released

        def add_offset(x):
            return handle["offset"] + x  # in the worker, the handle is the shared dict

        assert list(grid_executor.map(add_offset, [1, 2, 3])) == [101, 102, 103]
        key = wire.shared_key(handle.share_id)
    assert handle.released and grid.redis.exists(key) == 0
    with pytest.raises(PayloadError, match="released"):
        grid_executor.submit(size_and_pid, handle)
    assert grid_executor.submit(size_and_pid, b"abc").result(timeout=T)[0] == 3  # nothing broke


def test_a_task_that_starts_after_its_object_was_released_fails_naming_it(grid_executor, grid):
    handle = grid_executor.share(b"payload")
    grid.redis.delete(wire.shared_key(handle.share_id))  # gone as if another client released it
    exc = grid_executor.submit(size_and_pid, handle).exception(timeout=T)
    assert isinstance(exc, PayloadError) and handle.share_id in str(exc) and "not in the data plane" in str(exc)


def test_an_object_that_cannot_be_shared_raises_at_once(grid_executor):
    with pytest.raises(PayloadError, match="cannot pickle the shared object"):
        grid_executor.share(threading.Lock())
