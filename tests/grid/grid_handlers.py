"""Lambda-style worker functions the grid tests run (imported by the agents' runners)."""

import os
import time
from pathlib import Path


def echo(event, context):
    return {"echo": event, "task_id": context.aws_request_id}


def act(event, context):
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
