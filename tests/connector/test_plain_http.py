"""The transport's plain-HTTP path (connector/plain_http.py) against servers it did not write:
answers framed every way HTTP/1.1 allows, keep-alive and its end, broken answers and silence.

Each test runs a raw-socket server on loopback that plays scripted bytes, so the framing is
exactly what a gateway or proxy might send, not what http.server happens to produce.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from htcgrid_executor import GridUnavailableError
from htcgrid_executor.connector.auth import ApiKeyAuth
from htcgrid_executor.connector.transport import HTTPTransport

Play = Callable[[socket.socket, bytes], bool]  # (connection, request head) -> keep the connection


def _head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


class ScriptedServer:
    """Answers each request with the next of ``plays``; counts connections and requests."""

    def __init__(self, plays: list[Play]) -> None:
        self.plays = plays
        self.heads: list[bytes] = []
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released as the server closes each connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.plays:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.plays:
                    head = _head(conn)
                    if not head:
                        break
                    self.heads.append(head)
                    if not self.plays.pop(0)(conn, head):
                        break
            self.closed.release()

    def close(self) -> None:
        self._listener.close()


def _send(raw: bytes, keep: bool = True) -> Play:
    def play(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(raw)
        return keep
    return play


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[ScriptedServer, HTTPTransport]]]:
    made: list[tuple[ScriptedServer, HTTPTransport]] = []

    def start(*plays: Play, **options: float) -> tuple[ScriptedServer, HTTPTransport]:
        server = ScriptedServer(list(plays))
        transport = HTTPTransport(f"http://127.0.0.1:{server.port}", ApiKeyAuth("k"), max_attempts=3,
                                  backoff_sec=0.01, **options)
        made.append((server, transport))
        return server, transport

    yield start
    for server, transport in made:
        transport.close()
        server.close()


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": "ok"}'


def test_keep_alive_answers_of_every_framing_arrive_whole_on_one_connection(serve) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;ext=1\r\n{\"a\"\r\n7\r\n: \"ok\"}\r\n0\r\nX-Trailer: t\r\n\r\n")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    server, transport = serve(_send(OK), _send(chunked), _send(interim))
    assert [transport.request("GET", "/result", {"q": "1"}, retry=True) for _ in range(3)] == [{"a": "ok"}] * 3
    assert server.connections == 1  # kept alive across all three
    head = server.heads[0].decode()
    assert head.startswith("GET /result?q=1 HTTP/1.1\r\n")
    assert "x-api-key: k\r\n" in head.lower()


def test_connection_close_and_an_answer_framed_by_the_end_of_the_connection(serve) -> None:
    closing = OK.replace(b"Content-Length: 11\r\n", b"Content-Length: 11\r\nConnection: close\r\n")
    unframed = b'HTTP/1.0 200 OK\r\n\r\n{"a": "ok"}'
    server, transport = serve(_send(closing, keep=False), _send(unframed, keep=False), _send(OK))
    for _ in range(3):
        assert transport.request("POST", "/submit", {}, retry=False) == {"a": "ok"}
    assert server.connections == 3  # a new connection after each one the server ended


def test_an_idle_connection_the_server_closed_is_replaced_without_a_retry(serve) -> None:
    server, transport = serve(_send(OK, keep=False), _send(OK))
    assert transport.request("POST", "/submit", {}, retry=False) == {"a": "ok"}
    # the server closed the idle connection without having said so: the pool notices before reuse
    assert server.closed.acquire(timeout=5)
    assert transport.request("POST", "/submit", {}, retry=False) == {"a": "ok"}
    assert transport.counters()["retries"] == 0
    assert server.connections == 2


@pytest.mark.parametrize("raw, problem", [
    (b"SMTP ready\r\n\r\n", "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"a\"", "of the answer's 50 bytes"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "malformed Content-Length"),
    (b"", "closed the connection without answering"),
])
def test_a_broken_answer_is_retried_when_safe_then_said_clearly(serve, raw, problem) -> None:
    server, transport = serve(*[_send(raw, keep=False)] * 3)
    with pytest.raises(GridUnavailableError, match=problem):
        transport.request("GET", "/result", {}, retry=True)
    assert len(server.heads) == 3  # max_attempts


def test_a_broken_answer_to_a_call_unsafe_to_repeat_is_not_sent_twice(serve) -> None:
    server, transport = serve(_send(b"", keep=False), _send(OK))
    with pytest.raises(GridUnavailableError, match="without answering"):
        transport.request("POST", "/submit", {}, retry=False)
    assert len(server.heads) == 1


def test_silence_is_a_read_timeout_and_a_refused_port_cannot_connect(serve) -> None:
    release = threading.Event()

    def hang(conn: socket.socket, head: bytes) -> bool:
        release.wait(5)
        return False
    server, transport = serve(hang, read_timeout_sec=0.2)
    with pytest.raises(GridUnavailableError, match="did not answer within 0.2 s"):
        transport.request("POST", "/submit", {}, retry=False)
    release.set()

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    refused = HTTPTransport(f"http://127.0.0.1:{port}", ApiKeyAuth("k"), max_attempts=2, backoff_sec=0.01)
    with pytest.raises(GridUnavailableError, match="cannot reach the grid"):
        refused.request("POST", "/submit", {}, retry=False)  # nothing sent: retried even so
    assert refused.counters()["round_trips"] == 2
    refused.close()


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(serve) -> None:
    server, transport = serve(_send(OK))
    transport.auth = ApiKeyAuth("k\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="line break"):
        transport.request("GET", "/result", {}, retry=True)
    assert server.heads == []
