"""The records the call table (``_call_table.py``) keeps: one :class:`_Call` per grid task, one
:class:`_Session` per session sent, the :class:`_ExecutorFlags` an executor and its threads
share, and what the table hands the sender (:class:`_Batch`, :class:`_GridActions`). All their
fields are guarded by the table's lock; :func:`settle` resolves a future outside it.
"""

from __future__ import annotations

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


class _Call:
    """One grid task and its future. Small on purpose: a million may be outstanding.

    ``claimed`` (guarded by the table's lock) says that some thread has taken on calling
    ``set_running_or_notify_cancel()`` for the future, which must happen exactly once.
    """

    __slots__ = ("future", "task", "task_id", "claimed", "done", "raw", "table", "binding", "size", "options")

    def __init__(self, table: _CallTable, task: dict[str, Any], raw: bool, size: int = 0,
                 options: TaskOptions | None = None) -> None:
        self.future: Future[Any] = Future()
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
        self.future.add_done_callback(self)

    def __call__(self, future: Future[Any]) -> None:
        # done callback: a cancelled future also cancels its task on the grid
        if future.cancelled():
            self.table.on_cancelled(self)


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
    cancel_marks: list[str] = field(default_factory=list)  # task ids to mark cancelled (deployment)
    session_cancels: list[str] = field(default_factory=list)  # session ids to cancel on the grid
    cleanups: list[dict[str, Any]] = field(default_factory=list)  # collected sessions whose data to delete
    # task id -> its captured logs, to keep in the data plane past the session's deletion
    log_copies: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sends or self.cancels or self.cancel_marks or self.session_cancels or self.cleanups
                    or self.log_copies)


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
