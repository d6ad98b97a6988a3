"""``HTCGridExecutor``: a ``concurrent.futures.Executor`` that runs calls on an HTC-Grid.

Data flow::

    submit(fn, *a) ─▶ pickle in the caller (fails here if it cannot) ─▶ buffer
        ─▶ htcgrid-sender: one connector.send() per batch (a session; listener = this executor)
        ─▶ grid: agents run htcgrid_executor.worker.lambda_handler on each task
        ─▶ htcgrid-poller: connector.poll_listener() long polls ─▶ Future.set_result / set_exception
        ─▶ session fully collected ─▶ htcgrid-sender: connector.delete_session_data()

One grid task per ``submit`` and per ``map`` chunk. Both threads reach the executor only through a
weak reference (see ``_sessions.py``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from . import _sessions
from ._sessions import _Call, _Core
from .errors import (
    AuthenticationError,
    BrokenGridExecutor,
    ConfigurationError,
    ControlPlaneError,
    GridUnavailableError,
    PayloadError,
    StorageError,
)
from .options import DEFAULT_RETRY_COUNT, TaskOptions
from .payload import dumps_signed
from .wire import DEFAULT_MAX_PAYLOAD_BYTES, encoded_size, new_session_id, shared_key
from .worker import (
    SHARED_CONTEXT_PREFIX,
    _shared_object,
    check_task_size,
    make_task,
    pickle_args,
    pickle_chunk,
    pickle_function,
)
from .worker_guard import guard_location

__all__ = ["HTCGridExecutor", "ExecutorView", "SharedHandle"]

T = TypeVar("T")

_ENQUEUE_GROUP = 256  # map: calls handed to the sender per lock acquisition
_UNSET: Any = object()  # options(): an option not given keeps the executor's


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

    ``broken_after_sec``: if the grid cannot be reached for that long, every pending future fails
    with ``BrokenGridExecutor`` and the executor refuses new work.

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
        * ``cancel()`` succeeds until then, and cancels the task on the grid too; should it have
          started in the meantime, its worker process is killed. ``wait()`` and ``as_completed()``
          see a cancelled future at once.
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
        connector: Any = None,
        config: dict[str, Any] | str | os.PathLike[str] | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        priority: int = 0,
        task_timeout_sec: float | None = None,
        retry_count: int | None = DEFAULT_RETRY_COUNT,
        batch_size: int = 1000,
        batch_window: float = 0.0,
        broken_after_sec: float = 60.0,
        max_payload_bytes: int | None = None,
    ) -> None:
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
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if batch_window < 0:
            raise ValueError("batch_window must be >= 0")
        if connector is not None and config is not None:
            raise ValueError("pass connector= or config=, not both")
        options = TaskOptions(priority=priority, task_timeout_sec=task_timeout_sec, retry_count=retry_count)
        del mp_context  # accepted for drop-in compatibility: a grid starts no local process
        self._max_workers = max_workers
        # the tasks of this executor share their script's globals in each runner (see worker._Scope)
        self._scope = secrets.token_hex(8)

        grid = None
        owns_connector = connector is None
        if connector is None:
            from .connector import AWSConnector  # the HTTP/Redis/S3 stack loads only when used

            if config is None:
                from .grid import LocalGrid

                grid = LocalGrid(workers=max_workers, max_tasks_per_child=max_tasks_per_child,
                                 max_payload_bytes=max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES)
                grid.start()
                config = grid.client_config
            try:
                connector = AWSConnector(_load_config(config))
                connector.authenticate()
                if grid is None:  # a grid started elsewhere: is it there?
                    _check_reachable(connector)
            except BaseException:
                if grid is not None:
                    grid.stop()
                raise
        try:
            # the smaller of the caller's limit and the one the grid states (a LocalGrid does)
            stated = (getattr(connector, "client_config", None) or {}).get("max_payload_bytes")
            limits = [n for n in (max_payload_bytes, stated) if isinstance(n, int) and n > 0]
            self._max_payload = min(limits) if limits else DEFAULT_MAX_PAYLOAD_BYTES
            key = getattr(connector, "payload_signing_key", None)
            self._init_blob: str | None = None
            if initializer is not None:
                if key is None:
                    raise ConfigurationError(_NO_KEY)
                try:
                    self._init_blob = dumps_signed((initializer, tuple(initargs)), key)
                except PayloadError as exc:
                    raise PayloadError(f"cannot pickle the initializer or its initargs: {exc.__cause__}") from exc
            self._core = _Core(
                self, connector, owns_connector=owns_connector, grid=grid, signing_key=key,
                options=options, batch_size=batch_size,
                batch_window=batch_window, broken_after_sec=broken_after_sec,
            )
        except BaseException:
            if owns_connector:
                connector.close()
            if grid is not None:
                grid.stop()
            raise
        self._core.start()

    # ---- submitting ---------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on the grid and return its Future at once.

        The call is pickled here, in the caller's thread: one that cannot be pickled raises
        ``PayloadError`` naming the culprit (the pickler's error is the ``__cause__``). Raises
        ``RuntimeError`` after ``shutdown()`` and ``BrokenGridExecutor`` once the grid is lost.
        The Future's result is the call's return value; its exception is the one the call raised,
        of the same type, with the remote traceback as ``__cause__``.
        """
        return self._submit(self._core.options, fn, args, kwargs)

    def _submit(self, options: TaskOptions, fn: Callable[..., T], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Future[T]:
        self._check_open()
        core = self._core
        key = self._key()
        cache = core.fn_cache  # the sender swaps in a new dict per batch: pickled once per batch
        entry = cache.get(id(fn))
        if entry is not None and entry[0] is fn:
            fn_blob = entry[1]
        else:
            fn_blob = pickle_function(fn, key, self._scope)
            cache[id(fn)] = (fn, fn_blob)  # holding fn keeps its id from being reused
        task = make_task(fn_blob, pickle_args(fn, args, kwargs, key), init_blob=self._init_blob,
                         scope=self._scope, limit=self._max_payload)
        size = check_task_size(task, self._max_payload, fn)
        return self._enqueue([_Call(core, task, raw=False, size=size, options=options)])[0]

    def submit_task(self, task: dict[str, Any]) -> Future[Any]:
        """Send a plain HTC-Grid task dict, as it is, to the grid's worker function.

        For grids running an existing worker function (not this package's handler). The Future's
        result is the task's output, JSON-decoded when it is JSON, else the text; a Lambda error
        document (``errorMessage``/``errorType``) raises ``RemoteError``. Raises ``PayloadError``
        here if ``task`` is not JSON-serialisable.
        """
        self._check_open()
        try:
            text = json.dumps(task, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"task is not JSON-serialisable: {exc}") from exc
        size = encoded_size(len(text))
        if size > self._max_payload:
            raise PayloadError(f"the task is too large for the grid: {size:,} bytes in the data plane, over "
                               f"the limit of {self._max_payload:,} bytes (max_payload_bytes)")
        return self._enqueue([_Call(self._core, json.loads(text), raw=True, size=size)])[0]

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
        return self._map(self._core.options, None, fn, iterables, timeout, chunksize, buffersize)

    def _map(self, options: TaskOptions, tracker: _Tracker | None, fn: Callable[..., T],
             iterables: tuple[Iterable[Any], ...], timeout: float | None, chunksize: int | None,
             buffersize: int | None) -> Iterator[T]:
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        self._check_open()
        key = self._key()
        fn_blob = pickle_function(fn, key, self._scope)
        items: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        if chunksize is None:
            if self._core.deployment and buffersize is None:
                everything = list(items)  # submitted at once anyway: its length sizes the chunks
                chunksize = self._core.auto_chunksize(len(everything), self._max_workers, options)
                items = iter(everything)
            else:
                chunksize = self._core.auto_chunksize(None, self._max_workers, options)
        chunks = _batched(items, chunksize)

        def make_call(executor: HTCGridExecutor, chunk: list[tuple[Any, ...]]) -> _Call:
            blob = pickle_chunk(fn, chunk, key)
            task = make_task(fn_blob, blob, mode="map", init_blob=executor._init_blob, scope=executor._scope,
                             limit=executor._max_payload)
            if executor._core.deployment:
                task["calls"] = len(chunk)  # the guard reports the time per call
            size = check_task_size(task, executor._max_payload, fn)
            return _Call(executor._core, task, raw=False, size=size, options=options)

        def enqueue(executor: HTCGridExecutor, calls: list[_Call]) -> list[Future[list[T]]]:
            futures = executor._enqueue(calls)
            if tracker is not None:
                tracker.add(futures)
            return futures

        fs: collections.deque[Future[list[T]]] = collections.deque()
        try:
            source = chunks if buffersize is None else itertools.islice(chunks, buffersize)
            group: list[_Call] = []
            for chunk in source:
                group.append(make_call(self, chunk))
                if len(group) >= _ENQUEUE_GROUP:
                    fs.extend(enqueue(self, group))
                    group = []
            if group:
                fs.extend(enqueue(self, group))
        except BaseException:
            for future in fs:  # do not leave half a map running unseen
                future.cancel()
            raise

        # a weak reference: the iterator must not keep the executor alive (as in Python 3.14)
        executor_ref = weakref.ref(self)

        def refill() -> Future[list[T]] | None:
            executor = executor_ref()
            if executor is None:
                return None
            chunk = next(chunks, None)
            if chunk is None:
                return None
            return enqueue(executor, [make_call(executor, chunk)])[0]

        def result_iterator() -> Iterator[T]:
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
                for future in fs:
                    future.cancel()

        return result_iterator()

    def options(self, *, priority: int = _UNSET, task_timeout_sec: float | None = _UNSET,
                retry_count: int | None = _UNSET) -> ExecutorView:
        """A view of this executor whose ``submit`` and ``map`` send calls with these grid options
        (an option not given keeps this executor's; ``None`` for ``task_timeout_sec`` or
        ``retry_count`` means the grid's default, as in the constructor).

        The view shares everything else: this executor's threads, grid, connector and sessions,
        and its batching: calls of views with other options sent at the same time go in the same
        ``send`` round, as one session per distinct options (the wire carries options per
        session). It is a plain ``concurrent.futures.Executor`` to code that takes one. Cheap: make
        one per call site if you like. Raises ``TypeError``/``ValueError`` naming a bad option.
        """
        changes = {name: value for name, value in (("priority", priority), ("task_timeout_sec", task_timeout_sec),
                                                    ("retry_count", retry_count)) if value is not _UNSET}
        return ExecutorView(self, self._core.options.replace(**changes))

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
        self._check_open()
        key = self._key()
        share_id = new_session_id()
        try:
            blob = dumps_signed(obj, key, SHARED_CONTEXT_PREFIX + share_id)
        except PayloadError as exc:
            raise PayloadError(f"cannot pickle the shared object: {exc.__cause__}") from exc.__cause__
        if len(blob) > self._max_payload:
            raise PayloadError(f"the shared object is too large for the grid: {len(blob):,} bytes in the data "
                               f"plane, over the limit of {self._max_payload:,} bytes (max_payload_bytes)")
        core = self._core
        location = guard_location(core.connector.config) if core.deployment else {"store": "GRID"}
        core.connector.store.put_many({shared_key(share_id): blob.encode()})
        with core.lock:
            core.shares.add(share_id)
        return SharedHandle(core, share_id, location)

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
        self._core.request_stop(cancel_futures=cancel_futures, kill_running=kill_running)
        if wait:
            self._core.join()

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
        return self._core.kill_running()

    # ---- crash recovery -------------------------------------------------------------------------

    def sessions(self, *, flush: bool = True, timeout: float | None = None) -> list[dict[str, Any]]:
        """Records of the sessions sent and not yet fully collected, to store for :meth:`attach`.

        Each record is JSON-safe: ``{"session_id", "task_ids", "listener"}``. With ``flush`` this
        first waits (up to ``timeout`` s, else ``TimeoutError``) until every call submitted so far
        has been sent, so that the records cover them.
        """
        if flush:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._core.unsent():
                if self._core.broken is not None:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("calls are still waiting to be sent")
                time.sleep(0.002)
        return self._core.outstanding_sessions()

    @classmethod
    def attach(
        cls,
        sessions: Iterable[dict[str, Any]],
        *,
        connector: Any = None,
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
        as the original client would have done.
        """
        if connector is None and config is None:
            raise ValueError("attach needs the grid the sessions were sent to: pass connector= or config=")
        executor = cls(connector=connector, config=config, broken_after_sec=broken_after_sec)
        futures = executor._core.adopt(list(sessions))
        executor.shutdown(wait=False)  # its threads stop once these futures are resolved
        return futures

    # ---- helpers --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        """Raise if no new work is accepted; the core's lock is held by the caller or not needed."""
        core = self._core
        if core.broken is not None:
            raise BrokenGridExecutor(str(core.broken)) from core.broken.__cause__
        if core.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _sessions._global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _enqueue(self, calls: list[_Call]) -> list[Future[Any]]:
        core = self._core
        with core.lock:
            # checked again under the lock: shutdown() may have run since the caller's check
            self._check_open()
            core.enqueue(calls)
        return [call.future for call in calls]

    def _key(self) -> str:
        key = self._core.key
        if key is None:
            raise ConfigurationError(_NO_KEY)
        return key


class SharedHandle:
    """An object stored once in the grid's data plane by :meth:`HTCGridExecutor.share`.

    In a task (an argument, or a global or closure of its function) it unpickles to the shared
    object, loaded once per worker process. ``release()`` deletes it from the data plane (also
    on leaving ``with handle:``); repeatable. A released handle can no longer be sent
    (``PayloadError`` at ``submit``/``map``).
    """

    __slots__ = ("share_id", "_location", "_core", "_released", "__weakref__")

    def __init__(self, core: _Core, share_id: str, location: dict[str, Any]) -> None:
        self.share_id = share_id
        self._location = location
        self._core = core
        self._released = False

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, Any]]]:
        if self._released:
            raise ValueError(f"shared object {self.share_id} was released")
        return _shared_object, (self.share_id, self._location)

    @property
    def released(self) -> bool:
        """True once the object was deleted from the data plane (release, or shutdown)."""
        return self._released or self.share_id not in self._core.shares

    def release(self) -> None:
        """Delete the object from the data plane now. Raises the data plane's errors."""
        if self._released:
            return
        self._released = True
        self._core.release_shares([self.share_id])

    def __enter__(self) -> SharedHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<SharedHandle {self.share_id}{' (released)' if self.released else ''}>"


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
        if parent._core.deployment:  # what a deployment cannot keep, said as for the executor's own
            _sessions._warn_once_about_deployment(False, options.retry_count)
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

    def options(self, *, priority: int = _UNSET, task_timeout_sec: float | None = _UNSET,
                retry_count: int | None = _UNSET) -> ExecutorView:
        """Another view of the same executor: this view's options with these changed."""
        changes = {name: value for name, value in (("priority", priority), ("task_timeout_sec", task_timeout_sec),
                                                    ("retry_count", retry_count)) if value is not _UNSET}
        return ExecutorView(self._parent, self.task_options.replace(**changes))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work through this view (the parent goes on); ``cancel_futures`` cancels the
        view's calls not yet started; ``wait`` blocks until all its calls are done (except when
        called from a done callback, which runs in the executor's poller: it cannot wait there,
        and does not, as the executor's own shutdown). Repeatable."""
        self._closed = True
        if cancel_futures:
            for future in self._tracker.snapshot():
                future.cancel()
        if wait and threading.current_thread() not in self._parent._core.threads:
            concurrent.futures.wait(self._tracker.snapshot())

    def __repr__(self) -> str:
        return f"<ExecutorView of {self._parent!r} with {self.task_options}>"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after this view's shutdown")


_NO_KEY = (
    "payload_signing_key is not in the client config: pickled calls must be signed with the grid "
    "secret its workers hold in HTCGRID_PAYLOAD_KEY (raw tasks, submit_task, need none)"
)


_PROBE_SESSION = "00000000-0000-0000-0000-000000000000"  # a session id no grid hands out


def _check_reachable(connector: Any) -> None:
    """Fail at construction, naming the address tried, when the grid's control plane or data
    plane does not answer: else the first call would learn it only ``broken_after_sec`` later.
    One cheap read of each (with the connector's own few quick retries)."""
    try:
        connector.poll_session(_PROBE_SESSION, after=_sessions._FAR_CURSOR)
    except AuthenticationError:
        raise  # wrong credentials: better said now than at the first call
    except ControlPlaneError:
        pass  # an answer all the same (a 404 here; a deployment's 542): the control plane is there
    except GridUnavailableError as exc:
        url = getattr(connector.config, "api_url", "?")
        raise GridUnavailableError(f"the grid's control plane at {url} does not answer (is the grid "
                                   f"running?): {exc}") from exc
    try:
        connector.store.get_many([f"{_PROBE_SESSION}_0-output"])
    except (GridUnavailableError, StorageError) as exc:
        raise GridUnavailableError(f"the grid's data plane ({connector.store!r}) does not answer: {exc}") from exc


def _result_or_cancel(future: Future[T], timeout: float | None = None) -> T:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break a reference cycle with the exception in future._exception


def _batched(iterable: Iterator[tuple[Any, ...]], n: int) -> Iterator[list[tuple[Any, ...]]]:
    # itertools.batched is 3.12+; lists, because the worker gets a list of argument tuples
    while chunk := list(itertools.islice(iterable, n)):
        yield chunk


def _load_config(config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    try:
        with open(config, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the client config file {os.fspath(config)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"client config file {os.fspath(config)!r} does not hold a JSON object")
    return data
