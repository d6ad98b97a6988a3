"""``HTCGridExecutor.map`` on the grid: chunks of calls as tasks, submitted all at once or (with
``buffersize``, as Python 3.14) a bounded number ahead of the results taken, in input order."""

from __future__ import annotations

import collections
import itertools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ._calls import cancel_all
from .codec import check_task_size, make_task, pickle_chunk
from .options import TaskOptions

if TYPE_CHECKING:  # pragma: no cover
    from ._calls import _Call
    from ._view import _Tracker
    from .executor import HTCGridExecutor

__all__: list[str] = []  # private module

T = TypeVar("T")

_ENQUEUE_GROUP = 256  # calls handed to the sender per lock acquisition
_Chunk = list[tuple[Any, ...]]


def check_map_arguments(chunksize: int | None, buffersize: int | None) -> None:
    """The stdlib's checks and messages."""
    if chunksize is not None and chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None and not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be None or > 0")


class _MapCalls:
    """Makes and enqueues the calls of one map: one task per chunk, ``fn`` pickled once. Holds
    no executor (the result iterator must not keep it alive): each method is given it."""

    def __init__(self, executor: HTCGridExecutor, fn: Callable[..., Any], options: TaskOptions,
                 tracker: _Tracker | None) -> None:
        self.fn = fn
        self.key = executor._require_key()
        self.fn_blob = executor._pickle_function(fn, self.key)
        self.options = options
        self.tracker = tracker

    def make(self, executor: HTCGridExecutor, chunk: _Chunk) -> _Call:
        blob = pickle_chunk(self.fn, chunk, self.key, in_memory=True)
        task = make_task(self.fn_blob, blob, mode="map", init_blob=executor._init_blob, scope=executor._scope,
                         limit=executor._max_payload)
        if executor._traits.deployment:
            task["calls"] = len(chunk)  # the guard reports the time per call
        size = check_task_size(task, executor._max_payload, self.fn)
        return executor._new_call(task, size, self.options)

    def enqueue(self, executor: HTCGridExecutor, calls: list[_Call]) -> list[Future[Any]]:
        futures = executor._table.enqueue(calls)
        if self.tracker is not None:
            self.tracker.add(futures)
        return futures

    def submit(self, executor: HTCGridExecutor, chunks: Iterable[_Chunk]) -> collections.deque[Future[Any]]:
        """Submit ``chunks`` in groups; on any error, cancel what was submitted and raise."""
        fs: collections.deque[Future[Any]] = collections.deque()
        try:
            group: list[_Call] = []
            for chunk in chunks:
                group.append(self.make(executor, chunk))
                if len(group) >= _ENQUEUE_GROUP:
                    fs.extend(self.enqueue(executor, group))
                    group = []
            if group:
                fs.extend(self.enqueue(executor, group))
        except BaseException:
            cancel_all(fs)  # do not leave half a map running unseen
            raise
        return fs


def map_on_grid(executor: HTCGridExecutor, options: TaskOptions, tracker: _Tracker | None,
                fn: Callable[..., T], iterables: tuple[Iterable[Any], ...], timeout: float | None,
                chunksize: int | None, buffersize: int | None) -> Iterator[T]:
    """What ``map`` does (see its docstring): submit now, an iterator over the results."""
    check_map_arguments(chunksize, buffersize)
    end_time = None if timeout is None else timeout + time.monotonic()
    executor._table.check_open()
    calls = _MapCalls(executor, fn, options, tracker)
    chunks = _chunks(executor, options, zip(*iterables, strict=False), chunksize, buffersize)
    fs = calls.submit(executor, chunks if buffersize is None else itertools.islice(chunks, buffersize))
    # a weak reference: the iterator must not keep the executor alive (as in Python 3.14)
    return _results(weakref.ref(executor), calls, chunks, fs, buffersize, end_time)


def _chunks(executor: HTCGridExecutor, options: TaskOptions, items: Iterator[tuple[Any, ...]],
            chunksize: int | None, buffersize: int | None) -> Iterator[_Chunk]:
    traits = executor._traits
    if chunksize is None:
        if traits.deployment and buffersize is None:
            everything = list(items)  # submitted at once anyway: its length sizes the chunks
            chunksize = traits.auto_chunksize(len(everything), executor._max_workers, options)
            items = iter(everything)
        else:
            chunksize = traits.auto_chunksize(None, executor._max_workers, options)
    return _batched(items, chunksize)


def _results(executor_ref: Callable[[], HTCGridExecutor | None], calls: _MapCalls, chunks: Iterator[_Chunk],
             fs: collections.deque[Future[Any]], buffersize: int | None, end_time: float | None) -> Iterator[Any]:
    def refill() -> Future[Any] | None:
        executor = executor_ref()
        if executor is None:
            return None
        chunk = next(chunks, None)
        if chunk is None:
            return None
        return calls.enqueue(executor, [calls.make(executor, chunk)])[0]

    try:
        fs.reverse()  # pop() from the right gives input order
        while fs:
            if buffersize:
                future = refill()
                if future is not None:
                    fs.appendleft(future)
            if end_time is None:
                results = _result_or_cancel(fs.pop())
            else:
                results = _result_or_cancel(fs.pop(), end_time - time.monotonic())
            results.reverse()
            while results:
                yield results.pop()
    finally:
        cancel_all(fs)


def _result_or_cancel(future: Future[T], timeout: float | None = None) -> T:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break a reference cycle with the exception in future._exception


def _batched(iterable: Iterator[tuple[Any, ...]], n: int) -> Iterator[_Chunk]:
    # itertools.batched is 3.12+; lists, because the worker gets a list of argument tuples
    while chunk := list(itertools.islice(iterable, n)):
        yield chunk
