"""A batch of tasks running in an agent's runner child, and the deadlines the agent keeps for it.

:class:`RunningBatch` collects the runner's outputs and says when to flush them, when the running
task is over its time limit, and when a slow task should free the tasks queued behind it;
:class:`~.agent.Agent` decides what happens to them.
"""

from __future__ import annotations

import threading
import time

from .runner import RunnerProcess
from .task_inputs import BigInput

__all__ = ["RunningBatch", "RunnerStopped"]

_FLUSH_SEC = 0.005  # the longest a finished output waits to be completed with others
_STRAGGLER_SEC = 0.05  # a task in a batch running this long frees the tasks queued behind it


class RunnerStopped(Exception):
    """The runner had to be stopped (or died) in the middle of a batch."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why  # 'crash', 'timeout', 'stop' or 'lost'


class RunningBatch:
    """A batch running in the runner, and its three deadlines: the running task's time limit,
    the flush delay of finished outputs, and the one check for a straggler."""

    def __init__(self, runner: RunnerProcess, items: list[tuple[str, bytes | BigInput, int]],
                 outputs: dict[str, bytes]) -> None:
        self.runner = runner
        self.items = items
        self.outputs = outputs  # finished and not yet flushed: task id -> output
        self.received = 0
        self.first_unflushed = 0.0  # when the oldest unflushed output came (0: none)
        self.straggler_checked = False

    @property
    def done(self) -> bool:
        return self.received == len(self.items)

    def limit_ms(self, index: int) -> int:
        """The time limit of the batch's task ``index`` (0: none, or no such task)."""
        return self.items[index][2] if 0 <= index < len(self.items) else 0

    def next_wait(self) -> float:
        """How long to wait for outputs before a deadline comes up."""
        wait = 1.0
        index = self.runner.running_index
        if self.limit_ms(index):
            deadline = self.runner.started_at() + self.limit_ms(index) / 1000
            wait = min(wait, max(0.0, deadline - time.monotonic()) + 0.001)
        if self.outputs:  # never sit on a finished output for more than a few milliseconds
            wait = min(wait, max(0.0, self.first_unflushed + _FLUSH_SEC - time.monotonic()))
        if not self.straggler_checked and len(self.items) > 1:
            wait = min(wait, _STRAGGLER_SEC)
        return wait

    def collect(self, wait: float) -> None:
        """Take the outputs the runner sent within ``wait`` seconds. Raises EOFError/OSError
        if it died."""
        received = self.runner.outputs(wait)
        if received is None:
            return
        for index, output in received:
            self.received += 1
            if output is not None:
                self.outputs[self.items[index][0]] = output
        self.first_unflushed = self.first_unflushed or time.monotonic()

    def flush_due(self) -> bool:
        """Whether the outputs should be completed now: a group waited long enough, is big, or
        the batch is done."""
        return bool(self.outputs) and (time.monotonic() - self.first_unflushed >= _FLUSH_SEC
                                       or len(self.outputs) >= 64 or self.done)

    def flushed(self) -> None:
        """The outputs were completed (or kept for later): the next group starts empty."""
        self.outputs.clear()
        self.first_unflushed = 0.0

    def enforce_limits(self, stop_event: threading.Event) -> int | None:
        """Kill the runner if its task ran over its time limit or the agent is stopping (raises
        RunnerStopped); else the index of a straggler to release the tasks behind, once per
        batch (the batch was sized for short tasks), or None."""
        index = self.runner.running_index
        running_ns = self.runner.running_ns()
        if self.limit_ms(index) and running_ns / 1e6 >= self.limit_ms(index):
            self.runner.kill()
            raise RunnerStopped("timeout")
        if stop_event.is_set():  # asked to stop: unfinished work goes back
            self.runner.kill()
            raise RunnerStopped("stop")
        if not self.straggler_checked and 0 <= index and running_ns / 1e9 >= _STRAGGLER_SEC:
            self.straggler_checked = True
            return index
        return None
