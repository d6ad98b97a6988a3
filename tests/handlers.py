"""The Lambda-style worker functions (``handler(event, context)``) that the tests' local grids
run: agents' runners import this module through the ``sys.path`` they inherit (see conftest.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

__all__ = ["echo", "act", "identity", "report", "whoami"]


def echo(event: Any, context: Any) -> Any:
    """The event and the task id: what a handler saw."""
    return {"echo": event, "task_id": context.aws_request_id}


def identity(event: Any, context: Any) -> Any:
    """Return the event unchanged: its JSON round trip is the whole test."""
    return event


def act(event: Any, context: Any) -> Any:
    """Do what the event says, in order: log, pid file, sleep, marker, exit, raise."""
    if "log" in event:  # one line per attempt, to count runs
        with open(event["log"], "a") as log:
            log.write(f"{context.aws_request_id} {os.getpid()}\n")
    if "pidfile" in event:
        Path(event["pidfile"]).write_text(str(os.getpid()))
    if "sleep_unless" in event:  # sleep on the first attempt only
        if not Path(event["sleep_unless"]).exists():
            Path(event["sleep_unless"]).write_text("slept once")
            time.sleep(event["sleep"])
    elif "sleep" in event:
        time.sleep(event["sleep"])
    if "then_write" in event:  # proves the user code ran to the end (or was stopped before)
        Path(event["then_write"]).write_text("ran to the end")
    if event.get("exit") is not None:
        os._exit(event["exit"])
    if "raise" in event:
        raise ValueError(event["raise"])
    return {"ok": event.get("value")}


def report(event: Any, context: Any) -> Any:
    """Append the task id to ``event['log']`` (to count runs), sleep ``event['sleep']`` seconds,
    raise ``event['raise']``; return the event, the start time and the task id."""
    started = time.time()
    if isinstance(event, dict):
        if "log" in event:
            with open(event["log"], "a") as log:
                log.write(f"{context.aws_request_id}\n")
        if "sleep" in event:
            time.sleep(event["sleep"])
        if "raise" in event:
            raise ValueError(event["raise"])
    return {"event": event, "started": started, "task_id": context.aws_request_id}


def whoami(event: Any, context: Any) -> Any:
    """Which agent process ran this task (its runner's parent)."""
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"agent_pid": os.getppid(), "n": event.get("n")}
