"""The worker handler of :class:`~htcgrid_executor.HTCGridExecutor`.

``lambda_handler(event, context)`` is an HTC-Grid worker function (a Lambda-style handler): an
agent calls it with the task dict exactly as the client sent it, and stores the JSON text of what
it returns as the task's output. It runs on any HTC-Grid, the embedded local grid or a deployment
(see ``docs/worker-handler.md`` for packaging). The format of tasks and outputs, and how they are
signed and sealed, is the codec's (:mod:`htcgrid_executor.codec`); what the tasks of one executor
share in a runner is :mod:`htcgrid_executor.worker_scope`'s.

Before anything is unpickled the handler checks, with the grid secret from
``HTCGRID_PAYLOAD_KEY``, the task's seal (its function, arguments and initializer signed together
for its task id; on the local grid, whose agents name the task they run, that id must be the
running task's) and then each pickle's signature.

What the task writes to ``sys.stdout`` and ``sys.stderr`` while it runs (its logging records
too, see :class:`_LogCapture`) is captured, its last :data:`LOG_LIMIT_CHARS` characters, and
travels in the envelope's ``"logs"`` (absent when empty); the streams still get every write.
The handler never raises for a problem of the task: it answers with an envelope.

This module imports only the standard library, cloudpickle and this package's pure modules, so a
deployment's worker function needs nothing else (``redis``/``boto3`` only for a task's guard).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from typing import Any

from .codec import (
    TASK_MARKER,
    VERSION,
    check_seal,
    is_executor_task,
    output_binding,
    output_size,
    task_binding,
)
from .errors import PayloadError, SignatureError
from .payload import PAYLOAD_KEY_ENV, SignedPickle, pickle_signed, signing_key_from_env
from .wire import encoded_size, session_of
from .worker_scope import cache_key, scope_named

__all__ = ["LOG_LIMIT_CHARS", "lambda_handler"]

#: how much of a task's output (stdout, stderr, logging) its envelope keeps: the last 64 KiB
LOG_LIMIT_CHARS = 64 * 1024


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


def lambda_handler(event: Any, context: Any = None) -> dict[str, Any]:
    """Run one task of :class:`HTCGridExecutor` and return its outcome envelope (JSON-safe).

    The user's exception (any ``BaseException`` short of the process dying) is caught and sent
    back with its traceback text; a task whose seal or signatures do not match the grid secret
    is not unpickled and answers an ``"error": "signature"`` envelope.
    """
    if isinstance(event, dict) and "guard" in event and is_executor_task(event):
        # a deployment's task: its guard (cancel marks, run marker, limits) is kept first; the
        # guard's signed task id is the one the task must be sealed for
        from .worker_guard import run_guarded  # lazy: it needs redis or boto3

        return run_guarded(event, _run, _binding_or_empty(event))
    return _run(event, _running_task_id(context))


def _running_task_id(context: Any) -> str | None:
    """The id of the task the agent runs, when the context says it: the local grid's agents give
    it as ``aws_request_id``; a Lambda's request id is a UUID, which names no task."""
    request_id = getattr(context, "aws_request_id", None)
    try:
        session_of(request_id)
    except (PayloadError, AttributeError, TypeError):
        return None
    return request_id


def _run(event: Any, running: str | None) -> dict[str, Any]:
    """The task's envelope, with the logs it wrote while it ran."""
    with _Captured() as capture:
        answer = _handle(event, running)
    logs = capture.text()
    if logs and answer.get(TASK_MARKER) == VERSION:
        limit = event.get("limit") if isinstance(event, dict) else None
        answer["logs"] = logs
        if isinstance(limit, int) and not isinstance(limit, bool) and output_size(answer) > limit:
            del answer["logs"]  # the result just fits: it matters more than the logs
    if _is_raw(event):
        return answer  # the local grid's runner writes it raw, pickles as bytes
    return {k: v.text() if isinstance(v, SignedPickle) else v for k, v in answer.items()}


def _is_raw(event: Any) -> bool:
    """Whether the task came as a raw input (the local grid's agents): its answer goes back raw."""
    return isinstance(event, dict) and isinstance(event.get("args"), SignedPickle)


def _handle(event: Any, running: str | None) -> dict[str, Any]:
    """The task's envelope (the handler's work, minus the guard and the capture)."""
    try:
        if not is_executor_task(event):
            raise PayloadError(
                "not an htcgrid_executor task (this worker function runs tasks sent by HTCGridExecutor)"
            )
        key = signing_key_from_env()
        if key is None:
            return _failure("config", f"{PAYLOAD_KEY_ENV} is not set in the worker's environment")
        task_id, binding = check_seal(event, key, running)  # before anything is unpickled
        return _call(event, key, output_binding(task_id, binding))
    except SignatureError as exc:
        return _failure("signature", str(exc))
    except (PayloadError, KeyError, TypeError, ValueError) as exc:
        return _failure("payload", f"malformed task: {type(exc).__name__}: {exc}")


def _call(event: dict[str, Any], key: str, binding: str) -> dict[str, Any]:
    """Run a sealed task: its initializer (once per scope), then the call or the map chunk."""
    scope_name = event.get("scope", "")
    if not isinstance(scope_name, str):
        raise PayloadError("task scope is not text")
    scope = scope_named(scope_name)
    try:
        init, fn, args = scope.load_call(event, key)
    except PayloadError as exc:
        if isinstance(exc.__cause__, ModuleNotFoundError):
            # the call's own problem (a module the worker cannot import), raised as itself
            return _exception_envelope(ModuleNotFoundError(str(exc), name=exc.__cause__.name), key, binding)
        raise
    if init is not None:
        initializer, initargs = init
        try:
            initializer(*initargs)
        except BaseException as exc:  # the initializer's failure is this task's outcome
            return _exception_envelope(exc, key, binding)
        scope.initialized.add(cache_key(event["init"]))
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
    return _result_envelope(result, key, binding, event.get("limit"))


def _result_envelope(result: Any, key: str, binding: str, limit: Any) -> dict[str, Any]:
    try:
        blob = pickle_signed(result, key, binding)
    except PayloadError as exc:
        # as ProcessPoolExecutor does: a result that cannot be pickled becomes the error
        return _exception_envelope(exc, key, binding)
    del result
    answer = {TASK_MARKER: VERSION, "ok": True, "result": blob, "binding": binding}
    # its JSON is the blob's text, the binding (each character escaped at worst to 12) and under
    # 128 characters more: far under the limit (nearly every result) it needs no exact count
    bound = encoded_size(blob.text_length() + 12 * len(binding) + 128)
    if isinstance(limit, int) and not isinstance(limit, bool) and bound > limit and output_size(answer) > limit:
        # checked before anything is written: the data plane never sees an oversized value
        too_large = PayloadError(
            f"the result of the call is too large for the grid: {output_size(answer):,} bytes in "
            f"the data plane (its pickle, about {len(blob.data):,} bytes, encoded), over the "
            f"limit of {limit:,} bytes (max_payload_bytes): return less, or raise the limit")
        del answer, blob
        return _exception_envelope(too_large, key, binding)
    return answer


def _binding_or_empty(task: dict[str, Any]) -> str:
    """What the guard's own answers (cancelled, duplicate, ...) name as the task's binding."""
    try:
        return output_binding(str(task.get("task_id", "")), task_binding(task))
    except PayloadError:
        return ""


def _failure(kind: str, message: str) -> dict[str, Any]:
    return {TASK_MARKER: VERSION, "ok": False, "error": kind, "message": message}


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
        blob: SignedPickle | None = pickle_signed(exc, key, binding)
    except PayloadError:
        blob = None  # the client raises RemoteError with the type, message and traceback
    return {
        TASK_MARKER: VERSION,
        "ok": False,
        "error": "exception",
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": message,
        "traceback": text,
        "exception": blob,
        "binding": binding,
    }
