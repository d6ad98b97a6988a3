"""The policy both executor threads follow when the grid does not answer: which errors are
worth another try, the doubling wait between tries, and the deadline (``broken_after_sec``)
after which the executor is broken.

The deadline is one budget for every layer under the executor: each call to the connector runs
inside :meth:`_Outage.budget` (:func:`~htcgrid_executor.backoff.spend_until`), which ends
``broken_after_sec`` after the streak of failures began (after the call began, when there is no
streak), so the transport's and the data plane's retries and socket timeouts stop there too.
A grid that does not answer for ``broken_after_sec`` is found out then, not after every layer
has spent its own retries."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from .backoff import Backoff, spend_until
from .errors import ControlPlaneError, GridUnavailableError

__all__: list[str] = []  # private module

_FIRST_DELAY = 0.05
_MAX_DELAY = 2.0
# the least time worth a last attempt: with less left the streak is over, so that the error the
# executor breaks with is the grid's last answer, not a call refused for want of time
_LAST_TRY_SEC = 0.05


def retryable(exc: BaseException) -> bool:
    """Worth another try: the grid could not be reached, or answered with a server error."""
    if isinstance(exc, GridUnavailableError):
        return True
    if isinstance(exc, ControlPlaneError):
        return exc.status is None or exc.status >= 500
    return False


class _Outage:
    """A streak of failed attempts to reach the grid: since when, and the next wait."""

    def __init__(self, limit_sec: float) -> None:
        self.limit_sec = limit_sec
        self._since: float | None = None
        self._backoff = Backoff(_FIRST_DELAY, _MAX_DELAY)
        self._answer: BaseException | None = None  # the streak's last failure the grid itself said

    def deadline(self) -> float:
        """When the grid must have answered (monotonic): ``limit_sec`` after the streak began,
        or from now when there is none."""
        return (self._since or time.monotonic()) + self.limit_sec

    @contextlib.contextmanager
    def budget(self) -> Iterator[None]:
        """Run one attempt (its connector calls and every retry under them) within :meth:`deadline`."""
        with spend_until(self.deadline()):
            yield

    def long_poll_sec(self, wait_sec: float) -> float:
        """How long a long poll may ask the grid to wait: at most half the time left, so that an
        answer that comes when asked is within the deadline, and a grid that went silent is
        found out by it."""
        return max(0.0, min(wait_sec, (self.deadline() - time.monotonic()) / 2))

    def failed(self, attempt_started: float, exc: BaseException | None = None) -> bool:
        """Count a failed attempt that began at ``attempt_started`` (monotonic) and raised ``exc``:
        the streak begins when its first failed attempt began, so that attempt's own retries
        count too. True once the streak lasts ``limit_sec``: time to give up."""
        self._since = self._since or attempt_started
        if exc is not None and not isinstance(exc, GridUnavailableError):
            self._answer = exc
        return time.monotonic() - self._since >= self.limit_sec - _LAST_TRY_SEC

    def telling(self, exc: BaseException) -> BaseException:
        """The error to break with: ``exc``, unless it only says that the grid did not answer
        and the grid did answer earlier in the streak (a MISCONF, a 5xx): that says what to do.
        (A last try cut short by the deadline on a loaded machine would otherwise hide it.)"""
        if isinstance(exc, GridUnavailableError) and self._answer is not None:
            return self._answer
        return exc

    def verdict(self, exc: BaseException, doing: str = "reach the grid") -> tuple[str, BaseException]:
        """What to break the executor with once the streak is spent (``exc`` its last failure):
        the message, naming the deadline, and the cause, :meth:`telling`."""
        telling = self.telling(exc)
        return f"cannot {doing} for {self.limit_sec:g} s: {telling}", telling

    def next_delay(self) -> float:
        """How long to wait before the next attempt (doubling, at most 2 s, never past the
        deadline)."""
        return min(self._backoff.next_delay(), max(0.0, self.deadline() - time.monotonic() - _LAST_TRY_SEC))

    def ended(self) -> None:
        """An attempt succeeded: the next failure starts a new streak."""
        self._since = None
        self._answer = None
        self._backoff.reset()
