"""DirectRedis, the grid processes' Redis client: every command answers as on redis-py's client,
a failed or interrupted command never leaves its reply for the next one, and a restarted Redis
is reached again by the next command (the agents' and control plane's loops retry, not it)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from htcgrid_executor.grid.direct_redis import DirectRedis
from htcgrid_executor.grid.redis_server import RedisServer
from htcgrid_executor.grid.state_table import StateTable


@pytest.fixture
def server():
    with RedisServer() as server:
        yield server


def _direct(server: RedisServer) -> DirectRedis:
    return DirectRedis(unix_socket_path=server.unix_socket, password=server.password, socket_timeout=10)


def test_replies_are_parsed_as_redis_py_parses_them(server):
    client = _direct(server)
    client.hset("h", mapping={"a": "1", "b": "2"})
    client.xadd("s", {"e": "x"})
    assert client.hgetall("h") == {b"a": b"1", b"b": b"2"}
    assert client.hmget("h", "a", "missing") == [b"1", None]
    [(stream, [(_, fields)])] = client.xread({"s": "0"})
    assert (stream, fields) == (b"s", {b"e": b"x"})
    with pytest.raises(redis.exceptions.ResponseError):
        client.incr("h")  # WRONGTYPE: an answer; the connection stays in step
    assert client.get("missing") is None
    # scripts: NOSCRIPT is met by loading the script, as on redis-py's client
    table = StateTable(client)
    assert table.submit("s-1", 2) is True
    assert [c.task_id for c in table.claim("agent-1", 2, 60_000)] == ["s-1_0", "s-1_1"]
    client.close()


def test_an_interrupted_blocking_read_does_not_leave_its_reply_for_the_next_command(server):
    """The agent's SIGTERM handler raises inside its doorbell BLPOP: the reply that comes later
    must not be taken as the answer to the agent's next command."""
    client = _direct(server)
    other = server.client()

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            client.blpop(["doorbell"], timeout=5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    deadline = time.monotonic() + 5
    while other.info("clients")["blocked_clients"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the closed connection's BLPOP is given up by Redis
    other.rpush("doorbell", "ring")  # the blocked BLPOP, if its connection were kept, gets this
    other.set("k", "v")
    assert client.get("k") == b"v"
    assert other.lrange("doorbell", 0, -1) == [b"ring"]  # the abandoned BLPOP took nothing
    client.close()
    other.close()


def test_a_restarted_redis_is_reached_by_the_next_command(server):
    client = _direct(server)
    client.set("k", "v")
    server.restart()
    # the pooled connection is dead: the command sees it (or a fresh connection), never hangs
    try:
        value = client.get("k")
    except redis.exceptions.ConnectionError:
        value = client.get("k")
    assert value in (b"v", None)  # kept by the append-only file, or not: reached either way
    client.close()


def test_commands_from_many_threads_each_get_their_own_reply(server):
    client = _direct(server)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                client.set(f"k{n}", i)
                assert client.get(f"k{n}") == str(i).encode()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client.close()
