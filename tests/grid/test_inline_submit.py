"""An inline submission: a small session's payload and inputs in the body of ``POST /submit``,
written by the grid to the keys a client would have written, or not at all when it refuses."""

from __future__ import annotations

import pytest
import requests
from grid_client import GridClient
from hypothesis import given
from hypothesis import strategies as st

from htcgrid_executor import wire
from htcgrid_executor.errors import PayloadError


def _session(tasks: list[dict], sid: str | None = None) -> tuple[str, bytes, list[bytes]]:
    sid = sid or wire.new_session_id()
    tids = wire.task_ids_for(sid, len(tasks))
    payload = wire.encode_submission(wire.build_submission(sid, tids))
    return sid, payload, [wire.encode_task(task) for task in tasks]


def _post(grid, sid: str, body: bytes) -> requests.Response:
    return requests.post(grid.url + "/submit", params={"submission_content": sid}, data=body,
                         headers={"x-api-key": grid.api_key})


def test_an_inline_session_runs_and_its_data_sits_under_the_usual_keys(grid):
    sid, payload, inputs = _session([{"value": i} for i in range(3)])
    answer = _post(grid, sid, wire.encode_inline_submission(payload, inputs))
    assert answer.status_code == 200, answer.text
    tids = wire.task_ids_for(sid, 3)
    assert answer.json() == {"session_id": sid, "task_ids": tids}
    client = GridClient(grid)
    assert client.outputs(sid, client.wait(sid, 3)) == {tid: {"ok": i} for i, tid in enumerate(tids)}
    assert grid.redis.get(wire.payload_key(sid)) == payload
    assert grid.redis.mget([wire.input_key(tid) for tid in tids]) == inputs


def test_a_repeated_inline_submit_never_rewrites_a_sessions_inputs(grid):
    sid, payload, inputs = _session([{"value": "first"}])
    assert _post(grid, sid, wire.encode_inline_submission(payload, inputs)).status_code == 200
    client = GridClient(grid)
    client.wait(sid, 1)
    # the same session again (a retry, or a replay with other inputs): the same answer, nothing rewritten
    _, _, other = _session([{"value": "second"}], sid)
    again = _post(grid, sid, wire.encode_inline_submission(payload, other))
    assert again.status_code == 200 and again.json()["task_ids"] == [f"{sid}_0"]
    assert grid.redis.get(wire.input_key(f"{sid}_0")) == inputs[0]
    assert client.outputs(sid, client.result(sid)) == {f"{sid}_0": {"ok": "first"}}


_SID, _PAYLOAD, _INPUTS = _session([{"value": 1}, {"value": 2}])
_GOOD = wire.encode_inline_submission(_PAYLOAD, _INPUTS)
BAD_BODIES = [  # (body for session _SID, words of the 400's message)
    (b"not inline at all", "inline submission"),
    (_GOOD.replace(b"htcgrid-inline-1", b"htcgrid-inline-9"), "inline submission"),
    (_GOOD[:-1], "add up"),
    (_GOOD + b"x", "add up"),
    (b"htcgrid-inline-1\n12,x\n" + _GOOD, "lengths"),
    (b"htcgrid-inline-1\n\n", "lengths"),
    (wire.encode_inline_submission(_PAYLOAD, _INPUTS[:1]), "1 task inputs for 2 tasks"),
    (wire.encode_inline_submission(_session([{"value": 1}, {"value": 2}])[1], _INPUTS), "does not match"),
    (wire.encode_inline_submission(b"%%% not base64", _INPUTS), "base64"),
]


@pytest.mark.parametrize("body,words", BAD_BODIES)
def test_a_malformed_inline_submission_gets_a_400_and_writes_nothing(grid, body, words):
    answer = _post(grid, _SID, body)
    assert answer.status_code == 400 and words in answer.json()["error"], answer.text
    assert grid.table.session_info(_SID) is None
    assert grid.redis.exists(wire.payload_key(_SID), wire.input_key(f"{_SID}_0"), wire.input_key(f"{_SID}_1")) == 0
    assert GridClient(grid).submit([{"value": "still serving"}])  # the grid goes on


@given(st.binary(max_size=64), st.lists(st.binary(max_size=64), max_size=8))
def test_an_inline_body_gives_back_the_values_it_was_made_of(payload, inputs):
    assert wire.decode_inline_submission(wire.encode_inline_submission(payload, inputs)) == (payload, inputs)


@given(st.one_of(st.binary(max_size=40),
                 st.binary(max_size=40).map(lambda rest: b"htcgrid-inline-1\n" + rest),
                 st.lists(st.sampled_from([b"0", b"1", b"2", b"00", b"01", b"x", b"", b"-1"]), min_size=1, max_size=4)
                 .flatmap(lambda fields: st.binary(max_size=6).map(
                     lambda rest: b"htcgrid-inline-1\n" + b",".join(fields) + b"\n" + rest))))
def test_any_other_body_is_refused_as_not_an_inline_submission(body):
    try:
        payload, inputs = wire.decode_inline_submission(body)
    except PayloadError:
        return
    assert wire.encode_inline_submission(payload, inputs) == body  # only a well-formed body decodes


def test_an_inline_session_of_too_many_tasks_gets_a_413_and_writes_nothing(grid):
    # the inputs are written by one script, which must stay short: a bigger session's inputs go
    # through the data plane (as the connector sends them)
    count = wire.INLINE_SUBMIT_TASKS + 1
    sid, payload, inputs = _session([{"value": i} for i in range(count)])
    answer = _post(grid, sid, wire.encode_inline_submission(payload, inputs))
    assert answer.status_code == 413 and f"at most {wire.INLINE_SUBMIT_TASKS} tasks" in answer.json()["error"]
    assert grid.table.session_info(sid) is None
    assert grid.redis.exists(wire.payload_key(sid), wire.input_key(f"{sid}_0")) == 0
