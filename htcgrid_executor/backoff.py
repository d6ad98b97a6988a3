"""One retry policy: how long to wait before the next try, how fast the wait grows, when to stop.

Every retry loop of the package asks a :class:`Backoff` instead of doubling its own delay::

    backoff = Backoff(initial_sec=0.2, cap_sec=5.0, jitter=True, max_retries=5)
    while True:
        try:
            return attempt()
        except Transient:
            if backoff.exhausted:
                raise
            backoff.sleep()

The delay doubles from ``initial_sec`` up to ``cap_sec``. ``jitter`` scales each delay by a random
factor in [0.5, 1): clients that failed together do not retry in step. The policy is exhausted
after ``max_retries`` waits, or once ``deadline_sec`` (from construction or the last
:meth:`reset`) has passed, or once the caller's budget (below) is spent, whichever comes first;
with none of these it never is. Not thread-safe: one object per loop.

One budget across the layers: a caller that must have an answer by some time (the executor's
``broken_after_sec``) runs its calls inside :func:`spend_until`. Every :class:`Backoff` in those
calls, in this thread, is then exhausted once that time passes and never waits past it, and the
layers that block on sockets (the connector's HTTP transport, its Redis data plane) cap their
timeouts at :func:`time_left`. So the retries of the layers under the caller do not stack: they
all spend the caller's one budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import threading
import time
from collections.abc import Iterator

__all__ = ["Backoff", "spend_until", "time_left"]

# the end (monotonic) of the budget of the innermost spend_until, in this thread (a context
# variable: each thread starts without one)
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("htcgrid_deadline", default=None)


@contextlib.contextmanager
def spend_until(deadline: float | None) -> Iterator[None]:
    """Run the block within a budget that ends at ``deadline`` (``time.monotonic()`` seconds; None:
    no budget of its own). Nested budgets keep the earlier end. See the module docstring."""
    outer = _deadline.get()
    if deadline is None or (outer is not None and outer <= deadline):
        yield
        return
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float | None:
    """Seconds left of the enclosing :func:`spend_until` budget (0 once spent), None outside one."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Backoff:
    """Exponential backoff with an optional cap on retries and on total time (see the module)."""

    def __init__(
        self,
        initial_sec: float,
        cap_sec: float,
        *,
        jitter: bool = False,
        max_retries: int | None = None,
        deadline_sec: float | None = None,
    ) -> None:
        if initial_sec < 0 or cap_sec < initial_sec:
            raise ValueError(f"need 0 <= initial_sec <= cap_sec, got {initial_sec} and {cap_sec}")
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.initial_sec = initial_sec
        self.cap_sec = cap_sec
        self.jitter = jitter
        self.max_retries = max_retries
        self.deadline_sec = deadline_sec
        self.retries = 0
        self._started = time.monotonic()

    def reset(self) -> None:
        """Start again from ``initial_sec`` (after a success): retries and the deadline restart."""
        self.retries = 0
        self._started = time.monotonic()

    @property
    def exhausted(self) -> bool:
        """True when the policy allows no more retries (count, deadline or the caller's budget reached)."""
        if self.max_retries is not None and self.retries >= self.max_retries:
            return True
        if time_left() == 0.0:
            return True
        return self.deadline_sec is not None and time.monotonic() - self._started >= self.deadline_sec

    def next_delay(self) -> float:
        """The wait before the next retry, counting that retry. Never past the deadline, nor past
        the caller's budget."""
        delay = min(self.cap_sec, self.initial_sec * (2 ** self.retries))
        if self.jitter:
            delay *= 0.5 + random.random() / 2
        if self.deadline_sec is not None:
            delay = max(0.0, min(delay, self._started + self.deadline_sec - time.monotonic()))
        left = time_left()
        if left is not None:
            delay = min(delay, left)
        self.retries += 1
        return delay

    def sleep(self, stop: threading.Event | None = None) -> bool:
        """Wait :meth:`next_delay`. With ``stop``, return early once it is set; returns False
        then (the caller should stop retrying), else True."""
        delay = self.next_delay()
        if stop is not None:
            return not stop.wait(delay)
        time.sleep(delay)
        return True
