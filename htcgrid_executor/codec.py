"""The task codec: both ends of the format :class:`~htcgrid_executor.HTCGridExecutor` and its
worker handler (:mod:`htcgrid_executor.worker`) speak.

A task of ours is a JSON object; the callable and its arguments travel as signed pickles
(:mod:`htcgrid_executor.payload`)::

    {"htcgrid_executor": 1,
     "mode": "call" | "map",
     "fn": "<signed pickle of the callable>",      # the same text for every task of a batch
     "args": "<signed pickle>",                     # call: (args, kwargs); map: [args, ...]
     "init": "<signed pickle of (initializer, initargs)>",   # optional
     "scope": "<the executor's id>",                # optional: "fn" is signed for it
     "limit": 524288000,                            # optional: the most bytes the output may take
     "task_id": "<session>_<i>",                    # set by the connector when it sends the task
     "seal": "<MAC of task_id and the task's binding>"}

The **binding** of a task (:func:`task_binding`) is a digest of its mode, scope and the MACs of
its function, arguments and initializer. The connector seals each task for the task id it sends
it as (:func:`seal_task`); the worker checks the seal (:func:`check_seal`) before it unpickles
anything, so that signed parts of different calls recombined, or a call's input replayed under
another task, are refused. The worker signs the task's output for :func:`output_binding` (the
task id and the binding), which the client knows without reading the data plane.

Outputs are envelopes, one of::

    {"htcgrid_executor": 1, "ok": true, "result": "<signed pickle>", "binding": "..."}
    {"htcgrid_executor": 1, "ok": false, "error": "exception", "type": "module.Name",
     "message": "...", "traceback": "...", "exception": "<signed pickle>" | null, "binding": "..."}
    {"htcgrid_executor": 1, "ok": false, "error": "signature" | "payload" | "config", "message": "..."}

Imports only the standard library, cloudpickle and this package's pure modules (the worker's
``lambda.zip`` needs nothing else).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from .errors import ConfigurationError, PayloadError, RemoteError, SignatureError, TaskFailedError
from .payload import SignedPickle, dumps_signed, loads_signed, pickle_signed, sign_bytes, verify_bytes
from .wire import RawOutput, encoded_size, json_size

Blob = str | SignedPickle  # a signed pickle, as text (JSON wire format) or in memory

__all__ = [
    "TASK_MARKER",
    "VERSION",
    "pickle_function",
    "pickle_args",
    "pickle_chunk",
    "make_task",
    "task_size",
    "output_size",
    "check_task_size",
    "is_executor_task",
    "task_binding",
    "seal_task",
    "check_seal",
    "output_binding",
    "recorded_bindings",
    "decode_output",
    "decode_output_and_logs",
    "log_note",
]

#: key (and format version as its value) that marks a task or an output envelope as ours
TASK_MARKER = "htcgrid_executor"
VERSION = 1
_NOTE_LINES = 20  # a failed future's note: the last lines of its task's logs


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------


def _name_of(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def pickle_function(fn: Callable[..., Any], key: str, scope: str = "", *, in_memory: bool = False) -> Blob:
    """The signed pickle of ``fn``, for the tasks of ``scope`` (see :func:`make_task`), as text.
    ``in_memory``: a :class:`~htcgrid_executor.payload.SignedPickle` instead (no base64; the
    connector writes it raw to the local grid, as text to a deployment; ``json.dumps`` of a task
    holding one needs ``wire.encode_task``). Raises PayloadError naming the function."""
    try:
        return _form(pickle_signed(fn, key, scope), in_memory)
    except PayloadError as exc:
        raise PayloadError(f"cannot pickle the function {_name_of(fn)!r}: {exc.__cause__}") from exc.__cause__


def pickle_args(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: str, *,
                in_memory: bool = False) -> Blob:
    """The signed pickle of one call's ``(args, kwargs)`` (``in_memory``: as for
    :func:`pickle_function`). Raises PayloadError naming the argument that cannot be pickled."""
    try:
        return _form(pickle_signed((args, kwargs), key), in_memory)
    except PayloadError as exc:
        raise PayloadError(
            f"cannot pickle {_culprit(args, kwargs)} of the call to {_name_of(fn)!r}: {exc.__cause__}"
        ) from exc.__cause__


def pickle_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]], key: str, *,
                 in_memory: bool = False) -> Blob:
    """The signed pickle of a map chunk (a list of argument tuples; ``in_memory``: as for
    :func:`pickle_function`). Raises PayloadError naming the first item that cannot be pickled."""
    try:
        return _form(pickle_signed(chunk, key), in_memory)
    except PayloadError as exc:
        where = "an item"
        for args in chunk:
            try:
                dumps_signed(args, key)
            except PayloadError:
                where = _culprit(args, {})
                break
        raise PayloadError(
            f"cannot pickle {where} of a map over {_name_of(fn)!r}: {exc.__cause__}"
        ) from exc.__cause__


def _form(blob: SignedPickle, in_memory: bool) -> Blob:
    return blob if in_memory else blob.text()


def _culprit(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    # only on the error path: pickle each argument alone to say which one fails
    for i, arg in enumerate(args):
        try:
            dumps_signed(arg, "k")
        except PayloadError:
            return f"positional argument {i} (a {type(arg).__name__})"
    for name, arg in kwargs.items():
        try:
            dumps_signed(arg, "k")
        except PayloadError:
            return f"keyword argument {name!r} (a {type(arg).__name__})"
    return "the arguments"


def make_task(fn_blob: Blob, args_blob: Blob, *, mode: str = "call", init_blob: Blob | None = None,
              scope: str = "", limit: int | None = None) -> dict[str, Any]:
    """The JSON-safe task dict the handler runs (``mode``: ``"call"`` or ``"map"``), not sealed
    yet: the connector seals it for its task id when it sends it (:func:`seal_task`).

    ``scope``: the tasks of one scope (one executor) share, in each runner process, the globals
    of the modules their pickles carry by value and the initializer's run; ``fn_blob`` must be
    pickled for it (``pickle_function(fn, key, scope)``). ``limit``: the most bytes the task's
    output may take in the data plane; a larger result fails the call with PayloadError.
    """
    task: dict[str, Any] = {TASK_MARKER: VERSION, "mode": mode, "fn": fn_blob, "args": args_blob}
    if init_blob is not None:
        task["init"] = init_blob
    if scope:
        task["scope"] = scope
    if limit is not None:
        task["limit"] = limit
    return task


def is_executor_task(obj: Any) -> bool:
    """True when ``obj`` is a task dict made by :func:`make_task`."""
    return isinstance(obj, dict) and obj.get(TASK_MARKER) == VERSION and "fn" in obj and "args" in obj


def _mac_of(blob: Any) -> str:
    # the MAC of a signed blob without copying its pickle (a blob may be hundreds of MiB)
    if isinstance(blob, SignedPickle):
        return blob.mac_text
    end = blob.find(".", 3) if isinstance(blob, str) and blob.startswith("v1.") else -1
    if end < 0:
        raise PayloadError("malformed task: its function, arguments or initializer is not a signed blob")
    return blob[3:end]


def task_binding(task: dict[str, Any]) -> str:
    """The digest of what a task runs: its mode, scope, output limit and the MACs of its function,
    arguments and initializer (32 characters). Signed parts of two calls combined have another
    binding than either call. Raises PayloadError when a part is not a signed blob."""
    init = task.get("init")
    # repr: a field of another type, or one holding the separator, cannot pass for another
    text = (f"{task.get('mode', 'call')!r}\0{task.get('scope', '')!r}\0{task.get('limit')!r}\0"
            f"{_mac_of(task.get('fn'))}\0{_mac_of(task.get('args'))}\0{'' if init is None else _mac_of(init)}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _seal_context(task_id: str, binding: str) -> str:
    return f"task:{task_id}:{binding}"


def seal_task(task: dict[str, Any], task_id: str, key: str) -> dict[str, Any]:
    """A copy of ``task`` sealed for ``task_id``: its binding and the task id signed together."""
    return {**task, "task_id": task_id, "seal": sign_bytes(b"", key, _seal_context(task_id, task_binding(task)))}


def check_seal(task: dict[str, Any], key: str, running: str | None = None) -> tuple[str, str]:
    """``(task_id, binding)`` of a sealed task, checked before anything in it is unpickled.

    ``running``: the id of the task the worker was given to run, when it knows it (the local
    grid's agents say it): a task sealed for another id is refused. Raises SignatureError when the
    seal is missing, names another task, or does not cover these parts (recombined from other
    calls, or signed with another key); PayloadError when a part is not a signed blob.
    """
    binding = task_binding(task)
    seal, task_id = task.get("seal"), task.get("task_id")
    if not isinstance(seal, str) or not isinstance(task_id, str):
        raise SignatureError("the task carries no seal binding it to its task id (it was not sent "
                             "through this package's connector); refusing to unpickle it")
    if running is not None and running != task_id:
        raise SignatureError(f"the task was sealed for task {task_id}, not for {running}: an input "
                             "copied or replayed under another task; refusing to unpickle it")
    try:
        verify_bytes(seal, key, _seal_context(task_id, binding))
    except SignatureError:
        raise SignatureError(
            "the task's function, arguments and initializer were not signed together for this task "
            "(parts of other calls recombined, or signed with another key); refusing to unpickle them"
        ) from None
    return task_id, binding


def output_binding(task_id: str, binding: str) -> str:
    """What the outputs of task ``task_id`` with ``binding`` are signed for."""
    return f"output:{task_id}:{binding}"


def recorded_bindings(records: list[dict[str, Any]]) -> dict[str, str]:
    """The bindings that session records (``HTCGridExecutor.sessions()``) hold, by task id:
    ``"bindings"``, aligned with ``"task_ids"``; a record without them, or a None, names none."""
    found: dict[str, str] = {}
    for record in records:
        bindings = record.get("bindings")
        if isinstance(bindings, list) and len(bindings) == len(record["task_ids"]):
            found.update((tid, b) for tid, b in zip(record["task_ids"], bindings, strict=True)
                         if isinstance(b, str))
    return found


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------


def output_size(answer: dict[str, Any]) -> int:
    """Bytes the handler's ``answer`` takes as a task output in the data plane. Exact for our
    envelopes: their long strings are base64, which JSON writes as they are."""
    return encoded_size(json_size(answer))


def task_size(task: dict[str, Any]) -> int:
    """Bytes a task of :func:`make_task` takes in the data plane (``<task_id>-input``), to a few
    bytes over, seal included: counted without writing its JSON (this runs for every call)."""
    length = 2 + 120  # the seal and the task id the connector adds
    for name, value in task.items():  # '"name": "value", ' (text) or '"name": 123, ' (a number)
        if isinstance(value, SignedPickle):
            length += len(name) + 6 + value.text_length() + 2
        else:
            length += len(name) + 6 + (len(value) + 2 if isinstance(value, str) else 20)
    return encoded_size(length)


def _pickled_bytes(value: Any) -> int:
    # the bytes of a pickle, whichever form its blob has (text: its base64, about 4/3 of them)
    if isinstance(value, SignedPickle):
        return len(value.data)
    return len(value) * 3 // 4 if isinstance(value, str) else 0


def check_task_size(task: dict[str, Any], limit: int, fn: Callable[..., Any] | None = None) -> int:
    """Raise PayloadError if ``task`` is over ``limit`` bytes in the data plane; else its size."""
    size = task_size(task)
    if size > limit:
        what = "the task" if fn is None else f"the call to {_name_of(fn)!r}"
        pickled = sum(_pickled_bytes(v) for k, v in task.items() if k in ("fn", "args", "init"))
        raise PayloadError(
            f"{what} is too large for the grid: {size:,} bytes in the data plane (its pickles, about "
            f"{pickled:,} bytes, encoded), over the limit of {limit:,} bytes "
            "(max_payload_bytes): send less per call (e.g. a path or a key the task reads itself), "
            "a smaller map chunksize, or raise the limit")
    return size


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


class _RemoteTraceback(Exception):
    """The text of a traceback from the grid, attached as ``__cause__`` of a re-raised exception
    (the same device as ``concurrent.futures.process``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def decode_output(text: str, key: str | None, *, raw: bool = False, binding: str | None = None,
                  task_id: str | None = None) -> tuple[bool, Any]:
    """:func:`decode_output_and_logs` without the logs."""
    ok, value, _ = decode_output_and_logs(text, key, raw=raw, binding=binding, task_id=task_id)
    return ok, value


def log_note(exc: BaseException, logs: str, task_id: str | None = None) -> None:
    """Attach the last lines of a task's ``logs`` to the exception its future raises: a note
    (``add_note``, Python 3.11+), or on 3.10 a line appended to a text message (an exception
    whose first argument is not text is left as it is)."""
    lines = logs.rstrip("\n").splitlines()[-_NOTE_LINES:]
    where = f"task {task_id}" if task_id else "the task"
    more = f"; all of them: htcgrid-executor logs {task_id}" if task_id else ""
    note = f"--- last {len(lines)} log lines of {where}{more} ---\n" + "\n".join(lines)
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])


def decode_output_and_logs(text: str, key: str | None, *, raw: bool = False, binding: str | None = None,
                           task_id: str | None = None) -> tuple[bool, Any, str]:
    """Decode a task's output text: ``(True, value)`` or ``(False, exception to raise)``.

    Our envelopes give the result, or the task's exception with the remote traceback as its
    ``__cause__`` (``RemoteError`` when the exception could not travel), ``SignatureError`` when a
    pickle's signature does not match ``key``. A Lambda error document
    (``{"errorMessage", "errorType", "stackTrace"}``) becomes a RemoteError. With ``raw`` (a task
    dict sent as it is to some worker function) any other output is JSON-decoded when it is JSON,
    else returned as text; without it, any other output is a PayloadError (the grid's worker
    function is not ``htcgrid_executor.worker.lambda_handler``). ``binding`` and ``task_id``: the
    task's :func:`task_binding`, as the client made it, and its id; an output made for another
    task or another call then raises ``SignatureError``.
    The third item is the task's captured logs (``""`` when there are none). ``text`` may be a
    raw output's :class:`~htcgrid_executor.wire.RawOutput`.
    """
    if isinstance(text, RawOutput):
        doc, is_json = text.doc, True
    else:
        doc, is_json = _parse_json(text)
    if is_json and isinstance(doc, dict):
        if doc.get(TASK_MARKER) == VERSION and "ok" in doc:
            logs = doc.get("logs")
            expected = None if binding is None else output_binding(task_id or "", binding)
            return (*_decode_envelope(doc, key, expected), logs if isinstance(logs, str) else "")
        if "errorMessage" in doc and "errorType" in doc:
            stack = doc.get("stackTrace") or ""
            if isinstance(stack, list):
                stack = "".join(str(line) for line in stack)
            return False, RemoteError(str(doc["errorType"]), str(doc["errorMessage"]), str(stack)), ""
    if raw:
        return True, doc, ""
    shown = text if len(text) <= 200 else text[:200] + "..."
    return False, PayloadError(
        "the task's output is not an htcgrid_executor envelope (is the grid's worker function "
        f"htcgrid_executor.worker.lambda_handler?): {shown!r}"
    ), ""


def _parse_json(text: str) -> tuple[Any, bool]:
    try:
        return json.loads(text), True
    except (TypeError, ValueError):
        return text, False


_UNBOUND_ERRORS = ("signature", "config", "payload")  # answered before the task's binding is known


def _decode_envelope(doc: dict[str, Any], key: str | None, expected: str | None) -> tuple[bool, Any]:
    try:
        if key is None:
            raise ConfigurationError("payload_signing_key is not set: cannot read a pickled task output")
        bound = str(doc.get("binding", ""))  # what the worker signed it for (checked by the MAC)
        if expected is not None and doc.get("error") not in _UNBOUND_ERRORS and bound != expected:
            raise SignatureError("this output was made for another task or another call (copied "
                                 "onto this task's key?); refusing to unpickle it")
        if doc["ok"]:
            return True, loads_signed(doc["result"], key, bound)
        if doc.get("error") == "exception":
            return False, _remote_exception(doc, key, bound)
        return False, _failure_of(doc.get("error"), str(doc.get("message", "")))
    except (PayloadError, ConfigurationError) as exc:
        return False, exc
    except (KeyError, TypeError) as exc:
        return False, PayloadError(f"malformed task output envelope: {exc!r}")


def _failure_of(kind: Any, message: str) -> BaseException:
    """The exception for an envelope that says the worker did not run the call."""
    if kind == "signature":
        return SignatureError(f"the worker refused the task: {message}")
    if kind == "config":
        return ConfigurationError(f"the worker cannot run the task: {message}")
    if kind in ("timeout", "retries", "duplicate"):
        # the deployment guard's answers (worker_guard.py): what the local grid reports failed
        return TaskFailedError(message)
    if kind == "cancelled":
        return CancelledError(message)
    return PayloadError(f"the worker could not run the task: {message}")


def _remote_exception(doc: dict[str, Any], key: str, bound: str) -> BaseException:
    """The exception the call raised, with the remote traceback as its ``__cause__``."""
    tb_text = str(doc.get("traceback", ""))
    exc: BaseException | None = None
    if doc.get("exception") is not None:
        try:
            exc = loads_signed(doc["exception"], key, bound)
        except SignatureError:
            raise
        except PayloadError:
            exc = None  # it pickled on the worker but does not unpickle here
    if not isinstance(exc, BaseException):
        exc = RemoteError(str(doc.get("type", "Exception")), str(doc.get("message", "")), tb_text)
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb_text}"""')
    return exc
