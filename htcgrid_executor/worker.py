"""The worker side of :class:`~htcgrid_executor.HTCGridExecutor`, and the codec of its tasks.

``lambda_handler(event, context)`` is an HTC-Grid worker function (a Lambda-style handler): an
agent calls it with the task dict exactly as the client sent it, and stores the JSON text of what
it returns as the task's output. It runs on any HTC-Grid, the embedded local grid or a deployment
(see ``docs/worker-handler.md`` for packaging).

A task of ours is a JSON object; the callable and its arguments travel as signed pickles
(:mod:`htcgrid_executor.payload`), checked with the grid secret from ``HTCGRID_PAYLOAD_KEY`` before
anything is unpickled::

    {"htcgrid_executor": 1,
     "mode": "call" | "map",
     "fn": "<signed pickle of the callable>",      # the same text for every task of a batch
     "args": "<signed pickle>",                     # call: (args, kwargs); map: [args, ...]
     "init": "<signed pickle of (initializer, initargs)>",   # optional
     "scope": "<the executor's id>",                # optional: see _Scope; "fn" is signed for it
     "limit": 524288000}                            # optional: the most bytes the output may take

What the task writes to ``sys.stdout`` and ``sys.stderr`` while it runs (its logging records
too, see :class:`_LogCapture`) is captured, its last :data:`LOG_LIMIT_CHARS` characters, and
travels in the envelope's ``"logs"`` (absent when empty); the streams still get every write.

The handler never raises for a problem of the task: it answers with an envelope, one of::

    {"htcgrid_executor": 1, "ok": true, "result": "<signed pickle>"}   # map: the list of results
    {"htcgrid_executor": 1, "ok": false, "error": "exception", "type": "module.Name",
     "message": "...", "traceback": "...", "exception": "<signed pickle>" | null}
    {"htcgrid_executor": 1, "ok": false, "error": "signature" | "payload" | "config", "message": "..."}

The client side of the codec (``pickle_function``, ``pickle_args``, ``pickle_chunk``,
``make_task``, ``decode_output``) lives here too, so that both ends of the format are in one file.
This module imports only the standard library, cloudpickle and this package's pure modules, so a
deployment's worker function needs nothing else.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import logging
import os
import pickle
import sys
import threading
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import cloudpickle

from .errors import ConfigurationError, PayloadError, RemoteError, SignatureError, TaskFailedError
from .payload import (
    PAYLOAD_KEY_ENV,
    loads_signed,
    missing_module_message,
    sign_bytes,
    signing_key_from_env,
    verify_bytes,
)
from .wire import encoded_size, shared_key

__all__ = [
    "TASK_MARKER",
    "LOG_LIMIT_CHARS",
    "lambda_handler",
    "pickle_function",
    "pickle_args",
    "pickle_chunk",
    "make_task",
    "task_size",
    "output_size",
    "check_task_size",
    "is_executor_task",
    "task_binding",
    "decode_output",
    "decode_output_and_logs",
    "log_note",
    "SHARED_CONTEXT_PREFIX",
]

#: key (and format version as its value) that marks a task or an output envelope as ours
TASK_MARKER = "htcgrid_executor"
_VERSION = 1
#: how much of a task's output (stdout, stderr, logging) its envelope keeps: the last 64 KiB
LOG_LIMIT_CHARS = 64 * 1024
_NOTE_LINES = 20  # a failed future's note: the last lines of its task's logs

class _Scope:
    """What the tasks of one executor share in a runner process, as a ProcessPoolExecutor's
    worker shares it between the initializer and the calls: the globals of the client's modules
    sent by value (its script's ``__main__`` above all), the initializers that ran, and the
    functions unpickled.

    cloudpickle gives each pickle its own copy of a by-value module's globals, so an initializer
    that sets ``global MODEL`` in the script would set it in a copy no task reads. Here every
    by-value function of a task of this executor is bound to one namespace per module (per
    ``__name__`` and ``__file__``): the first pickle that names a global supplies its value, and
    what the user's code assigns later stays (a later pickle's copy of the client's value does not
    overwrite it), which is what a worker process that imported or forked the script sees.
    """

    def __init__(self) -> None:
        self.namespaces: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._namespace_ids: set[int] = set()
        self.initialized: set[str] = set()  # initializer blobs that ran (once per runner, as PPE)
        # Unpickled callables by the exact text of their signed pickle: every task of a map
        # carries the same text, so it is unpickled (and verified) once. The text is the key, not
        # its MAC alone, so a hit means these exact bytes were verified before. Bounded.
        self.functions: OrderedDict[str, Callable[..., Any]] = OrderedDict()

    def loads(self, text: str, key: str, context: str = "") -> Any:
        """:func:`~htcgrid_executor.payload.loads_signed`, binding by-value functions to this
        scope's namespaces."""
        data = verify_bytes(text, key, context)
        try:
            return _ScopedUnpickler(io.BytesIO(data), self).load()
        except ModuleNotFoundError as exc:
            raise PayloadError(missing_module_message(exc)) from exc
        except Exception as exc:  # unpickling can raise anything (broken __setstate__, ...)
            raise PayloadError(f"cannot unpickle payload: {exc}") from exc

    def load_function(self, text: str, key: str, context: str) -> Callable[..., Any]:
        fn = self.functions.get(text)
        if fn is None:
            # not checked for being callable: calling it raises TypeError ("'int' object is not
            # callable") as the call's own exception, as in a process pool
            fn = self.loads(text, key, context)
            self.functions[text] = fn
            if len(self.functions) > _FUNCTION_CACHE_SIZE:
                self.functions.popitem(last=False)
        else:
            self.functions.move_to_end(text)
        return fn

    def namespace_for(self, base_globals: dict[str, Any]) -> dict[str, Any]:
        name = base_globals.get("__name__")
        if not isinstance(name, str):
            return base_globals  # nothing says which module: cloudpickle's own copy
        where = (name, base_globals.get("__file__"))
        namespace = self.namespaces.get(where)
        if namespace is None:
            namespace = self.namespaces[where] = {}
            self._namespace_ids.add(id(namespace))
        for item, value in base_globals.items():
            namespace.setdefault(item, value)
        return namespace

    def owns(self, namespace: dict[str, Any]) -> bool:
        return id(namespace) in self._namespace_ids


class _ScopedUnpickler(pickle.Unpickler):
    """An unpickler that routes cloudpickle's two by-value function constructors through a
    :class:`_Scope`. Anything else unpickles as ``pickle.loads`` would. (cloudpickle 3.x names
    them ``_make_function`` and ``_function_setstate``, which pyproject.toml pins; a version that
    renames them loses only the sharing, and the tests that check it fail.)"""

    def __init__(self, file: io.BytesIO, scope: _Scope) -> None:
        super().__init__(file)
        self._scope = scope

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module.startswith("cloudpickle"):
            if name == "_make_function":
                return functools.partial(_make_scoped_function, self._scope)
            if name == "_function_setstate":
                return functools.partial(_set_scoped_function_state, self._scope, found)
        return found


def _make_scoped_function(scope: _Scope, code: Any, base_globals: dict[str, Any], name: Any,
                          argdefs: Any, closure: Any) -> Any:
    namespace = scope.namespace_for(base_globals)
    namespace["__builtins__"] = builtins.__dict__
    return types.FunctionType(code, namespace, name, argdefs, closure)


def _set_scoped_function_state(scope: _Scope, setstate: Callable[[Any, Any], None], obj: Any,
                               state: Any) -> None:
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) \
            and scope.owns(obj.__globals__):
        # the client's values of the globals the function names: only those not set already
        pickled = state[1].get("__globals__") or {}
        for item, value in pickled.items():
            obj.__globals__.setdefault(item, value)
        state = (state[0], {**state[1], "__globals__": {}})
    setstate(obj, state)


_FUNCTION_CACHE_SIZE = 32

# Scopes by the id an executor puts in its tasks, least recently used first. Bounded, and small:
# a long-lived runner serves executor after executor, and each scope holds what its initializer
# loaded (a model, say) until evicted; an evicted scope is rebuilt (initializer included) as a
# fresh worker process would be.
_SCOPES: OrderedDict[str, _Scope] = OrderedDict()
_SCOPE_LIMIT = 4


def _scope_named(name: str) -> _Scope:
    scope = _SCOPES.get(name)
    if scope is None:
        scope = _SCOPES[name] = _Scope()
        if len(_SCOPES) > _SCOPE_LIMIT:
            _SCOPES.popitem(last=False)
    else:
        _SCOPES.move_to_end(name)
    return scope


def dumps_signed(obj: Any, key: str, context: str = "") -> str:
    """Pickle and sign ``obj``: what :func:`htcgrid_executor.payload.dumps_signed` does, faster
    for plain data. Raises PayloadError naming the type, with the pickler's error as cause.

    Arguments and results are mostly plain data, which the C pickler writes several times faster
    than cloudpickle (pickling is most of a client's cost per call). Its output is used only when
    cloudpickle would have written the same thing: it pickled without error (so nothing needed
    pickling by value: no lambda, closure or dynamic class), it names nothing in ``__main__``
    (which cloudpickle sends by value, as the worker has another ``__main__``), and no module is
    registered with ``cloudpickle.register_pickle_by_value``. Otherwise cloudpickle does it.
    """
    data = None
    if not cloudpickle.list_registry_pickle_by_value():
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # anything the C pickler refuses, cloudpickle may do by value
            data = None
        else:
            if b"__main__" in data:
                data = None
    if data is None:
        try:
            data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling can raise anything a __reduce__ raises
            raise PayloadError(f"cannot pickle object of type {type(obj).__name__}: {exc}") from exc
    return sign_bytes(data, key, context)


class _RemoteTraceback(Exception):
    """The text of a traceback from the grid, attached as ``__cause__`` of a re-raised exception
    (the same device as ``concurrent.futures.process``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


class _LogCapture:
    """The last :data:`LOG_LIMIT_CHARS` characters written while one task runs. Thread-safe
    (threads the user's code starts write too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._size = 0

    def write(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            if self._size > 2 * LOG_LIMIT_CHARS:  # compact now and then: bounded, and cheap per write
                kept = "".join(self._parts)[-LOG_LIMIT_CHARS:]
                self._parts, self._size = [kept], len(kept)

    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)[-LOG_LIMIT_CHARS:]


_capture: _LogCapture | None = None  # the running task's, if any (one task at a time per process)


class _Tee:
    """Stands in for ``sys.stdout``/``sys.stderr`` while a task runs: every write goes to the
    real stream (the terminal on a local grid, the function's log on a deployment) and to the
    running task's capture. One per stream and process, so that a logging handler the user's
    code made meanwhile (which keeps the stream it was given) still writes through it later;
    with no task running it only passes writes on. Writes at the file-descriptor level
    (``os.write``, a subprocess's output) are not seen."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        capture = _capture
        if capture is not None and isinstance(text, str):
            capture.write(text)
        return self._stream.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, buffer, ...
        return getattr(self._stream, name)


_tees: dict[int, _Tee] = {}


def _tee_for(stream: Any) -> Any:
    if stream is None or isinstance(stream, _Tee):
        return stream
    tee = _tees.get(id(stream))
    if tee is None or tee._stream is not stream:
        tee = _tees[id(stream)] = _Tee(stream)
    return tee


class _LastResort(logging.Handler):
    """Python's last-resort handler (records no handler took, WARNING and above, on
    ``sys.stderr``), with the level and the logger's name: while a task runs it is
    ``logging.lastResort``, so its records reach the captured stderr. Records the user's own
    logging configuration handles reach the capture through the stream its handler writes to
    (stderr by default); nothing about the configuration is changed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # as logging's own handlers: a failed log line must not fail the task
            self.handleError(record)


_LAST_RESORT = _LastResort()


class _Captured:
    """``with _Captured() as capture:`` tees stdout/stderr into ``capture`` and routes logging's
    last resort there, restoring all three on exit."""

    def __enter__(self) -> _LogCapture:
        global _capture
        self._saved = (sys.stdout, sys.stderr, logging.lastResort, _capture)
        capture = _capture = _LogCapture()
        sys.stdout, sys.stderr = _tee_for(sys.stdout), _tee_for(sys.stderr)
        logging.lastResort = _LAST_RESORT
        return capture

    def __exit__(self, *exc_info: object) -> None:
        global _capture
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a stream the user's code closed
                pass
        sys.stdout, sys.stderr, logging.lastResort, _capture = self._saved


#: what a shared object's pickle is signed for: this prefix and its share id (so that a blob
#: signed for one share, or for a task, is refused as another)
SHARED_CONTEXT_PREFIX = "share:"
_SHARED_LIMIT = 4  # shared objects kept per worker process, least recently used evicted
_shared: OrderedDict[str, Any] = OrderedDict()
_shared_lock = threading.RLock()  # re-entrant: a shared object may hold another handle


def _shared_object(share_id: str, location: dict[str, Any]) -> Any:
    """What a ``SharedHandle`` unpickles to in a worker: the shared object, read from the data
    plane and unpickled once per process, then served from a small cache (a map of many tasks
    over one object moves it once per worker process). ``location`` ``{"store": "GRID"}``: the
    data plane of the local grid this runner's agent serves; else as ``worker_guard.guard_location``.
    Raises PayloadError when the object is gone (released, or its executor shut down) or not
    signed with the grid secret."""
    with _shared_lock:  # threads of one task that unpickle the same handle load it once
        if share_id in _shared:
            _shared.move_to_end(share_id)
            return _shared[share_id]
        key = signing_key_from_env()
        if key is None:
            raise PayloadError(f"{PAYLOAD_KEY_ENV} is not set in the worker's environment")
        from .worker_guard import read_data_plane_key  # lazy: it needs redis or boto3

        if location.get("store") == "GRID":
            from .grid.agent import AGENT_CONFIG_ENV  # the runner's agent: its Redis is the data plane

            location = {"store": "REDIS", "redis_url": json.loads(os.environ[AGENT_CONFIG_ENV])["redis_url"]}
        data = read_data_plane_key(location, shared_key(share_id))
        if data is None:
            raise PayloadError(f"shared object {share_id} is not in the data plane (released, or its "
                               "executor shut down, before this task started)")
        value = loads_signed(data.decode(), key, SHARED_CONTEXT_PREFIX + share_id)
        del data
        _shared[share_id] = value
        if len(_shared) > _SHARED_LIMIT:
            _shared.popitem(last=False)
        return value


def lambda_handler(event: Any, context: Any = None) -> dict[str, Any]:
    """Run one task of :class:`HTCGridExecutor` and return its outcome envelope (JSON-safe).

    The user's exception (any ``BaseException`` short of the process dying) is caught and sent
    back with its traceback text; a task whose signature does not match the grid secret is not
    unpickled and answers an ``"error": "signature"`` envelope.
    """
    if isinstance(event, dict) and "guard" in event and is_executor_task(event):
        # a deployment's task: its guard (cancel marks, run marker, limits) is kept first
        from .worker_guard import run_guarded  # lazy: it needs redis or boto3

        return run_guarded(event, lambda task: lambda_handler(task, context), _binding_or_empty(event))
    with _Captured() as capture:
        answer = _handle(event)
    logs = capture.text()
    if logs and answer.get(TASK_MARKER) == _VERSION:
        limit = event.get("limit") if isinstance(event, dict) else None
        answer["logs"] = logs
        if isinstance(limit, int) and not isinstance(limit, bool) and output_size(answer) > limit:
            del answer["logs"]  # the result just fits: it matters more than the logs
    return answer


def _handle(event: Any) -> dict[str, Any]:
    """The task's envelope (the handler's work, minus the guard and the capture)."""
    try:
        if not is_executor_task(event):
            raise PayloadError(
                "not an htcgrid_executor task (this worker function runs tasks sent by HTCGridExecutor)"
            )
        key = signing_key_from_env()
        if key is None:
            return _failure("config", f"{PAYLOAD_KEY_ENV} is not set in the worker's environment")
        try:
            binding = task_binding(event)
        except PayloadError:
            binding = ""  # malformed blobs: their signature checks below refuse them
        scope_name = event.get("scope", "")
        if not isinstance(scope_name, str):
            raise PayloadError("task scope is not text")
        scope = _scope_named(scope_name)
        try:
            init = event.get("init")
            if init is not None and init not in scope.initialized:
                initializer, initargs = scope.loads(init, key)
                try:
                    initializer(*initargs)
                except BaseException as exc:  # the initializer's failure is this task's outcome
                    return _exception_envelope(exc, key, binding)
                scope.initialized.add(init)
            # the function is signed for its scope: a task moved into another scope is refused
            fn = scope.load_function(event["fn"], key, scope_name)
            args = scope.loads(event["args"], key)
        except PayloadError as exc:
            if isinstance(exc.__cause__, ModuleNotFoundError):
                # the call's own problem (a module the worker cannot import), raised as itself
                return _exception_envelope(ModuleNotFoundError(str(exc), name=exc.__cause__.name),
                                           key, binding)
            raise
        mode = event.get("mode", "call")
        try:
            if mode == "map":
                # stops at the first exception, as ProcessPoolExecutor's _process_chunk does
                result: Any = [fn(*call_args) for call_args in args]
            elif mode == "call":
                call_args, call_kwargs = args
                result = fn(*call_args, **call_kwargs)
            else:
                raise PayloadError(f"unknown task mode {mode!r}")
        except BaseException as exc:  # user code: everything it raises goes back to the caller
            return _exception_envelope(exc, key, binding)
        try:
            blob = dumps_signed(result, key, binding)
        except PayloadError as exc:
            # as ProcessPoolExecutor does: a result that cannot be pickled becomes the error
            return _exception_envelope(exc, key, binding)
        del result
        answer = {TASK_MARKER: _VERSION, "ok": True, "result": blob, "binding": binding}
        limit = event.get("limit")
        if isinstance(limit, int) and not isinstance(limit, bool) and output_size(answer) > limit:
            # checked before anything is written: the data plane never sees an oversized value
            too_large = PayloadError(
                f"the result of the call is too large for the grid: {output_size(answer):,} bytes in "
                f"the data plane (its pickle, about {len(blob) * 3 // 4:,} bytes, encoded), over the "
                f"limit of {limit:,} bytes (max_payload_bytes): return less, or raise the limit")
            del answer, blob
            return _exception_envelope(too_large, key, binding)
        return answer
    except SignatureError as exc:
        return _failure("signature", str(exc))
    except (PayloadError, KeyError, TypeError, ValueError) as exc:
        return _failure("payload", f"malformed task: {type(exc).__name__}: {exc}")


def _binding_or_empty(task: dict[str, Any]) -> str:
    try:
        return task_binding(task)
    except PayloadError:
        return ""


def _failure(kind: str, message: str) -> dict[str, Any]:
    return {TASK_MARKER: _VERSION, "ok": False, "error": kind, "message": message}


def _exception_envelope(exc: BaseException, key: str, binding: str) -> dict[str, Any]:
    tb = exc.__traceback__
    # drop this module's own frames: the traceback starts in the user's code
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    # the frames hold every local of the failed call; they must not stay alive in the runner
    exc.__traceback__ = None
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the exception
        message = f"<{type(exc).__name__} with unprintable message>"
    try:
        blob: str | None = dumps_signed(exc, key, binding)
    except PayloadError:
        blob = None  # the client raises RemoteError with the type, message and traceback
    return {
        TASK_MARKER: _VERSION,
        "ok": False,
        "error": "exception",
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": message,
        "traceback": text,
        "exception": blob,
        "binding": binding,
    }


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------


def _name_of(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def pickle_function(fn: Callable[..., Any], key: str, scope: str = "") -> str:
    """The signed pickle of ``fn``, for the tasks of ``scope`` (see :func:`make_task`). Raises
    PayloadError naming the function."""
    try:
        return dumps_signed(fn, key, scope)
    except PayloadError as exc:
        raise PayloadError(f"cannot pickle the function {_name_of(fn)!r}: {exc.__cause__}") from exc.__cause__


def pickle_args(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: str) -> str:
    """The signed pickle of one call's ``(args, kwargs)``. Raises PayloadError naming the argument
    that cannot be pickled."""
    try:
        return dumps_signed((args, kwargs), key)
    except PayloadError as exc:
        raise PayloadError(
            f"cannot pickle {_culprit(args, kwargs)} of the call to {_name_of(fn)!r}: {exc.__cause__}"
        ) from exc.__cause__


def pickle_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]], key: str) -> str:
    """The signed pickle of a map chunk (a list of argument tuples). Raises PayloadError naming the
    first item that cannot be pickled."""
    try:
        return dumps_signed(chunk, key)
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


def make_task(fn_blob: str, args_blob: str, *, mode: str = "call", init_blob: str | None = None,
              scope: str = "", limit: int | None = None) -> dict[str, Any]:
    """The JSON-safe task dict the handler runs (``mode``: ``"call"`` or ``"map"``).

    ``scope``: the tasks of one scope (one executor) share, in each runner process, the globals
    of the modules their pickles carry by value and the initializer's run; ``fn_blob`` must be
    pickled for it (``pickle_function(fn, key, scope)``). ``limit``: the most bytes the task's
    output may take in the data plane; a larger result fails the call with PayloadError.
    """
    task: dict[str, Any] = {TASK_MARKER: _VERSION, "mode": mode, "fn": fn_blob, "args": args_blob}
    if init_blob is not None:
        task["init"] = init_blob
    if scope:
        task["scope"] = scope
    if limit is not None:
        task["limit"] = limit
    return task


def output_size(answer: dict[str, Any]) -> int:
    """Bytes the handler's ``answer`` takes as a task output in the data plane. Exact for our
    envelopes: their long strings are base64, which JSON writes as they are."""
    return encoded_size(_json_length(answer))


def task_size(task: dict[str, Any]) -> int:
    """Bytes a task of :func:`make_task` takes in the data plane (``<task_id>-input``), to a few
    bytes over: counted without writing its JSON (this runs for every call submitted)."""
    length = 2
    for name, value in task.items():  # '"name": "value", ' (text) or '"name": 123, ' (a number)
        length += len(name) + 6 + (len(value) + 2 if isinstance(value, str) else 20)
    return encoded_size(length)


def _json_length(doc: dict[str, Any]) -> int:
    # len(json.dumps(doc)) without copying its long base64 strings
    strings = sum(len(v) for v in doc.values() if isinstance(v, str) and len(v) > 256)
    short = {k: ("" if isinstance(v, str) and len(v) > 256 else v) for k, v in doc.items()}
    return len(json.dumps(short)) + strings


def check_task_size(task: dict[str, Any], limit: int, fn: Callable[..., Any] | None = None) -> int:
    """Raise PayloadError if ``task`` is over ``limit`` bytes in the data plane; else its size."""
    size = task_size(task)
    if size > limit:
        what = "the task" if fn is None else f"the call to {_name_of(fn)!r}"
        pickled = sum(len(v) for k, v in task.items() if k in ("fn", "args", "init") and isinstance(v, str))
        raise PayloadError(
            f"{what} is too large for the grid: {size:,} bytes in the data plane (its pickles, about "
            f"{pickled * 3 // 4:,} bytes, encoded), over the limit of {limit:,} bytes "
            "(max_payload_bytes): send less per call (e.g. a path or a key the task reads itself), "
            "a smaller map chunksize, or raise the limit")
    return size


def is_executor_task(obj: Any) -> bool:
    """True when ``obj`` is a task dict made by :func:`make_task`."""
    return isinstance(obj, dict) and obj.get(TASK_MARKER) == _VERSION and "fn" in obj and "args" in obj


def task_binding(task: dict[str, Any]) -> str:
    """What a task's outputs are signed for: the MACs of its function and of its arguments.

    The worker signs a task's result (or exception) for this binding and names it in the
    envelope, so an output copied onto another task's key does not pass for that task's: the
    client checks the binding it expects (see :func:`decode_output`).
    """
    try:
        return f"{task['fn'].split('.', 2)[1]}.{task['args'].split('.', 2)[1]}"
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise PayloadError(f"malformed task: no signed function and arguments ({exc!r})") from exc


def decode_output(text: str, key: str | None, *, raw: bool = False,
                  binding: str | None = None) -> tuple[bool, Any]:
    """:func:`decode_output_and_logs` without the logs."""
    ok, value, _ = decode_output_and_logs(text, key, raw=raw, binding=binding)
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


def decode_output_and_logs(text: str, key: str | None, *, raw: bool = False,
                           binding: str | None = None) -> tuple[bool, Any, str]:
    """Decode a task's output text: ``(True, value)`` or ``(False, exception to raise)``.

    Our envelopes give the result, or the task's exception with the remote traceback as its
    ``__cause__`` (``RemoteError`` when the exception could not travel), ``SignatureError`` when a
    pickle's signature does not match ``key``. A Lambda error document
    (``{"errorMessage", "errorType", "stackTrace"}``) becomes a RemoteError. With ``raw`` (a task
    dict sent as it is to some worker function) any other output is JSON-decoded when it is JSON,
    else returned as text; without it, any other output is a PayloadError (the grid's worker
    function is not ``htcgrid_executor.worker.lambda_handler``). ``binding``: the task's
    :func:`task_binding`; an output made for another task then raises ``SignatureError``.
    The third item is the task's captured logs (``""`` when there are none).
    """
    try:
        doc = json.loads(text)
    except (TypeError, ValueError):
        doc, is_json = text, False
    else:
        is_json = True
    if is_json and isinstance(doc, dict):
        if doc.get(TASK_MARKER) == _VERSION and "ok" in doc:
            logs = doc.get("logs")
            return (*_decode_envelope(doc, key, binding), logs if isinstance(logs, str) else "")
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


def _decode_envelope(doc: dict[str, Any], key: str | None, binding: str | None) -> tuple[bool, Any]:
    try:
        if key is None:
            raise ConfigurationError("payload_signing_key is not set: cannot read a pickled task output")
        bound = str(doc.get("binding", ""))  # what the worker signed it for (checked by the MAC)
        if binding is not None and doc.get("error") not in ("signature", "config", "payload") and bound != binding:
            raise SignatureError("this output was made for another task (copied onto this task's "
                                 "key?); refusing to unpickle it")
        if doc["ok"]:
            return True, loads_signed(doc["result"], key, bound)
        kind = doc.get("error")
        message = str(doc.get("message", ""))
        if kind == "signature":
            return False, SignatureError(f"the worker refused the task: {message}")
        if kind == "config":
            return False, ConfigurationError(f"the worker cannot run the task: {message}")
        if kind in ("timeout", "retries", "duplicate"):
            # the deployment guard's answers (worker_guard.py): what the local grid reports failed
            return False, TaskFailedError(message)
        if kind == "cancelled":
            return False, CancelledError(message)
        if kind != "exception":
            return False, PayloadError(f"the worker could not run the task: {message}")
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
            exc = RemoteError(str(doc.get("type", "Exception")), message, tb_text)
        exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb_text}"""')
        return False, exc
    except (PayloadError, ConfigurationError) as exc:
        return False, exc
    except (KeyError, TypeError) as exc:
        return False, PayloadError(f"malformed task output envelope: {exc!r}")

