"""``ExecutorView``: an executor's calls with other grid options, as a plain ``Executor``."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, TypeVar

from ._calls import cancel_all
from ._deployment import warn_once_about_deployment
from .options import KEEP, TaskOptions

if TYPE_CHECKING:  # pragma: no cover
    from .executor import HTCGridExecutor

__all__ = ["ExecutorView"]

T = TypeVar("T")


class _Tracker:
    """The futures a view handed out that are not done yet: what its ``shutdown`` waits for or
    cancels. Holds no reference to the executor (a map's iterator keeps one)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: set[Future[Any]] = set()

    def add(self, futures: list[Future[Any]]) -> None:
        with self.lock:
            self.pending.update(futures)
        for future in futures:  # outside the lock: a done future calls back at once
            future.add_done_callback(self._discard)

    def _discard(self, future: Future[Any]) -> None:
        with self.lock:
            self.pending.discard(future)

    def snapshot(self) -> list[Future[Any]]:
        with self.lock:
            return list(self.pending)


class ExecutorView(Executor):
    """What :meth:`HTCGridExecutor.options` returns: an ``Executor`` whose ``submit`` and ``map``
    run on its parent executor with other grid options (:attr:`task_options`).

    A view owns nothing: its ``shutdown()`` (and leaving ``with view:``) never shuts the parent
    down. It stops the view taking new work (``RuntimeError`` then, as after any shutdown),
    with ``cancel_futures`` cancels the view's calls that have not started, and with ``wait``
    (the default) waits until every call made through the view is done, as a pool would. The
    parent's shutdown ends the view's work as it ends its own; the view then refuses new work
    too. Calls through a view count as the parent's everywhere else (``sessions()``,
    ``kill_running()``, ``shutdown(cancel_futures=True)``).
    """

    def __init__(self, parent: HTCGridExecutor, options: TaskOptions) -> None:
        if parent._traits.deployment:  # what a deployment cannot keep, said as for the executor's own
            warn_once_about_deployment(False, options.retry_count)
        self._parent = parent
        self._tracker = _Tracker()
        self._closed = False
        #: the options this view's calls are sent with
        self.task_options = options

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """As :meth:`HTCGridExecutor.submit`, with this view's options."""
        self._check_open()
        future = self._parent._submit(self.task_options, fn, args, kwargs)
        self._tracker.add([future])
        return future

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, buffersize: int | None = None) -> Iterator[T]:
        """As :meth:`HTCGridExecutor.map`, with this view's options."""
        self._check_open()
        return self._parent._map(self.task_options, self._tracker, fn, iterables, timeout, chunksize, buffersize)

    def options(self, *, priority: int = KEEP, task_timeout_sec: float | None = KEEP,
                retry_count: int | None = KEEP) -> ExecutorView:
        """Another view of the same executor: this view's options with these changed."""
        changed = self.task_options.replace(priority=priority, task_timeout_sec=task_timeout_sec,
                                            retry_count=retry_count)
        return ExecutorView(self._parent, changed)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work through this view (the parent goes on); ``cancel_futures`` cancels the
        view's calls not yet started; ``wait`` blocks until all its calls are done (except when
        called from a done callback, which runs in the executor's poller: it cannot wait there,
        and does not, as the executor's own shutdown). Repeatable."""
        self._closed = True
        if cancel_futures:
            cancel_all(self._tracker.snapshot())
        if wait and not self._parent._in_own_thread():
            concurrent.futures.wait(self._tracker.snapshot())

    def __repr__(self) -> str:
        return f"<ExecutorView of {self._parent!r} with {self.task_options}>"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after this view's shutdown")
