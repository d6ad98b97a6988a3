"""The Redis data plane within the caller's budget (:func:`~htcgrid_executor.backoff.spend_until`).

redis-py's timeouts are fixed per client (``socket_timeout``, ``socket_connect_timeout``) and it
retries on its own: a Redis that accepts connections and never answers would hold a call for
``socket_timeout`` times each retry, whatever the caller's deadline. :func:`within_budget` gives
the client a connection class whose connect, send and read are cut at what is left of the
budget (a spent one fails at once with redis-py's ``TimeoutError``, which the data plane maps to
``GridUnavailableError``), and a retry policy that never sleeps past it. Outside a budget nothing
changes.
"""

from __future__ import annotations

import functools
from typing import Any

from ..backoff import time_left

__all__ = ["within_budget"]


def _cut(limit: float | None, left: float) -> float:
    return left if limit is None else min(limit, left)


@functools.cache
def _budgeted(base: type) -> type:
    """``base`` (a redis-py connection class) with its socket timeouts cut at the budget."""
    import redis.exceptions

    def spend() -> float | None:
        left = time_left()
        if left is not None and left <= 0:
            raise redis.exceptions.TimeoutError("the caller's deadline has passed")
        return left

    class Budgeted(base):  # type: ignore[misc, valid-type]
        def connect(self, *args: Any, **kwargs: Any) -> Any:
            left = spend()
            if left is None or self._sock is not None:
                return super().connect(*args, **kwargs)
            connect_timeout, timeout = self.socket_connect_timeout, self.socket_timeout
            self.socket_connect_timeout = _cut(connect_timeout, left)
            try:
                return super().connect(*args, **kwargs)
            finally:
                self.socket_connect_timeout = connect_timeout
                self.socket_timeout = timeout

        def _within(self, call: Any, *args: Any, **kwargs: Any) -> Any:
            left = spend()
            sock = self._sock
            if left is None or sock is None:
                return call(*args, **kwargs)
            sock.settimeout(_cut(self.socket_timeout, left))
            try:
                return call(*args, **kwargs)
            finally:
                if self._sock is sock:
                    sock.settimeout(self.socket_timeout)

        def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
            self.connect()  # (a no-op when connected) so that the send's own timeout is cut too
            return self._within(super().send_packed_command, *args, **kwargs)

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            return self._within(super().read_response, *args, **kwargs)

    Budgeted.__name__ = Budgeted.__qualname__ = f"Budgeted{base.__name__}"
    return Budgeted


def within_budget(kwargs: dict[str, Any], retries: int) -> dict[str, Any]:
    """``redis.Redis``/``ConnectionPool`` keyword arguments (``redis.connection.parse_url``'s, or
    host/port/ssl) with a budgeted connection class and ``retries`` quick retries (exponential,
    50 ms doubling to 1 s) that stop at the budget. Always names ``connection_class``: build a
    ``ConnectionPool`` from the result."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    class BudgetedBackoff(ExponentialBackoff):
        def compute(self, failures: int) -> float:
            left = time_left()
            return super().compute(failures) if left is None else min(super().compute(failures), left)

    kwargs = dict(kwargs)
    base = kwargs.pop("connection_class", None)
    if base is None:
        base = redis.SSLConnection if kwargs.pop("ssl", False) else redis.Connection
    kwargs["connection_class"] = _budgeted(base)
    kwargs["retry"] = Retry(BudgetedBackoff(cap=1.0, base=0.05), retries)
    return kwargs
