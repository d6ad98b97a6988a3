"""``htcgrid-poller``: the only thread that resolves an executor's futures from the grid's
answers. One round, step by step: group the sent sessions by listener
(:meth:`_CallTable.sent_sessions`), long poll each listener (``poll_listeners``) and, one by
one, the sessions attached from another client (``poll_attached``), resolve what changed
(``apply``), and, when nothing changes, check that the grid still knows the sessions
(``verify_sessions``) and back off (``next_interval``). Polls that fail are retried to
``broken_after_sec``, then the executor is broken.

Like the sender it holds the executor only through a weak reference; it is woken through the
table's ``poller_wakeup`` event (a new session, shutdown), never through the data path.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _lifecycle
from ._calls import notify_cancelled, settle, settle_running
from ._outage import _Outage
from .codec import decode_output_and_logs, log_note
from .errors import BadRequestError, TaskFailedError

if TYPE_CHECKING:  # pragma: no cover
    from ._call_table import _CallTable
    from ._calls import _Call
    from ._connector_protocol import GridConnector
    from ._deployment import _DeploymentTraits
    from .connector.client import ResultBatch

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)

_LONG_POLL_SEC = 5.0  # one long poll's wait; new sessions join the listener's stream meanwhile
_VERIFY_SEC = 5.0  # after this long with no news, check that the grid still knows our sessions
_VERIFY_BATCH = 50  # sessions checked per round (round robin), one cheap request each
FAR_CURSOR = "99999999999999-0"  # a cursor after everything: the answer says only "it exists"
_FIRST_INTERVAL = 0.01


@dataclass
class _Round:
    """What one polling round learned."""

    changed: bool = False
    extensions: bool = True  # every answer came from a grid with this package's extensions
    long_polled: bool = False  # some request waited on the server side
    requests: int = 0

    def note(self, changed: bool, batch: ResultBatch, wait: float) -> None:
        self.changed = changed or self.changed
        self.extensions = self.extensions and batch.extensions
        self.long_polled = self.long_polled or wait > 0


class _PollerThread(threading.Thread):
    """Polls the grid for one call table and resolves its futures (see the module docstring)."""

    def __init__(self, owner: Callable[[], Any], table: _CallTable, connector: GridConnector,
                 traits: _DeploymentTraits, key: str | None, broken_after_sec: float) -> None:
        super().__init__(name="htcgrid-poller")
        self._owner = owner  # a weakref.ref to the executor
        self._table = table
        self._connector = connector
        self._traits = traits
        self._key = key
        self._outage = _Outage(broken_after_sec)
        self._cursors: dict[str, str | None] = {}  # listener id or "session:<sid>" -> cursor
        self._interval = _FIRST_INTERVAL
        config = connector.config
        self._pull_interval = config.results_pull_interval_sec if config is not None else 0.5
        self._quiet_since = time.monotonic()
        self._verify_order: collections.deque[str] = collections.deque()  # session ids, next to check first

    def closing(self) -> bool:
        """True once no new work can come (see :func:`_lifecycle.closing`)."""
        return _lifecycle.closing(self._table.flags, self._owner)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave futures hanging forever
            logger.exception("htcgrid-poller failed")
            self._table.set_broken(f"internal error in the poller thread: {exc!r}", exc)
        finally:
            self._table.poller_finished()

    def _loop(self) -> None:
        while True:
            groups, idle = self._table.sent_sessions()
            if idle and self.closing():
                return
            if not groups:
                self._wait(_lifecycle.IDLE_TICK)
                continue
            attempt_started = time.monotonic()
            try:
                with self._outage.budget():  # every layer's retries stop at broken_after_sec
                    result = self.poll_round(groups)
            except Exception as exc:  # noqa: BLE001 - any failure to poll is retried to the deadline
                if self._outage.failed(attempt_started, exc):
                    self._table.set_broken(*self._outage.verdict(exc))
                    continue
                delay = self._outage.next_delay()
                logger.debug("poll failed (%s); retrying in %.2f s", exc, delay)
                self._wait(delay)
                continue
            self._outage.ended()
            with self._outage.budget():
                self.next_interval(result, groups)

    def poll_round(self, groups: dict[str | None, list[dict[str, Any]]]) -> _Round:
        """Poll every listener and attached session once; a long poll only when there is a
        single channel to wait on."""
        result = _Round()
        single = len(groups) == 1
        for lid, sessions in groups.items():
            if lid is None:
                self.poll_attached(sessions, single, result)
            else:
                self.poll_listener(lid, sessions, single, result)
        return result

    def poll_listener(self, lid: str, sessions: list[dict[str, Any]], single: bool, result: _Round) -> None:
        """One poll of a listener's stream for its sessions."""
        result.requests += 1
        wait = self._outage.long_poll_sec(_LONG_POLL_SEC) if single else 0.0
        batch = self._connector.poll_listener(lid, sessions, self._cursors.get(lid), wait_sec=wait)
        result.note(self.apply(batch), batch, wait)
        self._cursors[lid] = batch.cursor  # after apply: a failed apply is polled again

    def poll_attached(self, sessions: list[dict[str, Any]], single: bool, result: _Round) -> None:
        """Poll attached sessions one by one; a session the grid does not know fails its futures."""
        result.requests += len(sessions)
        wait = self._outage.long_poll_sec(_LONG_POLL_SEC) if single and len(sessions) == 1 else 0.0
        for response in sessions:
            key = "session:" + response["session_id"]
            try:
                batch = self._connector.poll_session(response["session_id"], after=self._cursors.get(key),
                                                     wait_sec=wait)
            except BadRequestError as exc:
                # an answer, not an outage: the grid does not know the session
                # (never submitted, or expired): its futures fail with that
                self._table.drop_session(self._table.calls_of(response), response, exc)
                result.changed = True
                continue
            result.note(self.apply(batch), batch, wait)
            self._cursors[key] = batch.cursor  # after apply: a failed apply is polled again

    def next_interval(self, result: _Round, groups: dict[str | None, list[dict[str, Any]]]) -> None:
        """After a round: poll again at once if anything changed; else verify the sessions now
        and then, and wait an interval that backs off while nothing changes."""
        if result.changed:
            self._interval = _FIRST_INTERVAL
            self._quiet_since = time.monotonic()
            return
        if result.extensions and time.monotonic() - self._quiet_since >= _VERIFY_SEC:
            # A listener stream says what changed, not what was forgotten: a grid that lost
            # its state (Redis restarted without persistence) would leave these futures
            # waiting for ever. So, when nothing happens for a while, ask after the sessions.
            self.verify_sessions([r for lid, group in groups.items() if lid is not None for r in group])
            self._quiet_since = time.monotonic()
        if not result.long_polled or not result.extensions:
            # nothing waited on the server side (several channels, or a plain deployment that
            # answers at once): poll at an interval that backs off while nothing changes
            self._wait(self._interval)
            # many sessions polled one by one: fewer rounds, at most ~50 requests/s when idle
            self._interval = min(self._interval * 2, max(self._pull_interval, min(2.0, 0.02 * result.requests)))

    def verify_sessions(self, responses: list[dict[str, Any]]) -> None:
        """Fail the futures of sessions the grid answers it does not know (404), checking up to
        ``_VERIFY_BATCH`` sessions, round robin; other failures are left to the next poll."""
        order = self._verify_order
        by_id = {r["session_id"]: r for r in responses}
        known = set(order)
        order.extend(sid for sid in by_id if sid not in known)
        for _ in range(min(_VERIFY_BATCH, len(order))):
            sid = order.popleft()
            response = by_id.get(sid)
            if response is None:
                continue  # collected meanwhile
            try:
                self._connector.poll_session(sid, after=FAR_CURSOR)
            except BadRequestError as exc:
                if exc.status == 404:
                    lost = TaskFailedError(f"the grid no longer knows session {sid} (it lost its state, "
                                           "or the session expired): its tasks' outcomes are gone")
                    lost.__cause__ = exc
                    self._table.drop_session(self._table.calls_of(response), response, lost)
                    continue
            except Exception as exc:  # noqa: BLE001 - an outage shows in the next poll
                logger.debug("session check of %s failed: %s", sid, exc)
            order.append(sid)

    def apply(self, batch: ResultBatch) -> bool:
        """Resolve one poll's changes (futures set outside the table's lock); True if anything
        changed."""
        starts, ends = self._table.take_changes(batch)
        for call in starts:
            settle_running(call.future)
        logs_of: dict[str, str] = {}
        for call, need_claim, kind, value in ends:
            self._resolve(call, need_claim, kind, value, logs_of)
        if logs_of:
            self._table.keep_logs(logs_of)
        return bool(starts or ends)

    def _resolve(self, call: _Call, need_claim: bool, kind: str, value: Any, logs_of: dict[str, str]) -> None:
        if kind == "finished":
            self._traits.measure(value)
            ok, result, logs = decode_output_and_logs(value, self._key, raw=call.raw, binding=call.binding,
                                                      task_id=call.task_id)
            if logs and call.task_id is not None:
                logs_of[call.task_id] = logs
                if not ok:
                    log_note(result, logs, call.task_id)
            settle(call, need_claim, ok, result)
        elif kind == "failed":
            settle(call, need_claim, False, TaskFailedError(str(value), call.task_id))
        elif need_claim:  # cancelled on the grid before it started (by another client, or a session cancel)
            if Future.cancel(call.future):
                notify_cancelled(call.future)
        elif call.future.running():
            # cancelled on the grid while running (kill_running, or another client): a running
            # Future cannot become cancelled, so it raises CancelledError instead
            settle(call, False, False, CancelledError(f"task {call.task_id} was cancelled on the grid while running"))
        # else cancelled here: cancel() resolves its future

    def _wait(self, seconds: float) -> None:
        wakeup = self._table.poller_wakeup
        wakeup.wait(seconds)
        wakeup.clear()
