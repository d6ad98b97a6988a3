"""Task states and the one table of the transitions between them.

The state table in Redis (``grid/state_table.py``) is the only writer of a task's state: one Lua
script per :class:`Transition`, each checking its legal source states itself. The hypothesis
state machine over those scripts (``tests/grid/test_state_table_stateful.py``) checks every
change it sees against :data:`TRANSITIONS`. This module is pure, so that the client, the tests and
the docs read the same lifecycle::

    (new) ──submit──▶ pending ──claim──▶ processing ──complete──▶ finished
                        ▲  ▲                 │  │
                        │  └─────release─────┘  ├──expire (retries left)──▶ pending
                        │                       ├──expire (no retries left)▶ failed
                        │                       └──fail (time limit, output refused)▶ failed
                  pending, processing ──cancel──▶ cancelled
"""

from __future__ import annotations

import enum

__all__ = ["TaskState", "TERMINAL_STATES", "TRANSITIONS", "Transition", "is_allowed"]


class TaskState(str, enum.Enum):
    """A task's state, stored in Redis as its value (the deployment's names)."""

    PENDING = "pending"  # queued, owned by nobody
    PROCESSING = "processing"  # claimed by an agent that heart-beats it
    FINISHED = "finished"  # the worker function returned (or raised: its error document is the output)
    FAILED = "failed"  # the grid gave up: worker lost past the retry limit, or time limit
    CANCELLED = "cancelled"  # cancelled while pending or processing

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED})


class Transition(str, enum.Enum):
    """The named steps of the lifecycle; each is one atomic script in the state table."""

    SUBMIT = "submit"
    CLAIM = "claim"
    HEARTBEAT = "heartbeat"
    COMPLETE = "complete"
    RELEASE = "release"  # an agent gives a claimed task back unrun (its runner was stopped for another task)
    EXPIRE = "expire"  # its worker was lost: heartbeat expired (TTL checker) or the runner process died
    FAIL = "fail"  # the agent gives up on a task it runs: over its time limit, or its output was
    # refused by the data plane (full); failed with the reason, not retried
    CANCEL = "cancel"


_P, _R = TaskState.PENDING, TaskState.PROCESSING

#: transition -> (allowed source states, resulting states)
TRANSITIONS: dict[Transition, tuple[frozenset[TaskState | None], frozenset[TaskState]]] = {
    Transition.SUBMIT: (frozenset({None}), frozenset({_P})),
    Transition.CLAIM: (frozenset({_P}), frozenset({_R})),
    Transition.HEARTBEAT: (frozenset({_R}), frozenset({_R})),
    Transition.COMPLETE: (frozenset({_R}), frozenset({TaskState.FINISHED})),
    Transition.RELEASE: (frozenset({_R}), frozenset({_P})),
    Transition.EXPIRE: (frozenset({_R}), frozenset({_P, TaskState.FAILED})),
    Transition.FAIL: (frozenset({_R}), frozenset({TaskState.FAILED})),
    Transition.CANCEL: (frozenset({_P, _R}), frozenset({TaskState.CANCELLED})),
}


def is_allowed(transition: Transition, source: TaskState | None, target: TaskState) -> bool:
    """True when ``transition`` may move a task from ``source`` (None: not yet created) to ``target``."""
    sources, targets = TRANSITIONS[transition]
    return source in sources and target in targets
