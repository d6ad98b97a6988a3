"""The control plane's HTTP surface: auth, malformed requests, never a 5xx or a traceback."""

from __future__ import annotations

import base64
import logging
import socket
import time
import urllib.parse

import pytest
import requests
from grid_client import GridClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import wait_for

from htcgrid_executor import wire
from htcgrid_executor.grid.routes import MAX_INLINE_VALUE_BYTES

ROUTES = [("POST", "/submit"), ("GET", "/result"), ("POST", "/cancel")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_requests_without_credentials_get_401(grid, method, path):
    answer = requests.request(method, grid.url + path, params={"submission_content": "x"})
    assert answer.status_code == 401
    assert "credentials" in answer.json()["error"]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("header", ["x-api-key", "Authorization"])
def test_requests_with_a_wrong_key_get_403(grid, method, path, header):
    answer = requests.request(method, grid.url + path, params={"submission_content": "x"},
                              headers={header: "not-the-key"})
    assert answer.status_code == 403


def test_the_key_is_accepted_in_the_authorization_header_too(grid):
    client = GridClient(grid)
    sid = client.submit([{"value": 1}])
    answer = requests.get(grid.url + "/result", headers={"Authorization": grid.api_key},
                          params={"submission_content": wire.encode_query({"session_id": sid})})
    assert answer.status_code == 200


def _b64(obj) -> str:
    return wire.encode_query(obj) if not isinstance(obj, bytes) else base64.urlsafe_b64encode(obj).decode()


BAD_REQUESTS = [
    ("POST", "/submit", {}, 400, "submission_content"),
    ("POST", "/submit", {"submission_content": "has_underscore"}, 400, "session id"),
    ("POST", "/submit", {"submission_content": "no-such-session"}, 400, "no submission payload"),
    ("GET", "/result", {"submission_content": "%%%"}, 400, "base64"),
    ("GET", "/result", {"submission_content": _b64(b"not json")}, 400, "JSON"),
    ("GET", "/result", {"submission_content": _b64([1, 2])}, 400, "JSON object"),
    ("GET", "/result", {"submission_content": _b64({"session_id": 3})}, 400, "session_id"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "unknown-session"})}, 404, "unknown session"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "after": "x"}, 400, "cursor"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "after": "0", "wait_ms": "-1"}, 400, "wait_ms"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "after": "0", "wait_ms": "x"}, 400, "wait_ms"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "listener": "l"}, 400, "after"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "inline_outputs": "x"}, 400,
     "inline_outputs"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "inline_outputs": "-1"}, 400,
     "inline_outputs"),
    ("GET", "/result", {"submission_content": _b64({"session_id": "s"}), "inline_outputs": str((1 << 20) + 1)},
     400, "inline_outputs"),
    ("POST", "/cancel", {"submission_content": _b64({})}, 400, "nothing to cancel"),
    ("POST", "/cancel", {"submission_content": _b64({"session_ids_to_cancel": "abc"})}, 400, "list"),
    ("POST", "/cancel", {"submission_content": _b64({"task_ids_to_cancel": ["nounderscore"]})}, 400, "task id"),
    ("POST", "/cancel", {"submission_content": _b64({"task_ids_to_cancel": ["s_0"], "pending_only": 1})}, 400,
     "pending_only"),
    ("POST", "/cancel", {"submission_content": _b64({"session_ids_to_cancel": ["s"], "pending_only": True})}, 400,
     "pending_only"),
    ("GET", "/submit", {"submission_content": "x"}, 405, "not allowed"),
    ("GET", "/nowhere", {}, 404, "no route"),
]


@pytest.mark.parametrize("method,path,params,status,words", BAD_REQUESTS)
def test_malformed_requests_get_a_4xx_naming_the_problem(grid, method, path, params, status, words):
    answer = requests.request(method, grid.url + path, params=params, headers={"x-api-key": grid.api_key})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert words.lower() in error.lower()
    assert "Traceback" not in error


def _put_payload(grid, sid, submission):
    grid.redis.set(wire.payload_key(sid), wire.encode_submission(submission))


@pytest.mark.parametrize("change,words", [
    (lambda s: s.update(session_id="other"), "does not match"),
    (lambda s: s.update(tasks_list={"tasks": []}), "non-empty"),
    (lambda s: s.update(tasks_list={"tasks": ["a_0"]}), "<session_id>_<i>"),
    (lambda s: s["scheduler_data"].update(task_timeout_sec="soon"), "task_timeout_sec"),
    (lambda s: s["scheduler_data"].update(retry_count=-1), "retry_count"),
    (lambda s: s["context"].update(tasks_priority="high"), "tasks_priority"),
    (lambda s: s["context"].update(listener="bad id!"), "listener"),
])
def test_malformed_submission_payloads_are_rejected_and_nothing_is_queued(grid, change, words):
    sid = wire.new_session_id()
    submission = wire.build_submission(sid, wire.task_ids_for(sid, 2))
    change(submission)
    _put_payload(grid, sid, submission)
    answer = requests.post(grid.url + "/submit", params={"submission_content": sid},
                           headers={"x-api-key": grid.api_key})
    assert answer.status_code == 400
    assert words in answer.json()["error"]
    assert grid.table.session_info(sid) is None


def test_oversized_requests_are_refused_and_the_server_keeps_serving(grid):
    huge = "a" * 70_000
    answer = requests.get(grid.url + "/result", params={"submission_content": huge},
                          headers={"x-api-key": grid.api_key})
    assert answer.status_code == 414
    host, port = grid.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /submit?submission_content=x HTTP/1.1\r\nHost: x\r\nx-api-key: " +
                     grid.api_key.encode() + b"\r\nContent-Length: 99999999\r\n\r\n")
        assert b" 413 " in sock.recv(1000)
    client = GridClient(grid)
    sid = client.submit([{"value": "still serving"}])
    assert client.outputs(sid, client.wait(sid, 1)) == {f"{sid}_0": {"ok": "still serving"}}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(["/submit", "/result", "/cancel"]),
    content=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: _b64(b)),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                   lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                       st.sampled_from(["session_id", "session_ids_to_cancel",
                                                        "task_ids_to_cancel", "x"]), c, max_size=3),
                                   max_leaves=8).map(lambda o: _b64(o) if isinstance(o, dict) else _b64([o]))),
    extra=st.dictionaries(st.sampled_from(["after", "wait_ms", "listener"]),
                          st.text(max_size=12), max_size=3),
)
def test_fuzzed_requests_never_get_a_5xx_or_a_traceback(grid, method, path, content, extra):
    extra = {k: v for k, v in extra.items() if k != "wait_ms" or not v.strip().isdigit()}  # no real waits
    answer = requests.request(method, grid.url + path, params={"submission_content": content, **extra},
                              headers={"x-api-key": grid.api_key}, timeout=10)
    assert answer.status_code < 500, answer.text
    assert "Traceback" not in answer.text


# ----------------------------------------------------------- a bounded surface (issue 14, 2 and 6)


def _address(grid) -> tuple[str, int]:
    host, port = grid.url.removeprefix("http://").split(":")
    return host, int(port)


def _raw(address, head: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``head`` on a new connection (not closing our side) and return the first answer."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(head)
        return sock.recv(4096)


def _no_server_errors_logged(caplog) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("cursor", ["²", "１", "1-²", "٣", str(2**64), f"0-{2**64}", "1-", "-1", "1--2", " 1"])
@pytest.mark.parametrize("listener", [False, True])
def test_malformed_cursors_get_a_400_never_a_500(grid, client, caplog, cursor, listener):
    sid = client.submit([{"value": 1}], listener="lst-cursors" if listener else None)
    params = {"submission_content": wire.encode_query({"session_id": sid}), "after": cursor}
    if listener:
        params["listener"] = "lst-cursors"
    answer = requests.get(grid.url + "/result", params=params, headers={"x-api-key": grid.api_key})
    assert answer.status_code == 400, answer.text
    assert "cursor" in answer.json()["error"]
    _no_server_errors_logged(caplog)


@pytest.mark.parametrize("wait_ms", ["１", "²", "1_000", " 5", "99999999999999999999"])
def test_malformed_integers_get_a_400(grid, client, wait_ms):
    sid = client.submit([{"value": 1}])
    answer = requests.get(grid.url + "/result", headers={"x-api-key": grid.api_key}, params={
        "submission_content": wire.encode_query({"session_id": sid}), "after": "0", "wait_ms": wait_ms})
    assert answer.status_code == 400 and "wait_ms" in answer.json()["error"]


DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize("method,path", [("GET", "/result"), ("POST", "/cancel")])
def test_deeply_nested_json_in_submission_content_gets_a_400(grid, caplog, method, path):
    deep = base64.urlsafe_b64encode(b'{"session_id": "s", "session_ids_to_cancel": ' + DEEP[:20_000]
                                    + DEEP[-20_000:] + b"}").decode()
    answer = requests.request(method, grid.url + path, params={"submission_content": deep},
                              headers={"x-api-key": grid.api_key})
    assert answer.status_code == 400, answer.text
    assert "JSON" in answer.json()["error"]
    _no_server_errors_logged(caplog)


def test_a_deeply_nested_submission_payload_gets_a_400(grid, caplog):
    sid = wire.new_session_id()
    grid.redis.set(wire.payload_key(sid), base64.urlsafe_b64encode(DEEP))
    answer = requests.post(grid.url + "/submit", params={"submission_content": sid},
                           headers={"x-api-key": grid.api_key})
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]
    assert grid.table.session_info(sid) is None
    _no_server_errors_logged(caplog)


@pytest.mark.parametrize("length", [b"-1", b"+5", b"1e3", b"0x10", b"\xd9\xa3"])
def test_a_negative_or_malformed_content_length_is_refused_at_once(grid, length):
    # the old server read a "-1" body to the end of the stream, without even checking the key
    answer = _raw(_address(grid), b"POST /submit?submission_content=x HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: " + length + b"\r\n\r\n" + b"a" * 1000)
    assert b" 400 " in answer.split(b"\r\n")[0] and b"Content-Length" in answer


def test_no_body_byte_is_read_without_the_key(grid):
    # a body the server would accept in size: refused (401) on its headers, before any is read
    answer = _raw(_address(grid), b"POST /submit?submission_content=x HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000000\r\n\r\n", timeout=3)
    assert b" 401 " in answer.split(b"\r\n")[0]
    assert b"Connection: close" in answer  # its body was not read: the connection is not reused
    answer = _raw(_address(grid), b"POST /submit?submission_content=x HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n", timeout=3)
    assert b" 411 " in answer.split(b"\r\n")[0]


@pytest.fixture
def small_server(grid):
    """A second control plane on the module's grid, with a small connection cap and timeout."""
    from htcgrid_executor.grid.http_api import ControlPlaneServer

    server = ControlPlaneServer(grid.table, grid.api_key, max_connections=4,
                                connection_timeout_sec=0.5).start()
    yield server
    server.stop()


def test_a_silent_connection_is_closed_after_the_timeout(small_server):
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=5) as sock:
        sock.sendall(b"GET /result?submission_content=x HTTP/1.1\r\nHost: x\r\n")  # never ends
        started = time.monotonic()
        data = sock.recv(4096)
        while data and b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert time.monotonic() - started < 3  # before: no timeout at all, the socket's 5 s ran out
        assert data == b"" or b" 408 " in data


def test_connections_past_the_cap_get_a_503_and_the_threads_stay_bounded(small_server):
    url = f"http://127.0.0.1:{small_server.port}/result"
    held = [socket.create_connection(("127.0.0.1", small_server.port)) for _ in range(4)]
    try:
        wait_for(lambda: len(small_server._server._connections) == 4, timeout=5)
        extra = requests.get(url, params={"submission_content": "x"}, timeout=5)
        assert extra.status_code == 503 and "too many connections" in extra.json()["error"]
        workers = small_server._server._workers
        assert len(workers) == 4 and all(w.is_alive() for w in workers)  # one per connection, no more
    finally:
        for sock in held:
            sock.close()
    # the held connections closed, the server answers again
    wait_for(lambda: requests.get(url, params={"submission_content": "x"}, timeout=5).status_code == 401)


CURSORS = st.one_of(st.sampled_from(["0", "1-0", "²", "１", "1-", str(2**64), "-1", "0-0", "99999999999999-0"]),
                    st.text(alphabet="0123456789-²１٣ ", max_size=24))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    path=st.sampled_from(["/submit", "/result", "/cancel", "//[x/result", "/result/../submit", "*", "/%00"]),
    content=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(_b64),
        st.integers(1, 5000).map(lambda depth: _b64(b"[" * depth + b"]" * depth)),
        st.integers(1, 5000).map(lambda depth: _b64(b'{"session_id": "s", "x": ' + b"[" * depth + b"]" * depth + b"}")),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(
                         st.sampled_from(["session_id", "session_ids_to_cancel", "task_ids_to_cancel", "x"]),
                         c, max_size=3),
                     max_leaves=8).map(lambda o: _b64(o) if isinstance(o, dict) else _b64([o]))),
    after=st.none() | CURSORS,
    wait_ms=st.none() | st.sampled_from(["0", "1", "-1", "x", "１", "²", "1_0", str(2**70)]),
    listener=st.none() | st.text(max_size=12),
    content_length=st.none() | st.sampled_from(["0", "-1", "5", "abc", str(2**70), "9999999"]),
    keyed=st.booleans(),
)
def test_fuzzed_requests_to_all_three_routes_never_get_a_5xx(grid, caplog, method, path, content, after, wait_ms,
                                                           listener, content_length, keyed):
    query = {"submission_content": content}
    for name, value in (("after", after), ("wait_ms", wait_ms), ("listener", listener)):
        if value is not None:
            query[name] = value
    head = [f"{method} {path}?{urllib.parse.urlencode(query)} HTTP/1.1", "Host: x"]
    if keyed:
        head.append(f"x-api-key: {grid.api_key}")
    if content_length is not None:
        head.append(f"Content-Length: {content_length}")
    body = b"b" * 5 if content_length == "5" else b""
    answer = _raw(_address(grid), ("\r\n".join(head) + "\r\n\r\n").encode() + body, timeout=15)
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split()[1])
    assert 200 <= status < 500, answer
    if status >= 400 and b"\r\n\r\n" in rest and rest.split(b"\r\n\r\n", 1)[1]:
        assert b'"error"' in rest and b"Traceback" not in rest
    _no_server_errors_logged(caplog)


def test_result_inlines_the_finished_tasks_outputs_as_asked(grid, client):
    sid = client.submit([{"value": i} for i in range(3)] + [{"raise": "no"}])
    client.wait(sid, 4)
    answer = client.result(sid, after="0", inline_outputs=str(1 << 20))
    stored = dict(zip(answer["finished"], grid.redis.mget([wire.output_key(t) for t in answer["finished"]]),
                      strict=True))
    assert len(stored) == 4  # a call that raised is finished, its output the error document
    assert {t: base64.b64decode(v) for t, v in answer["inline_outputs"].items()} == stored
    assert "inline_outputs" not in client.result(sid, after="0")  # only when asked


def test_outputs_past_the_budget_are_left_to_the_data_plane(grid, client):
    sid = client.submit([{"value": 1}, {"value": "x" * MAX_INLINE_VALUE_BYTES}, {"value": 3}])
    client.wait(sid, 3)
    small, big, last = wire.task_ids_for(sid, 3)
    size = len(grid.redis.get(wire.output_key(small)))
    assert len(grid.redis.get(wire.output_key(big))) > MAX_INLINE_VALUE_BYTES
    # each value past the per-value cap is left out, the others fit the whole budget
    assert set(client.result(sid, after="0", inline_outputs=str(1 << 20))["inline_outputs"]) == {small, last}
    # a budget that one output fills: the tasks after it are not inlined
    finished = client.result(sid, after="0")["finished"]
    first = finished[0] if finished[0] != big else finished[1]
    inlined = client.result(sid, after="0", inline_outputs=str(size))["inline_outputs"]
    assert set(inlined) == {first}


@pytest.mark.parametrize("scripts_lost", [False, True])
def test_a_listeners_long_poll_inlines_the_outputs_of_tasks_that_end_during_it(grid, client, scripts_lost):
    """The outputs of tasks that start and end within one long poll come inline (read with the
    events that report their end), also after Redis lost its scripts (as after a restart)."""
    listener = wire.new_session_id()
    if scripts_lost:
        grid.redis.script_flush()
    sid = client.submit([{"value": 1}, {"value": 2}], listener=listener)
    cursor, inlined, finished = "0", {}, []
    deadline = time.monotonic() + 30
    while len(finished) < 2:
        assert time.monotonic() < deadline, "the tasks did not end"
        answer = client.result(sid, listener=listener, after=cursor, wait_ms="2000", inline_outputs=str(1 << 20))
        cursor = answer["cursor"]
        finished += answer["finished"]
        inlined.update(answer["inline_outputs"])
    stored = grid.redis.mget([wire.output_key(t) for t in finished])
    assert {t: base64.b64decode(v) for t, v in inlined.items()} == dict(zip(finished, stored, strict=True))
