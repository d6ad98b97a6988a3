"""The connector's reading side: ``GET /result`` and what it is turned into.

::

    poll_session / poll_listener / session_status / get_results
        ──▶ _result(): one GET /result (paced against a plain deployment) ──▶ Answer
        ──▶ the finished tasks' outputs: those the local grid inlined in the answer
            (``inline_outputs``), then _read_outputs(): the others, one batched data-plane read
        ──▶ ResultBatch / SessionStatus / the seed's dict   (results.py)

:class:`ResultPolling` is a base class of :class:`~htcgrid_executor.connector.AWSConnector`, which
provides what it reads through: ``_parts()`` (the open connector's auth, transport and store,
or the lifecycle's error), ``config``, ``_lock`` (guarding the poll counts), ``_plain`` (what
the plain-deployment fallback remembers) and the ``extensions`` flag.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .. import wire
from ..errors import PayloadError
from .arguments import check_id, check_submission
from .auth import Auth
from .config import DEFAULT_PULL_INTERVAL_SEC, ClientConfig
from .dataplane import DataPlane
from .plain_deployment import PlainPolls, new_terminal, plain_session_status
from .results import NO_OUTPUT, Answer, ResultBatch, SessionStatus, build_batch, decode_inline, seed_results
from .transport import HTTPTransport

__all__ = ["ResultPolling", "MAX_WAIT_SEC"]

#: longest single long poll the grid accepts (its ``wait_ms`` limit)
MAX_WAIT_SEC = 20.0

#: the most output bytes a poll asks the local grid to inline in its answer (its limit)
INLINE_OUTPUT_BYTES = 1 << 20

_AFTER_EVERYTHING = "99999999999999-0"  # a cursor after every event: an answer with counts only


class ResultPolling:
    """Polls of a grid's ``/result`` route (see the module docstring for what the host provides)."""

    config: ClientConfig | None
    #: True/False once a ``/result`` answer showed whether the server has the extensions
    extensions: bool | None
    _lock: threading.Lock
    _plain: PlainPolls
    _polls: int
    _long_polls: int

    def _parts(self) -> tuple[Auth, HTTPTransport, DataPlane]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ results

    def _result(self, session_id: str, *, after: str | None, wait_sec: float = 0.0,
                listener: str | None = None, counts: bool = False, inline: bool = False) -> Answer:
        """One ``GET /result``. Extension parameters are sent always: a deployment ignores them
        (its lambda reads ``submission_content`` alone). ``inline``: ask for the finished tasks'
        outputs in the answer, up to :data:`INLINE_OUTPUT_BYTES`."""
        _, transport, _ = self._parts()
        if self.extensions is False:
            pause = self._plain.pause(session_id, self._pull_interval())
            if pause > 0:
                time.sleep(pause)
        params = {"submission_content": wire.encode_query({"session_id": session_id}),
                  "after": after or "0"}
        wait_sec = min(max(0.0, float(wait_sec)), MAX_WAIT_SEC)
        if wait_sec > 0:
            params["wait_ms"] = str(int(wait_sec * 1000))
        if listener is not None:
            params["listener"] = listener
        if counts:
            params["counts"] = "1"
        if inline:
            params["inline_outputs"] = str(INLINE_OUTPUT_BYTES)
        with self._lock:
            self._polls += 1
            self._long_polls += wait_sec > 0
        body = transport.request("GET", "/result", params, retry=True, extra_read_timeout_sec=wait_sec)
        answer = Answer.parse(body)
        self.extensions = answer.has_cursor
        return answer

    def _read_outputs(self, task_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Outputs of finished tasks in one batched read: (task id -> text, task id -> reason for
        those whose output is missing or unreadable; they are reported as failed)."""
        _, _, store = self._parts()
        if not task_ids:
            return {}, {}
        values = store.get_many([wire.output_key(tid) for tid in task_ids])
        outputs: dict[str, str] = {}
        broken: dict[str, str] = {}
        for tid, value in zip(task_ids, values, strict=True):
            if value is None:
                broken[tid] = NO_OUTPUT
                continue
            try:
                outputs[tid] = wire.decode_output_text(value)
            except PayloadError as exc:
                broken[tid] = f"the task's output in the data plane is unreadable: {exc}"
        return outputs, broken

    def _batch(self, terminal: list[tuple[str, str, str]], processing: list[str], cursor: str | None,
               extensions: bool, read: bool = True, inline: dict[str, Any] | None = None) -> ResultBatch:
        """A ResultBatch of ``terminal``, with the finished tasks' outputs (``read``) taken from
        ``inline`` (an answer's inlined outputs) where it has them, else read from the data plane."""
        finished_ids = [tid for tid, state, _ in terminal if state == "finished"]
        if read:
            outputs, broken = decode_inline(finished_ids, inline or {})
            rest = [tid for tid in finished_ids if tid not in outputs and tid not in broken]
            read_outputs, read_broken = self._read_outputs(rest)
            outputs.update(read_outputs)
            broken.update(read_broken)
        else:
            outputs, broken = dict.fromkeys(finished_ids, ""), {}
        return build_batch(terminal, processing, cursor, extensions, outputs, broken)

    def poll_session(self, session_id: str, after: str | None = None, wait_sec: float = 0, *,
                     outputs: bool = True) -> ResultBatch:
        """One poll of a session: the tasks that reached a terminal state after cursor ``after``
        (None: from the start), waiting up to ``wait_sec`` (at most 20 s) for the first one.

        Blocks for one request (a long poll where the server offers it). Against a plain
        deployment every terminal task of the session comes back each time (``cursor`` None,
        ``extensions`` False) and the wait is emulated by polling every
        ``dynamodb_results_pull_interval_sec``. Raises the transport's errors, StorageError /
        GridUnavailableError for the output read. ``outputs=False``: the states as the grid keeps
        them, without reading any output (``finished`` then maps each task id to ``""``; a task
        whose output is gone still counts as finished).
        """
        check_id(session_id, "session_id")
        deadline = time.monotonic() + max(0.0, min(float(wait_sec), MAX_WAIT_SEC))
        while True:
            answer = self._result(session_id, after=after, wait_sec=wait_sec, inline=outputs)
            if answer.has_cursor:
                return self._batch(list(answer.terminal()), answer.processing, answer.cursor, True, outputs,
                                   answer.inline_outputs)
            terminal = list(answer.terminal())
            remaining = deadline - time.monotonic()
            if terminal or remaining <= 0:
                return self._batch(terminal, [], None, False, outputs)
            time.sleep(min(self._pull_interval(), remaining))

    def session_status(self, session_id: str) -> SessionStatus:
        """Counts per state of a session (pending, processing, finished, failed, cancelled).

        One ``GET /result`` (the local grid's ``counts`` extension answers from the session's
        counters, whatever its size). Against a plain deployment, which lists terminal tasks
        only, also one read of the session's payload (its task count) and of the run markers of
        its unfinished tasks (see :class:`SessionStatus`). Raises BadRequestError (404) for a
        session the local grid does not know, and the transport's and data plane's errors.
        """
        check_id(session_id, "session_id")
        answer = self._result(session_id, after=_AFTER_EVERYTHING, counts=True)
        if answer.has_cursor and answer.counts is not None:
            c = answer.counts
            return SessionStatus(session_id, c.get("count"), c.get("pending"), c.get("processing"),
                                 c.get("finished", 0), c.get("failed", 0), c.get("cancelled", 0), True)
        if answer.has_cursor:  # a grid with cursors but without counts: what its answer says
            return SessionStatus(session_id, None, None, None, 0, 0, 0, False)
        return plain_session_status(session_id, answer, self._parts()[2])

    def poll_listener(self, listener: str, sessions: list[dict[str, Any]], after: str | None,
                      wait_sec: float = 0) -> ResultBatch:
        """One poll of a listener: what changed, after cursor ``after`` (None: from the start),
        in every session submitted with ``listener=listener``; waits up to ``wait_sec`` (at most
        20 s) for something to change.

        ``sessions`` are the submission responses of the sessions still of interest; the request
        names the first one (the route needs a session). With no session, returns an empty batch
        at once. The first is checked always, the others where they are used (against a plain
        deployment): a malformed one raises BadRequestError there. Against a plain deployment (no ``cursor`` in answers) it polls each listed session
        that still has unreported tasks, reports only tasks not reported before (the connector
        remembers them per listener, forgetting sessions no longer listed), and emulates the wait
        by polling every ``dynamodb_results_pull_interval_sec``; ``cursor`` is then None and
        ``processing`` empty.
        """
        check_id(listener, "listener")
        if not sessions:
            return ResultBatch(cursor=after, extensions=self.extensions is not False)
        # The request names the first session; the others are read only against a plain
        # deployment (a listener's stream answers for all), so they are checked there: checking
        # every session's task ids on each poll cost the poller O(outstanding tasks) per poll.
        first_sid, _ = check_submission(sessions[0])
        checked = [check_submission(s) for s in sessions] if self.extensions is False else None
        wait_sec = max(0.0, min(float(wait_sec), MAX_WAIT_SEC))
        deadline = time.monotonic() + wait_sec
        answer = self._result(first_sid, after=after, wait_sec=wait_sec, listener=listener, inline=True)
        if answer.has_cursor:
            return self._batch(list(answer.terminal()), answer.processing, answer.cursor, True,
                               inline=answer.inline_outputs)
        # Plain deployment: the answer is the first session's full list of terminal tasks.
        if checked is None:
            checked = [check_submission(s) for s in sessions]
        reported = self._plain.reported(listener, {sid for sid, _ in checked})
        new, pairs = new_terminal(checked, answer, reported, lambda sid: self._result(sid, after=None),
                                  deadline, self._pull_interval())
        batch = self._batch(new, [], None, False)
        # Marked as seen only now that the outputs were read: if the read failed, the same tasks
        # are reported by the next poll instead of being lost.
        self._plain.mark_reported(listener, pairs)
        return batch

    def forget_listener(self, listener: str) -> None:
        """Drop what the fallback mode remembers about ``listener`` (nothing else changes)."""
        self._plain.forget(listener)

    def _pull_interval(self) -> float:
        config = self.config
        return config.results_pull_interval_sec if config is not None else DEFAULT_PULL_INTERVAL_SEC

    def get_results(self, submission_response: dict[str, Any], timeout_sec: float = 0) -> dict[str, Any]:
        """The seed's blocking call: wait until every task of ``submission_response`` is in a
        terminal state, or until ``timeout_sec`` has passed (0 or None: no limit, as in the seed),
        then return what is done, in the seed's shape::

            {'finished': [...], 'finished_OUTPUT': [decoded outputs], 'failed': [...],
             'failed_OUTPUT': [...], 'failed_reason': [...], 'cancelled': [...],
             'cancelled_OUTPUT': [...], 'metadata': {'tasks_in_response': n}}

        A timeout is not an error: the answer simply lists fewer tasks than were sent (compare
        ``metadata.tasks_in_response`` with ``len(task_ids)``). Uses long polls where the server
        offers them, else polls every ``dynamodb_results_pull_interval_sec``. Outputs are read in
        one batched read at the end; a finished task whose output is missing is reported as failed
        with a reason. Lists follow the order of ``task_ids``.
        """
        sid, task_ids = check_submission(submission_response)
        deadline = time.monotonic() + timeout_sec if timeout_sec and timeout_sec > 0 else None
        states = self._wait_for_terminal(sid, set(task_ids), deadline)
        order = {tid: i for i, tid in enumerate(task_ids)}
        ranked = sorted(states, key=lambda tid: (order.get(tid, len(order)), tid))
        outputs, broken = self._read_outputs([tid for tid in ranked if states[tid][0] == "finished"])
        return seed_results(ranked, states, outputs, broken)

    def _wait_for_terminal(self, sid: str, expected: set[str], deadline: float | None) -> dict[str, tuple[str, str]]:
        """Poll ``sid`` until every ``expected`` task is terminal or ``deadline`` (monotonic, None:
        none) passed: task id -> (state, reason) of the terminal ones."""
        states: dict[str, tuple[str, str]] = {}
        cursor: str | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            wait = MAX_WAIT_SEC if remaining is None else max(0.0, min(MAX_WAIT_SEC, remaining))
            answer = self._result(sid, after=cursor, wait_sec=wait)
            if answer.has_cursor:
                cursor = answer.cursor
            else:
                states = {}  # a plain answer is the whole picture each time
            for tid, state, reason in answer.terminal():
                states[tid] = (state, reason)
            if expected <= states.keys() or (deadline is not None and time.monotonic() >= deadline):
                return states
            if not answer.has_cursor:
                pause = self._pull_interval()
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)
