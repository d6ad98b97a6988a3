"""The control plane's HTTP surface: auth, malformed requests, never a 5xx or a traceback."""

from __future__ import annotations

import base64
import socket

import pytest
import requests
from grid_client import GridClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from htcgrid_executor import wire

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
    ("POST", "/cancel", {"submission_content": _b64({})}, 400, "nothing to cancel"),
    ("POST", "/cancel", {"submission_content": _b64({"session_ids_to_cancel": "abc"})}, 400, "list"),
    ("POST", "/cancel", {"submission_content": _b64({"task_ids_to_cancel": ["nounderscore"]})}, 400, "task id"),
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
