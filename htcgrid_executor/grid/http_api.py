"""The control plane: HTC-Grid's HTTP routes over the state table.

``POST /submit``, ``GET /result`` and ``POST /cancel``, each taking the one query parameter
``submission_content``, answer exactly as a deployment's API gateway does. Extensions that a
deployment ignores (see docs/architecture.md): ``after``/``wait_ms``/``listener`` on ``/result``
for cursors and long polls, ``processing``/``failed_reason``/``cursor`` in its answer,
``counts=1`` on ``/result`` for a session's counts per state (``counts`` in the answer),
``inline_outputs=<bytes>`` on ``/result`` for the finished tasks' outputs in the answer, within
that budget (``inline_outputs`` in the answer), ``task_ids_to_cancel`` on ``/cancel``, and a
body on ``/submit`` that holds the session's payload and inputs (``wire.encode_inline_submission``).

Every request needs the grid's key in ``x-api-key`` or ``Authorization`` (401 without, 403 when
wrong), checked before any body byte is read. Malformed requests get a 4xx with
``{"error": "..."}`` naming the problem; nothing a client sends produces a 5xx or a traceback,
and the server keeps serving. What a client can cost is bounded: headers (http.server's limits),
a body of at most ``MAX_BODY_BYTES`` (read only with the key; a negative, malformed or larger
``Content-Length`` is refused and the connection closed), ``MAX_CONNECTIONS`` connections served
at once by as many pooled worker threads (one more gets a 503), each closed after
``CONNECTION_TIMEOUT_SEC`` of silence.

Redis refusing work is said as such, never as an internal error: 507 while it refuses writes
(OOM, MISCONF: see :func:`~.redis_refusals.redis_refusal`), 503 while it is busy or loading, 503
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
from urllib.parse import SplitResult, parse_qs, urlsplit

import redis

from .dashboard import Dashboard
from .http_head import HeadersTooLarge, read_headers
from .redis_refusals import redis_refusal
from .routes import MAX_RETRIES, MAX_TASKS_PER_SESSION, MAX_WAIT_MS, ROUTES, Reject, Routes
from .state_table import StateTable

__all__ = ["ControlPlaneServer", "MAX_TASKS_PER_SESSION", "MAX_WAIT_MS", "MAX_CONNECTIONS", "CONNECTION_TIMEOUT_SEC"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # twice wire.INLINE_SUBMIT_BYTES: an inline submission and room to spare
MAX_CONNECTIONS = 64  # connections served at once; more get a 503
CONNECTION_TIMEOUT_SEC = 30.0  # a silent connection is closed after this long
#: (second, its Date header), shared by the handler threads (replaced whole: no lock needed)
_date_header: tuple[int, str] = (0, "")


_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
_VERSION_PART = re.compile(r"[0-9]{1,10}")


def _parse_target(target: str) -> SplitResult:
    try:
        return urlsplit(target)
    except ValueError:  # e.g. "//[x": an unclosed IPv6 host
        raise Reject(400, "malformed request target") from None


def _route(method: str, path: str) -> str:
    """The name of the Routes method serving ``method path``; raises Reject 404/405."""
    route = ROUTES.get((method, path))
    if route is None:
        if any(route_path == path for _, route_path in ROUTES):
            raise Reject(405, f"{method} is not allowed on {path}")
        raise Reject(404, f"no route {path}")
    return route


def _content_and_params(query: str) -> tuple[str, dict[str, list[str]]]:
    """The query's ``submission_content`` (required) and all its parameters."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=16)
    except ValueError:
        raise Reject(400, "too many query parameters") from None
    content = params.get("submission_content")
    if not content or not content[0]:
        raise Reject(400, "query parameter 'submission_content' is required")
    return content[0], params


def _http_version(version: str) -> tuple[int, int] | None:
    """``HTTP/<major>.<minor>`` as numbers (ASCII digits, at most 10 each), else None."""
    if not version.startswith("HTTP/"):
        return None
    parts = version[5:].split(".")
    if len(parts) != 2 or not all(_VERSION_PART.fullmatch(part) for part in parts):
        return None
    return int(parts[0]), int(parts[1])


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

    def parse_request(self) -> bool:
        """http.server's parse_request (Python 3.11-3.13: the request line, its version, then
        the headers and what ``Connection`` and ``Expect`` say), with the header block read by
        :func:`.http_head.read_headers` instead of the email parser."""
        self.command = None  # set in case of error on the first line
        self.request_version = version = self.default_request_version
        self.close_connection = True
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:  # enough to tell the protocol version
            version = words[-1]
            number = _http_version(version)
            if number is None:
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            if number >= (1, 1) and self.protocol_version >= "HTTP/1.1":
                self.close_connection = False
            if number >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                                f"Invalid HTTP version ({version.split('/', 1)[1]})")
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):  # gh-87389: not taken for a scheme-relative URL
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_headers(self.rfile)  # type: ignore[assignment]
        except HeadersTooLarge as exc:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, exc.reason, exc.detail)
            return False
        return self._connection_directives()

    def _connection_directives(self) -> bool:
        """What the headers say of the connection (as http.server reads them): ``Connection``
        close or keep-alive, ``Expect: 100-continue`` (answered here; False if that failed)."""
        conntype = (self.headers.get("Connection") or "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if expect == "100-continue" and self.protocol_version >= "HTTP/1.1" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header's value; the current one is formatted once a second, not once an
        answer (``email.utils.formatdate`` was 4% of the control plane's time per single task)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        global _date_header
        second = int(time.time())
        cached = _date_header
        if cached[0] != second:
            cached = _date_header = (second, super().date_time_string(second))
        return cached[1]

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
            url = _parse_target(self.path)
            path = url.path
            route = _route(method, url.path)
            self._authenticate()
            data = b""
            if unread:
                # /submit takes an inline submission; the other routes' bodies are dropped
                data = self._read_body(unread)
                if data is None:
                    return
                unread = 0
            content, params = _content_and_params(url.query)
            if route == "submit":
                answer = self.server.routes.submit(content, params, data)
            else:
                answer = getattr(self.server.routes, route)(content, params)
            self._answer(200, answer)
        except Reject as exc:
            if unread:
                self.close_connection = True
            self._answer(exc.status, {"error": exc.message})
        except redis.exceptions.RedisError as exc:
            self._answer_redis_error(exc, method, path)
        except Exception:  # never a traceback to the client; the log has it
            logger.exception("control plane: internal error in %s %s", method, path)
            self._answer(500, {"error": "internal error"})

    def _read_body(self, size: int) -> bytes | None:
        """The body (``size`` bytes, at most MAX_BODY_BYTES); None when the connection failed or
        ended meanwhile: nobody is left to answer."""
        try:
            data = self.rfile.read(size)
        except OSError:  # timed out or reset
            data = b""
        if len(data) != size:
            self.close_connection = True
            return None
        return data

    def _answer_redis_error(self, exc: redis.exceptions.RedisError, method: str, path: str) -> None:
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

    def _authenticate(self) -> None:
        given = self.headers.get("x-api-key") or self.headers.get("Authorization")
        if not given:
            raise Reject(401, "missing credentials: send the grid's key in x-api-key")
        if given.startswith("Bearer "):
            given = given[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), self.server.api_key.encode()):
            raise Reject(403, "wrong credentials")

    def _body_size(self) -> int:
        """The body's announced size; a body of unknown, negative or too large a size is
        refused (and the connection closed: its bytes are never read)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise Reject(411, "a body needs a Content-Length: send no Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return 0
        if len(set(lengths)) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
            self.close_connection = True
            raise Reject(400, "malformed Content-Length: it must be one byte count >= 0")
        size = int(lengths[0])
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise Reject(413, f"request body too large (at most {MAX_BODY_BYTES} bytes: an inline submission)")
        return size

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            if self.request_version == "HTTP/0.9":  # no headers at all (http.server buffers none)
                self.wfile.write(data)
                return
            # headers and body in one write (what end_headers() would send, then the body): one
            # send, one segment, one wake-up of the client instead of two of each
            self._headers_buffer.extend((b"\r\n", data))
            self.flush_headers()
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

    def __init__(self, address: tuple[str, int], routes: Routes, api_key: str, *,
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
        self._server = _Server((host, port), Routes(table, retry_limit), api_key,
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
