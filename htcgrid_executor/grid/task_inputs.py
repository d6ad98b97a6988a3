"""Task inputs between Redis, an agent and its runner: small ones through the agent, big ones
read by the runner itself.

An input of at most :data:`INLINE_INPUT_BYTES` comes with the claim of its task, read by the
claim script itself (no second round trip for a batch of small tasks). The agent reads the
others after the claim, in one round trip for the batch, but only their first
:data:`SMALL_INPUT_BYTES`: an input that fits comes whole and goes to the runner over the pipe
with its batch, as before. A bigger one (a 200 MB argument) comes as a :class:`BigInput`, its key
and length, and the runner reads it from Redis in pieces when it reaches the task. So the agent
process never holds, copies or pickles a big value: its watcher thread, which heart-beats the
agent's leases, is never kept from the GIL by one (a lease that lapsed under a 200 MB input
retried, then failed, the task), and a value crosses from Redis to the user's code with one copy
instead of four (Redis -> agent -> pipe -> runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..wire import REDIS_PIECE_BYTES, input_key

if TYPE_CHECKING:  # a runner imports redis only at its first big input: 0.1 s off its start
    import redis

__all__ = ["INLINE_INPUT_BYTES", "SMALL_INPUT_BYTES", "BigInput", "read_inputs", "fetch_big_input"]

#: inputs up to this size come with the claim of their task: a claim of a full batch of them
#: (16) answers a few MB at most, so the script holds Redis for a short copy only
INLINE_INPUT_BYTES = 256 * 1024
#: inputs up to this size travel through the agent with their batch
SMALL_INPUT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class BigInput:
    """Stands in a runner's batch for an input too big to travel through the agent."""

    key: str
    length: int


def read_inputs(client: redis.Redis, task_ids: list[str]) -> list[bytes | BigInput | None]:
    """Each task's ``<task_id>-input`` (None where it is missing or empty), a :class:`BigInput`
    for one over :data:`SMALL_INPUT_BYTES`, in one round trip. Raises redis' errors."""
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.strlen(input_key(task_id))
        pipe.getrange(input_key(task_id), 0, SMALL_INPUT_BYTES - 1)
    answers = pipe.execute()
    found: list[bytes | BigInput | None] = []
    for task_id, length, head in zip(task_ids, answers[::2], answers[1::2], strict=True):
        if not length:
            found.append(None)
        elif length > len(head):
            found.append(BigInput(input_key(task_id), int(length)))
        else:
            found.append(head)
    return found


_clients: dict[str, redis.Redis] = {}  # the runner's own connection, made at its first big input


def fetch_big_input(big: BigInput, redis_url: str) -> bytes | None:
    """In the runner: the input ``big`` stands for, read from the grid's Redis (``redis_url``,
    its agent's) in pieces; None when it is gone (its session was purged meanwhile) or was
    rewritten since the agent looked. Raises redis' errors."""
    client = _clients.get(redis_url)
    if client is None:
        import redis

        client = _clients[redis_url] = redis.Redis.from_url(redis_url, socket_timeout=30)
    pieces = []
    for start in range(0, big.length, REDIS_PIECE_BYTES):
        piece = client.getrange(big.key, start, min(start + REDIS_PIECE_BYTES, big.length) - 1)
        if not piece:
            return None
        pieces.append(piece)
    data = b"".join(pieces)
    return data if len(data) == big.length else None  # rewritten meanwhile: not this task's input
