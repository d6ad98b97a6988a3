"""The runner: the child process of an agent in which the worker function runs.

It exists so that user code can be stopped: the agent kills the runner when the running task is
cancelled or runs over its time limit, and starts a new one. It talks to its agent over a pipe,
a batch at a time (one message each way per batch, not per task: see :func:`runner_main`). The
runner does the decoding, the call and the encoding, so the agent process only moves bytes.

The worker function is a Lambda-style ``handler(event, context)``. As on a deployment, a handler
that raises (or cannot be imported, or returns something that is not JSON) gives a *finished*
task whose output is Lambda's error document.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..wire import DEFAULT_MAX_PAYLOAD_BYTES, decode_task, encode_output
from .child_processes import die_with_parent

__all__ = ["runner_main", "load_handler", "error_document", "LambdaContext"]

DEFAULT_MAX_OUTPUT_BYTES = DEFAULT_MAX_PAYLOAD_BYTES  # a deployment's own limit may be lower


class LambdaContext:
    """The little of AWS Lambda's context object that worker functions use."""

    def __init__(self, task_id: str, function_name: str, deadline: float | None) -> None:
        self.aws_request_id = task_id
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 0
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        if self._deadline is None:
            return 3_600_000
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def error_document(message: str, error_type: str, stack: list[str] | None = None) -> str:
    """The JSON a Lambda runtime answers when the handler fails."""
    return json.dumps({"errorMessage": message, "errorType": error_type, "stackTrace": stack or []})


def load_handler(spec: str) -> Callable[[Any, Any], Any]:
    """Import ``module:function`` (or ``module.function``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"worker function must be given as 'module:function', not {spec!r}")
    handler = getattr(importlib.import_module(module_name), attr)
    if not callable(handler):
        raise TypeError(f"worker function {spec!r} is not callable")
    return handler


def run_task(handler: Callable | None, load_error: str | None, spec: str, task_id: str,
             raw_input: bytes, timeout_ms: int, max_output_bytes: int) -> bytes:
    """Run one task and return its ``<task_id>-output`` value (never raises)."""
    if handler is None:
        text = error_document(load_error or "no handler", "Runtime.ImportModuleError")
        return encode_output(text)
    try:
        event = decode_task(raw_input)
    except Exception as exc:  # a malformed input is this task's problem only
        return encode_output(error_document(str(exc), "Runtime.InvalidInput"))
    deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
    try:
        result = handler(event, LambdaContext(task_id, spec, deadline))
    except Exception as exc:  # the handler's exception becomes Lambda's error document
        stack = traceback.format_tb(exc.__traceback__)[1:]  # drop this frame
        text = error_document(str(exc), type(exc).__name__, [line.rstrip() for line in stack])
    else:
        try:
            text = json.dumps(result)
        except (TypeError, ValueError) as exc:
            text = error_document(f"Unable to marshal response: {exc}", "Runtime.MarshalError")
    output = encode_output(text)
    if len(output) > max_output_bytes:
        text = error_document(
            f"response of {len(output)} bytes exceeds the data plane limit of {max_output_bytes} bytes",
            "Runtime.ResponseSizeTooLarge")
        output = encode_output(text)
    return output


def runner_main(conn: Connection, spec: str, parent_pid: int, max_output_bytes: int,
                progress: Any, skip: Any) -> None:
    """Entry point of the runner child: serve batches until the pipe closes or None arrives.

    A batch is a list of ``(task_id, input bytes, timeout_ms)``. Before each task the runner
    writes its start time and index into the shared ``progress`` array (``[index, start_ns]``),
    so the agent knows which task is running without a message per task, and skips a task whose
    ``skip`` flag the agent set (it was cancelled, or given back, while it waited). Outputs go
    back as lists of ``(index, output or None)``, every few milliseconds and at the end of the
    batch.
    """
    die_with_parent()
    if os.getppid() != parent_pid:  # the agent died before we could ask to die with it
        os._exit(1)
    if hasattr(os, "setpgid"):
        # a process group of its own: the agent kills the group, so a stopped task's
        # subprocesses (time limit, cancel, kill_running) end with the runner
        os.setpgid(0, 0)
    # Ctrl-C in a terminal reaches the whole process group: the agent decides what stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler: Callable | None = None
    load_error: str | None = None
    try:
        handler = load_handler(spec)
    except Exception as exc:  # reported per task, as a deployment's Lambda does
        load_error = f"cannot import worker function {spec!r}: {type(exc).__name__}: {exc}"
    outbox = _Outbox(conn)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for index, (task_id, raw_input, timeout_ms) in enumerate(batch):
            progress[1] = time.monotonic_ns()
            progress[0] = index  # after the start time: the agent reads index, then time
            if skip[index]:
                outbox.put(index, None)
                continue
            outbox.put(index, run_task(handler, load_error, spec, task_id, raw_input, timeout_ms,
                                       max_output_bytes))
        progress[0] = len(batch)
        outbox.flush()


class _Outbox:
    """Outputs on their way back to the agent: sent in groups, by a thread that flushes a few
    milliseconds after the first one is ready, so an output finished just before a long task
    does not wait for it."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._ready = threading.Condition()  # guards _done and the pipe's write end
        self._done: list[tuple[int, bytes | None]] = []
        threading.Thread(target=self._flush_soon, name="htcgrid-runner-outbox", daemon=True).start()

    def put(self, index: int, output: bytes | None) -> None:
        with self._ready:
            self._done.append((index, output))
            if len(self._done) == 1:
                self._ready.notify()

    def flush(self) -> None:
        with self._ready:
            done, self._done = self._done, []
            if done:
                self._conn.send(done)

    def _flush_soon(self) -> None:
        while True:
            with self._ready:
                while not self._done:
                    self._ready.wait()
            time.sleep(0.005)  # let a few more join it
            try:
                self.flush()
            except OSError:  # the agent is gone: the main thread finds out too
                return
