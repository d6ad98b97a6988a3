"""Private machinery of :class:`~htcgrid_executor.HTCGridExecutor`: call records, the state they
share, and the two threads that move them::

    caller threads               htcgrid-sender                       htcgrid-poller
    submit / map ──▶ buffer ──▶ send(batch) ─────────▶ grid ───────▶ poll_listener (long poll)
    (pickling here)  (lock)     cancel_tasks / cancel_sessions          │ decode outputs
                                delete_session_data ◀──── cleanups ─────┘ resolve futures

Only the caller pickles (so an unpicklable call fails in the caller); only the sender talks to
the grid to change it; only the poller (and a cancel callback, for the future it cancels) moves a
future out of PENDING. Both threads hold the shared :class:`_Core`, never the executor: they see
it only through a weak reference, so an executor dropped without ``shutdown()`` is collected and
its threads wind down as after ``shutdown(wait=False)``.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
import time
import warnings
import weakref
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from .errors import (
    BadRequestError,
    BrokenGridExecutor,
    ControlPlaneError,
    GridUnavailableError,
    PayloadError,
    TaskFailedError,
)
from .options import TaskOptions
from .wire import decode_task, input_key, new_session_id, shared_key, task_ids_for
from .worker import decode_output_and_logs, is_executor_task, log_note, task_binding
from .worker_guard import GUARD_FIELD, guard_location, seal_guard

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)

_IDLE_TICK = 0.5  # how often an idle thread checks whether its executor was collected
_LONG_POLL_SEC = 5.0  # one long poll's wait; new sessions join the listener's stream meanwhile
_VERIFY_SEC = 5.0  # after this long with no news, check that the grid still knows our sessions
_VERIFY_BATCH = 50  # sessions checked per round (round robin), one cheap request each
_FAR_CURSOR = "99999999999999-0"  # a cursor after everything: the answer says only "it exists"
_CANCEL_CHUNK = 500  # task ids per cancel request: the query string stays under 64 KiB
_CALL_SEC = re.compile(r'"call_sec": ([0-9.e-]+)\}$')
_CHUNK_TARGET_SEC = 1.0  # a deployment's task should last about this long (per-task overhead ~0.5-1 s)
_MAX_AUTO_CHUNK = 1000
_GUARD_LEASE_SEC = 30.0  # the run marker's lease on a deployment (renewed every third of it)
_BATCH_BYTES = 64 * 1024 * 1024  # task inputs per send (one call at least)

# Set at interpreter exit (before non-daemon threads are joined): threads then finish what was
# submitted and stop, as ProcessPoolExecutor's manager thread does.
_global_shutdown = False
_live_cores: set[_Core] = set()
_live_lock = threading.Lock()
_atexit_registered = False


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    with _live_lock:
        cores = list(_live_cores)
    # the program ends on Ctrl-C (an unhandled KeyboardInterrupt): stop the work instead of
    # finishing it, as a process pool's workers, which got the SIGINT too, stop
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    interrupted = isinstance(last, KeyboardInterrupt)
    for core in cores:
        if interrupted:
            core.request_stop(cancel_futures=True, kill_running=True)
        core.wake()
    for core in cores:
        core.join()


def _register_atexit() -> None:
    # only once an executor exists, never at import time (style: no import-time hooks)
    global _atexit_registered
    with _live_lock:
        if _atexit_registered:
            return
        _atexit_registered = True
    try:
        threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
    except RuntimeError:  # interpreter already shutting down
        pass


class _Call:
    """One grid task and its future. Small on purpose: a million may be outstanding.

    ``claimed`` (guarded by the core's lock) says that some thread has taken on calling
    ``set_running_or_notify_cancel()`` for the future, which must happen exactly once.
    """

    __slots__ = ("future", "task", "task_id", "claimed", "done", "raw", "core", "binding", "size", "options")

    def __init__(self, core: _Core, task: dict[str, Any], raw: bool, size: int = 0,
                 options: TaskOptions | None = None) -> None:
        self.future: Future[Any] = Future()
        # the grid options it is sent with: calls with equal options go in one session
        self.options = core.options if options is None else options
        self.size = size  # bytes its task takes in the data plane: batches are capped by it
        self.task: dict[str, Any] | None = task  # dropped once sent
        # what its output must be signed for: an output copied from another task is refused
        self.binding: str | None = task_binding(task) if is_executor_task(task) else None
        self.task_id: str | None = None  # set when the sender puts it in a session
        self.claimed = False
        self.done = False  # terminal on the grid (or given up on)
        self.raw = raw
        self.core = core
        self.future.add_done_callback(self)

    def __call__(self, future: Future[Any]) -> None:
        # done callback: a cancelled future also cancels its task on the grid
        if future.cancelled():
            self.core.on_cancelled(self)


class _Session:
    __slots__ = ("response", "remaining", "sent", "cancelled_here")

    def __init__(self, response: dict[str, Any], remaining: int, sent: bool) -> None:
        self.response = response  # {'session_id', 'task_ids', 'listener'}: what attach() needs
        self.remaining = remaining  # tasks not yet terminal on the grid
        self.sent = sent
        # a deployment: some task was given up on here (cancelled) before the grid ended it
        self.cancelled_here = False


class _Core:
    """State shared by an executor, its sender and its poller."""

    def __init__(
        self,
        owner: Any,
        connector: Any,
        *,
        owns_connector: bool,
        grid: Any,
        signing_key: str | None,
        options: TaskOptions,
        batch_size: int,
        batch_window: float,
        broken_after_sec: float,
    ) -> None:
        self.owner = weakref.ref(owner)
        self.connector = connector
        self.owns_connector = owns_connector
        self.grid = grid  # an embedded LocalGrid this core stops when done, or None
        self.key = signing_key
        self.options = options  # the executor's own; a view's calls carry theirs
        self.batch_size = batch_size
        self.batch_window = batch_window
        self.broken_after_sec = broken_after_sec
        self.listener: str = connector.new_listener_id()
        # A deployment (not a grid of this package, whose config names its control Redis) cannot
        # cancel single tasks nor keep time limits, retry counts or at-most-once: our handler does
        # (worker_guard.py), told by a signed guard in each task. `htcgrid_worker_guard: false`
        # in the client config turns it off (a worker without redis-py / boto3).
        client_config = getattr(connector, "client_config", None) or {}
        self.deployment = bool(client_config) and "htcgrid_redis_control_url" not in client_config
        self.guard: dict[str, Any] | None = None
        if self.deployment and client_config.get("htcgrid_worker_guard", True) is not False \
                and getattr(connector, "config", None) is not None:
            self.guard = guard_location(connector.config)
        if self.deployment:
            _warn_once_about_deployment(self.guard is None, options.retry_count)
        self.guard_lease_sec = float(client_config.get("htcgrid_worker_guard_lease_sec", _GUARD_LEASE_SEC))
        self.call_sec: float | None = None  # measured seconds per call (deployment), for map's chunks

        # `lock` guards every attribute below it; `cond` (same lock) wakes the sender
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.buffer: collections.deque[_Call] = collections.deque()
        self.buffer_since = 0.0  # monotonic time the oldest buffered call arrived
        self.fn_cache: dict[int, tuple[Any, str]] = {}  # id(fn) -> (fn, signed pickle), per batch
        self.tasks: dict[str, _Call] = {}  # task id -> call, until its task is terminal
        self.sessions: dict[str, _Session] = {}  # session id -> session with tasks not terminal
        self.cancels: list[str] = []  # task ids to cancel on the grid
        self.cancel_marks: list[str] = []  # task ids to mark cancelled in the data plane (deployment)
        self.session_cancels: list[str] = []  # session ids to cancel on the grid
        self.cleanups: list[dict[str, Any]] = []  # collected sessions whose data to delete
        # task id -> its captured logs, to keep in the data plane past the session's deletion
        self.log_copies: dict[str, str] = {}
        self.shares: set[str] = set()  # ids of objects shared (executor.share) and not released
        self.shutdown = False
        self.broken: BaseException | None = None
        self.poller_done = False

        self.poller_event = threading.Event()  # wakes an idle poller (new session, shutdown)
        self.threads: list[threading.Thread] = []

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        _register_atexit()
        with _live_lock:
            _live_cores.add(self)
        self.threads = [
            threading.Thread(target=self._sender_main, name="htcgrid-sender"),
            threading.Thread(target=self._poller_main, name="htcgrid-poller"),
        ]
        for thread in self.threads:
            thread.start()

    def closing(self) -> bool:
        """True once no new work can come: shutdown, interpreter exit or the executor collected."""
        return self.shutdown or _global_shutdown or self.owner() is None

    def wake(self) -> None:
        with self.lock:
            self.cond.notify_all()
        self.poller_event.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for both threads; a no-op when called from one of them (a done callback runs in
        the poller and may call ``shutdown()``: waiting there could never end)."""
        if threading.current_thread() in self.threads:
            return
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(timeout)

    # ---- called by the executor (caller threads) --------------------------------------------

    def enqueue(self, calls: list[_Call]) -> None:
        """Buffer calls for the sender; the caller holds ``self.lock`` and has checked the flags."""
        buffer = self.buffer
        if not buffer:
            self.buffer_since = time.monotonic()
            self.cond.notify()
        buffer.extend(calls)
        if len(buffer) >= self.batch_size:
            self.cond.notify()

    def on_cancelled(self, call: _Call) -> None:
        with self.lock:
            notify = not call.claimed
            call.claimed = True
            if call.task_id is not None and not call.done:
                if self.deployment:
                    # A deployment cannot cancel one task: its handler skips a task marked
                    # cancelled, and the call is forgotten now, so that nothing waits for the grid
                    # to run it (shutdown(cancel_futures=True) returns at once). A session left with
                    # only such tasks is cancelled as a whole (see _pop_terminal).
                    self.cancel_marks.append(call.task_id)
                    session = self.sessions.get(call.task_id.rpartition("_")[0])
                    if session is not None:
                        session.cancelled_here = True
                    self._pop_terminal(call.task_id)
                else:
                    self.cancels.append(call.task_id)
                self.cond.notify()
        if notify:
            # wait() and as_completed() count a cancelled future only once notified
            call.future.set_running_or_notify_cancel()

    def outstanding_sessions(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(s.response) for s in self.sessions.values() if s.sent]

    def unsent(self) -> int:
        with self.lock:
            return len(self.buffer) + sum(1 for s in self.sessions.values() if not s.sent)

    def adopt(self, records: list[dict[str, Any]]) -> list[Future[Any]]:
        """Register sessions sent by another client (attach); their futures, in order."""
        futures: list[Future[Any]] = []
        bindings = self._bindings_of([tid for record in records for tid in record["task_ids"]])
        with self.lock:
            for record in records:
                sid, task_ids = record["session_id"], list(record["task_ids"])
                # polled session by session, not through the record's listener: the grid trims a
                # listener's stream as its client reads it, so what the dead client had read is
                # gone there; a session's own events stay, and an unknown session answers 404
                response = {"session_id": sid, "task_ids": task_ids, "listener": None}
                self.sessions[sid] = _Session(response, len(task_ids), sent=True)
                for tid in task_ids:
                    # raw: whether a task was ours or a plain dict, its output tells
                    call = _Call(self, {}, raw=True)
                    call.task, call.task_id, call.binding = None, tid, bindings.get(tid)
                    self.tasks[tid] = call
                    futures.append(call.future)
        self.poller_event.set()
        return futures

    def _bindings_of(self, task_ids: list[str]) -> dict[str, str]:
        """The bindings of adopted tasks, from their inputs in the data plane (the client that
        sent them is gone). A task whose input is gone, or not ours, gets no check."""
        found: dict[str, str] = {}
        for start in range(0, len(task_ids), 1000):
            chunk = task_ids[start:start + 1000]
            try:
                inputs = self.connector.store.get_many([input_key(tid) for tid in chunk])
            except Exception as exc:  # noqa: BLE001 - without inputs, outputs are checked unbound
                logger.debug("attach: cannot read task inputs (%s); outputs checked without binding", exc)
                return found
            for tid, raw in zip(chunk, inputs, strict=True):
                try:
                    task = decode_task(raw) if raw is not None else None
                except PayloadError:
                    task = None
                if is_executor_task(task):
                    found[tid] = task_binding(task)
        return found

    def request_stop(self, *, cancel_futures: bool, kill_running: bool) -> None:
        """The shutdown flags plus the grid-side cancellations of ``shutdown()``."""
        with self.lock:
            self.shutdown = True
            pending: list[_Call] = []
            if cancel_futures:
                pending = [c for c in self.buffer if not c.claimed]
                pending += [c for c in self.tasks.values() if not c.claimed]
            if kill_running and cancel_futures:
                self.session_cancels.extend(sid for sid, s in self.sessions.items() if s.sent)
            elif kill_running:
                self.cancels.extend(tid for tid, c in self.tasks.items() if c.claimed and not c.done)
            self.cond.notify_all()
        for call in pending:
            call.future.cancel()  # the done callback notifies waiters and queues the grid cancel
        self.poller_event.set()

    def kill_running(self) -> int:
        with self.lock:
            ids = [tid for tid, c in self.tasks.items() if c.claimed and not c.done and c.future.running()]
            self.cancels.extend(ids)
            self.cond.notify()
        return len(ids)

    # ---- resolving futures ----------------------------------------------------------------

    def _pop_terminal(self, task_id: str) -> _Call | None:
        """Forget a task that reached a terminal state; lock held. None if unknown."""
        call = self.tasks.pop(task_id, None)
        if call is None:
            return None  # a late duplicate, or a task of another client on the same listener
        call.done = True
        session = self.sessions.get(task_id.rpartition("_")[0])
        if session is not None:
            session.remaining -= 1
            if session.remaining <= 0:
                del self.sessions[session.response["session_id"]]
                if session.cancelled_here:
                    # the grid may still hold tasks of it that we gave up on: end them there before
                    # their data is deleted (queued ones are then skipped, running ones stopped)
                    self.session_cancels.append(session.response["session_id"])
                self.cleanups.append(session.response)
                self.cond.notify()
        return call

    @staticmethod
    def _settle(call: _Call, need_claim: bool, ok: bool, value: Any) -> None:
        future = call.future
        if need_claim:
            try:
                if not future.set_running_or_notify_cancel():
                    return  # the user cancelled it first
            except RuntimeError:
                return  # resolved meanwhile by the broken path
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except InvalidStateError:
            pass  # cancelled by the user between our claim and now (a race we accept)

    def apply(self, batch: Any) -> bool:
        """Apply one poll's changes; True if anything changed."""
        starts: list[_Call] = []
        ends: list[tuple[_Call, bool, str, Any]] = []
        with self.lock:
            for tid in batch.processing:
                call = self.tasks.get(tid)
                if call is not None and not call.claimed:
                    call.claimed = True
                    starts.append(call)
            for kind, items in (("finished", batch.finished.items()), ("failed", batch.failed.items())):
                for tid, value in items:
                    call = self._pop_terminal(tid)
                    if call is not None:
                        need_claim = not call.claimed
                        call.claimed = True
                        ends.append((call, need_claim, kind, value))
            for tid in batch.cancelled:
                call = self._pop_terminal(tid)
                if call is not None:
                    ends.append((call, False, "cancelled", None))
        for call in starts:
            try:
                call.future.set_running_or_notify_cancel()
            except RuntimeError:
                pass  # resolved meanwhile by the broken path
        logs_of: dict[str, str] = {}
        for call, need_claim, kind, value in ends:
            if kind == "finished" and self.deployment:
                self._measure(value)
            if kind == "finished":
                ok, result, logs = decode_output_and_logs(value, self.key, raw=call.raw, binding=call.binding)
                if logs and call.task_id is not None:
                    logs_of[call.task_id] = logs
                    if not ok:
                        log_note(result, logs, call.task_id)
                self._settle(call, need_claim, ok, result)
            elif kind == "failed":
                self._settle(call, need_claim, False, TaskFailedError(str(value), call.task_id))
            elif not call.future.cancel():
                # cancelled on the grid while running (kill_running, or another client): a running
                # Future cannot become cancelled, so it raises CancelledError instead
                exc = CancelledError(f"task {call.task_id} was cancelled on the grid while running")
                self._settle(call, False, False, exc)
        if logs_of:
            with self.lock:
                self.log_copies.update(logs_of)
                self.cond.notify()
        return bool(starts or ends)

    def _measure(self, output: str) -> None:
        """Learn the seconds per call from the guard's ``call_sec``, the output's last key."""
        found = _CALL_SEC.search(output, max(0, len(output) - 40))
        if found is not None:
            sample = float(found.group(1))
            self.call_sec = sample if self.call_sec is None else 0.8 * self.call_sec + 0.2 * sample

    def auto_chunksize(self, items: int | None, workers: int | None, options: TaskOptions | None = None) -> int:
        """map's chunk size when the user gives none: 1 on a grid of this package. On a
        deployment, whose per-task overhead is of the order of a second, tasks of about
        :data:`_CHUNK_TARGET_SEC` of calls at the time per call the handler measured (so
        ``items`` calls that take less than that in all go as one task); before any measurement,
        two tasks per worker of ``workers`` (default 4). ``items`` None (``buffersize``): chunks of
        the measured target, else 1. ``options``: those of the map (its time limit caps a chunk)."""
        if not self.deployment:
            return 1
        call_sec = self.call_sec
        target = _CHUNK_TARGET_SEC
        timeout = (options or self.options).task_timeout_sec
        if timeout is not None:
            target = min(target, timeout / 4)  # a chunk is one task: well within its limit
        if items is None:
            return max(1, min(int(target / call_sec), _MAX_AUTO_CHUNK)) if call_sec else 1
        if not call_sec:
            tasks = 2 * (workers or 4)
        else:
            tasks = -(-int(items * call_sec * 1e6) // max(1, int(target * 1e6)))
        tasks = max(1, min(items, tasks))
        return max(1, min(-(-items // tasks), _MAX_AUTO_CHUNK))

    def fail_calls(self, calls: list[_Call], exc_factory: Any) -> None:
        """Resolve calls the grid will never answer for (lock not held; calls already removed)."""
        for call in calls:
            with self.lock:
                need_claim = not call.claimed
                call.claimed = True
                call.done = True
            self._settle(call, need_claim, False, exc_factory())

    def set_broken(self, message: str, cause: BaseException | None) -> None:
        """The grid is lost: fail every pending future with BrokenGridExecutor."""
        with self.lock:
            if self.broken is not None:
                return
            self.broken = BrokenGridExecutor(message)
            self.broken.__cause__ = cause
            calls = list(self.buffer) + list(self.tasks.values())
            self.buffer.clear()
            self.tasks.clear()
            self.sessions.clear()
            self.cancels.clear()
            self.cancel_marks.clear()
            self.session_cancels.clear()
            self.cond.notify_all()
        logger.debug("executor broken: %s", message)

        def factory() -> BaseException:
            exc = BrokenGridExecutor(message)
            exc.__cause__ = cause
            return exc

        self.fail_calls(calls, factory)
        self.poller_event.set()

    # ---- the sender -------------------------------------------------------------------------

    def _sender_main(self) -> None:
        try:
            self._sender_loop()
        except BaseException as exc:  # a bug here must not leave futures hanging forever
            logger.exception("htcgrid-sender failed")
            self.set_broken(f"internal error in the sender thread: {exc!r}", exc)
        finally:
            self._close()

    def _sender_loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    closing = self.closing()
                    work = bool(self.cancels or self.cancel_marks or self.session_cancels or self.cleanups
                                or self.log_copies)
                    if self.buffer:
                        age = time.monotonic() - self.buffer_since
                        if closing or len(self.buffer) >= self.batch_size or age >= self.batch_window:
                            work = True
                        wait = max(self.batch_window - age, 0.0005)
                    else:
                        wait = _IDLE_TICK
                    if work:
                        break
                    if closing and not self.buffer and self.poller_done:
                        return
                    self.cond.wait(min(wait, _IDLE_TICK))
                sends = self._take_batch()
                cancels, self.cancels = self.cancels, []
                cancel_marks, self.cancel_marks = self.cancel_marks, []
                session_cancels, self.session_cancels = self.session_cancels, []
                cleanups, self.cleanups = self.cleanups, []
                log_copies, self.log_copies = self.log_copies, {}
            if log_copies and hasattr(self.connector, "keep_task_logs"):
                # their own keys, which the session's deletion leaves (they expire with the
                # grid's retention): `htcgrid-executor logs TASK_ID` reads them later
                self._best_effort("keep_task_logs", self.connector.keep_task_logs, log_copies)
            for batch, session, tasks_list in sends:
                self._send(batch, session, tasks_list)
            if cancel_marks and self.guard is not None:
                # one batched write, before any session cancel or clean-up of the same tasks
                self._best_effort("mark_cancelled", self.connector.mark_cancelled, cancel_marks)
            if session_cancels:
                self._best_effort("cancel_sessions", self.connector.cancel_sessions, session_cancels)
                gone = set(session_cancels)
                cancels = [tid for tid in cancels if tid.rpartition("_")[0] not in gone]
            if cancels and getattr(self.connector, "extensions", None) is not False:
                # (a plain deployment cannot cancel single tasks: they run, their futures stay cancelled)
                for start in range(0, len(cancels), _CANCEL_CHUNK):
                    self._best_effort("cancel_tasks", self.connector.cancel_tasks,
                                      cancels[start:start + _CANCEL_CHUNK])
            for response in cleanups:
                if self.guard is not None:
                    self._best_effort("delete_session_data", self._delete_guarded, response)
                else:
                    self._best_effort("delete_session_data", self.connector.delete_session_data, response)

    def _delete_guarded(self, response: dict[str, Any]) -> None:
        self.connector.delete_session_data(response, guarded=True)

    def _take_batch(self) -> list[tuple[list[_Call], _Session, list[dict[str, Any]]]]:
        """Move up to batch_size calls into new registered sessions, one per distinct options
        (the wire carries options per session), in the order their first call came; lock held."""
        groups: dict[TaskOptions, list[_Call]] = {}
        buffer = self.buffer
        size = taken = 0
        # and at most _BATCH_BYTES of inputs (one call at least): one write of several large
        # tasks would pass Redis's 1 GiB limit on a client's query and drop the connection
        while buffer and taken < self.batch_size and (not taken or size + buffer[0].size <= _BATCH_BYTES):
            call = buffer.popleft()
            if not call.claimed:  # claimed while unsent means cancelled: never send it
                groups.setdefault(call.options, []).append(call)
                taken += 1
                size += call.size
        if buffer:
            self.buffer_since = time.monotonic()
        self.fn_cache = {}  # a function is pickled once per batch
        return [self._register(options, batch) for options, batch in groups.items()]

    def _register(self, options: TaskOptions, batch: list[_Call]) -> tuple[list[_Call], _Session, list[dict[str, Any]]]:
        sid = new_session_id()
        task_ids = task_ids_for(sid, len(batch))
        tasks_list = []
        guard, key = self.guard, self.key
        for call, tid in zip(batch, task_ids, strict=True):
            call.task_id = tid
            self.tasks[tid] = call
            task = call.task
            if guard is not None and key is not None and not call.raw:
                # the task id and the limits travel in the task: upstream's agent gives the
                # worker the task dict alone (and so each task's guard keeps its call's options)
                task[GUARD_FIELD] = seal_guard(guard, tid, key, task_timeout_sec=options.task_timeout_sec,
                                               retry_count=options.retry_count, lease_sec=self.guard_lease_sec)
            tasks_list.append(task)
            call.task = None
        # registered before it is sent: the listener may report a task before send() returns
        session = _Session({"session_id": sid, "task_ids": task_ids, "listener": self.listener},
                           len(batch), sent=False)
        self.sessions[sid] = session
        return batch, session, tasks_list

    def _send(self, batch: list[_Call], session: _Session, tasks_list: list[dict[str, Any]]) -> None:
        sid = session.response["session_id"]
        first_failure: float | None = None
        delay = 0.05
        while True:
            attempt_started = time.monotonic()
            try:
                response = self.connector.send(tasks_list, session_id=sid, listener=self.listener,
                                               options=batch[0].options)
                break
            except Exception as exc:  # noqa: BLE001 - sorted below: retry, or fail the batch
                if not _retryable(exc) or self.broken is not None:
                    self._drop_session(batch, session.response, exc)
                    return
                # the streak began when the first failed call began: its own retries count too
                first_failure = first_failure or attempt_started
                if time.monotonic() - first_failure >= self.broken_after_sec:
                    self.set_broken(f"cannot send tasks to the grid for {self.broken_after_sec:g} s: {exc}", exc)
                    return
                logger.debug("send of session %s failed (%s); retrying", sid, exc)
                # the same session id again: a grid that got the first try keeps one copy
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        returned = list(response.get("task_ids") or [])
        with self.lock:
            if returned and returned != session.response["task_ids"]:
                # the connector named the tasks itself: re-key them (never expected)
                for call, tid in zip(batch, returned, strict=False):
                    if self.tasks.pop(call.task_id or "", None) is call:
                        call.task_id = tid
                        self.tasks[tid] = call
                session.response["task_ids"] = returned
            session.sent = True
        self.poller_event.set()

    def _calls_of(self, response: dict[str, Any]) -> list[_Call]:
        with self.lock:
            return [call for tid in response["task_ids"] if (call := self.tasks.get(tid)) is not None]

    def _drop_session(self, batch: list[_Call], response: dict[str, Any], exc: BaseException) -> None:
        """Give up on a session: its calls' futures fail with ``exc``."""
        with self.lock:
            self.sessions.pop(response["session_id"], None)
            for call in batch:
                if call.task_id is not None and self.tasks.get(call.task_id) is call:
                    del self.tasks[call.task_id]
        logger.debug("session %s dropped: %s", response["session_id"], exc)

        def factory() -> BaseException:
            return exc  # the same exception object for the batch: it came from one send()

        self.fail_calls(batch, factory)

    def _best_effort(self, what: str, method: Any, arg: Any) -> None:
        # cancellations and clean-ups are worth a few tries, never a broken executor
        for attempt in range(3):
            try:
                method(arg)
                return
            except Exception as exc:  # noqa: BLE001 - best effort by design
                logger.debug("%s failed (attempt %d): %s", what, attempt + 1, exc)
                if not _retryable(exc):
                    return
                time.sleep(0.1 * (attempt + 1))

    def release_shares(self, share_ids: list[str]) -> None:
        """Delete shared objects from the data plane (the caller's thread; raises its errors)."""
        with self.lock:
            ids = [sid for sid in share_ids if sid in self.shares]
            self.shares.difference_update(ids)
        if ids:
            self.connector.store.delete_many([shared_key(sid) for sid in ids])

    def _close(self) -> None:
        with _live_lock:
            _live_cores.discard(self)
        if self.shares:  # the work is done: what it shared goes
            try:
                self.release_shares(list(self.shares))
            except Exception as exc:  # noqa: BLE001 - closing must not raise in a thread
                logger.debug("shared objects not deleted: %s", exc)
        if self.owns_connector:
            try:
                self.connector.close()
            except Exception as exc:  # noqa: BLE001 - closing must not raise in a thread
                logger.debug("connector close failed: %s", exc)
        if self.grid is not None:
            grid, self.grid = self.grid, None
            try:
                grid.stop()
            except Exception as exc:  # noqa: BLE001
                logger.debug("embedded grid stop failed: %s", exc)

    # ---- the poller -------------------------------------------------------------------------

    def _poller_main(self) -> None:
        try:
            self._poller_loop()
        except BaseException as exc:  # a bug here must not leave futures hanging forever
            logger.exception("htcgrid-poller failed")
            self.set_broken(f"internal error in the poller thread: {exc!r}", exc)
        finally:
            with self.lock:
                self.poller_done = True
                self.cond.notify_all()

    def _poller_loop(self) -> None:
        cursors: dict[str | None, str | None] = {}  # listener id (None: per session) -> cursor
        first_failure: float | None = None
        delay = 0.05
        interval = 0.01
        pull_interval = float(self.connector.client_config.get("dynamodb_results_pull_interval_sec", 0.5) or 0.5)
        quiet_since = time.monotonic()
        verified: collections.deque[str] = collections.deque()  # session ids, next to check first
        while True:
            with self.lock:
                groups: dict[str | None, list[dict[str, Any]]] = {}
                for s in self.sessions.values():
                    if s.sent:
                        groups.setdefault(s.response.get("listener"), []).append(s.response)
                idle = not self.sessions
                stop = idle and not self.buffer and self.closing()
            if stop:
                return
            if not groups:
                self.poller_event.wait(_IDLE_TICK)
                self.poller_event.clear()
                continue
            changed = False
            extensions = True
            long_polled = False
            requests = 0
            attempt_started = time.monotonic()
            try:
                single = len(groups) == 1
                for lid, sessions in groups.items():
                    if lid is None:  # attached sessions: one by one
                        requests += len(sessions)
                        for response in sessions:
                            key = "session:" + response["session_id"]
                            wait = _LONG_POLL_SEC if single and len(sessions) == 1 else 0.0
                            try:
                                batch = self.connector.poll_session(response["session_id"],
                                                                    after=cursors.get(key), wait_sec=wait)
                            except BadRequestError as exc:
                                # an answer, not an outage: the grid does not know the session
                                # (never submitted, or expired): its futures fail with that
                                self._drop_session(self._calls_of(response), response, exc)
                                changed = True
                                continue
                            changed = self.apply(batch) or changed
                            cursors[key] = batch.cursor  # after apply: a failed apply is polled again
                            extensions = extensions and batch.extensions
                            long_polled = long_polled or wait > 0
                    else:
                        requests += 1
                        wait = _LONG_POLL_SEC if single else 0.0
                        batch = self.connector.poll_listener(lid, sessions, cursors.get(lid), wait_sec=wait)
                        changed = self.apply(batch) or changed
                        cursors[lid] = batch.cursor
                        extensions = extensions and batch.extensions
                        long_polled = long_polled or wait > 0
                first_failure, delay = None, 0.05
            except Exception as exc:  # noqa: BLE001 - any failure to poll is retried to the deadline
                first_failure = first_failure or attempt_started
                if time.monotonic() - first_failure >= self.broken_after_sec:
                    self.set_broken(f"cannot reach the grid for {self.broken_after_sec:g} s: {exc}", exc)
                    continue
                logger.debug("poll failed (%s); retrying in %.2f s", exc, delay)
                self.poller_event.wait(delay)
                self.poller_event.clear()
                delay = min(delay * 2, 2.0)
                continue
            if changed:
                interval = 0.01
                quiet_since = time.monotonic()
                continue
            if extensions and time.monotonic() - quiet_since >= _VERIFY_SEC:
                # A listener stream says what changed, not what was forgotten: a grid that lost
                # its state (Redis restarted without persistence) would leave these futures
                # waiting for ever. So, when nothing happens for a while, ask after the sessions.
                self._verify_sessions([r for lid, group in groups.items() if lid is not None
                                       for r in group], verified)
                quiet_since = time.monotonic()
            if not long_polled or not extensions:
                # nothing waited on the server side (several channels, or a plain deployment that
                # answers at once): poll at an interval that backs off while nothing changes
                self.poller_event.wait(interval)
                self.poller_event.clear()
                # many sessions polled one by one: fewer rounds, at most ~50 requests/s when idle
                interval = min(interval * 2, max(pull_interval, min(2.0, 0.02 * requests)))


    def _verify_sessions(self, responses: list[dict[str, Any]], order: collections.deque[str]) -> None:
        """Fail the futures of sessions the grid answers it does not know (404), checking up to
        ``_VERIFY_BATCH`` sessions, round robin; other failures are left to the next poll."""
        by_id = {r["session_id"]: r for r in responses}
        known = set(order)
        order.extend(sid for sid in by_id if sid not in known)
        for _ in range(min(_VERIFY_BATCH, len(order))):
            sid = order.popleft()
            response = by_id.get(sid)
            if response is None:
                continue  # collected meanwhile
            try:
                self.connector.poll_session(sid, after=_FAR_CURSOR)
            except BadRequestError as exc:
                if exc.status == 404:
                    lost = TaskFailedError(f"the grid no longer knows session {sid} (it lost its state, "
                                           "or the session expired): its tasks' outcomes are gone")
                    lost.__cause__ = exc
                    self._drop_session(self._calls_of(response), response, lost)
                    continue
            except Exception as exc:  # noqa: BLE001 - an outage shows in the next poll
                logger.debug("session check of %s failed: %s", sid, exc)
            order.append(sid)


_warned: set[str] = set()


def _warn_once_about_deployment(no_guard: bool, retry_count: int | None) -> None:
    """What a deployment cannot keep (docs/deploying.md, "What differs"), said once a process."""
    notes = []
    if no_guard:
        notes.append(("no-guard", "htcgrid_worker_guard is off: on this deployment a cancelled call may still "
                      "run, a replayed submission runs calls twice, and task_timeout_sec and retry_count are "
                      "not enforced"))
    if retry_count is not None and retry_count > 5:
        notes.append(("retries", f"retry_count={retry_count}: an HTC-Grid deployment gives up on a lost "
                      "task after 5 retries whatever the client asks"))
    for name, text in notes:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(text, RuntimeWarning, stacklevel=4)


def _retryable(exc: BaseException) -> bool:
    """Worth another try: the grid could not be reached, or answered with a server error."""
    if isinstance(exc, GridUnavailableError):
        return True
    if isinstance(exc, ControlPlaneError):
        return exc.status is None or exc.status >= 500
    return False
