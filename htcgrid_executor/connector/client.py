"""AWSConnector: HTC-Grid's client API (the seed's), wire-compatible with a real deployment.

::

    send(tasks) ──▶ data plane: <task_id>-input …, <sid>-payload   (one batched write)
                └─▶ POST /submit?submission_content=<sid>          (retried with the same sid)
    get_results / poll_session / poll_listener
                ──▶ GET /result?submission_content=b64({"session_id": sid})[&after&wait_ms&listener]
                └─▶ data plane: <task_id>-output …                  (one batched read per answer)
    cancel_sessions / cancel_tasks ──▶ POST /cancel?submission_content=b64({...})

Against the local grid (and any server whose ``/result`` answers carry a ``cursor``), polls use its
extensions: only what changed since a cursor, long polls, failure reasons, processing events.
Against a plain deployment the same calls fall back to plain polling (every answer lists every
terminal task of the session) and report what is new themselves.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..errors import BadRequestError, ConfigurationError, ControlPlaneError, GridError, PayloadError
from ..options import TaskOptions
from ..worker_guard import COLLECTED, cancel_key, run_key
from .auth import ApiKeyAuth, Auth, CognitoAuth
from .config import ClientConfig
from .dataplane import DataPlane, make_store
from .transport import HTTPTransport

__all__ = ["AWSConnector", "ResultBatch", "SessionStatus", "MAX_WAIT_SEC"]

logger = logging.getLogger(__name__)

#: longest single long poll the grid accepts (its ``wait_ms`` limit)
MAX_WAIT_SEC = 20.0

_ID = re.compile(r"^[A-Za-z0-9-]{1,128}$")
_TERMINAL = ("finished", "failed", "cancelled")
_AFTER_EVERYTHING = "99999999999999-0"
_LOG_RETENTION_SEC = 3600.0  # a grid's default retention of ended sessions' keys  # a cursor after every event: an answer with counts only
# reason given for a task the grid reports finished whose output is not in the data plane
_NO_OUTPUT = "the task finished but its output is missing from the data plane (evicted or deleted)"


@dataclass
class ResultBatch:
    """What one poll learned.

    ``finished`` maps task id to the decoded output text (read from the data plane in one batched
    read); ``failed`` maps task id to the grid's reason (``""`` when the grid gives none);
    ``processing`` lists tasks that started (only where the grid reports it); ``cursor`` is to be
    passed back as ``after`` (None against a plain deployment); ``extensions`` is False when the
    server is a plain deployment and the connector fell back to plain polling.
    """

    cursor: str | None = None
    finished: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    processing: list[str] = field(default_factory=list)
    extensions: bool = True

    def __bool__(self) -> bool:
        """True when the batch reports anything."""
        return bool(self.finished or self.failed or self.cancelled or self.processing)


@dataclass(frozen=True)
class SessionStatus:
    """How many tasks of a session are in each state (:meth:`AWSConnector.session_status`).

    On the local grid (``exact``) every count comes from the grid's own counters. On a plain
    deployment, whose API lists only terminal tasks: ``finished``/``failed``/``cancelled`` are
    the grid's; ``count`` comes from the submission payload in the data plane (None once the
    session's data was deleted, e.g. after an executor collected it); ``processing`` counts the
    non-terminal tasks whose worker-guard run marker says a run is under way, ``pending`` the
    others (both None without the count). A task whose call raised is ``finished`` on the grid,
    as on any HTC-Grid (its output holds the exception).
    """

    session_id: str
    count: int | None
    pending: int | None
    processing: int | None
    finished: int
    failed: int
    cancelled: int
    exact: bool


@dataclass
class _Answer:
    """A ``/result`` answer, checked: the ids per state, in the server's order."""

    finished: list[str]
    failed: list[str]
    failed_reason: list[str]
    cancelled: list[str]
    processing: list[str]
    cursor: str | None
    counts: dict[str, int] | None = None

    @classmethod
    def parse(cls, body: Any) -> _Answer:
        if not isinstance(body, dict):
            raise ControlPlaneError("GET /result: the grid's answer is not a JSON object")

        def ids(name: str) -> list[str]:
            value = body.get(name) or []
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ControlPlaneError(f"GET /result: {name!r} in the grid's answer is not a list of ids")
            return value

        failed = ids("failed")
        reasons = body.get("failed_reason")
        if not isinstance(reasons, list) or len(reasons) != len(failed):
            reasons = [""] * len(failed)  # a plain deployment gives no reasons
        cursor = body.get("cursor")
        counts = body.get("counts")
        if counts is not None and not (isinstance(counts, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in counts.values())):
            raise ControlPlaneError("GET /result: 'counts' in the grid's answer is not a map of counts")
        return cls(
            finished=ids("finished"),
            failed=failed,
            failed_reason=[r if isinstance(r, str) else str(r) for r in reasons],
            cancelled=ids("cancelled"),
            processing=ids("processing"),
            cursor=None if cursor is None else str(cursor),
            counts=counts,
        )

    @property
    def has_cursor(self) -> bool:
        return self.cursor is not None

    def terminal(self) -> Iterable[tuple[str, str, str]]:
        """(task id, state, reason) of every terminal task in the answer."""
        for tid in self.finished:
            yield tid, "finished", ""
        for tid, reason in zip(self.failed, self.failed_reason, strict=True):
            yield tid, "failed", reason
        for tid in self.cancelled:
            yield tid, "cancelled", ""


def _marker_state(marker: bytes | None) -> str | None:
    """The ``state`` of a worker-guard run marker (see worker_guard), None if absent or unreadable."""
    if marker is None:
        return None
    try:
        doc = json.loads(marker)
    except ValueError:
        return None
    return doc.get("state") if isinstance(doc, dict) else None


class _CountedStore(DataPlane):
    """The connector's data plane, counting its batched calls and the value bytes they move
    (one lock per batch, not per key), for :meth:`AWSConnector.stats`."""

    def __init__(self, store: DataPlane) -> None:
        self.inner = store
        self._lock = threading.Lock()
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return repr(self.inner)

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None:
        size = sum(len(value) for value in items.values())
        with self._lock:
            self.calls += 1
            self.bytes_sent += size
        self.inner.put_many(items, expire_sec=expire_sec)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            self.calls += 1
        values = self.inner.get_many(keys)
        size = sum(len(value) for value in values if value is not None)
        with self._lock:
            self.bytes_received += size
        return values

    def delete_many(self, keys: Iterable[str]) -> None:
        with self._lock:
            self.calls += 1
        self.inner.delete_many(keys)

    def close(self) -> None:
        self.inner.close()


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise BadRequestError(f"{what} must be a string of letters, digits and '-' (at most 128), got {value!r}")
    return value


def _check_submission(submission_response: object) -> tuple[str, list[str]]:
    if not isinstance(submission_response, Mapping):
        raise BadRequestError("submission_response must be the dict that send() returned")
    sid = _check_id(submission_response.get("session_id"), "submission_response['session_id']")
    task_ids = submission_response.get("task_ids")
    if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
        raise BadRequestError("submission_response['task_ids'] must be the list of task ids send() returned")
    return sid, task_ids


class AWSConnector:
    """The client of one HTC-Grid: the seed's API, plus what an executor needs.

    Build it with a config dict (``AWSConnector(config)``), from a file
    (:meth:`from_config_file`), or as the public client does (``AWSConnector()`` then
    :meth:`init`). In public-API mode call :meth:`authenticate` before anything else; with
    ``intra_vpc`` (config key or ``INTRA_VPC`` environment variable) there is nothing to log in to.

    Thread-safe: one connector may be used by several threads at once (an executor submits from
    one and polls from another). It starts no thread of its own except the S3 upload pool, which
    :meth:`close` shuts down.
    """

    def __init__(
        self,
        client_config_data: Mapping[str, Any] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.client_config: dict[str, Any] = {}
        self.payload_signing_key: str | None = None
        self.config: ClientConfig | None = None
        self._auth: Auth | None = None
        self._transport: HTTPTransport | None = None
        self._store: DataPlane | None = None
        self._closed = False
        self._lock = threading.Lock()  # guards _listeners and init/close
        # listener id -> session id -> ids already reported (fallback mode only)
        self._listeners: dict[str, dict[str, set[str]]] = {}
        # session id -> monotonic time of its last /result (plain deployment: polls are spaced)
        self._last_poll: dict[str, float] = {}
        #: True/False once a ``/result`` answer showed whether the server has the extensions
        self.extensions: bool | None = None
        # GET /result calls, and those that asked the grid to wait, for stats(); counted across
        # init(), which replaces the transport and store (and with them their counts)
        self._polls = 0
        self._long_polls = 0
        if client_config_data is not None:
            self.init(client_config_data, username or "", password or "")

    # ------------------------------------------------------------------------------ construction

    def init(self, client_config_data: Mapping[str, Any], username: str = "", password: str = "") -> None:
        """Configure the connector (the public client's two-step style). Raises ConfigurationError
        naming a missing or malformed key. Calling it again replaces the configuration (and closes
        the previous connections)."""
        config = ClientConfig.from_dict(client_config_data, username=username or None, password=password or None)
        auth: Auth
        if config.intra_vpc:
            assert config.api_gateway_key is not None
            auth = ApiKeyAuth(config.api_gateway_key)
        else:
            assert config.user_pool_id is not None and config.cognito_userpool_client_id is not None
            auth = CognitoAuth(
                user_pool_id=config.user_pool_id,
                client_id=config.cognito_userpool_client_id,
                region=config.cognito_region,
                username=config.username,
                password=config.password,
            )
        store = _CountedStore(make_store(config))
        transport = HTTPTransport(config.api_url, auth)
        with self._lock:
            old = (self._store, self._transport)
            self.config = config
            self.client_config = dict(client_config_data)
            self.payload_signing_key = config.payload_signing_key
            self._auth, self._transport, self._store = auth, transport, store
            self._listeners = {}
            self.extensions = None
            self._closed = False
        for resource in old:
            if resource is not None:
                resource.close()

    @classmethod
    def from_config_file(cls, path: str | None = None) -> AWSConnector:
        """A connector from a deployment's JSON config file; ``path`` None reads the path from the
        ``AGENT_CONFIG_FILE`` environment variable. Raises ConfigurationError."""
        return cls(ClientConfig.load_file(path))

    @staticmethod
    def new_listener_id() -> str:
        """A fresh listener id for :meth:`send` / :meth:`poll_listener`."""
        return wire.new_session_id()

    def __repr__(self) -> str:
        if self.config is None:
            return "AWSConnector(not configured)"
        mode = "intra-vpc" if self.config.intra_vpc else "public"
        return f"AWSConnector({self.config.api_url!r}, {mode}, {self.config.grid_storage_service})"

    def _parts(self) -> tuple[Auth, HTTPTransport, DataPlane]:
        if self._closed:
            raise GridError("the connector is closed")
        auth, transport, store = self._auth, self._transport, self._store
        if auth is None or transport is None or store is None:
            raise ConfigurationError("the connector has no configuration: pass client_config_data or call init()")
        return auth, transport, store

    @property
    def store(self) -> DataPlane:
        """The data plane (for the executor's cleanup and for tests)."""
        return self._parts()[2]

    @property
    def transport(self) -> HTTPTransport:
        """The HTTP layer; its ``max_attempts``, ``backoff_sec`` and timeouts may be tuned."""
        return self._parts()[1]

    def stats(self) -> dict[str, Any]:
        """What this connector sent and received, counted as it went (a snapshot; the counts only
        grow, so the difference of two snapshots is what happened between them)::

            {"http_requests": 12,                 # calls to the control plane, retries not included
             "http_requests_by_route": {"/submit": 4, "/result": 8},
             "round_trips": 16,                   # HTTP attempts (retries included) + data-plane calls
             "http_round_trips": 12, "retries": 0,
             "bytes_sent": 3100, "bytes_received": 2050,   # HTTP request lines / answer bodies
             "polls": 8, "long_polls": 8,         # GET /result calls, those that asked the grid to wait
             "dataplane_calls": 4,                # batched put/get/delete calls (one per batch)
             "dataplane_bytes_sent": 900, "dataplane_bytes_received": 640}   # values written / read

        Calls made by the executor through :attr:`store` are counted too. :meth:`init` starts the
        HTTP and data-plane counts again (new connections); polls are counted across it. Cheap
        enough to call often; does not contact the grid. Raises ConfigurationError before the
        connector is configured.
        """
        transport, store = self._transport, self._store
        if transport is None or not isinstance(store, _CountedStore):
            raise ConfigurationError("the connector has no configuration: pass client_config_data or call init()")
        http = transport.counters()
        with store._lock:
            calls, sent, received = store.calls, store.bytes_sent, store.bytes_received
        with self._lock:
            polls, long_polls = self._polls, self._long_polls
        return {
            "http_requests": sum(http["requests"].values()),
            "http_requests_by_route": http["requests"],
            "round_trips": http["round_trips"] + calls,
            "http_round_trips": http["round_trips"],
            "retries": http["retries"],
            "bytes_sent": http["bytes_sent"],
            "bytes_received": http["bytes_received"],
            "polls": polls,
            "long_polls": long_polls,
            "dataplane_calls": calls,
            "dataplane_bytes_sent": sent,
            "dataplane_bytes_received": received,
        }

    # ------------------------------------------------------------------------------ auth

    def authenticate(self) -> None:
        """Log in to Cognito (public API); a no-op for the private API. Blocks for the round
        trips. Calling it again is harmless. Raises PasswordChangeRequired, AuthenticationError,
        ConfigurationError (no username/password), GridUnavailableError."""
        auth, _, _ = self._parts()
        auth.authenticate()

    # ------------------------------------------------------------------------------ submit

    def send(
        self,
        tasks_list: list[Any],
        *,
        priority: int = 0,
        session_id: str | None = None,
        listener: str | None = None,
        task_timeout_sec: float | None = None,
        retry_count: int | None = None,
        options: TaskOptions | None = None,
    ) -> dict[str, Any]:
        """Submit ``tasks_list`` (JSON-serialisable values, each the event of one worker call) as
        one session; returns ``{'session_id': sid, 'task_ids': [...]}`` in submission order.

        Everything is checked before anything is written: an empty list or a bad argument raises
        BadRequestError, a task that is not JSON raises PayloadError. Then the inputs and the
        submission payload go to the data plane in one batched write, and ``POST /submit`` is sent
        (retried on connection errors and 5xx). ``session_id`` given: that id is reused, so a
        submit repeated after an error never runs the work twice (the grid answers a repeated
        submit of a known session with the same answer). ``listener``: subscribe the session to
        that listener's stream (see :meth:`poll_listener`). ``task_timeout_sec``/``retry_count``
        default to the grid's 3600 s and 5. ``options``: a :class:`~htcgrid_executor.options.TaskOptions`
        instead of those three keywords (giving both raises TypeError); the wire holds options per
        session, so every task of one ``send`` gets the same.
        """
        _, transport, store = self._parts()
        if options is not None:
            if not isinstance(options, TaskOptions):
                raise TypeError(f"options must be a TaskOptions, got {type(options).__name__}")
            if priority != 0 or task_timeout_sec is not None or retry_count is not None:
                raise TypeError("pass options= or priority/task_timeout_sec/retry_count, not both")
            priority, task_timeout_sec, retry_count = (options.priority, options.task_timeout_sec,
                                                       options.retry_count)
        if not isinstance(tasks_list, (list, tuple)):
            raise BadRequestError(f"tasks_list must be a list of tasks, got {type(tasks_list).__name__}")
        if not tasks_list:
            raise BadRequestError("tasks_list is empty: a session needs at least one task")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise BadRequestError(f"priority must be an integer, got {priority!r}")
        sid = wire.new_session_id() if session_id is None else _check_id(session_id, "session_id")
        if listener is not None:
            _check_id(listener, "listener")
        options: dict[str, Any] = {}
        if task_timeout_sec is not None:
            if isinstance(task_timeout_sec, bool) or not isinstance(task_timeout_sec, (int, float)) \
                    or not task_timeout_sec > 0:
                raise BadRequestError(f"task_timeout_sec must be a positive number, got {task_timeout_sec!r}")
            options["task_timeout_sec"] = task_timeout_sec
        if retry_count is not None:
            if isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0:
                raise BadRequestError(f"retry_count must be an integer >= 0, got {retry_count!r}")
            options["retry_count"] = retry_count

        encoded: list[bytes] = []
        for index, task in enumerate(tasks_list):
            try:
                encoded.append(wire.encode_task(task))
            except PayloadError as exc:
                raise PayloadError(f"task {index} of tasks_list: {exc}") from exc.__cause__
        task_ids = wire.task_ids_for(sid, len(encoded))
        submission = wire.build_submission(
            sid, task_ids, priority=priority,
            extra_context={"listener": listener} if listener else None, **options,
        )
        items = {wire.input_key(tid): data for tid, data in zip(task_ids, encoded, strict=True)}
        items[wire.payload_key(sid)] = wire.encode_submission(submission)
        store.put_many(items)

        try:
            answer = transport.request("POST", "/submit", {"submission_content": sid}, retry=True)
        except BadRequestError:
            # The grid rejected a session made here as malformed: nothing will ever read these
            # keys. Not after a 5xx or no answer (the grid may have accepted it, and a retry needs
            # them), nor for a caller's session id (it may name a session accepted earlier).
            if session_id is None:
                self._forget_keys(store, list(items))
            raise
        if not isinstance(answer, dict):
            raise ControlPlaneError("POST /submit: the grid's answer is not a JSON object")
        answered_sid = answer.get("session_id", sid)
        if answered_sid != sid:
            raise ControlPlaneError(f"POST /submit: the grid answered for session {answered_sid!r}, not {sid!r}")
        answered_ids = answer.get("task_ids")
        if not isinstance(answered_ids, list) or not all(isinstance(t, str) for t in answered_ids):
            answered_ids = task_ids
        logger.debug("session %s: submitted %d tasks", sid, len(task_ids))
        return {"session_id": sid, "task_ids": list(answered_ids)}

    @staticmethod
    def _forget_keys(store: DataPlane, keys: list[str]) -> None:
        try:
            store.delete_many(keys)
        except GridError:  # best effort: the error being raised matters more
            logger.debug("could not delete %d keys of a rejected submission", len(keys), exc_info=True)

    # ------------------------------------------------------------------------------ results

    def _result(self, session_id: str, *, after: str | None, wait_sec: float = 0.0,
                listener: str | None = None, counts: bool = False) -> _Answer:
        """One ``GET /result``. Extension parameters are sent always: a deployment ignores them."""
        _, transport, _ = self._parts()
        if self.extensions is False:
            # A plain deployment answers at once (no long poll): never ask after one session more
            # often than dynamodb_results_pull_interval_sec, however often the caller polls.
            with self._lock:
                last = self._last_poll.get(session_id)
                now = time.monotonic()
                if len(self._last_poll) > 10_000:
                    self._last_poll = {sid: t for sid, t in self._last_poll.items()
                                       if now - t < self._pull_interval()}
                pause = 0.0 if last is None else last + self._pull_interval() - now
                self._last_poll[session_id] = now + max(pause, 0.0)
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
        with self._lock:
            self._polls += 1
            self._long_polls += wait_sec > 0
        body = transport.request("GET", "/result", params, retry=True, extra_read_timeout_sec=wait_sec)
        answer = _Answer.parse(body)
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
                broken[tid] = _NO_OUTPUT
                continue
            try:
                outputs[tid] = wire.decode_output(value)
            except PayloadError as exc:
                broken[tid] = f"the task's output in the data plane is unreadable: {exc}"
        return outputs, broken

    def _batch(self, terminal: list[tuple[str, str, str]], processing: list[str], cursor: str | None,
               extensions: bool, read: bool = True) -> ResultBatch:
        finished_ids = [tid for tid, state, _ in terminal if state == "finished"]
        if read:
            outputs, broken = self._read_outputs(finished_ids)
        else:
            outputs, broken = dict.fromkeys(finished_ids, ""), {}
        batch = ResultBatch(cursor=cursor, extensions=extensions, processing=list(processing))
        for tid, state, reason in terminal:
            if state == "finished":
                if tid in outputs:
                    batch.finished[tid] = outputs[tid]
                else:
                    batch.failed[tid] = broken[tid]
            elif state == "failed":
                batch.failed[tid] = reason
            else:
                batch.cancelled.append(tid)
        return batch

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
        _check_id(session_id, "session_id")
        deadline = time.monotonic() + max(0.0, min(float(wait_sec), MAX_WAIT_SEC))
        while True:
            answer = self._result(session_id, after=after, wait_sec=wait_sec)
            if answer.has_cursor:
                return self._batch(list(answer.terminal()), answer.processing, answer.cursor, True, outputs)
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
        _check_id(session_id, "session_id")
        answer = self._result(session_id, after=_AFTER_EVERYTHING, counts=True)
        if answer.has_cursor and answer.counts is not None:
            c = answer.counts
            return SessionStatus(session_id, c.get("count"), c.get("pending"), c.get("processing"),
                                 c.get("finished", 0), c.get("failed", 0), c.get("cancelled", 0), True)
        if answer.has_cursor:  # a grid with cursors but without counts: what its answer says
            return SessionStatus(session_id, None, None, None, 0, 0, 0, False)
        ended = {tid for tid, _, _ in answer.terminal()}
        status = {"finished": len(answer.finished), "failed": len(answer.failed),
                  "cancelled": len(answer.cancelled)}
        raw = self.store.get_many([wire.payload_key(session_id)])[0]
        try:
            task_ids = (wire.decode_submission(raw)["tasks_list"]["tasks"]) if raw is not None else None
        except (PayloadError, KeyError, TypeError):
            task_ids = None
        if not isinstance(task_ids, list):
            return SessionStatus(session_id, None, None, None, exact=False, **status)
        unfinished = [tid for tid in task_ids if tid not in ended]
        markers = self.store.get_many([run_key(tid) for tid in unfinished]) if unfinished else []
        processing = sum(1 for marker in markers if _marker_state(marker) == "running")
        return SessionStatus(session_id, len(task_ids), len(unfinished) - processing, processing,
                             exact=False, **status)

    def poll_listener(self, listener: str, sessions: list[dict[str, Any]], after: str | None,
                      wait_sec: float = 0) -> ResultBatch:
        """One poll of a listener: what changed, after cursor ``after`` (None: from the start),
        in every session submitted with ``listener=listener``; waits up to ``wait_sec`` (at most
        20 s) for something to change.

        ``sessions`` are the submission responses of the sessions still of interest; the request
        names the first one (the route needs a session). With no session, returns an empty batch
        at once. Against a plain deployment (no ``cursor`` in answers) it polls each listed session
        that still has unreported tasks, reports only tasks not reported before (the connector
        remembers them per listener, forgetting sessions no longer listed), and emulates the wait
        by polling every ``dynamodb_results_pull_interval_sec``; ``cursor`` is then None and
        ``processing`` empty.
        """
        _check_id(listener, "listener")
        if not sessions:
            return ResultBatch(cursor=after, extensions=self.extensions is not False)
        checked = [_check_submission(s) for s in sessions]
        wait_sec = max(0.0, min(float(wait_sec), MAX_WAIT_SEC))
        deadline = time.monotonic() + wait_sec
        first_sid = checked[0][0]
        answer = self._result(first_sid, after=after, wait_sec=wait_sec, listener=listener)
        if answer.has_cursor:
            return self._batch(list(answer.terminal()), answer.processing, answer.cursor, True)

        # Plain deployment: the answer is the first session's full list of terminal tasks.
        answers: dict[str, _Answer] = {first_sid: answer}
        with self._lock:
            seen = self._listeners.setdefault(listener, {})
            wanted = {sid for sid, _ in checked}
            for sid in list(seen):
                if sid not in wanted:
                    del seen[sid]
            snapshot = {sid: set(ids) for sid, ids in seen.items()}
        while True:
            new: list[tuple[str, str, str]] = []
            new_by_session: list[tuple[str, str]] = []
            for sid, task_ids in checked:
                done = snapshot.setdefault(sid, set())
                if task_ids and len(done) >= len(task_ids):
                    continue  # everything of this session was reported already
                session_answer = answers.pop(sid, None) or self._result(sid, after=None)
                for item in session_answer.terminal():
                    if item[0] not in done:
                        new.append(item)
                        new_by_session.append((sid, item[0]))
            remaining = deadline - time.monotonic()
            if new or remaining <= 0:
                break
            time.sleep(min(self._pull_interval(), remaining))
        batch = self._batch(new, [], None, False)
        # Marked as seen only now that the outputs were read: if the read failed, the same tasks
        # are reported by the next poll instead of being lost.
        with self._lock:
            seen = self._listeners.setdefault(listener, {})
            for sid, tid in new_by_session:
                seen.setdefault(sid, set()).add(tid)
        return batch

    def forget_listener(self, listener: str) -> None:
        """Drop what the fallback mode remembers about ``listener`` (nothing else changes)."""
        with self._lock:
            self._listeners.pop(listener, None)

    def _pull_interval(self) -> float:
        config = self.config
        return config.results_pull_interval_sec if config is not None else 0.5

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
        sid, task_ids = _check_submission(submission_response)
        expected = set(task_ids)
        deadline = time.monotonic() + timeout_sec if timeout_sec and timeout_sec > 0 else None
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
            if expected <= states.keys():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not answer.has_cursor:
                pause = self._pull_interval()
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)

        order = {tid: i for i, tid in enumerate(task_ids)}
        ranked = sorted(states, key=lambda tid: (order.get(tid, len(order)), tid))
        finished = [tid for tid in ranked if states[tid][0] == "finished"]
        outputs, broken = self._read_outputs(finished)
        result: dict[str, Any] = {name: [] for name in (
            "finished", "finished_OUTPUT", "failed", "failed_OUTPUT", "failed_reason",
            "cancelled", "cancelled_OUTPUT")}
        for tid in ranked:
            state, reason = states[tid]
            if state == "finished" and tid in outputs:
                result["finished"].append(tid)
                result["finished_OUTPUT"].append(outputs[tid])
            elif state in ("finished", "failed"):
                result["failed"].append(tid)
                result["failed_OUTPUT"].append(wire.OUTPUT_PLACEHOLDER)
                result["failed_reason"].append(broken.get(tid, reason))
            else:
                result["cancelled"].append(tid)
                result["cancelled_OUTPUT"].append(wire.OUTPUT_PLACEHOLDER)
        result["metadata"] = {"tasks_in_response": len(ranked)}
        return result

    # ------------------------------------------------------------------------------ cancel

    def cancel_sessions(self, session_ids: list[str]) -> dict[str, Any]:
        """Cancel every pending and processing task of each session; returns the seed's shape,
        ``{sid: {'cancelled_pending': a, 'cancelled_processing': b, 'total_cancelled_tasks': a+b}}``.
        An empty list sends nothing and returns ``{}``."""
        _, transport, _ = self._parts()
        if isinstance(session_ids, str) or not isinstance(session_ids, (list, tuple)):
            raise BadRequestError("session_ids must be a list of session ids")
        ids = [_check_id(sid, "session id") for sid in session_ids]
        if not ids:
            return {}
        content = wire.encode_query({"session_ids_to_cancel": ids})
        answer = transport.request("POST", "/cancel", {"submission_content": content}, retry=True)
        if not isinstance(answer, dict):
            raise ControlPlaneError("POST /cancel: the grid's answer is not a JSON object")
        return answer

    def cancel_tasks(self, task_ids: list[str]) -> dict[str, int]:
        """Cancel single tasks (a local-grid extension); returns ``{'cancelled_pending',
        'cancelled_processing', 'total_cancelled_tasks'}``. Tasks already terminal are not
        counted. Raises ControlPlaneError when the server is a plain deployment, which cannot
        cancel single tasks."""
        _, transport, _ = self._parts()
        if isinstance(task_ids, str) or not isinstance(task_ids, (list, tuple)):
            raise BadRequestError("task_ids must be a list of task ids")
        ids = list(task_ids)
        for tid in ids:
            if not isinstance(tid, str):
                raise BadRequestError(f"task ids must be strings, got {tid!r}")
            wire.session_of(tid)  # PayloadError for something that is not a task id
        if not ids:
            return {"cancelled_pending": 0, "cancelled_processing": 0, "total_cancelled_tasks": 0}
        content = wire.encode_query({"session_ids_to_cancel": [], "task_ids_to_cancel": ids})
        answer = transport.request("POST", "/cancel", {"submission_content": content}, retry=True)
        counts = answer.get("tasks") if isinstance(answer, dict) else None
        if not isinstance(counts, dict):
            raise ControlPlaneError(
                "POST /cancel: this grid cannot cancel single tasks (a plain HTC-Grid deployment); "
                "cancel whole sessions with cancel_sessions()"
            )
        return {key: int(counts.get(key, 0)) for key in
                ("cancelled_pending", "cancelled_processing", "total_cancelled_tasks")}

    # ------------------------------------------------------------------------------ cleanup

    def delete_session_data(self, submission_response: dict[str, Any], *, guarded: bool = False) -> None:
        """Delete a session's keys from the data plane: ``<sid>-payload`` and each task's
        ``-input`` and ``-output``, in one batched delete. Missing keys are ignored.

        ``guarded`` (tasks sent with the deployment guard, see ``worker_guard``): also delete
        their cancel marks, and overwrite their run markers (which hold the first run's answer)
        with a small "collected" marker in one batched write, so that a late duplicate delivery
        still runs nothing. Those markers stay (about 30 bytes a task; Redis' eviction or an S3
        lifecycle rule removes them)."""
        sid, task_ids = _check_submission(submission_response)
        keys = [wire.payload_key(sid)]
        for tid in task_ids:
            keys.append(wire.input_key(tid))
            keys.append(wire.output_key(tid))
            if guarded:
                keys.append(cancel_key(tid))
        if guarded:
            self.store.put_many({run_key(tid): COLLECTED for tid in task_ids})
        self.store.delete_many(keys)

    def keep_task_logs(self, logs: Mapping[str, str]) -> None:
        """Store tasks' captured logs (task id -> text) under their own ``<task_id>-logs`` keys,
        in one batched write: :meth:`delete_session_data` leaves them. On Redis they expire
        after ``htcgrid_retention_sec`` (the config's; a LocalGrid states its retention there;
        default 3600 s); on S3 a lifecycle rule of the bucket must remove them."""
        if logs:
            retention = self.client_config.get("htcgrid_retention_sec", _LOG_RETENTION_SEC)
            self.store.put_many({wire.logs_key(tid): text.encode("utf-8", "replace") for tid, text in logs.items()},
                                expire_sec=float(retention))

    def task_logs(self, task_id: str) -> str | None:
        """A task's captured logs (its stdout, stderr and logging, the last 64 KiB): from its
        ``<task_id>-logs`` key, else from its output while that is still in the data plane.
        None when neither holds any (the task printed nothing, is not done, or its logs
        expired). Raises PayloadError for something that is not a task id, and the data plane's
        errors."""
        wire.session_of(task_id)  # PayloadError for something that is not a task id
        kept, output = self.store.get_many([wire.logs_key(task_id), wire.output_key(task_id)])
        if kept is not None:
            return bytes(kept).decode("utf-8", "replace")
        if output is None:
            return None
        try:
            doc = json.loads(wire.decode_output(output))
        except (PayloadError, ValueError):
            return None
        logs = doc.get("logs") if isinstance(doc, dict) else None
        return logs if isinstance(logs, str) and logs else None

    def mark_cancelled(self, task_ids: list[str]) -> None:
        """Mark tasks cancelled in the data plane, in one batched write: a worker running this
        package's handler with the deployment guard skips them (``"error": "cancelled"``) if
        they have not started. For grids that cannot cancel single tasks."""
        if task_ids:
            self.store.put_many({cancel_key(tid): b"1" for tid in task_ids})

    def close(self) -> None:
        """Close the HTTP pool, the data-plane connections and the S3 thread pool. Repeatable;
        calls made afterwards raise GridError."""
        with self._lock:
            transport, store = self._transport, self._store
            self._closed = True
        errors: list[BaseException] = []
        for resource in (transport, store):
            if resource is None:
                continue
            try:
                resource.close()
            except Exception as exc:  # close both even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> AWSConnector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
