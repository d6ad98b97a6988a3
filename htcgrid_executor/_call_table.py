"""The call table: every call of one executor from ``submit`` to its terminal state, and the
grid actions queued for the sender, under one lock::

    caller threads               htcgrid-sender                       htcgrid-poller
    submit / map ──▶ buffer ──▶ send(batch) ─────────▶ grid ───────▶ poll_listener (long poll)
    (pickling here)  (lock)     cancel_tasks / cancel_sessions          │ decode outputs
                                delete_session_data ◀──── cleanups ─────┘ resolve futures

Only the caller pickles (so an unpicklable call fails in the caller); the sender
(``_sender.py``) talks to the grid to change it, except that a caller's ``Future.cancel()``
cancels its sent task itself (:meth:`_CallTable.cancel`: True must mean never run, which only the
grid can tell); the poller (``_poller.py``) moves futures out of PENDING, and so does a cancel,
for the futures it claimed. The executor and both
threads call the table's methods, never its fields. Each method says whether it *takes the lock*
or expects it *held*; the lock guards every field of the table and of its :class:`_ExecutorFlags`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ._calls import (
    _Batch,
    _Call,
    _Cleanups,
    _ExecutorFlags,
    _GridActions,
    _Session,
    notify_cancelled,
    settle,
    settle_running,
)
from .backoff import spend_until
from .errors import BrokenGridExecutor
from .options import TaskOptions
from .wire import new_session_id, task_ids_for

if TYPE_CHECKING:  # pragma: no cover
    from .connector.client import ResultBatch

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)

_BATCH_BYTES = 64 * 1024 * 1024  # task inputs per send (one call at least)


def _session_id_of(task_id: str) -> str:
    # not wire.session_of, which raises: an attached record's task ids are the caller's, unchecked
    return task_id.rpartition("_")[0]


class _CallTable:
    """The calls of one executor: buffered, in sessions on the grid, and the grid actions due.

    ``work_ready`` (a condition on ``lock``) wakes the sender; ``poller_wakeup`` wakes an idle
    poller (new session, shutdown). ``options``: the executor's own, for calls given none.
    ``cancel_unless_started``: cancels sent tasks no worker has claimed, answering the others as
    ``(claimed, ended)`` sets.
    """

    def __init__(self, listener: str, options: TaskOptions, *, deployment: bool, batch_size: int,
                 batch_window: float, broken_after_sec: float,
                 cancel_unless_started: Callable[[list[str]], tuple[set[str], set[str]]] | None) -> None:
        self.listener = listener
        self._cancel_unless_started = cancel_unless_started  # None: a deployment without the guard
        self._broken_after_sec = broken_after_sec
        self.options = options
        self.deployment = deployment
        self.batch_size = batch_size
        self.batch_window = batch_window
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        self.poller_wakeup = threading.Event()
        self.sessions_sent = threading.Condition(self.lock)  # notified as each send returns
        # `lock` guards every attribute below
        self.flags = _ExecutorFlags()
        self._buffer: collections.deque[_Call] = collections.deque()
        self._buffer_since = 0.0  # monotonic time the oldest buffered call arrived
        self._fn_cache: dict[int, tuple[Any, str]] = {}  # id(fn) -> (fn, signed pickle), per batch
        self._tasks: dict[str, _Call] = {}  # task id -> call, until its task is terminal
        self._sessions: dict[str, _Session] = {}  # session id -> session with tasks not terminal
        self._actions = _GridActions()
        self._cleanups = _Cleanups()  # handed to the sender when due, not one by one

    # ---- the executor (caller threads) ------------------------------------------------------

    def check_open(self) -> None:
        """Raise if no new work is accepted (no lock: :meth:`enqueue` checks again under it)."""
        self.flags.raise_if_closed()

    def function_blob(self, fn: Any, pickle: Callable[[], str]) -> str:
        """``fn``'s signed pickle, made once per batch. No lock: the sender swaps in a new dict
        per batch, and a dict's get and set are atomic."""
        cache = self._fn_cache
        entry = cache.get(id(fn))
        if entry is not None and entry[0] is fn:
            return entry[1]
        blob = pickle()
        cache[id(fn)] = (fn, blob)  # holding fn keeps its id from being reused
        return blob

    def enqueue(self, calls: list[_Call]) -> list[Future[Any]]:
        """Buffer calls for the sender; their futures. Takes the lock; raises as
        :meth:`_ExecutorFlags.raise_if_closed` (checked again under the lock: ``shutdown()`` may
        have run since the caller's check)."""
        with self.lock:
            self.flags.raise_if_closed()
            buffer = self._buffer
            if not buffer:
                self._buffer_since = time.monotonic()
                self.work_ready.notify()
            buffer.extend(calls)
            if len(buffer) >= self.batch_size:
                self.work_ready.notify()
        return [call.future for call in calls]

    def cancel(self, calls: list[_Call]) -> list[bool]:
        """``Future.cancel()`` of these calls, with the stdlib's promise kept: True for each call
        that will never run. An unsent call is never sent; the sent ones are cancelled on the
        grid by :meth:`_cancel_sent`; one claimed already (running, resolved or resolving) keeps
        its state. Takes the lock (not while it asks the grid)."""
        with self.lock:
            fresh = [call for call in calls if not call.claimed]
            ask = self._cancel_unless_started is not None
            mine = [call for call in fresh if call.task_id is None or not ask]
            for call in mine:
                call.claimed = True  # this thread cancels the future; the sender skips it
                if call.task_id is not None:  # sent, to a deployment that cannot cancel one task
                    self._give_up_on(call)
        never_run = {id(call) for call in mine}
        claimed_here, cancelled = self._cancel_sent([c for c in fresh if id(c) not in never_run])
        never_run |= cancelled
        for call in mine + claimed_here:
            if Future.cancel(call.future):
                notify_cancelled(call.future)
            else:  # resolved meanwhile by the broken path
                never_run.discard(id(call))
        ours = {id(call) for call in mine + claimed_here}
        for call in calls:
            if id(call) in never_run and id(call) not in ours:
                Future.cancel(call.future)  # the poller claimed it: it notifies the waiters
        return [id(call) in never_run or call.future.cancelled() for call in calls]

    def _cancel_sent(self, calls: list[_Call]) -> tuple[list[_Call], set[int]]:
        """Cancel sent calls on the grid unless a worker has claimed them; returns the calls this
        thread claimed (to cancel here) and the ``id()`` of each call that never runs. A call a
        worker has runs: its future now runs, as the poller would make it; one the grid ended is
        the poller's to resolve; a grid not answering within ``broken_after_sec`` cancels none."""
        if not calls:
            return [], set()
        deadline = time.monotonic() + self._broken_after_sec
        with self.lock:  # a session's tasks exist on the grid once its send has returned
            def unsent() -> list[_Call]:
                return [c for c in calls if not c.claimed and not getattr(
                    self._sessions.get(_session_id_of(c.task_id or "")), "sent", True)]
            while unsent() and self.flags.broken is None and time.monotonic() < deadline:
                self.sessions_sent.wait(0.05)
            waiting = {id(c) for c in unsent()}
            ask = [c for c in calls if not c.claimed and id(c) not in waiting]
        try:
            with spend_until(deadline):
                started, ended = self._cancel_unless_started([c.task_id for c in ask]) if ask else (set(), set())
        except Exception as exc:  # noqa: BLE001 - not known to be cancelled: left to run
            logger.debug("could not cancel %d tasks on the grid (%s): they go on", len(ask), exc)
            return [], set()
        never_run = [c for c in ask if c.task_id not in started and c.task_id not in ended]
        with self.lock:
            claimed_here = [c for c in never_run if not c.claimed]  # (else the poller resolves it)
            for call in ask:
                if call.task_id in started and not call.claimed:  # (running() agrees with cancel())
                    call.claimed = True
                    settle_running(call.future)  # no callbacks run: safe under the lock
            for call in claimed_here:
                call.claimed = True
                if self.deployment:
                    self._give_up_on(call)
        return claimed_here, {id(c) for c in never_run}

    def _give_up_on(self, call: _Call) -> None:
        """Forget a cancelled call that a deployment will not report: its handler skips a marked
        task later or never, and nothing is to wait for that (a session left with only such
        tasks is cancelled whole: :meth:`_pop_terminal`). Lock held."""
        session = self._sessions.get(_session_id_of(call.task_id or ""))
        if session is not None:
            session.cancelled_here = True
        self._pop_terminal(call.task_id or "")
        self.work_ready.notify()

    def outstanding_sessions(self) -> list[dict[str, Any]]:
        """Records of the sessions sent and not fully collected. Takes the lock."""
        with self.lock:
            # with the bindings this client made for its calls: attach() checks the outputs
            # against them, not against what the data plane holds (see codec.output_binding)
            return [{**s.response, "bindings": [getattr(self._tasks.get(tid), "binding", None)
                                                for tid in s.response["task_ids"]]}
                    for s in self._sessions.values() if s.sent]

    def unsent(self) -> int:
        """Calls and sessions not yet sent. Takes the lock."""
        with self.lock:
            return len(self._buffer) + sum(1 for s in self._sessions.values() if not s.sent)

    def is_broken(self) -> bool:
        """True once the grid was lost (no lock: a read of one reference)."""
        return self.flags.broken is not None

    def adopt(self, records: list[dict[str, Any]], bindings: dict[str, str]) -> list[Future[Any]]:
        """Register sessions sent by another client (attach); their futures, in order.
        ``bindings``: task id -> what its output must be signed for. Takes the lock."""
        futures: list[Future[Any]] = []
        with self.lock:
            for record in records:
                sid, task_ids = record["session_id"], list(record["task_ids"])
                # polled session by session, not through the record's listener: the grid trims a
                # listener's stream as its client reads it, so what the dead client had read is
                # gone there; a session's own events stay, and an unknown session answers 404
                response = {"session_id": sid, "task_ids": task_ids, "listener": None}
                self._sessions[sid] = _Session(response, len(task_ids), sent=True)
                for tid in task_ids:
                    # raw: whether a task was ours or a plain dict, its output tells
                    call = _Call(self, {}, raw=True)
                    call.task, call.task_id, call.binding = None, tid, bindings.get(tid)
                    self._tasks[tid] = call
                    futures.append(call.future)
        self.poller_wakeup.set()
        return futures

    def request_stop(self, *, cancel_futures: bool, kill_running: bool) -> None:
        """The shutdown flag, and what ``shutdown()`` does on the grid: ``cancel_futures`` cancels
        every call not started as :meth:`cancel` does, before any session cancel of
        ``kill_running`` (which would end them as running ones). Takes the lock."""
        with self.lock:
            self.flags.shutdown = True
            pending = [c for c in (*self._buffer, *self._tasks.values()) if not c.claimed] if cancel_futures else []
            if kill_running and not cancel_futures:
                self._actions.cancels.extend(tid for tid, c in self._tasks.items() if c.claimed and not c.done)
            self.work_ready.notify_all()
        self.cancel(pending)
        if kill_running and cancel_futures:
            with self.lock:
                self._actions.session_cancels.extend(sid for sid, s in self._sessions.items() if s.sent)
        self.wake()

    def kill_running(self) -> int:
        """Queue the cancellation of the tasks whose futures run; how many. Takes the lock."""
        with self.lock:
            ids = [tid for tid, c in self._tasks.items() if c.claimed and not c.done and c.future.running()]
            self._actions.cancels.extend(ids)
            self.work_ready.notify()
        return len(ids)

    def wake(self) -> None:
        """Wake both threads (they then look at the flags). Takes the lock."""
        with self.lock:
            self.work_ready.notify_all()
        self.poller_wakeup.set()

    # ---- the sender -------------------------------------------------------------------------

    def next_actions(self, closing: Callable[[], bool], idle_tick: float) -> _GridActions | None:
        """Wait until the sender has something to do and hand it over, the buffered calls
        batched into registered sessions; None once ``closing()`` and nothing is left (no
        buffered call, the poller done). Takes the lock (and waits on ``work_ready``)."""
        with self.work_ready:
            while True:
                is_closing = closing()
                due, wait = bool(self._actions), idle_tick
                if self._buffer:
                    age = time.monotonic() - self._buffer_since
                    if is_closing or len(self._buffer) >= self.batch_size or age >= self.batch_window:
                        due = True
                    wait = max(self.batch_window - age, 0.0005)
                cleanup_wait = self._cleanups.wait_sec(is_closing)  # inf: none gathered
                due, wait = due or cleanup_wait == 0.0, min(wait, cleanup_wait)
                if due:
                    break
                if is_closing and not self._buffer and self.flags.poller_done:
                    return None
                self.work_ready.wait(min(wait, idle_tick))
            actions, self._actions = self._actions, _GridActions()
            actions.cleanups = self._cleanups.take_if_due(is_closing)
            actions.sends = self._take_batch()
            return actions

    def _take_batch(self) -> list[_Batch]:
        """Move up to batch_size calls into new registered sessions, one per distinct options
        (the wire carries options per session), in the order their first call came. Lock held."""
        groups: dict[TaskOptions, list[_Call]] = {}
        buffer = self._buffer
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
            self._buffer_since = time.monotonic()
        self._fn_cache = {}  # a function is pickled once per batch
        return [self._register(options, calls) for options, calls in groups.items()]

    def _register(self, options: TaskOptions, calls: list[_Call]) -> _Batch:
        """Give calls task ids in a new session, registered before it is sent (the listener may
        report a task before send() returns). Lock held."""
        sid = new_session_id()
        task_ids = task_ids_for(sid, len(calls))
        tasks: list[dict[str, Any]] = []
        for call, tid in zip(calls, task_ids, strict=True):
            call.task_id = tid
            self._tasks[tid] = call
            assert call.task is not None
            tasks.append(call.task)
            call.task = None
        session = _Session({"session_id": sid, "task_ids": task_ids, "listener": self.listener},
                           len(calls), sent=False)
        self._sessions[sid] = session
        return _Batch(calls, session, tasks, options)

    def mark_sent(self, batch: _Batch, returned: list[str]) -> None:
        """The grid accepted a batch's session (``returned``: the task ids it answered). Takes
        the lock."""
        with self.lock:
            session = batch.session
            if returned and returned != session.response["task_ids"]:
                # the connector named the tasks itself: re-key them (never expected)
                for call, tid in zip(batch.calls, returned, strict=False):
                    if self._tasks.pop(call.task_id or "", None) is call:
                        call.task_id = tid
                        self._tasks[tid] = call
                session.response["task_ids"] = returned
            session.sent = True
            self.sessions_sent.notify_all()
        self.poller_wakeup.set()

    # ---- the poller -------------------------------------------------------------------------

    def sent_sessions(self) -> tuple[dict[str | None, list[dict[str, Any]]], bool]:
        """The sent sessions grouped by listener (None: attached, polled one by one), and
        whether nothing at all is outstanding (no session, no buffered call). Takes the lock."""
        with self.lock:
            groups: dict[str | None, list[dict[str, Any]]] = {}
            for s in self._sessions.values():
                if s.sent:
                    groups.setdefault(s.response.get("listener"), []).append(s.response)
            return groups, not self._sessions and not self._buffer

    def take_changes(self, batch: ResultBatch) -> tuple[list[_Call], list[tuple[_Call, bool, str, Any]]]:
        """One poll's changes: the calls that started (claimed here) and the calls that ended,
        each ``(call, need_claim, kind, value)`` with kind finished/failed/cancelled, forgotten
        here. Takes the lock; the futures are the caller's to resolve, outside it."""
        starts: list[_Call] = []
        ends: list[tuple[_Call, bool, str, Any]] = []
        with self.lock:
            for tid in batch.processing:
                call = self._tasks.get(tid)
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
                    need_claim = not call.claimed
                    call.claimed = True
                    ends.append((call, need_claim, "cancelled", None))
        return starts, ends

    def keep_logs(self, logs_of: dict[str, str]) -> None:
        """Have the sender copy these tasks' captured logs. Takes the lock."""
        with self.lock:
            self._actions.log_copies.update(logs_of)
            self.work_ready.notify()

    def calls_of(self, response: dict[str, Any]) -> list[_Call]:
        """The outstanding calls of a session. Takes the lock."""
        with self.lock:
            return [call for tid in response["task_ids"] if (call := self._tasks.get(tid)) is not None]

    def poller_finished(self) -> None:
        """The poller ends: the sender may end once its work is done. Takes the lock."""
        with self.lock:
            self.flags.poller_done = True
            self.work_ready.notify_all()

    def _pop_terminal(self, task_id: str) -> _Call | None:
        """Forget a task that reached a terminal state; None if unknown. Lock held."""
        call = self._tasks.pop(task_id, None)
        if call is None:
            return None  # a late duplicate, or a task of another client on the same listener
        call.done = True
        session = self._sessions.get(_session_id_of(task_id))
        if session is not None:
            session.remaining -= 1
            if session.remaining <= 0:
                del self._sessions[session.response["session_id"]]
                if session.cancelled_here:
                    # the grid may still hold tasks of it that we gave up on: end them there before
                    # their data is deleted (queued ones are then skipped, running ones stopped)
                    self._actions.session_cancels.append(session.response["session_id"])
                if self._cleanups.add(session.response):
                    self.work_ready.notify()
        return call

    # ---- failing calls (both threads) ---------------------------------------------------------

    def fail(self, calls: list[_Call], exc_factory: Callable[[], BaseException]) -> None:
        """Resolve calls the grid will never answer for (already removed from the table). Takes
        the lock, per call."""
        for call in calls:
            with self.lock:
                need_claim = not call.claimed
                call.claimed = True
                call.done = True
            settle(call, need_claim, False, exc_factory())

    def drop_session(self, calls: list[_Call], response: dict[str, Any], exc: BaseException) -> None:
        """Give up on a session: its calls' futures fail with ``exc`` (the same object for all:
        it came from one answer). Takes the lock."""
        with self.lock:
            self._sessions.pop(response["session_id"], None)
            for call in calls:
                if call.task_id is not None and self._tasks.get(call.task_id) is call:
                    del self._tasks[call.task_id]
        logger.debug("session %s dropped: %s", response["session_id"], exc)
        self.fail(calls, lambda: exc)

    def set_broken(self, message: str, cause: BaseException | None) -> None:
        """The grid is lost: fail every pending future with BrokenGridExecutor and refuse new
        work. Takes the lock; the first call wins."""
        with self.lock:
            if self.flags.broken is not None:
                return
            self.flags.broken = _broken(message, cause)
            calls = list(self._buffer) + list(self._tasks.values())
            self._buffer.clear()
            self._tasks.clear()
            self._sessions.clear()
            self._actions.cancels.clear()
            self._actions.session_cancels.clear()
            self.work_ready.notify_all()
        logger.debug("executor broken: %s", message)
        self.fail(calls, lambda: _broken(message, cause))
        self.poller_wakeup.set()


def _broken(message: str, cause: BaseException | None) -> BrokenGridExecutor:
    exc = BrokenGridExecutor(message)
    exc.__cause__ = cause
    return exc
