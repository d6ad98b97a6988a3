"""``htcgrid-sender``: the thread that changes the grid for an executor (but for
``Future.cancel()``, which asks the grid itself: see :meth:`_CallTable.cancel`). It takes what the
call table hands over (:meth:`_CallTable.next_actions`) and, in this order: keeps captured logs,
sends each batch as one session, cancels sessions and running tasks, and deletes the data of
collected sessions. Once the executor is closing and nothing is left, it releases what the
executor owns (``_lifecycle._Owned``) and ends.

It holds the executor only through a weak reference (as CPython's ``_ExecutorManagerThread``):
an executor dropped without ``shutdown()`` is collected, and the thread winds down as after
``shutdown(wait=False)``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _lifecycle
from ._outage import _Outage, retryable
from .backoff import Backoff

if TYPE_CHECKING:  # pragma: no cover
    from ._call_table import _CallTable
    from ._calls import _Batch, _GridActions
    from ._connector_protocol import GridConnector
    from ._deployment import _DeploymentTraits

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)



class _SenderThread(threading.Thread):
    """Sends batches and grid actions for one call table (see the module docstring)."""

    def __init__(self, owner: Callable[[], Any], table: _CallTable, connector: GridConnector,
                 traits: _DeploymentTraits, key: str | None, broken_after_sec: float,
                 owned: _lifecycle._Owned) -> None:
        super().__init__(name="htcgrid-sender")
        self._owner = owner  # a weakref.ref to the executor
        self._table = table
        self._connector = connector
        self._traits = traits
        self._key = key
        self._broken_after_sec = broken_after_sec
        self._owned = owned
        self._aside = _Outage(broken_after_sec)  # the streak of failed cancellations and clean-ups

    def closing(self) -> bool:
        """True once no new work can come (see :func:`_lifecycle.closing`)."""
        return _lifecycle.closing(self._table.flags, self._owner)

    def run(self) -> None:
        table = self._table
        try:
            while (actions := table.next_actions(self.closing, _lifecycle.IDLE_TICK)) is not None:
                self.carry_out(actions)
        except BaseException as exc:  # a bug here must not leave futures hanging forever
            logger.exception("htcgrid-sender failed")
            table.set_broken(f"internal error in the sender thread: {exc!r}", exc)
        finally:
            _lifecycle.forget(table)
            self._owned.release()

    def carry_out(self, actions: _GridActions) -> None:
        """One round of grid actions, in the order that keeps them consistent."""
        connector = self._connector
        if actions.log_copies:
            # their own keys, which the session's deletion leaves (they expire with the
            # grid's retention): `htcgrid-executor logs TASK_ID` reads them later
            self._best_effort("keep_task_logs", connector.keep_task_logs, actions.log_copies)
        for batch in actions.sends:
            self.send_session(batch)
        self.cancel_on_grid(actions.session_cancels, actions.cancels)
        self.delete_collected(actions.cleanups)

    def send_session(self, batch: _Batch) -> None:
        """Send one batch as a session, retried through outages up to ``broken_after_sec``;
        its futures fail with the error when the grid refuses it."""
        self._traits.seal(batch.tasks, batch.session.response["task_ids"], [call.raw for call in batch.calls],
                          self._key, batch.options)
        table, sid = self._table, batch.session_id
        outage = _Outage(self._broken_after_sec)
        while True:
            attempt_started = time.monotonic()
            try:
                with outage.budget():  # every layer's retries stop at broken_after_sec
                    response = self._connector.send(batch.tasks, session_id=sid, listener=table.listener,
                                                    options=batch.options)
                break
            except Exception as exc:  # noqa: BLE001 - sorted below: retry, or fail the batch
                if not retryable(exc) or table.is_broken():
                    table.drop_session(batch.calls, batch.session.response, exc)
                    return
                if outage.failed(attempt_started, exc):
                    table.set_broken(*outage.verdict(exc, "send tasks to the grid"))
                    return
                logger.debug("send of session %s failed (%s); retrying", sid, exc)
                # the same session id again: a grid that got the first try keeps one copy
                time.sleep(outage.next_delay())
        table.mark_sent(batch, list(response.get("task_ids") or []))

    def cancel_on_grid(self, session_cancels: list[str], cancels: list[str]) -> None:
        """Cancel sessions, then single tasks (``kill_running``: the grid stops their runners)."""
        connector = self._connector
        if session_cancels:
            self._best_effort("cancel_sessions", connector.cancel_sessions, session_cancels)
            gone = set(session_cancels)
            cancels = [tid for tid in cancels if tid.rpartition("_")[0] not in gone]
        if cancels and connector.extensions is not False:
            # (a plain deployment cannot cancel single tasks: they run, their futures stay cancelled)
            self._best_effort("cancel_tasks", connector.cancel_tasks, cancels)

    def delete_collected(self, cleanups: list[dict[str, Any]]) -> None:
        """Delete the data of fully collected sessions, all in one batched delete (guarded on a
        deployment: a replayed task then finds its run marker collected)."""
        if cleanups:
            delete = functools.partial(self._connector.delete_session_data,
                                       guarded=self._traits.guard is not None)
            self._best_effort("delete_session_data", lambda responses: delete(*responses), cleanups)

    def _best_effort(self, what: str, method: Callable[[Any], object], arg: Any) -> None:
        # cancellations and clean-ups are worth a few tries; they all spend one broken_after_sec
        # budget while the grid does not answer, and break the executor once it is spent (else
        # each would spend its own, and a shutdown on a lost grid would take that many budgets)
        backoff, aside = Backoff(0.1, 0.4, max_retries=2), self._aside
        while not self._table.is_broken():
            started = time.monotonic()
            try:
                with aside.budget():
                    method(arg)
                aside.ended()
                return
            except Exception as exc:  # noqa: BLE001 - best effort by design
                logger.debug("%s failed (attempt %d): %s", what, backoff.retries + 1, exc)
                if not retryable(exc):
                    return
                if aside.failed(started, exc):
                    self._table.set_broken(*aside.verdict(exc))
                    return
                if backoff.exhausted:
                    return
                time.sleep(min(backoff.next_delay(), aside.next_delay()))
