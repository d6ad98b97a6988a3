"""What each control-plane route does, apart from HTTP (:mod:`.http_api` serves them): the
checks of a request's parameters and submission, and the state table calls that answer it.
A bad request raises :class:`Reject`, which the server turns into a 4xx."""

from __future__ import annotations

import base64
import re
import threading
import time
from typing import Any

from ..errors import PayloadError
from ..states import TaskState
from ..wire import (
    INLINE_SUBMIT_TASKS,
    OUTPUT_PLACEHOLDER,
    decode_inline_submission,
    decode_query,
    decode_submission,
    empty_result_body,
    is_valid_session_id,
    payload_key,
    session_of,
    task_ids_for,
)
from .state_table import MAX_PRIORITY, Event, StateTable

__all__ = ["Routes", "Reject", "ROUTES", "MAX_TASKS_PER_SESSION", "MAX_WAIT_MS", "MAX_RETRIES",
           "MAX_INLINE_BYTES", "MAX_INLINE_VALUE_BYTES"]

MAX_TASKS_PER_SESSION = 1_000_000
MAX_WAIT_MS = 20_000
MAX_RETRIES = 100
#: the most output bytes one ``/result`` answer inlines (``inline_outputs``), and of one output
MAX_INLINE_BYTES = 1 << 20
MAX_INLINE_VALUE_BYTES = 256 << 10
# the most finished tasks whose outputs one answer looks at: bounds the script that reads them
# when a big batch of tiny outputs would fit the budget (the rest are read from the data plane)
_MAX_INLINE_TASKS = 10_000
_COALESCE_MS = 5  # how long a long poll that saw only task starts waits for their ends


class Reject(Exception):
    """A request the grid refuses: becomes a 4xx answer with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_INTEGER = re.compile(r"-?[0-9]{1,10}")
# a stream id as Redis writes it: two unsigned 64-bit numbers; ASCII digits only (str.isdigit()
# also takes '²' and '１', which Redis refuses)
_CURSOR = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_U64 = 1 << 64


def _int_param(params: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    values = params.get(name)
    if not values:
        return default
    if not _INTEGER.fullmatch(values[0]):
        raise Reject(400, f"query parameter {name!r} must be an integer")
    value = int(values[0])
    if not low <= value <= high:
        raise Reject(400, f"query parameter {name!r} must be between {low} and {high}")
    return value


def _cursor_param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    value = values[0]
    match = _CURSOR.fullmatch(value)
    if not match or any(part is not None and int(part) >= _U64 for part in match.groups()):
        raise Reject(400, f"query parameter {name!r} must be a cursor from an earlier answer")
    return value


def _result_body(events: list[Event], after: str | None) -> dict[str, Any]:
    """The ``/result`` answer for ``events``, in the deployment's shape plus ``processing``,
    ``failed_reason`` and the ``cursor`` to read on from."""
    body = empty_result_body()
    body["processing"] = []
    body["failed_reason"] = []
    for event in events:
        if event.state is TaskState.PROCESSING:
            body["processing"].append(event.task_id)
        elif event.state.is_terminal:
            name = event.state.value
            body[name].append(event.task_id)
            body[f"{name}_OUTPUT"].append(OUTPUT_PLACEHOLDER)
            if event.state is TaskState.FAILED:
                body["failed_reason"].append(event.reason)
    body["metadata"]["tasks_in_response"] = len(body["finished"]) + len(body["failed"]) + len(
        body["cancelled"])
    body["cursor"] = events[-1].cursor if events else (after or "0")
    return body


class Routes:
    """What each route does, apart from HTTP. Raises Reject for a bad request.

    ``retry_limit``: the most retries this grid gives a lost task; a submission's
    ``retry_count`` may ask for fewer, not more.
    """

    def __init__(self, table: StateTable, retry_limit: int = MAX_RETRIES) -> None:
        self.table = table
        self.retry_limit = retry_limit
        self._read_lock = threading.Lock()
        self._read_up_to: dict[str, str] = {}  # listener -> cursor its client has read up to

    def trim_listeners(self) -> None:
        """Drop the listener entries their clients have read. Raises redis errors; what was
        not trimmed is kept for the next try."""
        with self._read_lock:
            read, self._read_up_to = self._read_up_to, {}
        try:
            while read:
                listener, cursor = next(iter(read.items()))
                self.table.trim_listener(listener, cursor)
                del read[listener]
        finally:
            with self._read_lock:
                for listener, cursor in read.items():  # unless its client has read further since
                    self._read_up_to.setdefault(listener, cursor)

    # POST /submit?submission_content=<session id>, with an inline body or none
    def submit(self, content: str, params: dict[str, list[str]], body: bytes = b"") -> dict[str, Any]:
        """Create the session whose payload the client wrote to the data plane; or, given a
        body (:func:`~htcgrid_executor.wire.encode_inline_submission`), whose payload and inputs
        the body holds: they are checked first, then written to their data-plane keys by the
        script that creates the session (not again for a session that exists: a repeat never
        rewrites the inputs of a session accepted earlier)."""
        sid = content
        if not is_valid_session_id(sid):
            raise Reject(400, "submission_content must be a session id (letters, digits and '-')")
        inline: tuple[bytes, list[bytes]] | None = None
        if body:
            try:
                inline = decode_inline_submission(body)
            except PayloadError as exc:
                raise Reject(400, str(exc)) from None
            raw = inline[0]
        else:
            raw = self.table.read_submission(sid)
            if raw is None:
                raise Reject(400, f"no submission payload {payload_key(sid)} in the data plane")
        submission, count = self._submission(sid, raw)
        if inline is not None and len(inline[1]) != count:
            raise Reject(400, f"the inline submission holds {len(inline[1])} task inputs for {count} tasks")
        if inline is not None and count > INLINE_SUBMIT_TASKS:
            raise Reject(413, f"an inline submission holds at most {INLINE_SUBMIT_TASKS} tasks, not {count}: "
                              "write a bigger session's inputs to the data plane")
        timeout, retries, priority, listener = self._scheduling(submission)
        self.table.submit(sid, count, priority=priority, max_retries=min(retries, self.retry_limit),
                          timeout_ms=int(timeout * 1000), listener=listener, inline=inline)
        return {"session_id": sid, "task_ids": task_ids_for(sid, count)}

    @staticmethod
    def _submission(sid: str, raw: bytes) -> tuple[dict[str, Any], int]:
        """The session's submission object (``raw``: its payload value), checked, and its task count."""
        try:
            submission = decode_submission(raw)
        except PayloadError as exc:
            raise Reject(400, str(exc)) from None
        if not isinstance(submission, dict):
            raise Reject(400, "submission payload must be a JSON object")
        if submission.get("session_id") != sid:
            raise Reject(400, "submission payload's session_id does not match submission_content")
        tasks = (submission.get("tasks_list") or {}).get("tasks") if isinstance(
            submission.get("tasks_list"), dict) else None
        if not isinstance(tasks, list) or not tasks:
            raise Reject(400, "submission payload needs a non-empty tasks_list.tasks")
        if len(tasks) > MAX_TASKS_PER_SESSION:
            raise Reject(413, f"a session holds at most {MAX_TASKS_PER_SESSION} tasks, not {len(tasks)}")
        if tasks != task_ids_for(sid, len(tasks)):
            raise Reject(400, "tasks_list.tasks must be '<session_id>_<i>' for i = 0, 1, ... in order")
        return submission, len(tasks)

    @staticmethod
    def _scheduling(submission: dict[str, Any]) -> tuple[float, int, int, str]:
        """The submission's ``(time limit in s, retries, priority, listener)``, checked."""
        scheduler = submission.get("scheduler_data") or {}
        context = submission.get("context") or {}
        if not isinstance(scheduler, dict) or not isinstance(context, dict):
            raise Reject(400, "scheduler_data and context must be JSON objects")
        timeout = scheduler.get("task_timeout_sec", 3600)
        retries = scheduler.get("retry_count", 5)
        priority = context.get("tasks_priority", 0)
        listener = context.get("listener") or ""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 1e7:
            raise Reject(400, "scheduler_data.task_timeout_sec must be a number of seconds >= 0")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            raise Reject(400, f"scheduler_data.retry_count must be an integer from 0 to {MAX_RETRIES}")
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
            raise Reject(400, f"context.tasks_priority must be an integer within ±{MAX_PRIORITY}")
        if listener and not is_valid_session_id(listener):
            raise Reject(400, "context.listener must be an id of letters, digits and '-'")
        return timeout, retries, priority, listener

    # GET /result?submission_content=b64({"session_id": sid})[&after=&wait_ms=&listener=&inline_outputs=]
    def result(self, content: str, params: dict[str, list[str]]) -> dict[str, Any]:
        query = self._query(content)
        sid = query.get("session_id")
        if not is_valid_session_id(sid):
            raise Reject(400, "submission_content must hold a 'session_id'")
        after = _cursor_param(params, "after")
        wait_ms = _int_param(params, "wait_ms", 0, 0, MAX_WAIT_MS)
        inline_bytes = _int_param(params, "inline_outputs", 0, 0, MAX_INLINE_BYTES)
        listener = (params.get("listener") or [None])[0]
        prefetched: dict[str, bytes] = {}
        if listener is not None:
            events, prefetched = self._listener_events(listener, after, wait_ms, inline_bytes)
        else:
            if not self.table.session_exists(sid):
                raise Reject(404, f"unknown session {sid} (never submitted, or expired)")
            events = self.table.read_session_events(sid, after, block_ms=wait_ms if after is not None else 0)
        if not events and self.table.write_refusal is not None:
            # nothing new, and nothing can happen while Redis refuses writes: say so, so that
            # the client's deadline runs (a read that only found nothing would hide it)
            raise Reject(507, f"the grid cannot make progress: {self.table.write_refusal}")
        body = _result_body(events, after)
        if inline_bytes:
            body["inline_outputs"] = self._inline_outputs(body["finished"][:_MAX_INLINE_TASKS], inline_bytes,
                                                          prefetched)
        if listener is None and (params.get("counts") or [""])[0] == "1":
            body["counts"] = self._counts(sid)
        return body

    def _inline_outputs(self, finished: list[str], budget: int, prefetched: dict[str, bytes]) -> dict[str, str]:
        """``inline_outputs``: task id -> standard base64 of its stored output (raw outputs are
        binary, which JSON cannot carry), for those of ``finished`` that fit: each at most
        :data:`MAX_INLINE_VALUE_BYTES`, ``budget`` bytes in all (stored bytes). Read here, one
        local hop from Redis, to spare the client its own data-plane round trip; ``prefetched``
        (read within ``budget`` with the events) are used first, the others read now."""
        found = {tid: prefetched[tid] for tid in finished if tid in prefetched}
        left = budget - sum(len(value) for value in found.values())
        rest = [tid for tid in finished if tid not in found]
        if rest and left > 0:
            found.update(self.table.output_reads.within(rest, left, MAX_INLINE_VALUE_BYTES))
        return {tid: base64.b64encode(value).decode("ascii") for tid, value in found.items()}

    def _listener_events(self, listener: str, after: str | None, wait_ms: int,
                         inline_bytes: int) -> tuple[list[Event], dict[str, bytes]]:
        """The listener's events after ``after``, waiting up to ``wait_ms`` for the first, and
        the outputs read with them (for ``inline_bytes`` > 0) of tasks that may have finished."""
        if not is_valid_session_id(listener):
            raise Reject(400, "query parameter 'listener' must be an id of letters, digits and '-'")
        if after is None:
            raise Reject(400, "query parameter 'listener' needs 'after' (a cursor, '0' at first)")
        started = time.monotonic()
        events = self.table.read_listener_events(listener, after, block_ms=wait_ms)
        prefetched: dict[str, bytes] = {}
        if events and wait_ms and not any(e.state.is_terminal for e in events):
            # Only starts so far: a short task ends within milliseconds, and one answer for
            # both saves the client a round trip; a long task's start is reported 5 ms late.
            left_ms = wait_ms - (time.monotonic() - started) * 1000
            if left_ms >= 1:
                block_ms = int(min(_COALESCE_MS, left_ms))
                if inline_bytes:  # the started tasks' outputs, should they end: no round trip of their own
                    started_ids = [e.task_id for e in events][:_MAX_INLINE_TASKS]
                    more, prefetched = self.table.read_listener_events_and_outputs(
                        listener, events[-1].cursor, block_ms, started_ids, inline_bytes, MAX_INLINE_VALUE_BYTES)
                else:
                    more = self.table.read_listener_events(listener, events[-1].cursor, block_ms=block_ms)
                events += more
        # the client has read what precedes ``after``: the entries go at the next trim (a
        # read route does not write, so reads keep working while Redis refuses writes)
        with self._read_lock:
            self._read_up_to[listener] = after
        return events, prefetched

    def _counts(self, sid: str) -> dict[str, int]:
        """The session hash's counters: pending and processing too, which no stream holds."""
        info = self.table.session_info(sid)
        if info is None:  # expired between the check in result() and now
            raise Reject(404, f"unknown session {sid} (never submitted, or expired)")
        counts = {state.value: info[state.value] for state in TaskState}
        counts["count"] = info["count"]
        return counts

    # POST /cancel?submission_content=b64({"session_ids_to_cancel": [...]})
    def cancel(self, content: str, params: dict[str, list[str]]) -> dict[str, Any]:
        query = self._query(content)
        sessions = query.get("session_ids_to_cancel", [])
        tasks = query.get("task_ids_to_cancel", [])
        if not isinstance(sessions, list) or not all(is_valid_session_id(s) for s in sessions):
            raise Reject(400, "session_ids_to_cancel must be a list of session ids")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise Reject(400, "task_ids_to_cancel must be a list of task ids")
        if not sessions and not tasks:
            raise Reject(400, "nothing to cancel: give session_ids_to_cancel (or task_ids_to_cancel)")
        try:
            for task_id in tasks:
                session_of(task_id)
        except PayloadError as exc:
            raise Reject(400, str(exc)) from None
        pending_only = query.get("pending_only", False)
        if not isinstance(pending_only, bool) or (pending_only and (sessions or not tasks)):
            raise Reject(400, "pending_only must be true or false, and true only with task_ids_to_cancel alone")
        answer: dict[str, Any] = self.table.cancel_sessions(list(dict.fromkeys(sessions)))
        if pending_only:
            unique = list(dict.fromkeys(tasks))
            claimed, ended = self.table.cancel_pending_tasks(unique)
            cancelled = len(unique) - len(claimed) - len(ended)
            answer["tasks"] = {"cancelled_pending": cancelled, "cancelled_processing": 0,
                               "total_cancelled_tasks": cancelled, "claimed": claimed, "ended": ended}
        elif tasks:
            answer["tasks"] = self.table.cancel_tasks(list(dict.fromkeys(tasks)))
        return answer

    @staticmethod
    def _query(content: str) -> dict[str, Any]:
        try:
            query = decode_query(content)
        except PayloadError as exc:
            raise Reject(400, str(exc)) from None
        if not isinstance(query, dict):
            raise Reject(400, "submission_content must encode a JSON object")
        return query


ROUTES = {("POST", "/submit"): "submit", ("GET", "/result"): "result", ("POST", "/cancel"): "cancel"}
