"""The local grid's live dashboard: a page the control plane serves beside its API routes.

::

    GET  /dashboard?key=<grid key>        the page (HTML, its script and style inlined)
    GET  /dashboard/state                 what the page shows, as JSON (polled every second)
    POST /dashboard/cancel?session=<sid>  cancel a session, as ``POST /cancel`` does

Every route needs the grid's key, as the API routes do: in ``x-api-key`` or ``Authorization``,
or (so that the page can be opened from a link) in the query parameter ``key``; 401 without it,
403 when wrong, and no data either way. The page sends the key in ``x-api-key``, so that it
appears in one URL only, and the request line is logged with the key blanked out.

What the page shows is read from the state table (:class:`GridView`, through read-only
:class:`StateTable` methods) and from the data plane's output envelopes for the traceback of a
task that raised. Nothing is unpickled: an envelope's type, message and traceback are JSON text.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import json
import logging
import re
import secrets
import threading
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from ..codec import TASK_MARKER
from ..states import TaskState
from ..wire import is_valid_session_id
from .state_table import StateTable

__all__ = ["Dashboard", "GridView", "DASHBOARD_PATH"]

logger = logging.getLogger(__name__)

DASHBOARD_PATH = "/dashboard"
WINDOW_MS = 5 * 60_000  # how far back the throughput chart and the failures list look
BUCKET_MS = 5_000  # one bar of the chart
MAX_FAILURES = 50  # failures kept and shown, newest first
MAX_ENDED_SESSIONS = 20  # ended sessions shown beside every running one
MAX_TRACEBACK_CHARS = 8_000  # the end of a longer traceback (or task log) is shown
_EVENTS_PER_READ = 20_000  # a big session's backlog is read over several refreshes
_SNAPSHOT_TTL_SEC = 0.5  # several open pages share one reading of the grid
_GONE_AGENT_MS = 60_000  # an agent silent this long after its registration expired is not shown
_SCAN_STEPS = 2  # SCAN calls (of 10,000 keys) per refresh: a big keyspace is looked through over time
# The output of a task that raised starts with one of these texts (the runner writes the worker's
# answer with json.dumps, keys in the worker's order): the head tells a failure from a result
# without reading the result. Outputs are stored as base64: compared in base64, on whole
# 3-byte groups.
_FAILED_HEADS = [base64.b64encode(text[:len(text) // 3 * 3]) for text in (
    f'{{"{TASK_MARKER}": 1, "ok": false'.encode(), b'{"errorMessage"')]
_KEY_IN_REQUEST_LINE = re.compile(r"([?&]key=)[^&\s]*")


class GridView:
    """What the dashboard shows, read from the state table. Thread-safe.

    Incremental: it remembers how far it has read each session's event stream, so a refresh
    reads only the tasks that ended since the last one (the chart and the failures list are
    built from those), and when each agent's heartbeat last moved its registration (the
    heartbeat age: the table keeps the expiry, not the agent's lease, so an age is known once a
    refresh has seen a heartbeat happen; until then it is None).
    """

    def __init__(self, table: StateTable) -> None:
        self.table = table
        self._lock = threading.Lock()
        self._cursors: dict[str, str] = {}  # session -> last event read
        self._ended_seen: dict[str, int] = {}  # session -> terminal tasks counted when last read
        self._raised: collections.Counter[str] = collections.Counter()  # session -> tasks seen raising
        self._buckets: dict[int, list[int]] = {}  # start ms -> [ended, failed]
        self._failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_FAILURES)
        self._beats: dict[str, tuple[int, int | None]] = {}  # agent -> (expiry, when it last moved)
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._known: set[str] | None = None  # sessions found so far (None: not looked yet)
        self._scan_cursor = 0

    def snapshot(self) -> dict[str, Any]:
        """The grid as the page shows it (a JSON-safe dict). Raises redis errors."""
        with self._lock:
            if self._snapshot is not None and time.monotonic() - self._snapshot[0] < _SNAPSHOT_TTL_SEC:
                return self._snapshot[1]
            now = self.table.time_ms()
            owners = self.table.processing_owners()
            sessions = self._read_sessions(now, {task_id.rpartition("_")[0] for task_id in owners})
            snapshot = {
                "now_ms": now,
                "sessions": sessions,
                "agents": self._read_agents(now, owners),
                "throughput": self._chart(now),
                "failures": sorted(self._failures, key=lambda f: f["time_ms"], reverse=True),
            }
            self._snapshot = (time.monotonic(), snapshot)
            return snapshot

    # -- sessions, and from their events the chart and the failures -------------------------------
    def _find_sessions(self, running: set[str]) -> set[str]:
        """Every session: those of processing tasks and the newest queued ones at once, the
        others (ended, or queued behind others) through a SCAN spread over refreshes."""
        known = self._known
        if known is None:  # the first look sees everything
            known = set()
            cursor = None
            while cursor != 0:
                cursor, found = self.table.scan_sessions(cursor or 0)
                known.update(found)
        else:
            for _ in range(_SCAN_STEPS):
                self._scan_cursor, found = self.table.scan_sessions(self._scan_cursor)
                known.update(found)
                if self._scan_cursor == 0:
                    break
        return known | running | self.table.newest_queued_sessions()

    def _read_sessions(self, now: int, running: set[str]) -> list[dict[str, Any]]:
        overview = self.table.sessions_overview(sorted(self._find_sessions(running)))
        self._known = set(overview)
        for sid in list(self._cursors):
            if sid not in overview:  # expired: forget it
                del self._cursors[sid]
                self._ended_seen.pop(sid, None)
                self._raised.pop(sid, None)
        finished: list[tuple[str, int]] = []
        for sid, info in overview.items():
            ended = info["finished"] + info["failed"] + info["cancelled"]
            if self._ended_seen.get(sid) == ended:
                continue
            after = self._cursors.get(sid, str(now - WINDOW_MS))
            events = self.table.read_session_events(sid, after, count=_EVENTS_PER_READ)
            if events:
                self._cursors[sid] = events[-1].cursor
            if len(events) < _EVENTS_PER_READ:
                self._ended_seen[sid] = ended
            for event in events:
                at = int(event.cursor.partition("-")[0])
                bucket = self._buckets.setdefault(at - at % BUCKET_MS, [0, 0])
                bucket[0] += 1
                if event.state is TaskState.FAILED:
                    bucket[1] += 1
                    self._failures.appendleft(_failure(event.task_id, sid, at, event.reason, ""))
                elif event.state is TaskState.FINISHED:
                    finished.append((event.task_id, at))
        self._find_raised(finished)
        for start in [s for s in self._buckets if s < now - WINDOW_MS - BUCKET_MS]:
            del self._buckets[start]
        # "raised": finished tasks whose function raised, as far as the dashboard saw them
        running = [dict(info, id=sid, raised=self._raised[sid]) for sid, info in overview.items()
                   if info["pending"] + info["processing"] > 0]
        ended = [dict(info, id=sid, raised=self._raised[sid]) for sid, info in overview.items()
                 if info["pending"] + info["processing"] <= 0]
        ended.sort(key=lambda s: s["submitted_ms"], reverse=True)
        shown = running + ended[:MAX_ENDED_SESSIONS]
        shown.sort(key=lambda s: s["submitted_ms"], reverse=True)
        return shown

    def _find_raised(self, finished: list[tuple[str, int]]) -> None:
        """Add the finished tasks whose output is a failure envelope (the task raised) to the
        failures. Their output is in the data plane until the client has collected the whole
        session; a failure collected before a refresh saw it is not shown."""
        when = dict(finished)
        for start in range(0, len(finished), 1000):
            ids = [task_id for task_id, _ in finished[start:start + 1000]]
            failed = self.table.outputs_starting_with(ids, _FAILED_HEADS)
            for task_id, raw in self.table.outputs(failed).items():
                reason, trace, logs = _reason_of_output(raw)
                bucket = self._buckets.get(when[task_id] - when[task_id] % BUCKET_MS)
                if bucket is not None:
                    bucket[1] += 1
                sid = task_id.rpartition("_")[0]
                self._raised[sid] += 1
                self._failures.appendleft(_failure(task_id, sid, when[task_id], reason, trace, logs))

    def _chart(self, now: int) -> dict[str, Any]:
        first = now - now % BUCKET_MS - WINDOW_MS + BUCKET_MS
        starts = range(first, now + 1, BUCKET_MS)
        return {
            "start_ms": first,
            "bucket_ms": BUCKET_MS,
            "ended": [self._buckets.get(s, [0, 0])[0] for s in starts],
            "failed": [self._buckets.get(s, [0, 0])[1] for s in starts],
        }

    # -- agents -----------------------------------------------------------------------------------
    def _read_agents(self, now: int, owners: dict[str, str]) -> list[dict[str, Any]]:
        registrations = self.table.agent_registrations()
        held: dict[str, list[str]] = {}
        for task_id, owner in sorted(owners.items(), key=lambda item: _task_order(item[0])):
            held.setdefault(owner, []).append(task_id)
        for agent in list(self._beats):
            if agent not in registrations:
                del self._beats[agent]
        agents = []
        for agent, expiry in sorted(registrations.items()):
            last = self._beats.get(agent)
            if last is None:
                self._beats[agent] = (expiry, None)
            elif last[0] != expiry:
                self._beats[agent] = (expiry, now)
            beat_at = self._beats[agent][1]
            if expiry < now - _GONE_AGENT_MS:
                continue
            agents.append({
                "id": agent,
                "alive": expiry >= now,
                "heartbeat_age_ms": None if beat_at is None else now - beat_at,
                "tasks": held.get(agent, []),
            })
        return agents


def _task_order(task_id: str) -> tuple[str, int]:
    sid, _, index = task_id.rpartition("_")
    return sid, int(index) if index.isdigit() else 0


def _failure(task_id: str, session_id: str, at_ms: int, reason: str, trace: str, logs: str = "") -> dict[str, Any]:
    return {"task_id": task_id, "session_id": session_id, "time_ms": at_ms, "reason": reason,
            "traceback": trace[-MAX_TRACEBACK_CHARS:], "logs": logs[-MAX_TRACEBACK_CHARS:]}


def _reason_of_output(raw: bytes) -> tuple[str, str, str]:
    """(reason, traceback text, the task's captured logs) of a failure envelope or a Lambda
    error document."""
    try:
        doc = json.loads(base64.b64decode(raw))
    except (ValueError, binascii.Error):
        return "the task's output is unreadable", "", ""
    if not isinstance(doc, dict):
        return "the task's output is unreadable", "", ""
    if "errorMessage" in doc:  # a handler that raised (not this package's): Lambda's document
        stack = doc.get("stackTrace") or []
        trace = "\n".join(str(line) for line in stack) if isinstance(stack, list) else str(stack)
        return f"{doc.get('errorType', 'Error')}: {doc.get('errorMessage')}", trace, ""
    logs = doc.get("logs") if isinstance(doc.get("logs"), str) else ""
    kind = doc.get("error")
    if kind == "exception":
        name = str(doc.get("type", "Exception")).removeprefix("builtins.")
        return f"{name}: {doc.get('message', '')}", str(doc.get("traceback", "")), logs
    return f"the worker could not run the task ({kind}): {doc.get('message', '')}", "", logs


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Dashboard:
    """The dashboard's routes, for the control plane's request handler to hand requests to."""

    def __init__(self, table: StateTable, api_key: str) -> None:
        self.view = GridView(table)
        self.table = table
        self._api_key = api_key.encode()
        assets = resources.files(__package__) / "dashboard_assets"
        page = (assets / "dashboard.html").read_text(encoding="utf-8")
        self._page = (page.replace("/*STYLE*/", (assets / "dashboard.css").read_text(encoding="utf-8"))
                      .replace("/*SCRIPT*/", (assets / "dashboard.js").read_text(encoding="utf-8")))

    @staticmethod
    def handles(path: str) -> bool:
        """Whether a request for ``path`` (with its query) is the dashboard's."""
        route = urlsplit(path).path
        return route == DASHBOARD_PATH or route.startswith(DASHBOARD_PATH + "/")

    def serve(self, handler: Any, method: str) -> bool:
        """Answer ``handler``'s request (a BaseHTTPRequestHandler) if it is the dashboard's and
        return True; return False, having done nothing, if it is not."""
        if not self.handles(handler.path):
            return False
        # the key may be in the query: it must not reach the log (http.server logs this line)
        handler.requestline = _KEY_IN_REQUEST_LINE.sub(r"\1<hidden>", handler.requestline)
        has_body = handler.headers.get("Content-Length", "0") != "0" or handler.headers.get("Transfer-Encoding")
        if has_body:
            handler.close_connection = True  # no route here takes a body: it is not read
        try:
            url = urlsplit(handler.path)
            try:
                params = parse_qs(url.query, keep_blank_values=True, max_num_fields=8)
            except ValueError:
                raise _Refusal(400, "too many query parameters") from None
            self._authenticate(handler, params)
            if has_body:
                raise _Refusal(400, "the dashboard's routes take no request body")
            route = (method, url.path)
            if route == ("GET", DASHBOARD_PATH):
                self._send(handler, 200, "text/html; charset=utf-8", *self._render_page())
            elif route == ("GET", DASHBOARD_PATH + "/state"):
                self._send_json(handler, 200, self.view.snapshot())
            elif route == ("POST", DASHBOARD_PATH + "/cancel"):
                self._send_json(handler, 200, self._cancel(params))
            elif url.path in (DASHBOARD_PATH, DASHBOARD_PATH + "/state", DASHBOARD_PATH + "/cancel"):
                raise _Refusal(405, f"{method} is not allowed on {url.path}")
            else:
                raise _Refusal(404, f"no route {url.path}")
        except _Refusal as exc:
            self._send_json(handler, exc.status, {"error": exc.message})
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self._send_json(handler, 503, {"error": "the grid's state table is unreachable; try again"})
        except Exception:  # never a traceback to the client; the log has it (not the key)
            logger.exception("dashboard: internal error in %s", method)
            self._send_json(handler, 500, {"error": "internal error"})
        return True

    def _authenticate(self, handler: Any, params: dict[str, list[str]]) -> None:
        given = (handler.headers.get("x-api-key") or handler.headers.get("Authorization")
                 or (params.get("key") or [""])[0])
        if not given:
            raise _Refusal(401, "missing credentials: open the dashboard with the grid's key "
                                "(LocalGrid.dashboard_url, or the address 'htcgrid-executor grid' prints)")
        given = given.removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self._api_key):
            raise _Refusal(403, "wrong credentials")

    def _cancel(self, params: dict[str, list[str]]) -> dict[str, Any]:
        sid = (params.get("session") or [""])[0]
        if not is_valid_session_id(sid):
            raise _Refusal(400, "query parameter 'session' must be a session id")
        if self.table.sessions_overview([sid]) == {}:
            raise _Refusal(404, f"unknown session {sid} (never submitted, or expired)")
        return self.table.cancel_sessions([sid])

    def _render_page(self) -> tuple[bytes, dict[str, str]]:
        nonce = secrets.token_urlsafe(16)
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                  "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                  "frame-ancestors 'none'")
        return self._page.replace("__NONCE__", nonce).encode(), {"Content-Security-Policy": policy}

    def _send_json(self, handler: Any, status: int, body: dict[str, Any]) -> None:
        self._send(handler, status, "application/json", json.dumps(body).encode(), {})

    @staticmethod
    def _send(handler: Any, status: int, content_type: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header("Cache-Control", "no-store")
            handler.send_header("Referrer-Policy", "no-referrer")  # the page's URL holds the key
            handler.send_header("X-Content-Type-Options", "nosniff")
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # the browser went away
            handler.close_connection = True
