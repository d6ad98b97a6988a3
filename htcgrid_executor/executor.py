"""``HTCGridExecutor``: a ``concurrent.futures.Executor`` that runs calls on an HTC-Grid.

Data flow::

    submit(fn, *a) ─▶ pickle in the caller (fails here if it cannot) ─▶ call table (_call_table.py)
        ─▶ htcgrid-sender (_sender.py): one connector.send() per batch (a session; listener = this executor)
        ─▶ grid: agents run htcgrid_executor.worker.lambda_handler on each task
        ─▶ htcgrid-poller (_poller.py): connector.poll_listener() long polls ─▶ Future.set_result / set_exception
        ─▶ session fully collected ─▶ htcgrid-sender: connector.delete_session_data()

One grid task per ``submit`` and per ``map`` chunk (``_map.py``). The executor is the composition
root: it builds the connector (``_connect.py``; the interface it relies on is
``_connector_protocol.GridConnector``), the call table and both threads, and calls the table's
methods only. Both threads reach the executor only through a weak reference (``_lifecycle.py``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from . import _lifecycle
from ._call_table import _CallTable
from ._calls import _Call
from ._connect import close_opened, open_grid, payload_limit, release_grid, task_bindings
from ._connector_protocol import GridConnector
from ._deployment import _DeploymentTraits
from ._map import map_on_grid
from ._poller import _PollerThread
from ._sender import _SenderThread
from ._shares import SharedHandle, _SharedObjects
from ._view import ExecutorView, _Tracker
from .backoff import spend_until
from .codec import check_task_size, make_task, pickle_args, pickle_function, recorded_bindings
from .errors import ConfigurationError, PayloadError
from .options import DEFAULT_PRIORITY, DEFAULT_RETRY_COUNT, DEFAULT_TASK_TIMEOUT_SEC, KEEP, TaskOptions
from .payload import dumps_signed
from .wire import encoded_size

__all__ = ["HTCGridExecutor", "ExecutorView", "SharedHandle"]

T = TypeVar("T")


class HTCGridExecutor(Executor):
    """Run calls on an HTC-Grid; a drop-in for ``ProcessPoolExecutor``.

    Where it runs:
        * neither ``connector`` nor ``config``: an embedded :class:`~htcgrid_executor.LocalGrid`
          with ``max_workers`` agents (default: the CPU count) is started now and stopped by
          ``shutdown()``;
        * ``config``: a client config dict, or the path of a JSON config file (a deployment's
          ``Agent_config.tfvars.json``); an ``AWSConnector`` is made from it and authenticated;
        * ``connector``: an ``AWSConnector`` ready to use (authenticated); it is not closed by
          ``shutdown()``. ``max_workers`` and ``max_tasks_per_child`` are then the grid's business
          and are ignored.

    The grid's worker function must be ``htcgrid_executor.worker.lambda_handler`` (the local grid's
    default; see ``docs/worker-handler.md`` for a deployment), holding the config's
    ``payload_signing_key`` in its ``HTCGRID_PAYLOAD_KEY`` environment variable.

    Arguments as in ``ProcessPoolExecutor``: ``initializer(*initargs)`` runs once in each grid
    worker process before the first task of this executor it runs there (if it raises, that
    task's future raises its exception and the next task tries it again; the executor does not
    break as a process pool does). ``mp_context`` is accepted and ignored (there are no local
    processes to start). ``max_tasks_per_child`` is passed to the embedded grid.

    Grid options, for every task sent: ``priority``; ``task_timeout_sec``, a per-task time limit
    (a task over it is stopped and its future raises ``TaskFailedError``); ``retry_count``, how
    often the grid retries a task whose worker was lost before failing it with
    ``TaskFailedError``: by default 2, so a call that crashes its worker every time runs 3 times
    (a lost machine is a grid's everyday fault, a call that kills its process is a bug; a
    process pool breaks at the first); None: the grid's own default (5 on a LocalGrid). They
    are checked here (``TypeError``/``ValueError`` naming the option, see
    :class:`~htcgrid_executor.options.TaskOptions`); :meth:`options` gives a view of this
    executor whose calls get other values.

    Batching: calls are pickled in the caller and sent by a background thread, up to
    ``batch_size`` calls per ``send`` (one grid session). The sender sends as soon as it is free;
    calls submitted while a send is under way go together in the next one. ``batch_window`` (s)
    makes it wait that long after the first buffered call for more.

    ``broken_after_sec``: a deadline (positive seconds; ``ValueError``/``TypeError`` otherwise). Once
    the grid has not answered for that long (unreachable, 5xx answers, or silence on an open
    connection), every pending future fails with ``BrokenGridExecutor``, the executor refuses new
    work and its threads end. It is the one budget of every layer under the executor: the
    transport's and the data plane's retries and socket timeouts stop when it is spent, so a
    pending future waits about ``broken_after_sec`` at most after the grid went (the streak starts
    when the first failed call began). A single call with no answer within it counts as the grid
    not answering; cancellations, clean-ups and ``shutdown()`` give up within it too.

    ``max_payload_bytes``: the most bytes one task (a call's or a map chunk's function and
    arguments) or one result may take in the grid's data plane, where pickles travel encoded
    (about 1.8 times the pickle's size). Default, and never more than: what the grid states
    (a ``LocalGrid``'s ``max_payload_bytes``), else 500 MiB, under Redis's 512 MiB per value.
    A larger call raises ``PayloadError`` in ``submit``/``map`` naming its size and the limit; a
    larger result fails that call's future with ``PayloadError`` before anything is written.
    Either way nothing oversized reaches the grid, and the executor goes on working.

    What a grid changes in the ``Future`` contract (nothing else does):
        * ``running()`` becomes True when the grid reports the task processing (an agent that
          claims several short tasks at once reports them all); a task retried after its worker
          was lost stays running.
        * ``cancel()`` keeps the stdlib's promise, True only for a call that will never run: a
          call already sent is cancelled on the grid before ``cancel()`` returns (one request, in
          the caller's thread); if a worker took it meanwhile, ``cancel()`` returns False and the
          future is running. ``wait()`` and ``as_completed()`` see a cancelled future at once.
        * A running task stops only through :meth:`kill_running` or
          ``shutdown(kill_running=True)``; its future then raises ``CancelledError``.
        * A task the grid gives up on (worker lost past the retries, time limit) raises
          ``TaskFailedError`` with the grid's reason.

    At interpreter exit, work already submitted is finished first (as ``ProcessPoolExecutor``
    does); nothing hangs once it is. Tasks outlive a crashed client on a deployed grid: record
    :meth:`sessions` and collect their results elsewhere with :meth:`attach`.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        connector: GridConnector | None = None,
        config: dict[str, Any] | str | os.PathLike[str] | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        priority: int = DEFAULT_PRIORITY,
        task_timeout_sec: float | None = DEFAULT_TASK_TIMEOUT_SEC,
        retry_count: int | None = DEFAULT_RETRY_COUNT,
        batch_size: int = 1000,
        batch_window: float = 0.0,
        broken_after_sec: float = 60.0,
        max_payload_bytes: int | None = None,
    ) -> None:
        _check_pool_arguments(max_workers, initializer, max_tasks_per_child, max_payload_bytes)
        _check_batching(batch_size, batch_window)
        _check_deadline(broken_after_sec)
        if connector is not None and config is not None:
            raise ValueError("pass connector= or config=, not both")
        options = TaskOptions(priority=priority, task_timeout_sec=task_timeout_sec, retry_count=retry_count)
        del mp_context  # accepted for drop-in compatibility: a grid starts no local process
        self._options = options  # what submit and map send with; a view's calls carry their own
        self._max_workers = max_workers
        # the tasks of this executor share their script's globals in each runner (see worker_scope.Scope)
        self._scope = secrets.token_hex(8)
        connector, grid, owns_connector = open_grid(connector, config, max_workers=max_workers,
                                                    max_tasks_per_child=max_tasks_per_child,
                                                    max_payload_bytes=max_payload_bytes)
        # what this executor built or was given, held here (the composition root); the sender
        # closes an owned connector and stops the grid once the work is done
        self._connector: GridConnector = connector
        self._grid = grid
        try:
            self._max_payload = payload_limit(connector, max_payload_bytes)
            self._signing_key: str | None = connector.payload_signing_key
            self._init_blob = _pickle_initializer(initializer, initargs, self._signing_key)
            self._traits = _DeploymentTraits(connector, options)  # may warn: keep it in __init__
            self._table = _CallTable(connector.new_listener_id(), options, deployment=self._traits.deployment,
                                     batch_size=batch_size, batch_window=batch_window,
                                     broken_after_sec=broken_after_sec,
                                     cancel_unless_started=self._traits.cancel_unless_started(connector))
            self._shares = _SharedObjects(connector)
            self._broken_after_sec = broken_after_sec
            self._threads = self._make_threads(owns_connector, broken_after_sec)
        except BaseException:
            close_opened(connector, owns_connector, grid)
            raise
        _lifecycle.start(self._table, self._threads)

    def _make_threads(self, owns_connector: bool, broken_after_sec: float) -> tuple[threading.Thread, ...]:
        owner = weakref.ref(self)  # the threads must not keep the executor alive
        owned = _lifecycle._Owned(self._shares, self._connector, owns_connector, self._grid, broken_after_sec,
                                  release_grid)
        args = (owner, self._table, self._connector, self._traits, self._signing_key, broken_after_sec)
        return (_SenderThread(*args, owned), _PollerThread(*args))

    # ---- submitting ---------------------------------------------------------------------------


    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on the grid and return its Future at once.

        The call is pickled here, in the caller's thread: one that cannot be pickled raises
        ``PayloadError`` naming the culprit (the pickler's error is the ``__cause__``). Raises
        ``RuntimeError`` after ``shutdown()`` and ``BrokenGridExecutor`` once the grid is lost.
        The Future's result is the call's return value; its exception is the one the call raised,
        of the same type, with the remote traceback as ``__cause__``.
        """
        return self._submit(self._options, fn, args, kwargs)

    def _submit(self, options: TaskOptions, fn: Callable[..., T], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Future[T]:
        table = self._table
        table.check_open()
        key = self._require_key()
        fn_blob = table.function_blob(fn, lambda: self._pickle_function(fn, key))
        task = make_task(fn_blob, pickle_args(fn, args, kwargs, key, in_memory=True), init_blob=self._init_blob,
                         scope=self._scope, limit=self._max_payload)
        size = check_task_size(task, self._max_payload, fn)
        return table.enqueue([self._new_call(task, size, options)])[0]

    def submit_task(self, task: dict[str, Any]) -> Future[Any]:
        """Send a plain HTC-Grid task dict, as it is, to the grid's worker function.

        For grids running an existing worker function (not this package's handler). The Future's
        result is the task's output, JSON-decoded when it is JSON, else the text; a Lambda error
        document (``errorMessage``/``errorType``) raises ``RemoteError``. Raises ``PayloadError``
        here if ``task`` is not JSON-serialisable.
        """
        self._table.check_open()
        try:
            text = json.dumps(task, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"task is not JSON-serialisable: {exc}") from exc
        size = encoded_size(len(text))
        if size > self._max_payload:
            raise PayloadError(f"the task is too large for the grid: {size:,} bytes in the data plane, over "
                               f"the limit of {self._max_payload:,} bytes (max_payload_bytes)")
        return self._table.enqueue([_Call(self._table, json.loads(text), raw=True, size=size)])[0]

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like the built-in ``map(fn, *iterables)``, run on the grid; results in input order.

        ``chunksize`` calls go in one grid task. None (the default) means 1 on a grid of this
        package; on a deployment, whose per-task overhead is much larger, the executor picks it
        from the call times its handler measured (about a second of calls per task; before any
        measurement, two tasks per worker of ``max_workers``, default 4). Without ``buffersize`` every call is submitted
        before this returns (as the stdlib does); with it (Python 3.14 semantics) at most
        ``buffersize`` tasks are in flight: one more is submitted each time a result is taken, so
        a huge or endless iterable runs in bounded memory. The iterator raises ``TimeoutError`` if
        a result is not ready ``timeout`` seconds after this call, and the first exception of a
        call where its result would be; either way, and when it is closed early, the tasks not yet
        started are cancelled. ``fn`` is pickled once for the whole map.
        """
        return self._map(self._options, None, fn, iterables, timeout, chunksize, buffersize)

    def _map(self, options: TaskOptions, tracker: _Tracker | None, fn: Callable[..., T],
             iterables: tuple[Iterable[Any], ...], timeout: float | None, chunksize: int | None,
             buffersize: int | None) -> Iterator[T]:
        return map_on_grid(self, options, tracker, fn, iterables, timeout, chunksize, buffersize)

    def options(self, *, priority: int = KEEP, task_timeout_sec: float | None = KEEP,
                retry_count: int | None = KEEP) -> ExecutorView:
        """A view of this executor whose ``submit`` and ``map`` send calls with these grid options
        (an option not given keeps this executor's; ``None`` for ``task_timeout_sec`` or
        ``retry_count`` means the grid's default, as in the constructor).

        The view shares everything else: this executor's threads, grid, connector and sessions,
        and its batching: calls of views with other options sent at the same time go in the same
        ``send`` round, as one session per distinct options (the wire carries options per
        session). It is a plain ``concurrent.futures.Executor`` to code that takes one. Cheap: make
        one per call site if you like. Raises ``TypeError``/``ValueError`` naming a bad option.
        """
        changed = self._options.replace(priority=priority, task_timeout_sec=task_timeout_sec,
                                              retry_count=retry_count)
        return ExecutorView(self, changed)

    def share(self, obj: Any) -> SharedHandle:
        """Store ``obj`` once in the grid's data plane; return a handle that tasks use instead.

        Pass the handle as an argument (or close over it) and, in each grid worker process, it
        unpickles to ``obj`` itself: read from the data plane and unpickled the first time, then
        taken from the process's cache (its last 4 shared objects), so a ``map`` of many tasks
        over one large object moves it once per worker process, not once per task. ``obj`` is
        pickled here and signed with the grid secret (workers refuse it otherwise).

        Freed (deleted from the data plane) by ``handle.release()`` (or leaving ``with handle:``)
        and by this executor's shutdown, once its work is done. A task that starts after the
        release fails with ``PayloadError`` (unless its worker process still has the object
        cached), so release a handle when the calls using it are done. Worker processes drop
        their copy as newer shared objects push it out. Raises
        ``PayloadError`` if ``obj`` cannot be pickled or is over ``max_payload_bytes``,
        ``RuntimeError`` after shutdown, and the data plane's errors.
        """
        self._table.check_open()
        return self._shares.put(obj, self._require_key(), self._max_payload, self._traits.deployment)

    # ---- stopping -------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, kill_running: bool = False) -> None:
        """Refuse new work and release the executor's threads, connector and embedded grid.

        As the stdlib: repeatable and thread-safe; ``wait`` blocks until every pending future is
        done and the threads have stopped; without it they stop by themselves once done.
        ``cancel_futures`` cancels the futures that have not started (and their tasks on the
        grid). Beyond the stdlib, ``kill_running`` stops tasks already running: their runners are
        killed on the grid and their futures raise ``CancelledError`` (a running Future cannot be
        cancelled, so ``cancelled()`` stays False). Both together cancel this executor's sessions
        on the grid. Without them, work already submitted still runs to the end. Called from a
        done callback (they run in the executor's poller thread) it cannot wait, and does not.
        """
        # (cancel_futures asks the grid in this thread: on a lost grid, no longer than broken_after_sec)
        with spend_until(time.monotonic() + self._broken_after_sec):
            self._table.request_stop(cancel_futures=cancel_futures, kill_running=kill_running)
        if wait:
            _lifecycle.join(self._threads)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        """``shutdown(wait=True)``, as the stdlib's; leaving on ``KeyboardInterrupt`` (Ctrl-C) also
        cancels what has not started and stops what is running, so the program ends at once (a
        process pool's workers get the terminal's SIGINT too; the grid's processes do not)."""
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.shutdown(wait=True, cancel_futures=interrupted, kill_running=interrupted)
        return False

    def kill_running(self) -> int:
        """Stop the tasks whose futures are running (the grid reported them processing): their
        runners are killed and their futures raise ``CancelledError``. Pending work continues.
        Returns how many tasks were asked to stop."""
        return self._table.kill_running()

    # ---- crash recovery -------------------------------------------------------------------------

    def sessions(self, *, flush: bool = True, timeout: float | None = None) -> list[dict[str, Any]]:
        """Records of the sessions sent and not yet fully collected, to store for :meth:`attach`.

        Each record is JSON-safe: ``{"session_id", "task_ids", "listener", "bindings"}``;
        ``bindings`` holds, per task, the digest its output must be signed for (None for a raw
        task or one collected already): keep records where the data plane's writers cannot change
        them. With ``flush`` this first waits (up to ``timeout`` s, else ``TimeoutError``) until
        every call submitted so far has been sent, so that the records cover them.
        """
        if flush:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._table.unsent():
                if self._table.is_broken():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("calls are still waiting to be sent")
                time.sleep(0.002)
        return self._table.outstanding_sessions()

    @classmethod
    def attach(
        cls,
        sessions: Iterable[dict[str, Any]],
        *,
        connector: GridConnector | None = None,
        config: dict[str, Any] | str | os.PathLike[str] | None = None,
        broken_after_sec: float = 60.0,
    ) -> list[Future[Any]]:
        """Futures for the tasks of sessions another client sent (that client may be gone).

        ``sessions``: records from :meth:`sessions` (or ``send()`` answers). Returns one Future per
        task, in order; a ``submit`` task resolves to its call's result, a ``map`` task to the
        list of its chunk's results, a raw task to its decoded output. Sessions are polled one by
        one (not through the dead client's listener, whose stream the grid trims as it is read).
        A session the grid does not know fails its futures at once with ``BadRequestError``; one
        the first client had fully collected had its data deleted, so its futures raise
        ``TaskFailedError`` (output missing). Collected sessions' data is deleted from the grid,
        as the original client would have done. An output is checked against the binding its
        record holds (an output made for another task or another call raises ``SignatureError``);
        a task whose record holds none is checked against its input in the data plane.
        """
        if connector is None and config is None:
            raise ValueError("attach needs the grid the sessions were sent to: pass connector= or config=")
        executor = cls(connector=connector, config=config, broken_after_sec=broken_after_sec)
        records = list(sessions)
        bindings = recorded_bindings(records)  # what the client kept; the inputs for the rest
        bindings.update(task_bindings(executor._connector, [tid for record in records for tid in record["task_ids"]
                                                            if tid not in bindings]))
        futures = executor._table.adopt(records, bindings)
        executor.shutdown(wait=False)  # its threads stop once these futures are resolved
        return futures

    # ---- helpers --------------------------------------------------------------------------------

    def _new_call(self, task: dict[str, Any], size: int, options: TaskOptions) -> _Call:
        return _Call(self._table, task, raw=False, size=size, options=options)

    def _pickle_function(self, fn: Callable[..., Any], key: str) -> str:
        # the one place a call's function is pickled (tests count the calls here)
        return pickle_function(fn, key, self._scope)

    def _in_own_thread(self) -> bool:
        """True in the executor's sender or poller (where done callbacks run): no waiting there."""
        return threading.current_thread() in self._threads

    def _require_key(self) -> str:
        key = self._signing_key
        if key is None:
            raise ConfigurationError(_NO_KEY)
        return key


def _check_pool_arguments(max_workers: int | None, initializer: Callable[..., object] | None,
                          max_tasks_per_child: int | None, max_payload_bytes: int | None) -> None:
    """``ProcessPoolExecutor``'s checks and messages, and ``max_payload_bytes``'."""
    if max_payload_bytes is not None and (
            isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int)
            or max_payload_bytes <= 0):
        raise ValueError("max_payload_bytes must be a positive integer or None")
    if max_workers is not None and max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if max_tasks_per_child is not None:
        if not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")


def _check_batching(batch_size: int, batch_window: float) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if batch_window < 0:
        raise ValueError("batch_window must be >= 0")


def _check_deadline(broken_after_sec: float) -> None:
    if isinstance(broken_after_sec, bool) or not isinstance(broken_after_sec, (int, float)):
        raise TypeError(f"broken_after_sec must be a number of seconds, got {broken_after_sec!r}")
    if not (broken_after_sec > 0 and math.isfinite(broken_after_sec)):
        raise ValueError(f"broken_after_sec must be a positive, finite number of seconds, got {broken_after_sec!r}")


def _pickle_initializer(initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
                        key: str | None) -> str | None:
    """``(initializer, initargs)`` signed for the workers, or None without an initializer."""
    if initializer is None:
        return None
    if key is None:
        raise ConfigurationError(_NO_KEY)
    try:
        return dumps_signed((initializer, tuple(initargs)), key)
    except PayloadError as exc:
        raise PayloadError(f"cannot pickle the initializer or its initargs: {exc.__cause__}") from exc



_NO_KEY = (
    "payload_signing_key is not in the client config: pickled calls must be signed with the grid "
    "secret its workers hold in HTCGRID_PAYLOAD_KEY (raw tasks, submit_task, need none)"
)
