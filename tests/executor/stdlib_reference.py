"""ProcessPoolExecutor with Python 3.14's ``map`` (``buffersize``), to prove the conformance tests.

On Python 3.14 and later this is the stdlib's own class. Before, ``map`` is CPython 3.14's
``Executor.map`` and ``ProcessPoolExecutor.map`` (Lib/concurrent/futures/_base.py, process.py),
copied with two changes: ``itertools.batched`` (3.12+) is replaced by an ``islice`` loop, and the
executor is looked up through its weak reference without keeping it in a local across ``yield``.
"""

from __future__ import annotations

import collections
import itertools
import sys
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import process as _process
from concurrent.futures._base import _result_or_cancel
from functools import partial

__all__ = ["ReferenceProcessPoolExecutor"]


def _batched(iterable, n):
    iterator = iter(iterable)
    while batch := tuple(itertools.islice(iterator, n)):
        yield batch


def _executor_map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
    # CPython 3.14 Executor.map
    if buffersize is not None and not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be None or > 0")

    if timeout is not None:
        end_time = timeout + time.monotonic()

    zipped_iterables = zip(*iterables)  # noqa: B905 - verbatim
    if buffersize:
        fs = collections.deque(
            self.submit(fn, *args) for args in itertools.islice(zipped_iterables, buffersize)
        )
    else:
        fs = [self.submit(fn, *args) for args in zipped_iterables]

    executor_weakref = weakref.ref(self)

    def result_iterator():
        try:
            fs.reverse()
            while fs:
                if buffersize and executor_weakref() is not None and (args := next(zipped_iterables, None)):
                    fs.appendleft(executor_weakref().submit(fn, *args))
                if timeout is None:
                    yield _result_or_cancel(fs.pop())
                else:
                    yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
        finally:
            for future in fs:
                future.cancel()

    return result_iterator()


if sys.version_info >= (3, 14):  # pragma: no cover - the stdlib has it
    ReferenceProcessPoolExecutor = ProcessPoolExecutor
else:

    class ReferenceProcessPoolExecutor(ProcessPoolExecutor):  # type: ignore[no-redef]
        def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
            # CPython 3.14 ProcessPoolExecutor.map
            if chunksize < 1:
                raise ValueError("chunksize must be >= 1.")
            results = _executor_map(
                self, partial(_process._process_chunk, fn), _batched(zip(*iterables), chunksize),  # noqa: B905
                timeout=timeout, buffersize=buffersize,
            )
            return _process._chain_from_iterable_of_lists(results)
