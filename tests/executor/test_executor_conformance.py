"""The concurrent.futures contract, run against ProcessPoolExecutor (with Python 3.14's map) to
prove the tests, and against HTCGridExecutor on the real local grid."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    CancelledError,
    Future,
    as_completed,
    wait,
)
from concurrent.futures import TimeoutError as FuturesTimeoutError  # the builtin only since 3.11

import pytest
from executor_tasks import (
    CustomError,
    add,
    fail_on,
    get_initialized,
    initializer,
    kwargs_of,
    raise_custom,
    raise_value_error,
    return_unpicklable,
    sleep_return,
    sleep_then_write,
    square,
    start_and_sleep,
)

pytestmark = pytest.mark.timeout(60)

T = 30  # generous result timeout: a deadlock fails through pytest-timeout, not here


def wait_until(predicate, timeout=10.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def occupy_workers(executor, tmp_path, seconds, count=2):
    """Futures that keep every worker busy, returned once each call has really started."""
    markers = [tmp_path / f"started-{i}" for i in range(count)]
    futures = [executor.submit(start_and_sleep, str(m), seconds, i) for i, m in enumerate(markers)]
    wait_until(lambda: all(m.exists() for m in markers))
    # and known to be running: a grid reports it a moment after the call starts
    wait_until(lambda: all(f.running() for f in futures))
    return futures


# ---------------------------------------------------------------------------------- submit


def test_submit_returns_a_real_future_with_the_result(executor):
    future = executor.submit(square, 7)
    assert isinstance(future, Future)
    assert future.result(timeout=T) == 49
    assert future.done() and not future.running() and not future.cancelled()
    assert future.exception() is None


def test_submit_passes_args_and_kwargs(executor):
    assert executor.submit(add, 1, 2, z=3).result(timeout=T) == 6
    # fn is positional-only: "fn" and "self" are ordinary keyword arguments of the call
    assert executor.submit(kwargs_of, fn=1, self=2).result(timeout=T) == {"fn": 1, "self": 2}


def test_many_submits_each_get_their_own_result(executor):
    futures = [executor.submit(square, i) for i in range(60)]
    assert [f.result(timeout=T) for f in futures] == [i * i for i in range(60)]


def test_exception_keeps_its_type_and_the_remote_traceback(executor):
    future = executor.submit(raise_value_error, "bad input")
    exc = future.exception(timeout=T)
    assert type(exc) is ValueError and str(exc) == "bad input"
    assert type(exc.__cause__).__name__ == "_RemoteTraceback"
    assert "raise_value_error" in str(exc.__cause__) and "Traceback" in str(exc.__cause__)
    with pytest.raises(ValueError, match="bad input") as info:
        future.result()
    assert info.value.__cause__ is exc.__cause__


def test_exception_with_state_travels_as_itself(executor):
    exc = executor.submit(raise_custom, 42).exception(timeout=T)
    assert isinstance(exc, CustomError) and exc.code == 42


def test_unpicklable_result_becomes_the_futures_exception(executor):
    with pytest.raises(Exception, match="pickle"):
        executor.submit(return_unpicklable).result(timeout=T)
    assert executor.submit(square, 3).result(timeout=T) == 9  # still usable


def test_result_and_exception_time_out(executor):
    future = executor.submit(sleep_return, 1.0, "late")
    with pytest.raises(FuturesTimeoutError):
        future.result(timeout=0.05)
    with pytest.raises(FuturesTimeoutError):
        future.exception(timeout=0.05)
    assert future.result(timeout=T) == "late"


def test_running_while_it_runs_then_done(executor, tmp_path):
    marker = tmp_path / "started"
    future = executor.submit(start_and_sleep, str(marker), 0.8, "v")
    wait_until(marker.exists)
    wait_until(future.running)
    assert not future.done()
    assert future.result(timeout=T) == "v"
    assert future.done() and not future.running()


# ---------------------------------------------------------------------------------- callbacks


def test_done_callback_runs_once_with_the_future(executor):
    seen: list[Future] = []
    event = threading.Event()

    def callback(f):
        seen.append(f)
        event.set()

    future = executor.submit(sleep_return, 0.2, 1)
    future.add_done_callback(callback)
    assert future.result(timeout=T) == 1
    assert event.wait(T)
    time.sleep(0.05)
    assert seen == [future]


def test_callback_added_after_done_runs_at_once(executor):
    future = executor.submit(square, 2)
    future.result(timeout=T)
    seen = []
    future.add_done_callback(seen.append)
    assert seen == [future]


def test_a_raising_callback_breaks_nothing(executor):
    def bad(_):
        raise RuntimeError("callback failure")

    first = executor.submit(square, 2)
    first.add_done_callback(bad)
    assert first.result(timeout=T) == 4
    assert executor.submit(square, 3).result(timeout=T) == 9


def test_callback_may_submit_more_work(executor):
    chained: list[Future] = []
    event = threading.Event()

    def callback(f):
        chained.append(executor.submit(square, f.result()))
        event.set()

    executor.submit(square, 3).add_done_callback(callback)
    assert event.wait(T)
    assert chained[0].result(timeout=T) == 81


# ---------------------------------------------------------------------------------- wait / as_completed


def test_wait_all_completed(executor):
    futures = [executor.submit(square, i) for i in range(10)]
    done, not_done = wait(futures, timeout=T, return_when=ALL_COMPLETED)
    assert done == set(futures) and not not_done


def test_wait_first_completed(executor):
    slow = executor.submit(sleep_return, 1.5, "slow")
    fast = executor.submit(square, 4)
    done, not_done = wait([slow, fast], timeout=T, return_when=FIRST_COMPLETED)
    assert fast in done and slow in not_done


def test_wait_first_exception(executor):
    slow = executor.submit(sleep_return, 1.5, "slow")
    bad = executor.submit(raise_value_error)
    done, not_done = wait([slow, bad], timeout=T, return_when=FIRST_EXCEPTION)
    assert bad in done and slow in not_done


def test_wait_times_out(executor):
    slow = executor.submit(sleep_return, 1.0)
    done, not_done = wait([slow], timeout=0.05)
    assert not done and not_done == {slow}


def test_as_completed_yields_in_completion_order(executor):
    slow = executor.submit(sleep_return, 1.0, "slow")
    fast = executor.submit(sleep_return, 0.0, "fast")
    order = [f.result() for f in as_completed([slow, fast], timeout=T)]
    assert order == ["fast", "slow"]


def test_as_completed_times_out(executor):
    slow = executor.submit(sleep_return, 1.0)
    with pytest.raises(FuturesTimeoutError):
        for _ in as_completed([slow], timeout=0.05):
            pass


# ---------------------------------------------------------------------------------- map


def test_map_in_input_order(executor):
    assert list(executor.map(square, range(30))) == [i * i for i in range(30)]


def test_map_over_several_iterables_stops_at_the_shortest(executor):
    assert list(executor.map(add, range(5), range(10, 13))) == [10, 12, 14]


def test_map_of_nothing(executor):
    assert list(executor.map(square, [])) == []
    assert list(executor.map(square)) == []


@pytest.mark.parametrize("chunksize", [1, 3, 7, 100])
def test_map_chunksize(executor, chunksize):
    assert list(executor.map(square, range(25), chunksize=chunksize)) == [i * i for i in range(25)]


def test_map_rejects_a_bad_chunksize(executor):
    with pytest.raises(ValueError):
        executor.map(square, range(3), chunksize=0)


@pytest.mark.parametrize(("chunksize", "before"), [(1, [0, 1, 2, 3, 4]), (3, [0, 1, 2])])
def test_map_raises_the_first_exception_in_order(executor, chunksize, before):
    got = []
    with pytest.raises(KeyError):
        for value in executor.map(fail_on, range(10), itertools.repeat(5), chunksize=chunksize):
            got.append(value)
    assert got == before


def test_map_consumes_its_input_eagerly_without_buffersize(executor):
    pulled = []

    def source():
        for i in range(8):
            pulled.append(i)
            yield i

    iterator = executor.map(square, source())
    assert pulled == list(range(8))  # all submitted before map() returned
    assert list(iterator) == [i * i for i in range(8)]


def test_map_timeout_raises_and_cancels_what_has_not_run(executor, tmp_path):
    paths = [tmp_path / f"out-{i}" for i in range(8)]
    iterator = executor.map(sleep_then_write, [str(p) for p in paths], [0.6] * 8, timeout=0.2)
    with pytest.raises(FuturesTimeoutError):
        next(iterator)
    time.sleep(2.0)  # two rounds of two workers would have written four files by now
    assert not paths[-1].exists() and not paths[-2].exists()
    # what had started: a process pool also runs what sits in its call queue (2 workers + 3)
    assert sum(p.exists() for p in paths) <= 5


def test_map_after_a_timeout_with_results_ready(executor):
    assert list(executor.map(square, range(5), timeout=T)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize(("buffersize", "chunksize"), [(1, 1), (4, 1), (3, 2)])
def test_map_buffersize_bounds_what_is_taken_from_the_input(executor, buffersize, chunksize):
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield i

    iterator = executor.map(square, endless(), buffersize=buffersize, chunksize=chunksize)
    assert len(pulled) == buffersize * chunksize  # only the first tasks before any result
    taken = list(itertools.islice(iterator, 10))
    assert taken == [i * i for i in range(10)]
    chunks_taken = -(-10 // chunksize)
    # one task more is submitted each time a task's results are taken (Python 3.14 semantics)
    assert len(pulled) == (buffersize + chunks_taken) * chunksize
    iterator.close()


def test_map_buffersize_gives_every_result(executor):
    assert list(executor.map(add, range(40), range(40), buffersize=5, chunksize=3)) == [2 * i for i in range(40)]


@pytest.mark.parametrize(("buffersize", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_map_rejects_a_bad_buffersize(executor, buffersize, error):
    with pytest.raises(error):
        executor.map(square, range(3), buffersize=buffersize)


def test_map_buffersize_with_a_timeout(executor):
    iterator = executor.map(sleep_return, [2.0] * 3, buffersize=2, timeout=0.2)
    with pytest.raises(FuturesTimeoutError):
        next(iterator)


# ---------------------------------------------------------------------------------- cancel


def test_cancel_a_pending_future(executor, tmp_path):
    blockers = occupy_workers(executor, tmp_path, 0.8)
    queued = [executor.submit(square, i) for i in range(4)]
    last = queued[-1]
    seen = []
    last.add_done_callback(seen.append)
    assert last.cancel()
    assert last.cancelled() and last.done() and not last.running()
    assert last.cancel()  # cancelling again still says cancelled
    with pytest.raises(CancelledError):
        last.result(timeout=0)
    with pytest.raises(CancelledError):
        last.exception(timeout=0)
    assert seen == [last]
    # a process pool notifies wait() and as_completed() once its manager reaches the item
    done, _ = wait([last], timeout=T)
    assert done == {last}
    assert list(as_completed([last], timeout=T)) == [last]
    assert [f.result(timeout=T) for f in blockers] == [0, 1]
    assert [f.result(timeout=T) for f in queued[:-1] if not f.cancelled()] == [i * i for i in range(3)][
        : sum(not f.cancelled() for f in queued[:-1])]


def test_cancel_a_running_future_fails(executor, tmp_path):
    marker = tmp_path / "started"
    future = executor.submit(start_and_sleep, str(marker), 0.5, "ran")
    wait_until(marker.exists)
    wait_until(future.running)
    assert not future.cancel()
    assert future.result(timeout=T) == "ran"


def test_cancel_a_done_future_fails(executor):
    future = executor.submit(square, 5)
    future.result(timeout=T)
    assert not future.cancel() and not future.cancelled()


# ---------------------------------------------------------------------------------- shutdown


def test_shutdown_wait_waits_for_pending_work(executor):
    futures = [executor.submit(sleep_return, 0.3, i) for i in range(3)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2]


def test_shutdown_without_wait_still_finishes_the_work(executor):
    futures = [executor.submit(sleep_return, 0.2, i) for i in range(3)]
    executor.shutdown(wait=False)
    assert [f.result(timeout=T) for f in futures] == [0, 1, 2]


def test_shutdown_cancel_futures_cancels_what_has_not_started(executor, tmp_path):
    blockers = occupy_workers(executor, tmp_path, 0.6)
    queued = [executor.submit(square, i) for i in range(6)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert [f.result() for f in blockers] == [0, 1]
    assert all(f.done() for f in queued)
    assert queued[-1].cancelled()
    for f in queued:
        if not f.cancelled():
            assert f.result() == queued.index(f) ** 2


def test_shutdown_is_repeatable(executor):
    assert executor.submit(square, 2).result(timeout=T) == 4
    executor.shutdown()
    executor.shutdown()
    executor.shutdown(wait=False)
    executor.shutdown(cancel_futures=True)


# CPython 3.11's ProcessPoolExecutor.shutdown is not safe against concurrent calls (a second
# call may close the result queue again: OSError in that thread); the futures are still right.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_shutdown_from_many_threads_at_once(executor):
    futures = [executor.submit(sleep_return, 0.1, i) for i in range(4)]
    threads = [threading.Thread(target=executor.shutdown) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


def test_submit_and_map_after_shutdown_raise(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(square, 1)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(square, range(3))


def test_context_manager_waits_on_exit(make_executor):
    with make_executor() as executor:
        future = executor.submit(sleep_return, 0.3, "done")
    assert future.done() and future.result() == "done"
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)


# ---------------------------------------------------------------------------------- threads, asyncio


def test_futures_from_several_threads(executor):
    results: dict[int, list[int]] = {}

    def worker(n):
        futures = [executor.submit(add, n, i) for i in range(25)]
        results[n] = [f.result(timeout=T) for f in futures]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert results == {n: [n + i for i in range(25)] for n in range(8)}


def test_asyncio_wrap_future(executor):
    async def main():
        loop = asyncio.get_running_loop()
        one = await asyncio.wrap_future(executor.submit(square, 6))
        many = await asyncio.gather(*(asyncio.wrap_future(executor.submit(square, i)) for i in range(10)))
        in_executor = await loop.run_in_executor(executor, square, 9)
        with pytest.raises(ValueError, match="async boom"):
            await asyncio.wrap_future(executor.submit(raise_value_error, "async boom"))
        return one, many, in_executor

    one, many, in_executor = asyncio.run(main())
    assert one == 36 and many == [i * i for i in range(10)] and in_executor == 81


# ---------------------------------------------------------------------------------- arguments


def test_initializer_runs_before_the_calls(make_executor):
    executor = make_executor(initializer=initializer, initargs=("ready",))
    results = [executor.submit(get_initialized).result(timeout=T) for _ in range(6)]
    assert {value for value, _ in results} == {"ready"}
    assert {count for _, count in results} == {1}  # once per worker process


def test_bad_constructor_arguments_are_refused(executor_kind):
    from stdlib_reference import ReferenceProcessPoolExecutor

    from htcgrid_executor.executor import HTCGridExecutor

    cls = ReferenceProcessPoolExecutor if executor_kind == "process" else HTCGridExecutor
    with pytest.raises(ValueError):
        cls(max_workers=0)
    with pytest.raises(TypeError):
        cls(max_workers=1, initializer="not callable")
    # ProcessPoolExecutor takes max_tasks_per_child since 3.11 (before: an unknown keyword);
    # HTCGridExecutor takes it on every Python and checks it as 3.11's stdlib does
    stdlib_has_it = executor_kind != "process" or sys.version_info >= (3, 11)
    with pytest.raises(TypeError):
        cls(max_workers=1, max_tasks_per_child="3")
    with pytest.raises(ValueError if stdlib_has_it else TypeError):
        cls(max_workers=1, max_tasks_per_child=0)
