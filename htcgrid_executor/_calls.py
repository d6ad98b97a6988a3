"""The records the call table (``_call_table.py``) keeps: one :class:`_Call` per grid task, one
:class:`_Session` per session sent, the :class:`_ExecutorFlags` an executor and its threads
share, and what the table hands the sender (:class:`_Batch`, :class:`_GridActions`, the
:class:`_Cleanups` it gathers). All their
fields are guarded by the table's lock; :func:`settle` resolves a future outside it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _lifecycle
from .codec import is_executor_task, task_binding
from .errors import BrokenGridExecutor
from .options import TaskOptions

if TYPE_CHECKING:  # pragma: no cover
    from ._call_table import _CallTable

__all__: list[str] = []  # private module


class _ExecutorFlags:
    """The states an executor, its views and its threads share (cf. loky's ``_ExecutorFlags``),
    guarded by the call table's lock. ``broken`` holds the exception the pending futures got."""

    __slots__ = ("shutdown", "broken", "poller_done")

    def __init__(self) -> None:
        self.shutdown = False
        self.broken: BrokenGridExecutor | None = None
        self.poller_done = False

    def raise_if_closed(self) -> None:
        """Raise if no new work is accepted (lock held, or a check ahead of the locked one)."""
        broken = self.broken
        if broken is not None:
            raise BrokenGridExecutor(str(broken)) from broken.__cause__
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _lifecycle.interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")


class _GridFuture(Future):  # type: ignore[type-arg]
    """The Future of a grid call: a real ``concurrent.futures.Future``, whose :meth:`cancel`
    keeps the stdlib's promise on a grid, where the call runs in another process that the
    executor learns about only through the grid."""

    def __init__(self, call: _Call) -> None:
        super().__init__()
        self._call = call

    def cancel(self) -> bool:
        """Cancel the call unless it is running or done, as the stdlib's: True means it never runs.

        A call already sent is cancelled on the grid first, in this thread (one request, which
        waits at most ``broken_after_sec``): if a worker has taken it meanwhile, it runs and this
        returns False. To cancel many futures, ``shutdown(cancel_futures=True)`` (and ``map``'s
        own clean-up) asks for all of them at once."""
        return self._call.table.cancel([self._call])[0]


def cancel_all(futures: Iterable[Future[Any]]) -> None:
    """``cancel()`` each future, with one grid request per executor for the grid's ones."""
    by_table: dict[int, tuple[_CallTable, list[_Call]]] = {}
    for future in futures:
        if isinstance(future, _GridFuture):
            table = future._call.table
            by_table.setdefault(id(table), (table, []))[1].append(future._call)
        else:
            future.cancel()
    for table, calls in by_table.values():
        table.cancel(calls)


def settle_running(future: Future[Any]) -> None:
    """Move a claimed future to RUNNING (it may have been resolved by the broken path)."""
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:
        pass


def notify_cancelled(future: Future[Any]) -> None:
    """Tell ``wait()`` and ``as_completed()`` about a future cancelled here (they count a
    cancelled future only once notified); once, by the thread that claimed it."""
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:
        pass  # notified already


class _Call:
    """One grid task and its future. Small on purpose: a million may be outstanding.

    ``claimed`` (guarded by the table's lock) says that some thread has taken on calling
    ``set_running_or_notify_cancel()`` for the future, which must happen exactly once.
    """

    __slots__ = ("future", "task", "task_id", "claimed", "done", "raw", "table", "binding", "size", "options")

    def __init__(self, table: _CallTable, task: dict[str, Any], raw: bool, size: int = 0,
                 options: TaskOptions | None = None) -> None:
        self.future: _GridFuture = _GridFuture(self)
        # the grid options it is sent with: calls with equal options go in one session
        self.options = table.options if options is None else options
        self.size = size  # bytes its task takes in the data plane: batches are capped by it
        self.task: dict[str, Any] | None = task  # dropped once sent
        # what its output must be signed for: an output copied from another task is refused
        self.binding: str | None = task_binding(task) if is_executor_task(task) else None
        self.task_id: str | None = None  # set when the sender puts it in a session
        self.claimed = False
        self.done = False  # terminal on the grid (or given up on)
        self.raw = raw
        self.table = table


class _Session:
    __slots__ = ("response", "remaining", "sent", "cancelled_here")

    def __init__(self, response: dict[str, Any], remaining: int, sent: bool) -> None:
        self.response = response  # {'session_id', 'task_ids', 'listener'}: what attach() needs
        self.remaining = remaining  # tasks not yet terminal on the grid
        self.sent = sent
        # a deployment: some task was given up on here (cancelled) before the grid ended it
        self.cancelled_here = False


@dataclass
class _Batch:
    """One session's worth of calls taken from the buffer, registered, ready to send."""

    calls: list[_Call]
    session: _Session
    tasks: list[dict[str, Any]]
    options: TaskOptions

    @property
    def session_id(self) -> str:
        return self.session.response["session_id"]


@dataclass
class _GridActions:
    """What the sender is to do on the grid next, handed over whole (swapped under the lock)."""

    sends: list[_Batch] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # task ids to cancel on the grid
    session_cancels: list[str] = field(default_factory=list)  # session ids to cancel on the grid
    cleanups: list[dict[str, Any]] = field(default_factory=list)  # collected sessions whose data to delete
    # task id -> its captured logs, to keep in the data plane past the session's deletion
    log_copies: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sends or self.cancels or self.session_cancels or self.cleanups
                    or self.log_copies)


class _Cleanups:
    """Collected sessions whose data the sender is to delete, gathered into one delete.

    Deleting each session as it is collected put a data-plane round trip on the sender between
    one result and the next send: a quarter of a millisecond of every single-task round trip.
    Gathered, they are due once ``MAX_TASKS`` tasks or ``MAX_SESSIONS`` sessions wait, once the
    oldest has waited ``DELAY_SEC``, or when the executor is closing; the data of a collected
    session so stays in the data plane that much longer (nobody reads it again).
    """

    MAX_TASKS = 10_000
    MAX_SESSIONS = 256
    DELAY_SEC = 0.25

    __slots__ = ("responses", "tasks", "since")

    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self.tasks = 0
        self.since = 0.0  # monotonic time the oldest was added

    def add(self, response: dict[str, Any]) -> bool:
        """Gather a collected session's answer; True if that made the gathered ones due."""
        if not self.responses:
            self.since = time.monotonic()
        self.responses.append(response)
        self.tasks += len(response["task_ids"])
        return self.tasks >= self.MAX_TASKS or len(self.responses) >= self.MAX_SESSIONS

    def wait_sec(self, closing: bool) -> float:
        """How long until the gathered ones are due: 0 when due, infinity when there are none."""
        if not self.responses:
            return float("inf")
        if closing or self.tasks >= self.MAX_TASKS or len(self.responses) >= self.MAX_SESSIONS:
            return 0.0
        return max(0.0, self.DELAY_SEC - (time.monotonic() - self.since))

    def take_if_due(self, closing: bool) -> list[dict[str, Any]]:
        """Every gathered answer if they are due (and start again), else none."""
        if self.wait_sec(closing) > 0.0:
            return []
        responses, self.responses, self.tasks = self.responses, [], 0
        return responses


def settle(call: _Call, need_claim: bool, ok: bool, value: Any) -> None:
    """Resolve a call's future (lock not held: done callbacks run here)."""
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
