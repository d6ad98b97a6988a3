"""Lambda-style worker functions for the connector's tests against the local grid.

The agents import this module in their runner processes: it is found through the ``sys.path`` they
inherit from the test process (pytest puts this folder on it).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["echo", "act"]


def echo(event: Any, context: Any) -> Any:
    """Return the event unchanged: its JSON round trip is the whole test."""
    return event


def act(event: Any, context: Any) -> Any:
    """Append a line to ``event['log']`` (to count runs), sleep ``event['sleep']`` seconds, raise
    ``event['raise']``; return the event, the start time and the task id."""
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
