"""Reads of the stored ``<task_id>-output`` values for ``/result``'s ``inline_outputs``: within a
byte budget, checked in Redis (a read-only script) so that a value past the limits never leaves
it, alone or queued on a pipeline after another command."""

from __future__ import annotations

from typing import Any

import redis

from ..wire import output_key
from . import lua_scripts

__all__ = ["OutputReads"]


class OutputReads:
    """The budgeted output reads over ``client`` (a redis-py client, decode_responses off)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(lua_scripts.WITHIN_BUDGET)

    def within(self, task_ids: list[str], budget: int, cap: int) -> dict[str, bytes]:
        """The stored outputs of ``task_ids``, taken in order as long as they fit (each at most
        ``cap`` bytes, ``budget`` bytes in all), in one round trip. Missing values and those past
        the limits are left out."""
        if not task_ids or budget <= 0:
            return {}
        values = self._script(keys=[output_key(t) for t in task_ids], args=[budget, cap])
        return _found(task_ids, values)

    def queue(self, pipe: Any, task_ids: list[str], budget: int, cap: int) -> None:
        """Queue :meth:`within`'s read on ``pipe``; :meth:`result` reads its answer."""
        keys = [output_key(t) for t in task_ids]
        # evalsha, not the Script object: a pipeline holding one first asks Redis whether it
        # has the script, a round trip of its own
        pipe.evalsha(self._script.sha, len(keys), *keys, budget, cap)

    def result(self, answer: Any, task_ids: list[str], budget: int, cap: int) -> dict[str, bytes]:
        """What :meth:`within` gives, from the answer of a read :meth:`queue` put on a pipeline
        run with ``raise_on_error=False``; raises a redis error that answer holds."""
        if isinstance(answer, redis.exceptions.NoScriptError):  # Redis lost its scripts (restarted)
            return self.within(task_ids, budget, cap)
        if isinstance(answer, Exception):
            raise answer
        return _found(task_ids, answer)


def _found(task_ids: list[str], values: list[bytes | None]) -> dict[str, bytes]:
    return {task_id: value for task_id, value in zip(task_ids, values, strict=True) if value is not None}
