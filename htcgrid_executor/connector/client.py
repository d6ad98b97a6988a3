"""AWSConnector: HTC-Grid's client API (the seed's), wire-compatible with a real deployment.

::

    send(tasks) ──▶ data plane: <task_id>-input …, <sid>-payload   (one batched write)
                └─▶ POST /submit?submission_content=<sid>          (retried with the same sid)
       (embedded grid, small session: POST /submit with the values as its body, no write)
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

import enum
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from .. import wire
from ..errors import (
    BadRequestError,
    ConfigurationError,
    ConnectorClosedError,
    ControlPlaneError,
    GridError,
    PayloadError,
)
from ..options import TaskOptions
from ..worker_guard import CANCELLED, COLLECTED, cancel_key, run_key
from .arguments import check_id, check_id_list, check_submission, check_task_ids, encode_tasks, send_options
from .auth import ApiKeyAuth, Auth, CognitoAuth
from .config import ClientConfig
from .dataplane import DataPlane, make_store
from .plain_deployment import PlainPolls
from .polling import MAX_WAIT_SEC, ResultPolling
from .results import ResultBatch, SessionStatus, marker_state
from .stats import CountedStore, stats_snapshot
from .transport import HTTPTransport

__all__ = ["AWSConnector", "ConnectorState", "ResultBatch", "SessionStatus", "MAX_WAIT_SEC"]

logger = logging.getLogger(__name__)

_LOG_RETENTION_SEC = 3600.0  # a grid's default retention of ended sessions' keys
_NOT_CONFIGURED = "the connector has no configuration: pass client_config_data or call init()"


class ConnectorState(enum.Enum):
    """An :class:`AWSConnector`'s lifecycle. UNCONFIGURED until :meth:`~AWSConnector.init` (or a
    config given to the constructor), then OPEN; :meth:`~AWSConnector.close` makes it CLOSED, and
    :meth:`~AWSConnector.init` opens it again with new connections. Calls refuse UNCONFIGURED with
    ConfigurationError and CLOSED with ConnectorClosedError."""

    UNCONFIGURED = "unconfigured"
    OPEN = "open"
    CLOSED = "closed"


def _auth_for(config: ClientConfig) -> Auth:
    """The authentication mode a config names: an API key (intra-VPC) or a Cognito login."""
    if config.intra_vpc:
        assert config.api_gateway_key is not None
        return ApiKeyAuth(config.api_gateway_key)
    assert config.user_pool_id is not None and config.cognito_userpool_client_id is not None
    return CognitoAuth(
        user_pool_id=config.user_pool_id,
        client_id=config.cognito_userpool_client_id,
        region=config.cognito_region,
        username=config.username,
        password=config.password,
    )


class AWSConnector(ResultPolling):
    """The client of one HTC-Grid: the seed's API, plus what an executor needs.

    Build it with a config dict (``AWSConnector(config)``), from a file
    (:meth:`from_config_file`), or as the public client does (``AWSConnector()`` then
    :meth:`init`). In public-API mode call :meth:`authenticate` before anything else; with
    ``intra_vpc`` (config key or ``INTRA_VPC`` environment variable) there is nothing to log in to.

    ``transport`` (an :class:`HTTPTransport`, which carries its base URL and auth) and ``store``
    (a :class:`DataPlane`) replace the ones the config would give: tests and benchmarks inject
    them (fast retries, a counting or failing store) instead of reaching into the connector. The
    connector owns what it is given: :meth:`close` closes it.

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
        transport: HTTPTransport | None = None,
        store: DataPlane | None = None,
    ) -> None:
        self.client_config: dict[str, Any] = {}
        self.payload_signing_key: str | None = None
        self.config: ClientConfig | None = None
        self._auth: Auth | None = None
        self._transport: HTTPTransport | None = None
        self._store: CountedStore | None = None
        self._state = ConnectorState.UNCONFIGURED
        self._lock = threading.Lock()  # guards the parts, the state and the poll counts
        self._plain = PlainPolls()
        #: True/False once a ``/result`` answer showed whether the server has the extensions
        self.extensions: bool | None = None
        # GET /result calls, and those that asked the grid to wait, for stats(); counted across
        # init(), which replaces the transport and store (and with them their counts)
        self._polls = 0
        self._long_polls = 0
        if client_config_data is not None:
            self.init(client_config_data, username or "", password or "", transport=transport, store=store)
        elif transport is not None or store is not None:
            raise TypeError("transport= and store= need client_config_data")

    # ------------------------------------------------------------------------------ construction

    def init(self, client_config_data: Mapping[str, Any], username: str = "", password: str = "", *,
             transport: HTTPTransport | None = None, store: DataPlane | None = None) -> None:
        """Configure the connector (the public client's two-step style). Raises ConfigurationError
        naming a missing or malformed key. Calling it again replaces the configuration (and closes
        the previous connections). ``transport``/``store``: as in the constructor."""
        config = ClientConfig.from_dict(client_config_data, username=username or None, password=password or None)
        if transport is None:
            transport = HTTPTransport(config.api_url, _auth_for(config))
        counted = CountedStore(make_store(config) if store is None else store)
        with self._lock:
            old = (self._store, self._transport)
            self.config = config
            self.client_config = dict(client_config_data)
            self.payload_signing_key = config.payload_signing_key
            self._auth, self._transport, self._store = transport.auth, transport, counted
            self._plain.forget()
            self.extensions = None
            self._state = ConnectorState.OPEN
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
        """The parts of an open connector; the one place that refuses a closed or unconfigured one."""
        state, auth, transport, store = self._state, self._auth, self._transport, self._store
        if state is ConnectorState.CLOSED:
            raise ConnectorClosedError("the connector is closed")
        if auth is None or transport is None or store is None:
            raise ConfigurationError(_NOT_CONFIGURED)
        return auth, transport, store

    @property
    def store(self) -> DataPlane:
        """The data plane (the executor reads and cleans up through it; its calls are counted)."""
        return self._parts()[2]

    @property
    def transport(self) -> HTTPTransport:
        """The HTTP layer (to tune retries and timeouts, pass one to the constructor instead)."""
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
        if transport is None or store is None:
            raise ConfigurationError(_NOT_CONFIGURED)
        with self._lock:
            polls, long_polls = self._polls, self._long_polls
        return stats_snapshot(transport.counters(), store, polls, long_polls)

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
        BadRequestError, a task that is not JSON raises PayloadError. A task of ``codec.make_task`` is
        sealed for its task id (``codec.seal_task``) with the grid secret. Then the inputs and the
        submission payload go to the data plane in one batched write, and ``POST /submit`` is sent
        (retried on connection errors and 5xx); to the embedded local grid, a session of at most
        ``wire.INLINE_SUBMIT_BYTES`` and ``wire.INLINE_SUBMIT_TASKS`` goes in the body of
        ``POST /submit`` instead, and the grid writes the same keys. ``session_id`` given: that id is reused, so a
        submit repeated after an error never runs the work twice (the grid answers a repeated
        submit of a known session with the same answer). ``listener``: subscribe the session to
        that listener's stream (see :meth:`poll_listener`). ``task_timeout_sec``/``retry_count``
        default to the grid's 3600 s and 5. ``options``: a :class:`~htcgrid_executor.options.TaskOptions`
        instead of those three keywords (giving both raises TypeError); the wire holds options per
        session, so every task of one ``send`` gets the same.
        """
        _, transport, store = self._parts()
        priority, extra = send_options(priority, task_timeout_sec, retry_count, options)
        sid = wire.new_session_id() if session_id is None else check_id(session_id, "session_id")
        if listener is not None:
            check_id(listener, "listener")
        embedded = "htcgrid_redis_control_url" in self.client_config  # the embedded local grid
        task_ids, encoded = encode_tasks(tasks_list, sid, self.payload_signing_key, raw=embedded)
        submission = wire.build_submission(
            sid, task_ids, priority=priority,
            extra_context={"listener": listener} if listener else None, **extra,
        )
        payload = wire.encode_submission(submission)
        params = {"submission_content": sid}
        if (embedded and len(encoded) <= wire.INLINE_SUBMIT_TASKS
                and len(payload) + sum(map(len, encoded)) <= wire.INLINE_SUBMIT_BYTES):
            # a small session goes whole in the request: the grid writes its keys as it creates it
            # (and writes nothing when it refuses it), one round trip instead of two
            body = wire.encode_inline_submission(payload, encoded)
            answer = transport.request("POST", "/submit", params, retry=True, body=body)
            return self._submitted(answer, sid, task_ids)
        items = {wire.input_key(tid): data for tid, data in zip(task_ids, encoded, strict=True)}
        items[wire.payload_key(sid)] = payload
        store.put_many(items)
        try:
            answer = transport.request("POST", "/submit", params, retry=True)
        except BadRequestError:
            # The grid rejected a session made here as malformed: nothing will ever read these
            # keys. Not after a 5xx or no answer (the grid may have accepted it, and a retry needs
            # them), nor for a caller's session id (it may name a session accepted earlier).
            if session_id is None:
                self._forget_keys(store, list(items))
            raise
        return self._submitted(answer, sid, task_ids)

    @classmethod
    def _submitted(cls, answer: Any, sid: str, task_ids: list[str]) -> dict[str, Any]:
        """What :meth:`send` returns for the grid's ``answer`` to ``POST /submit``."""
        answered_ids = cls._submitted_ids(answer, sid, task_ids)
        logger.debug("session %s: submitted %d tasks", sid, len(task_ids))
        return {"session_id": sid, "task_ids": answered_ids}

    @staticmethod
    def _submitted_ids(answer: Any, sid: str, task_ids: list[str]) -> list[str]:
        """The task ids of a ``POST /submit`` answer for ``sid`` (``task_ids`` when it lists none)."""
        if not isinstance(answer, dict):
            raise ControlPlaneError("POST /submit: the grid's answer is not a JSON object")
        answered_sid = answer.get("session_id", sid)
        if answered_sid != sid:
            raise ControlPlaneError(f"POST /submit: the grid answered for session {answered_sid!r}, not {sid!r}")
        answered_ids = answer.get("task_ids")
        if not isinstance(answered_ids, list) or not all(isinstance(t, str) for t in answered_ids):
            answered_ids = task_ids
        return list(answered_ids)

    @staticmethod
    def _forget_keys(store: DataPlane, keys: list[str]) -> None:
        try:
            store.delete_many(keys)
        except GridError:  # best effort: the error being raised matters more
            logger.debug("could not delete %d keys of a rejected submission", len(keys), exc_info=True)

    # ------------------------------------------------------------------------------ cancel

    def cancel_sessions(self, session_ids: list[str]) -> dict[str, Any]:
        """Cancel every pending and processing task of each session; returns the seed's shape,
        ``{sid: {'cancelled_pending': a, 'cancelled_processing': b, 'total_cancelled_tasks': a+b}}``.
        An empty list sends nothing and returns ``{}``. Raises BadRequestError for something
        that is not a list of session ids."""
        _, transport, _ = self._parts()
        ids = [check_id(sid, "session id") for sid in check_id_list(session_ids, "session_ids")]
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
        counted. Raises BadRequestError for something that is not a list of task ids, and
        ControlPlaneError when the server is a plain deployment, which cannot cancel single
        tasks."""
        keys = ("cancelled_pending", "cancelled_processing", "total_cancelled_tasks")
        total = dict.fromkeys(keys, 0)
        for counts in self._cancel_task_chunks(check_task_ids(task_ids), pending_only=False):
            for key in keys:
                total[key] += int(counts.get(key, 0))
        return total

    def cancel_tasks_unless_started(self, task_ids: list[str]) -> tuple[set[str], set[str]]:
        """Cancel those of ``task_ids`` that no worker has claimed yet, atomically on the grid
        (a local-grid extension): they never run. The others are left as they are, and returned
        as ``(claimed, ended)``: claimed by a worker (running, or about to), and no longer
        pending nor running (finished, failed, cancelled before) or unknown to the grid. Raises
        as :meth:`cancel_tasks` does (ControlPlaneError against a plain deployment)."""
        claimed: set[str] = set()
        ended: set[str] = set()
        for counts in self._cancel_task_chunks(check_task_ids(task_ids), pending_only=True):
            lists = [counts.get("claimed"), counts.get("ended")]
            if not all(isinstance(ids, list) and all(isinstance(t, str) for t in ids) for ids in lists):
                raise ControlPlaneError("POST /cancel: the grid did not say which tasks it could not cancel")
            claimed.update(lists[0])
            ended.update(lists[1])
        return claimed, ended

    def _cancel_task_chunks(self, ids: list[str], *, pending_only: bool) -> Iterator[dict[str, Any]]:
        """``POST /cancel`` of single tasks, :data:`~htcgrid_executor.wire.CANCEL_IDS_PER_REQUEST`
        at a time; yields each answer's ``tasks`` counts."""
        _, transport, _ = self._parts()
        for start in range(0, len(ids), wire.CANCEL_IDS_PER_REQUEST):
            query: dict[str, Any] = {"session_ids_to_cancel": [],
                                     "task_ids_to_cancel": ids[start:start + wire.CANCEL_IDS_PER_REQUEST]}
            if pending_only:
                query["pending_only"] = True
            answer = transport.request("POST", "/cancel", {"submission_content": wire.encode_query(query)},
                                       retry=True)
            counts = answer.get("tasks") if isinstance(answer, dict) else None
            if not isinstance(counts, dict):
                raise ControlPlaneError(
                    "POST /cancel: this grid cannot cancel single tasks (a plain HTC-Grid deployment); "
                    "cancel whole sessions with cancel_sessions()"
                )
            yield counts

    # ------------------------------------------------------------------------------ cleanup

    def delete_session_data(self, *submission_responses: dict[str, Any], guarded: bool = False) -> None:
        """Delete sessions' keys from the data plane: for each session answer given (as
        :meth:`send` returned it), ``<sid>-payload`` and each task's ``-input`` and ``-output``,
        all in one batched delete. Missing keys are ignored; every answer is checked before
        anything is deleted (:class:`BadRequestError` names a malformed one).

        ``guarded`` (tasks sent with the deployment guard, see ``worker_guard``): also delete
        their cancel marks, and overwrite their run markers (which hold the first run's answer)
        with a small "collected" marker in one batched write, so that a late duplicate delivery
        still runs nothing. Those markers stay (about 30 bytes a task; Redis' eviction or an S3
        lifecycle rule removes them)."""
        keys: list[str] = []
        all_task_ids: list[str] = []
        for response in submission_responses:
            sid, task_ids = check_submission(response)
            keys.append(wire.payload_key(sid))
            all_task_ids.extend(task_ids)
        for tid in all_task_ids:
            keys.append(wire.input_key(tid))
            keys.append(wire.output_key(tid))
            if guarded:
                keys.append(cancel_key(tid))
        if guarded:
            self.store.put_many({run_key(tid): COLLECTED for tid in all_task_ids})
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
        expired). Raises BadRequestError for something that is not a task id, and the data
        plane's errors."""
        check_task_ids([task_id])
        kept, output = self.store.get_many([wire.logs_key(task_id), wire.output_key(task_id)])
        if kept is not None:
            return bytes(kept).decode("utf-8", "replace")
        if output is None:
            return None
        try:
            doc = json.loads(wire.decode_output_text(output))
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

    def mark_cancelled_unless_started(self, task_ids: list[str]) -> set[str]:
        """Cancel tasks that have not begun, exactly: the ids returned had begun on a worker and
        run to their end; the others never run. For each task, one atomic step decides: the
        client creates the task's run marker as ``cancelled`` unless a worker created it first
        (``DataPlane.create_many``), and a worker runs a call only once it has created that
        marker itself. (A cancel mark written next to the marker, read by the worker after it,
        left a window on S3, which has no script to do both at once: both sides saw the other,
        and a call kept running by the client never ran.) One batched write, then one read of
        the markers another writer had made."""
        if not task_ids:
            return set()
        created = self.store.create_many({run_key(tid): CANCELLED for tid in task_ids})
        taken = [tid for tid in task_ids if run_key(tid) not in created]
        markers = self.store.get_many([run_key(tid) for tid in taken]) if taken else []
        return {tid for tid, marker in zip(taken, markers, strict=True)
                if marker_state(marker) in ("running", "done")}

    def close(self) -> None:
        """Close the HTTP pool, the data-plane connections and the S3 thread pool. Repeatable;
        calls made afterwards raise ConnectorClosedError (until :meth:`init` opens it again)."""
        with self._lock:
            transport, store = self._transport, self._store
            self._state = ConnectorState.CLOSED
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
