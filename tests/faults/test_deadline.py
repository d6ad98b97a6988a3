"""``broken_after_sec`` is a deadline (issue 14): on a grid that is gone for good, every path of
the executor (sending, the poller's polls and result reads, cancelling, shutting down) answers
each pending future with ``BrokenGridExecutor`` within ``broken_after_sec`` plus a small margin,
and leaves no executor thread behind, however the grid is gone: stopped, a port that accepts
and never answers, an API that answers 503 for ever, a Redis that refuses connections or
swallows requests. The layers under the executor (HTTP retries, Redis' own retries, socket
timeouts) spend that one budget instead of stacking their own on top of it.

Each test measures from the moment the fault is made: the bound ``B + MARGIN`` is the
behaviour under test (a semantic deadline), not a speed goal."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait
from urllib.parse import urlsplit

import fault_tasks
import pytest
from fault_proxy import FaultProxy
from support import wait_for

from htcgrid_executor import BrokenGridExecutor, HTCGridExecutor, wire
from htcgrid_executor.grid.routes import MAX_INLINE_VALUE_BYTES

B = 2.0  # broken_after_sec of these tests
MARGIN = 1.5  # what may pass after B: the last try's clean-up, the threads' reaction, a loaded machine


@pytest.fixture
def proxied(make_grid):
    """``proxied()``: a :class:`FaultProxy` in front of a started grid's control plane (``http``)
    and one in front of its Redis (``redis``), and an executor with ``broken_after_sec=B`` that
    reaches the grid through both and has had one call there and back (connections open, the
    grid known to answer)."""
    proxies: list[FaultProxy] = []
    executors: list[HTCGridExecutor] = []

    def make() -> tuple[FaultProxy, FaultProxy, HTCGridExecutor]:
        grid = make_grid(workers=1)
        config = dict(grid.client_config)
        api, redis_url = urlsplit(config["public_api_gateway_url"]), urlsplit(config["redis_url"])
        http, redis = FaultProxy((api.hostname, api.port)), FaultProxy((redis_url.hostname, redis_url.port))
        proxies.extend((http, redis))
        config["public_api_gateway_url"] = config["private_api_gateway_url"] = f"http://127.0.0.1:{http.port}"
        config["redis_url"] = config["redis_url"].replace(f":{redis_url.port}/", f":{redis.port}/")
        executor = HTCGridExecutor(config=config, broken_after_sec=B)
        executors.append(executor)
        _warm(executor)
        return http, redis, executor

    yield make
    for executor in executors:  # a test that failed early: its threads end by the deadline too
        executor.shutdown(wait=True, cancel_futures=True)
    for proxy in proxies:
        proxy.close()


def _warm(executor: HTCGridExecutor) -> None:
    """One call there and back: the connections are open, the grid known to answer."""
    assert executor.submit(fault_tasks.square, 2).result(timeout=30) == 4


def _executor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("htcgrid-sender", "htcgrid-poller")]


def _assert_broken_by_the_deadline(futures, fault_at: float) -> None:
    done, not_done = wait(futures, timeout=B + MARGIN + 30)
    took = time.monotonic() - fault_at
    assert not not_done, f"futures left waiting {took:.1f} s after the grid went"
    assert took < B + MARGIN, f"answered {took:.1f} s after the grid went, broken_after_sec={B}"
    for future in futures:
        assert isinstance(future.exception(), BrokenGridExecutor), future.exception()


def _assert_threads_end(executor: HTCGridExecutor, fault_at: float) -> None:
    executor.shutdown(wait=True)
    took = time.monotonic() - fault_at
    assert took < B + MARGIN, f"shutdown took until {took:.1f} s after the grid went"
    assert not _executor_threads()


@pytest.mark.timeout(60)
def test_a_send_to_an_api_that_answers_503_for_ever_fails_by_the_deadline(proxied):
    http, _, executor = proxied()  # its warm-up call collected: only the sender has work from here on
    fault_at = time.monotonic()
    http.http_503()
    unsent = [executor.submit(fault_tasks.square, i) for i in range(3)]
    _assert_broken_by_the_deadline(unsent, fault_at)
    with pytest.raises(BrokenGridExecutor):
        executor.submit(fault_tasks.square, 4)
    _assert_threads_end(executor, fault_at)


@pytest.mark.timeout(60)
def test_a_send_to_a_silent_redis_fails_by_the_deadline(proxied):
    _, redis, executor = proxied()
    fault_at = time.monotonic()
    redis.silence()  # the inputs' write is accepted and never answered (socket timeout: 30 s)
    # an input too big to go in the body of /submit: the sender writes it to the data plane
    unsent = executor.submit(fault_tasks.identity, b"x" * (wire.INLINE_SUBMIT_BYTES + 1000))
    _assert_broken_by_the_deadline([unsent], fault_at)
    _assert_threads_end(executor, fault_at)


@pytest.mark.timeout(60)
def test_polls_of_a_silent_control_plane_fail_by_the_deadline(proxied, tmp_path):
    http, _, executor = proxied()
    sent = [executor.submit(fault_tasks.wait_for_file, str(tmp_path / "gate"), i) for i in range(2)]
    executor.sessions(timeout=30)
    fault_at = time.monotonic()
    http.silence()  # connections accepted, requests swallowed: a long poll's read would wait 40 s
    _assert_broken_by_the_deadline(sent, fault_at)
    _assert_threads_end(executor, fault_at)


@pytest.mark.timeout(60)
def test_result_reads_from_a_silent_redis_fail_by_the_deadline(proxied, tmp_path):
    _, redis, executor = proxied()
    gate = tmp_path / "gate"
    # an output too big for the grid to inline in its /result answer: the poller must read it
    # from the data plane (a small one would come with the answer, past the silent Redis)
    big = b"x" * (MAX_INLINE_VALUE_BYTES + 1000)
    future = executor.submit(fault_tasks.wait_for_file, str(gate), big)
    wait_for(future.running, timeout=30)
    fault_at = time.monotonic()
    redis.silence()
    gate.write_text("open")  # the task ends; the poller hears so and must read its output
    _assert_broken_by_the_deadline([future], fault_at)
    _assert_threads_end(executor, fault_at)


@pytest.mark.timeout(60)
def test_a_cancel_on_a_silent_control_plane_leaves_nothing_hanging(proxied, tmp_path):
    http, _, executor = proxied()
    gate = str(tmp_path / "gate")
    running = executor.submit(fault_tasks.wait_for_file, gate, 0)
    wait_for(running.running, timeout=30)
    queued = [executor.submit(fault_tasks.wait_for_file, gate, i) for i in (1, 2)]
    executor.sessions(timeout=30)
    fault_at = time.monotonic()
    http.silence()
    # cancel() True must mean "never runs", which only the grid can say: on a grid that does not
    # answer, cancel() gives up by the deadline and says False (the call may yet run there)
    assert not queued[0].cancel()
    took = time.monotonic() - fault_at
    assert took < B + MARGIN, f"cancel() took {took:.1f} s on a silent grid, broken_after_sec={B}"
    _assert_broken_by_the_deadline([running, *queued], fault_at)
    _assert_threads_end(executor, fault_at)


@pytest.mark.timeout(60)
def test_shutdown_on_a_stopped_grid_returns_by_the_deadline(make_grid, tmp_path):
    grid = make_grid(workers=1)
    executor = HTCGridExecutor(config=grid.client_config, broken_after_sec=B)
    _warm(executor)
    gate = str(tmp_path / "gate")
    running = executor.submit(fault_tasks.wait_for_file, gate, 0)
    wait_for(running.running, timeout=30)
    queued = executor.submit(fault_tasks.wait_for_file, gate, 1)
    executor.sessions(timeout=30)
    fault_at = time.monotonic()
    grid.stop()  # under the live executor: its port and its Redis are gone
    # the session's cancel, then the clean-ups, each to a grid that refuses connections
    executor.shutdown(wait=True, cancel_futures=True, kill_running=True)
    took = time.monotonic() - fault_at
    assert took < B + MARGIN, f"shutdown took {took:.1f} s on a stopped grid, broken_after_sec={B}"
    assert not _executor_threads()
    # no grid to say the queued call never runs: it is not called cancelled, it failed with the grid
    assert not queued.cancelled() and isinstance(queued.exception(timeout=0), BrokenGridExecutor)
    assert isinstance(running.exception(timeout=0), BrokenGridExecutor)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                        (float("nan"), ValueError), ("10", TypeError), (True, TypeError)])
def test_a_deadline_that_is_not_a_positive_number_of_seconds_is_refused(bad, error):
    # refused before any grid is started or contacted, naming the argument
    with pytest.raises(error, match="broken_after_sec"):
        HTCGridExecutor(config={}, broken_after_sec=bad)
