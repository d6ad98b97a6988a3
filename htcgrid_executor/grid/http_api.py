"""The control plane: HTC-Grid's HTTP routes over the state table.

``POST /submit``, ``GET /result`` and ``POST /cancel``, each taking the one query parameter
``submission_content``, answer exactly as a deployment's API gateway does. Extensions that a
deployment ignores (see docs/architecture.md): ``after``/``wait_ms``/``listener`` on ``/result``
for cursors and long polls, ``processing``/``failed_reason``/``cursor`` in its answer,
``counts=1`` on ``/result`` for a session's counts per state (``counts`` in the answer),
``task_ids_to_cancel`` on ``/cancel``.

Every request needs the grid's key in ``x-api-key`` or ``Authorization`` (401 without, 403 when
wrong), checked before any body byte is read. Malformed requests get a 4xx with
``{"error": "..."}`` naming the problem; nothing a client sends produces a 5xx or a traceback,
and the server keeps serving. What a client can cost is bounded: headers (http.server's limits),
a body of at most ``MAX_BODY_BYTES`` (read only with the key; a negative, malformed or larger
``Content-Length`` is refused and the connection closed), ``MAX_CONNECTIONS`` connections served
at once by as many pooled worker threads (one more gets a 503), each closed after
``CONNECTION_TIMEOUT_SEC`` of silence.

Redis refusing work is said as such, never as an internal error: 507 while it refuses writes
(OOM, MISCONF: see :func:`~.state_table.redis_refusal`), 503 while it is busy or loading, 503
when it cannot be reached. Read routes never write, so reads work while Redis refuses writes;
``/result`` then answers 507 when it has nothing new, since nothing can happen.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
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
from .state_table import MAX_PRIORITY, StateTable, key_for, redis_refusal

__all__ = ["ControlPlaneServer", "MAX_TASKS_PER_SESSION", "MAX_WAIT_MS", "MAX_CONNECTIONS", "CONNECTION_TIMEOUT_SEC"]

logger = logging.getLogger(__name__)

MAX_TASKS_PER_SESSION = 1_000_000
MAX_WAIT_MS = 20_000
MAX_BODY_BYTES = 1 << 20
MAX_RETRIES = 100
MAX_CONNECTIONS = 64  # connections served at once; more get a 503
CONNECTION_TIMEOUT_SEC = 30.0  # a silent connection is closed after this long
_COALESCE_MS = 5  # how long a long poll that saw only task starts waits for their ends


class _Reject(Exception):
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
        raise _Reject(400, f"query parameter {name!r} must be an integer")
    value = int(values[0])
    if not low <= value <= high:
        raise _Reject(400, f"query parameter {name!r} must be between {low} and {high}")
    return value


def _cursor_param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    value = values[0]
    match = _CURSOR.fullmatch(value)
    if not match or any(part is not None and int(part) >= _U64 for part in match.groups()):
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
            # the client has read what precedes ``after``: the entries go at the next trim (a
            # read route does not write, so reads keep working while Redis refuses writes)
            with self._read_lock:
                self._read_up_to[listener] = after
        else:
            if not self.table.redis.exists(key_for("session", sid)):
                raise _Reject(404, f"unknown session {sid} (never submitted, or expired)")
            events = self.table.read_events(key_for("session_events", sid), after,
                                            block_ms=wait_ms if after is not None else 0)
        if not events and self.table.write_refusal is not None:
            # nothing new, and nothing can happen while Redis refuses writes: say so, so that
            # the client's deadline runs (a read that only found nothing would hide it)
            raise _Reject(507, f"the grid cannot make progress: {self.table.write_refusal}")
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


_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the connector reuses one connection
    server: _Server

    def setup(self) -> None:
        # bounds every read and write on the connection, the wait for the next request of a
        # kept-alive connection included: a silent or trickling client frees its worker
        self.timeout = self.server.connection_timeout_sec
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
        path = "?"
        unread = 0  # body bytes not read yet: the connection cannot be reused while any are left
        try:
            # the body's size is checked before anything is read, and the key before the body
            # is read: a client without the key costs no more than its headers
            unread = self._body_size()
            try:
                url = urlsplit(self.path)
            except ValueError:  # e.g. "//[x": an unclosed IPv6 host
                raise _Reject(400, "malformed request target") from None
            path = url.path
            route = _ROUTES.get((method, url.path))
            if route is None:
                if any(route_path == url.path for _, route_path in _ROUTES):
                    raise _Reject(405, f"{method} is not allowed on {url.path}")
                raise _Reject(404, f"no route {url.path}")
            self._authenticate()
            if unread:
                try:
                    self.rfile.read(unread)  # the routes take no body; at most MAX_BODY_BYTES
                except OSError:  # timed out or reset: nobody left to answer
                    self.close_connection = True
                    return
                unread = 0
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
            if unread:
                self.close_connection = True
            self._answer(exc.status, {"error": exc.message})
        except redis.exceptions.RedisError as exc:
            refusal = redis_refusal(exc)
            if refusal is not None:
                logger.warning("control plane: %s during %s %s", refusal[1], method, path)
                self._answer(refusal[0], {"error": refusal[1]})
            elif isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
                logger.warning("control plane: redis unreachable during %s %s", method, path)
                self._answer(503, {"error": "the grid's state table is unreachable; try again"})
            else:
                logger.exception("control plane: redis error in %s %s", method, path)
                self._answer(500, {"error": "internal error"})
        except Exception:  # never a traceback to the client; the log has it
            logger.exception("control plane: internal error in %s %s", method, path)
            self._answer(500, {"error": "internal error"})

    def _authenticate(self) -> None:
        given = self.headers.get("x-api-key") or self.headers.get("Authorization")
        if not given:
            raise _Reject(401, "missing credentials: send the grid's key in x-api-key")
        if given.startswith("Bearer "):
            given = given[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), self.server.api_key.encode()):
            raise _Reject(403, "wrong credentials")

    def _body_size(self) -> int:
        """The body's announced size; a body of unknown, negative or too large a size is
        refused (and the connection closed: its bytes are never read)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise _Reject(411, "the routes take no body: send no Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return 0
        if len(set(lengths)) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
            self.close_connection = True
            raise _Reject(400, "malformed Content-Length: it must be one byte count >= 0")
        size = int(lengths[0])
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise _Reject(413, "request body too large (the routes take no body)")
        return size

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
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


_TOO_MANY = json.dumps({"error": "too many connections to the grid's control plane; try again"}).encode()


class _Server(HTTPServer):
    """An HTTP server whose connections are served by a pool of worker threads, at most
    ``max_connections`` at a time; a connection past the cap gets a 503 and is closed.

    Workers are started ahead of need (``spare_workers`` idle ones at least) and kept: a
    request never waits for a thread to start, so the grid keeps serving while the interpreter
    exits, when Python 3.12.0/3.12.1 refuse to start threads.
    """

    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: connections waiting for accept()

    def __init__(self, address: tuple[str, int], routes: _Routes, api_key: str, *,
                 max_connections: int, connection_timeout_sec: float, spare_workers: int = 8) -> None:
        self.routes = routes
        self.connection_timeout_sec = connection_timeout_sec
        self.api_key = api_key
        self.dashboard = Dashboard(routes.table, api_key)  # its routes: /dashboard...
        self.max_connections = max_connections
        self.spare_workers = spare_workers
        self.requests_served = 0
        self._count_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._accepted: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle_workers = 0
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        # socketserver prints tracebacks to stderr; a library logs them instead
        logger.debug("control plane: error while serving %s", client_address, exc_info=True)

    def count_request(self) -> None:
        with self._count_lock:
            self.requests_served += 1

    def start_workers(self) -> None:
        """Start workers until ``spare_workers`` are idle (never past ``max_connections``)."""
        while True:
            with self._count_lock:
                if (self._idle_workers >= self.spare_workers
                        or len(self._workers) >= self.max_connections):
                    return
                worker = threading.Thread(target=self._work, name=f"htcgrid-http-{len(self._workers)}",
                                          daemon=True)
                self._workers.append(worker)
                self._idle_workers += 1
            try:
                worker.start()
            except RuntimeError:  # the interpreter is exiting: the workers there are will do
                with self._count_lock:
                    self._workers.remove(worker)
                    self._idle_workers -= 1
                return

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        with self._count_lock:
            admitted = len(self._connections) < self.max_connections
            if admitted:
                self._connections.add(request)
        if not admitted:
            self._refuse(request)
            return
        self._accepted.put((request, client_address))
        self.start_workers()

    def _refuse(self, request: socket.socket) -> None:
        logger.warning("control plane: %d connections open; refusing another", self.max_connections)
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: " + str(len(_TOO_MANY)).encode()
                            + b"\r\n\r\n" + _TOO_MANY)
        except OSError:
            pass
        super().shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._accepted.get()
            if item is None:
                return
            with self._count_lock:
                self._idle_workers -= 1
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self._count_lock:
                    self._idle_workers += 1

    def shutdown_request(self, request) -> None:  # noqa: ANN001
        with self._count_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End open connections so that their workers go back to waiting."""
        with self._count_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop_workers(self, timeout: float = 1.0) -> None:
        """Tell every worker to exit once its request is answered, waiting up to ``timeout``: one
        still in a long poll ends with it (its Redis read returns, or fails as Redis stops)."""
        with self._count_lock:
            workers = list(self._workers)
        for _ in workers:
            self._accepted.put(None)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))


class ControlPlaneServer:
    """The HTTP API in a thread. ``port=0`` picks a free port; :attr:`url` says where it is.

    ``max_connections``: connections served at once (one worker thread each); one more is
    answered 503 and closed. ``connection_timeout_sec``: how long a connection may stay silent
    (mid-request or between kept-alive requests) before it is closed.
    """

    def __init__(self, table: StateTable, api_key: str, *, host: str = "127.0.0.1", port: int = 0,
                 retry_limit: int = MAX_RETRIES, max_connections: int = MAX_CONNECTIONS,
                 connection_timeout_sec: float = CONNECTION_TIMEOUT_SEC) -> None:
        self._server = _Server((host, port), _Routes(table, retry_limit), api_key,
                               max_connections=max_connections,
                               connection_timeout_sec=connection_timeout_sec)
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

    def trim_listeners(self) -> None:
        """Drop the listener-stream entries clients have read (the grid's TTL checker calls
        this after each sweep). Raises redis errors."""
        self._server.routes.trim_listeners()

    def start(self) -> ControlPlaneServer:
        self._server.start_workers()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.close_connections()
        self._server.stop_workers()
        self._server.server_close()
