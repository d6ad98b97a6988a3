"""The worker handler and the task codec, called directly (no grid)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading

import pytest
from executor_tasks import CustomError, add, identity, print_kib, raise_custom, raise_unpicklable, square
from hypothesis import given, settings
from hypothesis import strategies as st

from htcgrid_executor import codec, payload, worker_scope
from htcgrid_executor.codec import (
    decode_output,
    is_executor_task,
    make_task,
    output_binding,
    pickle_args,
    pickle_chunk,
    pickle_function,
    seal_task,
    task_binding,
)
from htcgrid_executor.errors import ConfigurationError, PayloadError, RemoteError, SignatureError
from htcgrid_executor.grid.runner import run_task
from htcgrid_executor.payload import PAYLOAD_KEY_ENV, SignedPickle, dumps_signed, loads_signed
from htcgrid_executor.wire import decode_output_text, decode_raw, encode_output, encode_raw, is_raw
from htcgrid_executor.worker import lambda_handler

KEY = "test-secret"
pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(PAYLOAD_KEY_ENV, KEY)


def call_task(fn, *args, **kwargs):
    return make_task(pickle_function(fn, KEY), pickle_args(fn, args, kwargs, KEY))


TASK_ID = "sid_0"


def run(task):
    """Run a task as an agent does: the event is the JSON round trip of the task dict as the
    connector seals it, and the handler's answer is JSON-serialised into the output text."""
    event = json.loads(json.dumps(seal_task(task, TASK_ID, KEY)))
    return json.dumps(lambda_handler(event, None))


class _Context:
    """What the local grid's agents give the handler: the id of the task it runs."""

    def __init__(self, task_id):
        self.aws_request_id = task_id


def test_a_call_round_trips():
    task = call_task(add, 2, 3, z=4)
    assert is_executor_task(task)
    assert decode_output(run(task), KEY) == (True, 9)


def test_a_map_chunk_returns_the_list_of_results():
    task = make_task(pickle_function(square, KEY), pickle_chunk(square, [(1,), (2,), (3,)], KEY), mode="map")
    assert decode_output(run(task), KEY) == (True, [1, 4, 9])


def test_closures_and_lambdas_travel():
    offset = 10
    task = call_task(lambda x: x + offset, 5)
    assert decode_output(run(task), KEY) == (True, 15)


def test_an_exception_comes_back_as_itself_with_the_remote_traceback():
    ok, exc = decode_output(run(call_task(raise_custom, 7)), KEY)
    assert not ok and isinstance(exc, CustomError) and exc.code == 7
    assert type(exc.__cause__).__name__ == "_RemoteTraceback"
    text = str(exc.__cause__)
    assert "raise_custom" in text and "CustomError" in text
    assert "lambda_handler" not in text  # the handler's own frames are dropped


def test_system_exit_in_user_code_is_caught():
    ok, exc = decode_output(run(call_task(exit_now)), KEY)
    assert not ok and isinstance(exc, SystemExit)


def exit_now():
    raise SystemExit(3)


def test_an_unpicklable_exception_becomes_remote_error():
    ok, exc = decode_output(run(call_task(raise_unpicklable)), KEY)
    assert not ok and isinstance(exc, RemoteError)
    assert exc.type_name == "executor_tasks.UnpicklableError"
    assert "cannot travel" in str(exc) and "raise_unpicklable" in exc.remote_traceback


def test_an_unpicklable_result_becomes_the_error():
    ok, exc = decode_output(run(call_task(threading.Lock)), KEY)
    assert not ok and isinstance(exc, PayloadError) and "pickle" in str(exc)


def test_a_tampered_task_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    task = seal_task(call_task(square, 3), TASK_ID, KEY)
    # a payload signed with another key: it would create the marker if it were unpickled
    task["args"] = dumps_signed(_Evil(str(marker)), "attacker-key")
    answer = lambda_handler(task, None)
    assert answer["ok"] is False and answer["error"] == "signature"
    assert not marker.exists()
    ok, exc = decode_output(json.dumps(answer), KEY)
    assert not ok and isinstance(exc, SignatureError)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_tampered_output_is_refused_by_the_client():
    text = run(call_task(square, 3))
    doc = json.loads(text)
    doc["result"] = dumps_signed(99, "attacker-key")
    ok, exc = decode_output(json.dumps(doc), KEY)
    assert not ok and isinstance(exc, SignatureError)


def test_a_worker_without_the_key_says_so(monkeypatch):
    task = call_task(square, 3)
    monkeypatch.delenv(PAYLOAD_KEY_ENV)
    ok, exc = decode_output(run(task), KEY)
    assert not ok and isinstance(exc, ConfigurationError) and PAYLOAD_KEY_ENV in str(exc)


@pytest.mark.parametrize("event", [{"hello": 1}, [], "text", None, {"htcgrid_executor": 1, "fn": 3, "args": 4}])
def test_a_task_that_is_not_ours_gets_an_error_envelope(event):
    answer = lambda_handler(event, None)
    assert answer["ok"] is False and answer["error"] == "payload"
    ok, exc = decode_output(json.dumps(answer), KEY)
    assert not ok and isinstance(exc, PayloadError)


def test_initializer_runs_once_per_process_per_initializer():
    import executor_tasks

    executor_tasks.INITIALIZED.clear()
    worker_scope._SCOPES.clear()
    fn_blob = pickle_function(square, KEY)
    for value in ("first", "second"):  # two executors' initializers: each runs once
        init = dumps_signed((executor_tasks.initializer, (value,)), KEY)
        for i in range(3):
            task = make_task(fn_blob, pickle_args(square, (i,), {}, KEY), init_blob=init)
            assert decode_output(run(task), KEY) == (True, i * i)
    assert executor_tasks.INITIALIZED == {"value": "second", ("count", "first"): 1, ("count", "second"): 1}


def test_a_failing_initializer_fails_the_task_and_is_tried_again():
    init = dumps_signed((fail_init, ()), KEY)
    task = make_task(pickle_function(square, KEY), pickle_args(square, (2,), {}, KEY), init_blob=init)
    for _ in range(2):
        ok, exc = decode_output(run(task), KEY)
        assert not ok and isinstance(exc, RuntimeError) and str(exc) == "init failed"
    assert init not in worker_scope.scope_named("").initialized


def fail_init():
    raise RuntimeError("init failed")


def test_a_function_is_unpickled_once_per_process():
    fn_blob = pickle_function(square, KEY)
    worker_scope._SCOPES.clear()
    for i in range(5):
        task = seal_task(make_task(fn_blob, pickle_args(square, (i,), {}, KEY)), f"sid_{i}", KEY)
        assert lambda_handler(task, None)["ok"]
    assert list(worker_scope.scope_named("").functions) == [fn_blob]


def test_a_function_signed_for_another_scope_is_refused():
    task = make_task(pickle_function(square, KEY, "scope-a"), pickle_args(square, (3,), {}, KEY), scope="scope-a")
    assert decode_output(run(task), KEY) == (True, 9)
    task["scope"] = "scope-b"  # moved into another executor's namespace: its signature no longer holds
    answer = run(task)
    assert json.loads(answer)["error"] == "signature"


def test_unpicklable_calls_name_the_culprit():
    lock = threading.Lock()
    with pytest.raises(PayloadError, match=r"positional argument 1 \(a lock\).*'add'"):
        pickle_args(add, (1, lock), {}, KEY)
    with pytest.raises(PayloadError, match=r"keyword argument 'y' \(a lock\)"):
        pickle_args(add, (1,), {"y": lock}, KEY)
    with pytest.raises(PayloadError, match=r"the function '.*<lambda>'"):
        pickle_function(lambda: lock, KEY)
    with pytest.raises(PayloadError, match=r"positional argument 0 \(a lock\) of a map over 'square'"):
        pickle_chunk(square, [(1,), (lock,)], KEY)


def test_raw_outputs_decode_as_json_or_text():
    assert decode_output('{"a": [1, 2]}', None, raw=True) == (True, {"a": [1, 2]})
    assert decode_output("plain text", None, raw=True) == (True, "plain text")
    assert decode_output('"a string"', None, raw=True) == (True, "a string")


def test_a_lambda_error_document_becomes_remote_error():
    doc = json.dumps({"errorMessage": "it broke", "errorType": "KeyError", "stackTrace": ["  File x\n"]})
    for raw in (True, False):
        ok, exc = decode_output(doc, KEY, raw=raw)
        assert not ok and isinstance(exc, RemoteError)
        assert exc.type_name == "KeyError" and "it broke" in str(exc) and "File x" in exc.remote_traceback


def test_an_output_that_is_no_envelope_is_an_error_for_our_tasks():
    ok, exc = decode_output('{"result": 3}', KEY)
    assert not ok and isinstance(exc, PayloadError) and "lambda_handler" in str(exc)


def test_the_envelope_is_json_and_signed_for_its_task():
    task = call_task(square, 4)
    answer = lambda_handler(seal_task(task, TASK_ID, KEY), None)
    json.dumps(answer)  # JSON-safe
    assert answer["binding"] == output_binding(TASK_ID, task_binding(task))
    assert loads_signed(answer["result"], KEY, answer["binding"]) == 16
    with pytest.raises(SignatureError):  # signed for this task only
        loads_signed(answer["result"], KEY)
    other = task_binding(call_task(square, 5))
    ok, error = decode_output(json.dumps(answer), KEY, binding=other, task_id=TASK_ID)
    assert not ok and isinstance(error, SignatureError) and "another task" in str(error)
    # the same call's output, taken for another task id: refused too
    ok, error = decode_output(json.dumps(answer), KEY, binding=task_binding(task), task_id="sid_1")
    assert not ok and isinstance(error, SignatureError)
    assert decode_output(json.dumps(answer), KEY, binding=task_binding(task), task_id=TASK_ID) == (True, 16)


def test_signed_parts_of_two_calls_recombined_are_refused_before_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    # two genuine calls signed with the grid secret; the second's arguments would create the
    # marker when unpickled
    first = seal_task(call_task(square, 3), "sid_0", KEY)
    second = seal_task(make_task(pickle_function(identity, KEY), pickle_args(identity, (_Evil(str(marker)),),
                                                                             {}, KEY)), "sid_1", KEY)
    recombined = [{**first, "args": second["args"]},            # a function with another call's arguments
                  {**second, "fn": first["fn"]},                # the same, keeping the other seal
                  {**first, "init": dumps_signed((print, ()), KEY)},   # an initializer added
                  {k: v for k, v in first.items() if k not in ("seal", "task_id")}]   # no seal
    for task in recombined:
        answer = lambda_handler(task, None)
        assert answer["ok"] is False and answer["error"] == "signature", answer
        assert "refusing to unpickle" in answer["message"]
    assert not marker.exists()


def test_an_input_replayed_under_another_task_is_refused_where_the_agent_names_the_task(tmp_path):
    task = seal_task(call_task(square, 3), "sid_0", KEY)
    assert decode_output(json.dumps(lambda_handler(task, _Context("sid_0"))), KEY) == (True, 9)
    answer = lambda_handler(task, _Context("other_4"))
    assert answer["error"] == "signature" and "sealed for task sid_0, not for other_4" in answer["message"]
    # a Lambda's request id names no task: there the guard's task id is checked instead
    assert lambda_handler(task, _Context("c6af9ac6-7b61-11e6-9a41-93e8deadbeef"))["ok"]


def test_a_sealed_task_keeps_its_binding_whatever_the_connector_adds():
    task = call_task(square, 3)
    sealed = seal_task(task, "sid_7", KEY)
    assert task_binding(sealed) == task_binding(task) and "seal" not in task  # the caller's dict is kept
    assert codec.check_seal(sealed, KEY, "sid_7") == ("sid_7", task_binding(task))
    with pytest.raises(SignatureError):
        codec.check_seal(seal_task(task, "sid_7", "another-key"), KEY)


def test_plain_data_and_by_value_objects_both_round_trip():
    class Local:  # a class cloudpickle must send by value (pickle cannot find it)
        def __init__(self, v):
            self.v = v

    for value in ([1, "two", 3.0, None, {"k": (1, 2)}], b"bytes" * 100, Local(5)):
        ok, result = decode_output(run(call_task(identity, value)), KEY)
        assert ok
        assert (result.v == 5) if isinstance(value, Local) else (result == value)


def test_modules_registered_by_value_are_pickled_by_value():
    import cloudpickle
    import executor_tasks

    cloudpickle.register_pickle_by_value(executor_tasks)
    try:
        blob = pickle_function(executor_tasks.square, KEY)
    finally:
        cloudpickle.unregister_pickle_by_value(executor_tasks)
    assert b"_make_function" in loads_signed_bytes(blob)  # by value: the worker imports nothing
    assert decode_output(run(make_task(blob, pickle_args(square, (3,), {}, KEY))), KEY) == (True, 9)


def loads_signed_bytes(blob):
    import base64

    return base64.b64decode(blob.split(".", 2)[2])


def test_the_envelope_carries_what_the_task_wrote_and_the_streams_still_get_it(capsys):
    from executor_tasks import noisy

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # a worker process as it starts: no logging configured (pytest's gone)
    try:
        failed = json.loads(run(call_task(noisy, 3, fail=True)))
    finally:
        root.handlers[:] = saved
    assert failed["logs"].splitlines() == ["stdout line of 3", "stderr line of 3",
                                           "WARNING user.module: a warning about 3"]
    out, err = capsys.readouterr()
    assert out == "stdout line of 3\n" and "stderr line of 3" in err and "a warning about 3" in err
    assert "logs" not in json.loads(run(call_task(square, 3)))  # a silent task: no logs at all
    ok, exc, logs = codec.decode_output_and_logs(json.dumps(failed), KEY)
    assert not ok and isinstance(exc, ValueError) and logs == failed["logs"]


def test_log_note_is_a_note_on_311_and_a_message_line_before():
    exc = ValueError("boom")
    codec.log_note(exc, "a\nb\n", "sid_0")
    if hasattr(exc, "__notes__"):
        assert exc.__notes__ == ["--- last 2 log lines of task sid_0; all of them: htcgrid-executor logs sid_0 ---\na\nb"]

    class NoNotes(Exception):  # how an exception looks on Python 3.10
        @property
        def add_note(self):
            raise AttributeError("add_note")

    old = NoNotes("boom")
    codec.log_note(old, "a\nb\n", "sid_0")
    assert str(old).startswith("boom\n--- last 2 log lines of task sid_0") and str(old).endswith("\na\nb")


@settings(max_examples=60, deadline=None)
@given(key=st.text(max_size=100), context=st.text(alphabet="abc:_-=0123456789", max_size=60),
       data=st.binary(max_size=300))
def test_payload_macs_are_rfc_2104_hmac_sha256(key, context, data):
    """Blobs signed by any version of the package, or by a deployment's worker, verify here: the
    MAC is HMAC-SHA256 over the context line and the pickle, whatever the implementation."""
    expected = hmac.new(key.encode(), (f"{context}\n" if context else "").encode() + data, hashlib.sha256)
    blob = SignedPickle.from_text(payload.sign_bytes(data, key, context))
    assert blob.mac == expected.digest() and payload.mac_from_text(blob.mac_text) == blob.mac
    assert payload.verify_bytes(blob, key, context) == data


def _raw_output_of(value, logs_kib, max_output_bytes):
    task = make_task(pickle_function(print_kib, KEY, in_memory=True),
                     pickle_args(print_kib, (logs_kib, value), {}, KEY, in_memory=True))
    raw = encode_raw(seal_task(task, TASK_ID, KEY))
    return run_task(lambda_handler, None, "spec", TASK_ID, raw, 0, max_output_bytes)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 200_000), logs_kib=st.integers(0, 40))
def test_a_raw_output_is_refused_exactly_when_its_json_form_is_over_the_limit(size, logs_kib):
    """The limit means the same on the local grid (raw outputs) as on a deployment (base64 JSON):
    the output that would take exactly the limit as JSON is written, one byte less is refused."""
    written = _raw_output_of("y" * size, logs_kib, 1 << 30)
    assert is_raw(written)
    doc = decode_raw(written)
    json_form = json.dumps({k: v.text() if isinstance(v, SignedPickle) else v for k, v in doc.items()})
    exact = len(encode_output(json_form))
    assert decode_raw(_raw_output_of("y" * size, logs_kib, exact))["ok"] is True
    for limit in (exact - 1, exact // 3):  # one byte over, far over
        refused = decode_output_text(_raw_output_of("y" * size, logs_kib, limit))
        assert "Runtime.ResponseSizeTooLarge" in refused and f"response of {exact} bytes" in refused


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 100_000))
def test_a_result_is_refused_in_the_worker_exactly_when_its_output_is_over_the_tasks_limit(size):
    """``max_payload_bytes`` is checked where the result is made: a result whose output takes
    exactly the limit comes back, one that takes a byte more fails its call with PayloadError."""
    def answer(limit):
        task = make_task(pickle_function(identity, KEY), pickle_args(identity, ("z" * size,), {}, KEY), limit=limit)
        return lambda_handler(seal_task(task, TASK_ID, KEY), None)
    exact = len(encode_output(json.dumps(answer(None))))
    assert answer(exact)["ok"] is True
    refused = answer(exact - 1)
    assert refused["ok"] is False and "too large for the grid" in refused["message"]
