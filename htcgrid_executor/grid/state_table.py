"""The task state table and queue, in Redis: the one writer of task states.

Every transition of :data:`htcgrid_executor.states.TRANSITIONS` is one Lua script (in :mod:`.lua_scripts`), so
each is atomic and checks its legal source state itself; nothing else in the package writes a
task's state. A script does a bounded amount of work (see ``SUBMIT_CHUNK``): a big submit or
cancel is a series of them, each atomic for its tasks. Times are Redis's clock (``TIME``), so
agents on other machines agree on leases.

Layout (each key starts with :data:`PREFIX`; data-plane keys are bare, as a deployment writes
them). This module is the only code that knows it: the Lua (:mod:`.lua_scripts`) is given it
by :func:`_lua_header`, and agents, routes and the dashboard call the methods below.

- ``task:<tid>`` hash, only while the task is not terminal: state, owner, retries
- ``session:<sid>`` hash: count, priority, listener, max_retries, timeout_ms, submitted_ms,
  and counters processing, finished, failed, cancelled; created (tasks a submit created so far)
  and, after a cancel stopped a submit half way, uncreated (its walk over the tasks never created);
  cancelling, once a cancel of the session began
- ``session:<sid>:events`` stream: one entry per task that reached a terminal state, one field
  ``e`` = ``"<state> <task id> <reason>"`` (one field, not three: streams are read in bulk)
- ``listener:<lid>`` stream: every change (processing and terminal) of that listener's sessions
- ``queue:<priority>`` list and ``queues`` zset of priorities; ``leases`` zset tid -> expiry ms
- ``agents`` zset agent -> registration expiry; ``agent:<id>:cancelled`` list; ``doorbell`` list
- ``agent:<id>:stats`` hash: the agent's counters (tasks claimed, claims, runner restarts,
  heartbeats), written at its heartbeat, expiring when the agent is gone (see ``agent.py``)
- ``swept_ms`` string: Redis time of the TTL checker's last sweep (a long gap means a stall)

A terminal task's hash is deleted at once (its outcome lives in the session's stream), and a
session's keys, data-plane keys included, expire ``retention`` after its last task ended: the
state table never grows without bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from ..states import TaskState
from ..wire import INPUT_SUFFIX, OUTPUT_SUFFIX, PAYLOAD_SUFFIX, output_key, payload_key
from . import lua_scripts
from .output_reads import OutputReads
from .redis_refusals import redis_refusal

__all__ = ["StateTable", "Claim", "Event", "PREFIX", "MAX_PRIORITY"]

PREFIX = "htcgrid:"  # of every control-plane key (the Redis ACLs of redis_server.py use it too)
_STATES = {state.value: state for state in TaskState}  # a dict lookup: reads parse many events
MAX_PRIORITY = 1_000_000

# The most work one script call does, so that no script holds Redis for long, whatever the size of
# a request or a session: Redis runs one script at a time, agents' heartbeats and claims wait
# behind it, and past lua-time-limit every other client gets BUSY. Measured on Redis 6.2 (2 busy
# cores): a submit chunk takes about 20 ms (80 at worst), a cancel chunk 20 ms (120), a claim that
# skips that many cancelled entries 6 ms (45); one script for a 1M-task submit took 4.6 s, for a
# cancel 10.8 s, and a claim behind that cancel 2 s. Smaller chunks cost more in all on a loaded
# machine (each call waits for the client to be scheduled: 1M tasks at 2000 a call took 8 s, at
# 5000 5.7 s, at 20000 4.2 s), bigger ones hold Redis longer.
SUBMIT_CHUNK = 5000  # tasks created by one submit call
CANCEL_CHUNK = 2000  # tasks cancelled by one cancel call
CLAIM_LOOK = 5000  # queue entries one claim call looks at (cancelled tasks stay queued until then)


# The control-plane keys: kind -> (name of its key in the Lua, key after PREFIX; "{}" takes the name)
_LAYOUT = {
    "task": ("task_key", "task:{}"),
    "session": ("session_key", "session:{}"),
    "session_events": ("events_key", "session:{}:events"),
    "listener": ("listener_key", "listener:{}"),
    "queue": ("queue_key", "queue:{}"),
    "agent_cancelled": ("cancelled_key", "agent:{}:cancelled"),
    "agent_stats": ("stats_key", "agent:{}:stats"),
    "queues": ("QUEUES_KEY", "queues"),
    "leases": ("LEASES_KEY", "leases"),
    "agents": ("AGENTS_KEY", "agents"),
    "doorbell": ("DOORBELL_KEY", "doorbell"),
    "swept_ms": ("SWEPT_KEY", "swept_ms"),
}


def _key_for(kind: str, name: str = "") -> str:
    """The control-plane key of ``kind`` (see ``_LAYOUT``) for ``name``."""
    return PREFIX + _LAYOUT[kind][1].replace("{}", name)


def _lua_string(text: str) -> str:
    if "'" in text or "\\" in text or "\n" in text:
        raise ValueError(f"not a plain Lua string: {text!r}")
    return f"'{text}'"


def _lua_header() -> str:
    """The Lua definitions every script starts with, formatted from the Python constants: the
    key layout, the data-plane keys and the task states (see :mod:`.lua_scripts`)."""
    lines = []
    for lua_name, template in _LAYOUT.values():
        head, hole, tail = (PREFIX + template).partition("{}")
        if hole:
            end = f" .. {_lua_string(tail)}" if tail else ""
            lines.append(f"local function {lua_name}(name) return {_lua_string(head)} .. name{end} end")
        else:
            lines.append(f"local {lua_name} = {_lua_string(head)}")
    for lua_name, suffix in (("input_key", INPUT_SUFFIX), ("output_key", OUTPUT_SUFFIX),
                             ("payload_key", PAYLOAD_SUFFIX)):
        lines.append(f"local function {lua_name}(name) return name .. {_lua_string(suffix)} end")
    lines += [f"local {state.name} = {_lua_string(state.value)}" for state in TaskState]
    return "\n".join(lines) + "\n"


_HEADER = _lua_header()


@dataclass(frozen=True)
class Claim:
    """A task an agent now owns; ``timeout_ms`` is its time limit (0: none).

    ``task_input`` is its ``<task_id>-input``, read by the claim itself when it is at most the
    claim's ``inline_bytes`` long; else None, and ``input_length`` is its length (0: missing or
    empty), for the agent to read it as big inputs are read."""

    task_id: str
    timeout_ms: int
    task_input: bytes | None = None
    input_length: int = 0


@dataclass(frozen=True)
class Event:
    """One entry of a session's or a listener's stream."""

    cursor: str
    task_id: str
    state: TaskState
    reason: str


class StateTable:
    """Python face of the Lua transitions. ``client`` is a redis-py client (decode_responses off).

    ``retention_sec``: how long a session's keys, data-plane keys included, live after its last
    task ended.
    """

    def __init__(self, client: redis.Redis, *, retention_sec: float = 3600.0) -> None:
        self.redis = client
        self.retention_ms = int(retention_sec * 1000)
        #: why Redis refused the last write of this table (full memory or disk), until a TTL
        #: sweep, which writes every time, succeeds again; None while writes succeed
        self.write_refusal: str | None = None
        self._scripts = {
            name: client.register_script(_HEADER + lua_scripts.PRELUDE + getattr(lua_scripts, name.upper()))
            for name in ("submit", "claim", "heartbeat", "complete", "release", "expire", "expire_due",
                         "fail", "cancel")
        }
        self._starting_with = client.register_script(lua_scripts.STARTING_WITH)
        self.output_reads = OutputReads(client)  # /result's inline_outputs

    def _run(self, name: str, *args: Any) -> Any:
        try:
            return self._scripts[name](args=[self.retention_ms, *args])
        except redis.exceptions.ResponseError as exc:
            refusal = redis_refusal(exc)
            if refusal is not None and refusal[0] == 507:
                self.write_refusal = refusal[1]
            raise

    # -- submit -------------------------------------------------------------------------------
    def submit(self, session_id: str, count: int, *, priority: int = 0, max_retries: int = 5,
               timeout_ms: int = 0, listener: str = "",
               inline: tuple[bytes, Sequence[bytes]] | None = None) -> bool:
        """Create a session of ``count`` pending tasks ``<sid>_<i>`` and queue them.

        ``inline``: the session's payload and its ``count`` inputs, written to their data-plane
        keys by the script that creates the session (so that no agent claims a task before its
        input is there); not written when the session exists already.

        The tasks are created :data:`SUBMIT_CHUNK` at a time, one short script each, so that
        agents go on heart-beating and claiming meanwhile (they may start the first tasks before
        the last are queued). Returns False when the session exists already: a repeated submit
        creates no task twice; it only goes on where an earlier one stopped (a Redis failure half
        way raises, and the client's retry of its request completes the session), with the
        session's own count and settings. Raises redis errors (see :func:`redis_refusal`).
        """
        fresh = None
        values = [] if inline is None else [inline[0], *inline[1]]
        while True:
            created, left = self._run("submit", session_id, count, priority, max_retries, timeout_ms,
                                      listener, SUBMIT_CHUNK, *values)
            values = []  # the first script wrote them, or found the session made by an earlier try
            if fresh is None:
                fresh = bool(created)
            if not left:
                return fresh

    # -- agents -------------------------------------------------------------------------------
    def claim(self, agent: str, max_batch: int, lease_ms: int, inline_bytes: int = 0) -> list[Claim]:
        """Take up to ``max_batch`` pending tasks, highest priority first; fewer when the queue
        is shallow, so that live agents share it. The tasks are now ``processing``, owned by
        ``agent``, with a lease of ``lease_ms``. Each input of at most ``inline_bytes`` comes
        with its claim (:attr:`Claim.task_input`), in the same round trip."""
        return self.claim_and_look(agent, max_batch, lease_ms, inline_bytes)[0]

    def claim_and_look(self, agent: str, max_batch: int, lease_ms: int,
                       inline_bytes: int = 0) -> tuple[list[Claim], bool]:
        """:meth:`claim`, and whether it left queue entries behind. When it left none, work
        queued later rings the doorbell (submits and requeues do): the agent may wait on it
        after its batch instead of claiming an empty queue."""
        while True:  # each call looks at CLAIM_LOOK queue entries at most
            more, left, *flat = self._run("claim", agent, max_batch, lease_ms, CLAIM_LOOK, inline_bytes)
            claims = [Claim(flat[i].decode(), int(flat[i + 1]), flat[i + 3], int(flat[i + 2]))
                      for i in range(0, len(flat), 4)]
            if claims or not more:
                return claims, bool(left)

    def heartbeat(self, agent: str, task_ids: list[str], lease_ms: int) -> list[str]:
        """Extend the leases of ``task_ids`` (and the agent's registration); return the ones the
        agent no longer owns (cancelled, or expired and given to another agent): stop them."""
        return [t.decode() for t in self._run("heartbeat", agent, lease_ms, *task_ids)]

    def complete(self, agent: str, outputs: dict[str, bytes]) -> list[str]:
        """Write each output and finish the task, only where ``agent`` still owns it.
        Returns the task ids that were finished."""
        args: list[Any] = [agent]
        for task_id, output in outputs.items():
            args += [task_id, output]
        return [t.decode() for t in self._run("complete", *args)]

    def release(self, agent: str, task_ids: list[str]) -> int:
        """Give claimed, never-started tasks back to the front of their queue (no retry counted)."""
        if not task_ids:
            return 0
        return int(self._run("release", agent, *task_ids))

    def lose(self, agent: str, task_id: str, reason: str) -> TaskState | None:
        """The agent's runner died while running ``task_id``: retry it or fail it past the limit."""
        state = self._run("expire", agent, reason, task_id)
        return TaskState(state.decode()) if state else None

    def fail(self, agent: str, task_id: str, reason: str) -> bool:
        """Fail a task its agent gives up on (time limit, output refused), with ``reason``; not
        retried. Only the owner of a task still processing may."""
        return bool(self._run("fail", agent, reason, task_id))

    def unregister(self, agent: str) -> None:
        self.redis.zrem(_key_for("agents"), agent)

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until the doorbell rings (submits, and claims that left work, ring it) or for
        ``timeout`` seconds."""
        self.redis.blpop([_key_for("doorbell")], timeout=timeout)

    def ring_doorbell(self, tokens: int) -> None:
        """Wake up to ``tokens`` waiting agents (each wait takes one token)."""
        if tokens > 0:
            self.redis.lpush(_key_for("doorbell"), *["1"] * tokens)

    def take_cancellations(self, agent: str, timeout: float) -> set[str]:
        """The task ids cancelled (by ``cancel``) from ``agent`` since its last call, waiting up
        to ``timeout`` seconds for the first; :meth:`wake_watcher` ends the wait early."""
        key = _key_for("agent_cancelled", agent)
        item = self.redis.blpop([key], timeout=timeout)
        if item is None:
            return set()
        more = self.redis.lpop(key, 1000) or []
        return {item[1].decode(), *(t.decode() for t in more)} - {""}

    def wake_watcher(self, agent: str) -> None:
        """End a :meth:`take_cancellations` wait of ``agent`` at once (an empty id is no task)."""
        self.redis.rpush(_key_for("agent_cancelled", agent), "")

    def publish_agent_counters(self, agent: str, counters: dict[str, int], ttl_sec: int) -> None:
        """Write an agent's counters to its stats hash, which expires ``ttl_sec`` after the last
        write (one round trip)."""
        key = _key_for("agent_stats", agent)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=counters)
        pipe.expire(key, ttl_sec)
        pipe.execute()

    def agent_counters(self) -> dict[str, dict[str, int]]:
        """Each registered agent's counters as it last published them (agents that published
        none are left out), in one pipelined read."""
        agents = [a.decode() for a in self.redis.zrange(_key_for("agents"), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for agent in agents:
            pipe.hgetall(_key_for("agent_stats", agent))
        return {agent: {k.decode(): int(v) for k, v in found.items()}
                for agent, found in zip(agents, pipe.execute(), strict=True) if found}

    # -- TTL checker ----------------------------------------------------------------------------
    def expire_due(self, limit: int = 1000, *, stall_ms: int = 0, grace_ms: int = 0) -> int:
        """Retry (or fail, past the limit) up to ``limit`` tasks whose heartbeat lease has expired;
        returns how many. With ``stall_ms``: when the sweep before was longer ago than that, no
        lease is taken; each one that ran out gets ``grace_ms`` more, and the answer is -1."""
        handled = int(self._run("expire_due", limit, stall_ms, grace_ms))
        self.write_refusal = None
        return handled

    # -- cancel -------------------------------------------------------------------------------
    def cancel_sessions(self, session_ids: list[str]) -> dict[str, dict[str, int]]:
        """Cancel every pending and processing task of each session (seed's answer shape).

        A session is walked :data:`CANCEL_CHUNK` tasks at a time, one short script each, with
        the outcome of one step: from the first, no task of the session is claimed or finished;
        a running task is cancelled as processing when the walk reaches it (its agent is told to
        stop it), and a submit of the session still creating tasks stops (those it had not
        created count as cancelled pending). Raises redis errors; a repeated cancel finishes what
        a failed one began and counts no task twice.
        """
        answer = {}
        for sid in session_ids:
            pending = processing = 0
            start = 0
            while start >= 0:
                more_pending, more_processing, start = self._run("cancel", "session", sid, start, CANCEL_CHUNK)
                pending += more_pending
                processing += more_processing
            answer[sid] = _counts(pending, processing)
        return answer

    def cancel_tasks(self, task_ids: list[str]) -> dict[str, int]:
        """Cancel those of ``task_ids`` still pending or processing, :data:`CANCEL_CHUNK` per script."""
        pending = processing = 0
        for at in range(0, len(task_ids), CANCEL_CHUNK):
            more_pending, more_processing, _ = self._run("cancel", "tasks", *task_ids[at:at + CANCEL_CHUNK])
            pending += more_pending
            processing += more_processing
        return _counts(pending, processing)

    def cancel_pending_tasks(self, task_ids: list[str]) -> tuple[list[str], list[str]]:
        """Cancel those of ``task_ids`` still pending (no agent has claimed them, so none ever
        runs), :data:`CANCEL_CHUNK` per script, and leave the others as they are. Returns those
        others: ``(claimed, ended)``, claimed by an agent (processing), and no longer in the
        table (finished, failed, cancelled) or never in it."""
        claimed: list[str] = []
        ended: list[str] = []
        for at in range(0, len(task_ids), CANCEL_CHUNK):
            _, _, _, more_claimed, more_ended = self._run("cancel", "unclaimed", *task_ids[at:at + CANCEL_CHUNK])
            claimed += [t.decode() for t in more_claimed]
            ended += [t.decode() for t in more_ended]
        return claimed, ended

    # -- reads ----------------------------------------------------------------------------------
    def session_info(self, session_id: str) -> dict[str, int] | None:
        """Counts per state of a session, or None if it is unknown (or expired)."""
        raw = self.redis.hgetall(_key_for("session", session_id))
        if not raw:
            return None
        info = {k.decode(): v.decode() for k, v in raw.items()}
        count = int(info["count"])
        ended = sum(int(info.get(s, 0)) for s in ("finished", "failed", "cancelled"))
        processing = int(info.get("processing", 0))
        return {
            "count": count,
            "pending": count - ended - processing,
            "processing": processing,
            "finished": int(info.get("finished", 0)),
            "failed": int(info.get("failed", 0)),
            "cancelled": int(info.get("cancelled", 0)),
            "priority": int(info.get("priority", 0)),
        }

    def task_state(self, task_id: str) -> TaskState | None:
        """Current state of a non-terminal task (terminal tasks: read the session's events)."""
        state = self.redis.hget(_key_for("task", task_id), "state")
        return TaskState(state.decode()) if state else None

    def session_exists(self, session_id: str) -> bool:
        """Whether the session was submitted and has not expired."""
        return bool(self.redis.exists(_key_for("session", session_id)))

    def read_submission(self, session_id: str) -> bytes | None:
        """The session's ``<session_id>-payload`` as the client wrote it (None: not there)."""
        return self.redis.get(payload_key(session_id))

    def read_session_events(self, session_id: str, after: str | None, block_ms: int = 0,
                            count: int = 100_000) -> list[Event]:
        """The session's terminal events after cursor ``after`` (see :meth:`_read_events`)."""
        return self._read_events(_key_for("session_events", session_id), after, block_ms, count)

    def read_listener_events(self, listener: str, after: str | None, block_ms: int = 0,
                             count: int = 100_000) -> list[Event]:
        """Every change of the listener's sessions after cursor ``after`` (see :meth:`_read_events`)."""
        return self._read_events(_key_for("listener", listener), after, block_ms, count)

    def _read_events(self, stream_key: str, after: str | None, block_ms: int = 0,
                     count: int = 100_000) -> list[Event]:
        """Entries of a stream after cursor ``after`` ('0' or None: from the start), waiting up
        to ``block_ms`` for the first one when there is none yet."""
        after = after or "0"
        if block_ms > 0:
            return _events(self.redis.xread({stream_key: after}, count=count, block=block_ms))
        return _events([(stream_key, self.redis.xrange(stream_key, min=f"({after}" if after != "0" else "-",
                                                        count=count))])

    def read_listener_events_and_outputs(self, listener: str, after: str, block_ms: int, task_ids: list[str],
                                         budget: int, cap: int) -> tuple[list[Event], dict[str, bytes]]:
        """:meth:`read_listener_events` (``block_ms`` > 0) and, in the same round trip (a pipeline),
        :meth:`.OutputReads.within` of ``task_ids`` once the wait is over: for tasks expected to
        finish during it. Outputs of tasks that finished just after the XREAD may be among them."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xread({_key_for("listener", listener): after}, count=100_000, block=block_ms)
        self.output_reads.queue(pipe, task_ids, budget, cap)
        found, outputs = pipe.execute(raise_on_error=False)
        if isinstance(found, Exception):
            raise found
        return _events(found), self.output_reads.result(outputs, task_ids, budget, cap)

    def trim_listener(self, listener: str, before: str) -> None:
        """Drop a listener's entries older than ``before`` (the client has read them)."""
        if before and before != "0":
            self.redis.xtrim(_key_for("listener", listener), minid=before)

    # -- reads for the dashboard (none of them writes) ----------------------------------------
    def time_ms(self) -> int:
        """Redis's clock in ms: the clock of stream ids, leases and agent registrations."""
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def scan_sessions(self, cursor: int = 0, count: int = 10_000) -> tuple[int, list[str]]:
        """One step of a SCAN of the keyspace for session hashes: ``(next cursor, session ids)``,
        about ``count`` keys looked at; the cursor is 0 again when the whole keyspace was seen.
        (No index of sessions is kept, as nothing but the transitions writes; a caller spreads
        the scan of a big keyspace over time.)"""
        prefix = _key_for("session")
        cursor, keys = self.redis.scan(cursor, match=prefix + "*", count=count, _type="HASH")
        return int(cursor), [key.decode()[len(prefix):] for key in keys]

    def newest_queued_sessions(self) -> set[str]:
        """The session of the last task of each priority's queue: a session just submitted
        (submit appends its tasks there), found without a scan."""
        priorities = self.redis.zrange(_key_for("queues"), 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for priority in priorities:
            pipe.lindex(_key_for("queue", priority.decode()), -1)
        return {task_id.decode().rpartition("_")[0] for task_id in pipe.execute() if task_id}

    def sessions_overview(self, session_ids: list[str]) -> dict[str, dict[str, int]]:
        """:meth:`session_info` of each session plus its ``submitted_ms``, in one round trip;
        sessions that are gone (expired meanwhile) are left out."""
        pipe = self.redis.pipeline(transaction=False)
        for sid in session_ids:
            pipe.hgetall(_key_for("session", sid))
        overview = {}
        for sid, raw in zip(session_ids, pipe.execute(), strict=True):
            if not raw:
                continue
            info = {name: int(raw.get(name.encode(), 0)) for name in (
                "count", "processing", "finished", "failed", "cancelled", "priority", "submitted_ms")}
            ended = info["finished"] + info["failed"] + info["cancelled"]
            info["pending"] = info["count"] - ended - info["processing"]
            overview[sid] = info
        return overview

    def agent_registrations(self) -> dict[str, int]:
        """Every registered agent → when its registration expires (ms, Redis clock; each
        heartbeat moves it to then + the agent's lease), expired ones included."""
        return {agent.decode(): int(expiry)
                for agent, expiry in self.redis.zrange(_key_for("agents"), 0, -1, withscores=True)}

    def processing_owners(self) -> dict[str, str]:
        """Every processing task (those holding a lease) → the agent that owns it."""
        task_ids = [t.decode() for t in self.redis.zrange(_key_for("leases"), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(_key_for("task", task_id), "owner")
        return {task_id: owner.decode() for task_id, owner in zip(task_ids, pipe.execute(), strict=True)
                if owner is not None and owner != b"None"}

    def outputs_starting_with(self, task_ids: list[str], heads: list[bytes]) -> list[str]:
        """The tasks whose stored ``<task_id>-output`` starts with one of ``heads``, checked in
        Redis (a read-only script) so that no result travels to learn it is not wanted."""
        if not task_ids:
            return []
        found = self._starting_with(keys=[output_key(t) for t in task_ids], args=heads)
        return [task_ids[int(i) - 1] for i in found]

    def outputs(self, task_ids: list[str]) -> dict[str, bytes]:
        """Each task's ``<task_id>-output`` as stored (base64), for those that have one."""
        if not task_ids:
            return {}
        return {task_id: raw for task_id, raw in zip(task_ids, self.redis.mget(
            [output_key(t) for t in task_ids]), strict=True) if raw is not None}


def _events(found: list[Any] | None) -> list[Event]:
    """The events of an XREAD answer (``[(stream, entries)]``; None or empty: none)."""
    return [Event(eid.decode(), task_id, _STATES[state], reason) for eid, fields in (found[0][1] if found else [])
            for state, task_id, reason in [fields[b"e"].decode().split(" ", 2)]]


def _counts(pending: int, processing: int) -> dict[str, int]:
    return {
        "cancelled_pending": pending,
        "cancelled_processing": processing,
        "total_cancelled_tasks": pending + processing,
    }
