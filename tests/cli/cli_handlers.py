"""Worker functions for the CLI tests (imported by agents started from the command line)."""

import os
import time


def whoami(event, context):
    """Which agent process ran this task (its runner's parent)."""
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"agent_pid": os.getppid(), "n": event.get("n")}
