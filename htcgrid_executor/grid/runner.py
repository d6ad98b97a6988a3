"""The runner: the child process of an agent in which the worker function runs.

It exists so that user code can be stopped: the agent kills the runner when the running task is
cancelled or runs over its time limit, and starts a new one. It talks to its agent over a pipe,
a batch at a time (one message each way per batch, not per task: see :func:`runner_main`). The
runner does the decoding, the call and the encoding, so the agent process only moves bytes.

Both ends of that protocol live here: :func:`runner_main` in the child, :class:`RunnerProcess`
(the agent's handle on it) in the parent.

The worker function is a Lambda-style ``handler(event, context)``. As on a deployment, a handler
that raises (or cannot be imported, or returns something that is not JSON) gives a *finished*
task whose output is Lambda's error document.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..payload import SignedPickle
from ..wire import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    decode_task,
    encode_output,
    encode_raw,
    encoded_size,
    json_size,
    pickles_text_length,
    raw_header_length,
)
from .child_processes import describe_exit, die_with_parent
from .task_inputs import BigInput, fetch_big_input

__all__ = ["RunnerProcess", "runner_main", "load_handler", "error_document", "LambdaContext"]

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
             raw_input: bytes | BigInput, timeout_ms: int, max_output_bytes: int,
             redis_url: str | None = None) -> bytes:
    """Run one task and return its ``<task_id>-output`` value (never raises).

    A raw input (``wire.encode_raw``: an executor task on the local grid) gets a raw output when
    the handler answers a dict: its signed pickles stay bytes. Its size is counted as the base64
    JSON output would take (``wire.json_size``), so the limit means the same on both formats."""
    if handler is None:
        text = error_document(load_error or "no handler", "Runtime.ImportModuleError")
        return encode_output(text)
    try:
        if isinstance(raw_input, BigInput):  # too big to come through the agent: read it here
            found = fetch_big_input(raw_input, redis_url) if redis_url else None
            if found is None:
                return encode_output(error_document(f"task input {raw_input.key} not found in the data plane",
                                                    "Runtime.InputNotFound"))
            raw_input = found
        event = decode_task(raw_input)
        if not _takes_raw(handler) and isinstance(event, dict):
            # a raw input for a worker function not ours: it gets the task as the JSON format has it
            event = {k: v.text() if isinstance(v, SignedPickle) else v for k, v in event.items()}
    except Exception as exc:  # a malformed (or unreadable) input is this task's problem only
        return encode_output(error_document(str(exc), "Runtime.InvalidInput"))
    del raw_input  # the event's pickles are views into it: it lives as long as they do
    deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
    try:
        result = handler(event, LambdaContext(task_id, spec, deadline))
    except Exception as exc:  # the handler's exception becomes Lambda's error document
        stack = traceback.format_tb(exc.__traceback__)[1:]  # drop this frame
        text = error_document(str(exc), type(exc).__name__, [line.rstrip() for line in stack])
    else:
        del event  # the arguments' bytes go before the result is encoded
        output = _raw_output(result, max_output_bytes) if isinstance(result, dict) else None
        if output is not None:
            return output
        try:
            text = json.dumps(result)
        except (TypeError, ValueError) as exc:
            text = error_document(f"Unable to marshal response: {exc}", "Runtime.MarshalError")
    output = encode_output(text)
    if len(output) > max_output_bytes:
        output = encode_output(_too_large(len(output), max_output_bytes))
    return output


def _too_large(size: int, max_output_bytes: int) -> str:
    return error_document(f"response of {size} bytes exceeds the data plane limit of {max_output_bytes} bytes",
                          "Runtime.ResponseSizeTooLarge")


def _takes_raw(handler: Callable) -> bool:
    """Whether ``handler`` is this package's worker function, which reads a raw input's pickles
    as bytes and answers them in memory."""
    return getattr(handler, "__module__", None) == "htcgrid_executor.worker" \
        and getattr(handler, "__name__", None) == "lambda_handler"


def _raw_output(result: dict[str, Any], max_output_bytes: int) -> bytes | None:
    """The raw output of a handler's answer that holds signed pickles in memory (it was given a
    raw input), checked against the limit before anything is written; None for any other answer.
    A result goes raw; a failure envelope (small, and read by the dashboard, which tells one from
    a result by the head of its base64 JSON) goes as JSON, its pickle as text."""
    if not any(isinstance(value, SignedPickle) for value in result.values()):
        return None
    if result.get("ok") is not True:
        output = encode_output(json.dumps({k: v.text() if isinstance(v, SignedPickle) else v
                                           for k, v in result.items()}))
        return output if len(output) <= max_output_bytes else encode_output(_too_large(len(output),
                                                                                       max_output_bytes))
    try:
        pickles = pickles_text_length(result)
        if encoded_size(pickles) > max_output_bytes:  # too large whatever else it holds: no copy made
            return encode_output(_too_large(encoded_size(json_size(result)), max_output_bytes))
        output = encode_raw(result)
        # its JSON is at most the raw header plus each pickle as quoted text: under the limit
        # (nearly every output), it needs no exact count
        if encoded_size(raw_header_length(output) + pickles) > max_output_bytes:
            size = encoded_size(json_size(result))
            if size > max_output_bytes:
                return encode_output(_too_large(size, max_output_bytes))
        return output
    except Exception as exc:  # noqa: BLE001 - as json.dumps' failure: the task's own problem
        return encode_output(error_document(f"Unable to marshal response: {exc}", "Runtime.MarshalError"))


def runner_main(conn: Connection, spec: str, parent_pid: int, max_output_bytes: int,
                progress: Any, skip: Any, redis_url: str | None = None) -> None:
    """Entry point of the runner child: serve batches until the pipe closes or None arrives.

    A batch is a list of ``(task_id, input bytes or task_inputs.BigInput, timeout_ms)``; a big
    input is read from ``redis_url`` (the agent's Redis) when its task starts. Before each task the runner
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
            batch[index] = None  # the input goes with its task (it may be hundreds of MB)
            outbox.put(index, run_task(handler, load_error, spec, task_id, raw_input, timeout_ms,
                                       max_output_bytes, redis_url), last=index == len(batch) - 1)
            del raw_input
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

    def put(self, index: int, output: bytes | None, last: bool = False) -> None:
        """Queue an output; ``last``: the batch's last one, which :meth:`flush` sends at once, so
        the thread is not woken for it (a single task's output would cost a thread switch)."""
        with self._ready:
            self._done.append((index, output))
            if len(self._done) == 1 and not last:
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


class RunnerProcess:
    """The agent's handle on a runner child: the process, its pipe and the shared arrays it
    reports progress in (see :func:`runner_main` for the protocol).

    ``kill()`` and the skip flags may be used from the agent's watcher thread.
    """

    _context = multiprocessing.get_context("spawn")  # no fork of a threaded agent

    def __init__(self, handler: str, max_batch: int, max_output_bytes: int, redis_url: str | None = None) -> None:
        self.conn, child_conn = self._context.Pipe()
        # [index of the task running now, its start in time.monotonic_ns()]; no lock: one writer
        self.progress = self._context.RawArray("q", 2)
        self.skip = self._context.RawArray("b", max(max_batch, 1))
        # not daemonic: user code may start processes of its own (multiprocessing refuses a
        # daemonic parent); the agent stops its runner itself, and the kernel kills it with it
        self.process = self._context.Process(
            target=runner_main, name="htcgrid-runner", daemon=False,
            args=(child_conn, handler, os.getpid(), max_output_bytes, self.progress, self.skip, redis_url),
        )
        self.process.start()
        child_conn.close()
        self.tasks_run = 0
        self.batch: list[str] = []  # task ids of the batch it is running (agent's lock)

    def start_batch(self, items: list[tuple[str, bytes | BigInput, int]]) -> None:
        """Send a batch of ``(task_id, input, timeout_ms)``; raises OSError if the runner died."""
        for index in range(len(items)):
            self.skip[index] = 0
        self.progress[0] = -1
        self.batch = [task_id for task_id, _, _ in items]
        self.conn.send(items)

    @property
    def running_index(self) -> int:
        """Index in the batch of the task running now (-1: none started yet; the batch's length:
        all done)."""
        return self.progress[0]

    def running_ns(self) -> int:
        """How long the task at :attr:`running_index` has run, in ns (read the index first: the
        runner writes the start time before the index)."""
        return time.monotonic_ns() - self.progress[1]

    def started_at(self) -> float:
        """When the task at :attr:`running_index` started, in ``time.monotonic()`` seconds."""
        return self.progress[1] / 1e9

    def skip_task(self, index: int) -> None:
        """Ask the runner not to run the batch's task ``index`` (it may have started already:
        read :attr:`running_index` after this to know)."""
        self.skip[index] = 1

    def outputs(self, wait: float) -> list[tuple[int, bytes | None]] | None:
        """The outputs the runner sent, waiting up to ``wait`` seconds: ``(index, output or None
        for a skipped task)``; None when nothing came. Raises EOFError/OSError if it died."""
        if not self.conn.poll(wait):
            return None
        return self.conn.recv()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def exit_description(self) -> str:
        """How the process ended ("exit code 3", "signal SIGKILL")."""
        return describe_exit(self.process.exitcode)

    def kill(self) -> None:
        """Kill the runner and every process the task started: the runner leads a process group
        of its own (see ``runner_main``), so a task's subprocesses go with it."""
        if self.process.is_alive():
            self.process.kill()
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL what is left of the runner's process group (its pid is the group's id, and
        the kernel does not reuse it while the group has members)."""
        pid = self.process.pid
        if pid is None or not hasattr(os, "killpg"):
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no group left (or not made yet)
            pass

    def discard(self) -> None:
        """Forget a runner that died while idle: what it left of its group and its pipe go."""
        self.kill_group()
        self.conn.close()

    def reap(self) -> str:
        """After the runner was killed or died mid-batch: make sure it and what its task started
        are gone, close the pipe, and say how it ended."""
        self.process.join(5)
        # what the task started dies with it (a crash leaves them running), and a runner that did
        # not end is not left for multiprocessing to wait for at the agent's exit (not daemonic)
        self.kill()
        self.process.join(1)
        how = self.exit_description()
        self.conn.close()
        return how

    def stop(self) -> None:
        """Let the runner exit cleanly (max_tasks_per_child reached, agent stopping); processes
        its tasks left behind end with it."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(2)
        self.kill()
        self.process.join()
        self.kill_group()
        self.conn.close()
