"""Functions the dashboard tests map over (imported by the agents' runners by name)."""

import time
from pathlib import Path


def gated(i: int, gate: str) -> int:
    """Raise for 0; otherwise wait until the file ``gate`` exists, then return i * i."""
    if i == 0:
        print(f"checking input {i}")  # the task's logs, shown with its failure
        raise ValueError(f"bad input {i}")
    deadline = time.monotonic() + 60
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return i * i
