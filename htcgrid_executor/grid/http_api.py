"""The control plane: HTC-Grid's HTTP routes over the state table.

``POST /submit``, ``GET /result`` and ``POST /cancel``, each taking the one query parameter
``submission_content``, answer exactly as a deployment's API gateway does. Extensions that a
deployment ignores (see docs/architecture.md): ``after``/``wait_ms``/``listener`` on ``/result``
for cursors and long polls, ``processing``/``failed_reason``/``cursor`` in its answer,
``counts=1`` on ``/result`` for a session's counts per state (``counts`` in the answer),
``task_ids_to_cancel`` on ``/cancel``.

Every request needs the grid's key in ``x-api-key`` or ``Authorization`` (401 without, 403 when
wrong). Malformed requests get a 4xx with ``{"error": "..."}`` naming the problem; nothing a
client sends produces a 5xx or a traceback, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from ..errors import PayloadError
from ..states import TaskState
from ..wire import (
    OUTPUT_PLACEHOLDER,
    decode_query,
    decode_submission,
    empty_result_body,
    is_valid_session_id,
    payload_key,
    session_of,
    task_ids_for,
)
from .dashboard import Dashboard
from .state_table import MAX_PRIORITY, StateTable, key_for

__all__ = ["ControlPlaneServer", "MAX_TASKS_PER_SESSION", "MAX_WAIT_MS"]

logger = logging.getLogger(__name__)

MAX_TASKS_PER_SESSION = 1_000_000
MAX_WAIT_MS = 20_000
MAX_BODY_BYTES = 1 << 20
MAX_RETRIES = 100
_COALESCE_MS = 5  # how long a long poll that saw only task starts waits for their ends


class _Reject(Exception):
    """A request the grid refuses: becomes a 4xx answer with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _int_param(params: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    values = params.get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise _Reject(400, f"query parameter {name!r} must be an integer") from None
    if not low <= value <= high:
        raise _Reject(400, f"query parameter {name!r} must be between {low} and {high}")
    return value


def _cursor_param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    value = values[0]
    major, _, minor = value.partition("-")
    if not major.isdigit() or (minor and not minor.isdigit()) or len(value) > 40:
        raise _Reject(400, f"query parameter {name!r} must be a cursor from an earlier answer")
    return value


class _Routes:
    """What each route does, apart from HTTP. Raises _Reject for a bad request.

    ``retry_limit``: the most retries this grid gives a lost task; a submission's
    ``retry_count`` may ask for fewer, not more.
    """

    def __init__(self, table: StateTable, retry_limit: int = MAX_RETRIES) -> None:
        self.table = table
        self.retry_limit = retry_limit

    # POST /submit?submission_content=<session id>
    def submit(self, content: str, params: dict[str, list[str]]) -> dict[str, Any]:
        sid = content
        if not is_valid_session_id(sid):
            raise _Reject(400, "submission_content must be a session id (letters, digits and '-')")
        raw = self.table.redis.get(payload_key(sid))
        if raw is None:
            raise _Reject(400, f"no submission payload {payload_key(sid)} in the data plane")
        try:
            submission = decode_submission(raw)
        except PayloadError as exc:
            raise _Reject(400, str(exc)) from None
        if not isinstance(submission, dict):
            raise _Reject(400, "submission payload must be a JSON object")
        if submission.get("session_id") != sid:
            raise _Reject(400, "submission payload's session_id does not match submission_content")
        tasks = (submission.get("tasks_list") or {}).get("tasks") if isinstance(
            submission.get("tasks_list"), dict) else None
        if not isinstance(tasks, list) or not tasks:
            raise _Reject(400, "submission payload needs a non-empty tasks_list.tasks")
        if len(tasks) > MAX_TASKS_PER_SESSION:
            raise _Reject(413, f"a session holds at most {MAX_TASKS_PER_SESSION} tasks, not {len(tasks)}")
        expected = task_ids_for(sid, len(tasks))
        if tasks != expected:
            raise _Reject(400, "tasks_list.tasks must be '<session_id>_<i>' for i = 0, 1, ... in order")
        scheduler = submission.get("scheduler_data") or {}
        context = submission.get("context") or {}
        if not isinstance(scheduler, dict) or not isinstance(context, dict):
            raise _Reject(400, "scheduler_data and context must be JSON objects")
        timeout = scheduler.get("task_timeout_sec", 3600)
        retries = scheduler.get("retry_count", 5)
        priority = context.get("tasks_priority", 0)
        listener = context.get("listener") or ""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 1e7:
            raise _Reject(400, "scheduler_data.task_timeout_sec must be a number of seconds >= 0")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            raise _Reject(400, f"scheduler_data.retry_count must be an integer from 0 to {MAX_RETRIES}")
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
            raise _Reject(400, f"context.tasks_priority must be an integer within ±{MAX_PRIORITY}")
        if listener and not is_valid_session_id(listener):
            raise _Reject(400, "context.listener must be an id of letters, digits and '-'")
        self.table.submit(sid, len(tasks), priority=priority, max_retries=min(retries, self.retry_limit),
                          timeout_ms=int(timeout * 1000), listener=listener)
        return {"session_id": sid, "task_ids": expected}

    # GET /result?submission_content=b64({"session_id": sid})[&after=&wait_ms=&listener=]
    def result(self, content: str, params: dict[str, list[str]]) -> dict[str, Any]:
        query = self._query(content)
        sid = query.get("session_id")
        if not is_valid_session_id(sid):
            raise _Reject(400, "submission_content must hold a 'session_id'")
        after = _cursor_param(params, "after")
        wait_ms = _int_param(params, "wait_ms", 0, 0, MAX_WAIT_MS)
        listener = (params.get("listener") or [None])[0]
        if listener is not None:
            if not is_valid_session_id(listener):
                raise _Reject(400, "query parameter 'listener' must be an id of letters, digits and '-'")
            if after is None:
                raise _Reject(400, "query parameter 'listener' needs 'after' (a cursor, '0' at first)")
            stream = key_for("listener", listener)
            started = time.monotonic()
            events = self.table.read_events(stream, after, block_ms=wait_ms)
            if events and wait_ms and not any(e.state.is_terminal for e in events):
                # Only starts so far: a short task ends within milliseconds, and one answer for
                # both saves the client a round trip; a long task's start is reported 5 ms late.
                left_ms = wait_ms - (time.monotonic() - started) * 1000
                if left_ms >= 1:
                    events += self.table.read_events(stream, events[-1].cursor,
                                                     block_ms=int(min(_COALESCE_MS, left_ms)))
            self.table.trim_listener(listener, after)
        else:
            if not self.table.redis.exists(key_for("session", sid)):
                raise _Reject(404, f"unknown session {sid} (never submitted, or expired)")
            events = self.table.read_events(key_for("session_events", sid), after,
                                            block_ms=wait_ms if after is not None else 0)
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
        if listener is None and (params.get("counts") or [""])[0] == "1":
            # the session hash's counters: pending and processing too, which no stream holds
            info = self.table.session_info(sid)
            if info is None:  # expired between the check above and now
                raise _Reject(404, f"unknown session {sid} (never submitted, or expired)")
            body["counts"] = {state.value: info[state.value] for state in TaskState}
            body["counts"]["count"] = info["count"]
        return body

    # POST /cancel?submission_content=b64({"session_ids_to_cancel": [...]})
    def cancel(self, content: str, params: dict[str, list[str]]) -> dict[str, Any]:
        query = self._query(content)
        sessions = query.get("session_ids_to_cancel", [])
        tasks = query.get("task_ids_to_cancel", [])
        if not isinstance(sessions, list) or not all(is_valid_session_id(s) for s in sessions):
            raise _Reject(400, "session_ids_to_cancel must be a list of session ids")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise _Reject(400, "task_ids_to_cancel must be a list of task ids")
        if not sessions and not tasks:
            raise _Reject(400, "nothing to cancel: give session_ids_to_cancel (or task_ids_to_cancel)")
        try:
            for task_id in tasks:
                session_of(task_id)
        except PayloadError as exc:
            raise _Reject(400, str(exc)) from None
        answer: dict[str, Any] = self.table.cancel_sessions(list(dict.fromkeys(sessions)))
        if tasks:
            answer["tasks"] = self.table.cancel_tasks(list(dict.fromkeys(tasks)))
        return answer

    @staticmethod
    def _query(content: str) -> dict[str, Any]:
        try:
            query = decode_query(content)
        except PayloadError as exc:
            raise _Reject(400, str(exc)) from None
        if not isinstance(query, dict):
            raise _Reject(400, "submission_content must encode a JSON object")
        return query


_ROUTES = {("POST", "/submit"): "submit", ("GET", "/result"): "result", ("POST", "/cancel"): "cancel"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the connector reuses one connection
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK hold every answer back by ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self.server.dashboard.serve(self, "GET"):
            self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        if not self.server.dashboard.serve(self, "POST"):
            self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        self.server.count_request()
        try:
            self._discard_body()
            url = urlsplit(self.path)
            route = _ROUTES.get((method, url.path))
            if route is None:
                if any(path == url.path for _, path in _ROUTES):
                    raise _Reject(405, f"{method} is not allowed on {url.path}")
                raise _Reject(404, f"no route {url.path}")
            self._authenticate()
            try:
                params = parse_qs(url.query, keep_blank_values=True, strict_parsing=False,
                                  max_num_fields=16)
            except ValueError:
                raise _Reject(400, "too many query parameters") from None
            content = params.get("submission_content")
            if not content or not content[0]:
                raise _Reject(400, "query parameter 'submission_content' is required")
            body = getattr(self.server.routes, route)(content[0], params)
            self._answer(200, body)
        except _Reject as exc:
            self._answer(exc.status, {"error": exc.message})
        except redis.exceptions.ConnectionError:
            logger.warning("control plane: redis unreachable during %s %s", method, url.path)
            self._answer(503, {"error": "the grid's state table is unreachable; try again"})
        except Exception:  # never a traceback to the client; the log has it
            logger.exception("control plane: internal error in %s", method)
            self._answer(500, {"error": "internal error"})

    def _authenticate(self) -> None:
        given = self.headers.get("x-api-key") or self.headers.get("Authorization")
        if not given:
            raise _Reject(401, "missing credentials: send the grid's key in x-api-key")
        if given.startswith("Bearer "):
            given = given[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), self.server.api_key.encode()):
            raise _Reject(403, "wrong credentials")

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None:
            return
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise _Reject(400, "malformed Content-Length") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise _Reject(413, "request body too large (the routes take no body)")
        self.rfile.read(size)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (or the grid is stopping): nobody to tell
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        logger.debug("control plane: " + format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (request line too long, bad version): JSON like ours, no HTML
        try:
            self.close_connection = True
            self._answer(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], routes: _Routes, api_key: str) -> None:
        self.routes = routes
        self.api_key = api_key
        self.dashboard = Dashboard(routes.table, api_key)  # its routes: /dashboard...
        self.requests_served = 0
        self._count_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        # socketserver prints tracebacks to stderr; a library logs them instead
        logger.debug("control plane: error while serving %s", client_address, exc_info=True)

    def count_request(self) -> None:
        with self._count_lock:
            self.requests_served += 1

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        with self._count_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # noqa: ANN001
        with self._count_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End keep-alive connections so their handler threads exit."""
        with self._count_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ControlPlaneServer:
    """The HTTP API in a thread. ``port=0`` picks a free port; :attr:`url` says where it is."""

    def __init__(self, table: StateTable, api_key: str, *, host: str = "127.0.0.1", port: int = 0,
                 retry_limit: int = MAX_RETRIES) -> None:
        self._server = _Server((host, port), _Routes(table, retry_limit), api_key)
        self._thread = threading.Thread(target=self._server.serve_forever, name="htcgrid-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        if host in ("0.0.0.0", "::"):  # a wildcard bind: name the machine for other machines
            host = socket.getfqdn()
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def requests_served(self) -> int:
        return self._server.requests_served

    def start(self) -> ControlPlaneServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.close_connections()
        self._server.server_close()
