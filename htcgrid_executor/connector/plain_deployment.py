"""How the connector emulates the local grid's ``/result`` extensions against a plain HTC-Grid
deployment, whose every answer lists every terminal task of one session, at once.

::

    poll_listener ──▶ first session's full answer ─▶ new_terminal(): poll each listed session
                      that still has unreported tasks, keep what the listener was not told yet,
                      sleep a pull interval and again until something is new or the wait is over
    _result        ──▶ PlainPolls.pause(): at most one /result per session per pull interval
    session_status ──▶ plain_session_status(): counts from the answer, the submission payload
                      and the worker guard's run markers

What was reported lives in :class:`PlainPolls` (per listener, per session), under its own lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .. import wire
from ..errors import PayloadError
from ..worker_guard import run_key
from .dataplane import DataPlane
from .results import Answer, SessionStatus, marker_state

__all__ = ["PlainPolls", "new_terminal", "plain_session_status"]

# sessions remembered for pacing before the old ones are dropped
_PACED_SESSIONS = 10_000


class PlainPolls:
    """What a connector remembers between polls of a plain deployment. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # listener id -> session id -> ids already reported
        self._listeners: dict[str, dict[str, set[str]]] = {}
        # session id -> monotonic time of its last /result
        self._last_poll: dict[str, float] = {}

    def pause(self, session_id: str, interval: float) -> float:
        """Seconds to wait before the next ``/result`` of ``session_id``: a plain deployment
        answers at once (no long poll), so one session is never asked more often than every
        ``interval``, however often the caller polls. Counts the poll as made after the wait."""
        with self._lock:
            last = self._last_poll.get(session_id)
            now = time.monotonic()
            if len(self._last_poll) > _PACED_SESSIONS:
                self._last_poll = {sid: t for sid, t in self._last_poll.items() if now - t < interval}
            pause = 0.0 if last is None else last + interval - now
            self._last_poll[session_id] = now + max(pause, 0.0)
        return pause

    def reported(self, listener: str, sessions: set[str]) -> dict[str, set[str]]:
        """A copy of what ``listener`` was told, per session, forgetting sessions not in
        ``sessions`` (no longer of interest)."""
        with self._lock:
            seen = self._listeners.setdefault(listener, {})
            for sid in list(seen):
                if sid not in sessions:
                    del seen[sid]
            return {sid: set(ids) for sid, ids in seen.items()}

    def mark_reported(self, listener: str, items: list[tuple[str, str]]) -> None:
        """Remember (session id, task id) ``items`` as told to ``listener``."""
        with self._lock:
            seen = self._listeners.setdefault(listener, {})
            for sid, tid in items:
                seen.setdefault(sid, set()).add(tid)

    def forget(self, listener: str | None = None) -> None:
        """Drop what is remembered about ``listener`` (None: about every listener)."""
        with self._lock:
            if listener is None:
                self._listeners = {}
            else:
                self._listeners.pop(listener, None)


def new_terminal(
    checked: list[tuple[str, list[str]]],
    first: Answer,
    reported: dict[str, set[str]],
    poll: Callable[[str], Answer],
    deadline: float,
    interval: float,
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """The terminal tasks of ``checked`` sessions (session id, task ids) not in ``reported``:
    (task id, state, reason) items and their (session id, task id) pairs. ``first`` is the first
    session's answer already in hand; ``poll(sid)`` asks for another. Polls every ``interval``
    until something is new or ``deadline`` (monotonic) has passed."""
    answers = {checked[0][0]: first}
    while True:
        new: list[tuple[str, str, str]] = []
        pairs: list[tuple[str, str]] = []
        for sid, task_ids in checked:
            done = reported.setdefault(sid, set())
            if task_ids and len(done) >= len(task_ids):
                continue  # everything of this session was reported already
            session_answer = answers.pop(sid, None) or poll(sid)
            for item in session_answer.terminal():
                if item[0] not in done:
                    new.append(item)
                    pairs.append((sid, item[0]))
        remaining = deadline - time.monotonic()
        if new or remaining <= 0:
            return new, pairs
        time.sleep(min(interval, remaining))


def plain_session_status(session_id: str, answer: Answer, store: DataPlane) -> SessionStatus:
    """A session's counts from a plain answer: the terminal ones from it, the task count from the
    submission payload, processing from the run markers (see :class:`SessionStatus`)."""
    ended = {tid for tid, _, _ in answer.terminal()}
    status = {"finished": len(answer.finished), "failed": len(answer.failed),
              "cancelled": len(answer.cancelled)}
    raw = store.get_many([wire.payload_key(session_id)])[0]
    try:
        task_ids = (wire.decode_submission(raw)["tasks_list"]["tasks"]) if raw is not None else None
    except (PayloadError, KeyError, TypeError):
        task_ids = None
    if not isinstance(task_ids, list):
        return SessionStatus(session_id, None, None, None, exact=False, **status)
    unfinished = [tid for tid in task_ids if tid not in ended]
    markers = store.get_many([run_key(tid) for tid in unfinished]) if unfinished else []
    processing = sum(1 for marker in markers if marker_state(marker) == "running")
    return SessionStatus(session_id, len(task_ids), len(unfinished) - processing, processing,
                         exact=False, **status)
