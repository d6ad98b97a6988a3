"""The task state table and queue, in Redis: the one writer of task states.

Every transition of :data:`htcgrid_executor.states.TRANSITIONS` is one Lua script below, so
each is atomic and checks its legal source state itself; nothing else in the package writes a
task's state. Times are Redis's clock (``TIME``), so agents on other machines agree on leases.

Layout (prefix ``htcgrid:``; data-plane keys are bare, as a deployment writes them):

- ``task:<tid>`` hash, only while the task is not terminal: state, owner, retries
- ``session:<sid>`` hash: count, priority, listener, max_retries, timeout_ms, submitted_ms,
  and counters processing, finished, failed, cancelled
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

import re
from dataclasses import dataclass
from typing import Any

import redis

from ..states import TaskState
from ..wire import output_key

__all__ = ["StateTable", "Claim", "Event", "PREFIX", "key_for", "redis_refusal"]

PREFIX = "htcgrid:"
_STATES = {state.value: state for state in TaskState}  # a dict lookup: reads parse many events
MAX_PRIORITY = 1_000_000


def key_for(kind: str, name: str = "") -> str:
    """The control-plane key of ``kind`` ('task', 'session', 'session_events', 'listener',
    'queue', 'agent_cancelled', 'agent_stats') for ``name``; keys with no name ('queues', 'leases', ...)."""
    return {
        "task": f"{PREFIX}task:{name}",
        "session": f"{PREFIX}session:{name}",
        "session_events": f"{PREFIX}session:{name}:events",
        "listener": f"{PREFIX}listener:{name}",
        "queue": f"{PREFIX}queue:{name}",
        "agent_cancelled": f"{PREFIX}agent:{name}:cancelled",
        "agent_stats": f"{PREFIX}agent:{name}:stats",
        "queues": f"{PREFIX}queues",
        "leases": f"{PREFIX}leases",
        "agents": f"{PREFIX}agents",
        "doorbell": f"{PREFIX}doorbell",
    }[kind]


# Redis refusals that are not an outage. The reason is the error's first word, after the
# "-" of a command's error inside a script's error; redis-py strips the word of an OOM error.
_REFUSAL = re.compile(r"(?:^|-)(MISCONF|OOM|BUSY|LOADING) ")
_REFUSALS = {
    "MISCONF": (507, "the grid's Redis cannot save its data and refuses writes (MISCONF: is its disk full?)"),
    "OOM": (507, "the grid's Redis is out of memory and refuses writes (OOM: maxmemory reached)"),
    "BUSY": (503, "the grid's Redis is busy running a long script; try again"),
    "LOADING": (503, "the grid's Redis is loading its data after a restart; try again"),
}


def redis_refusal(exc: BaseException) -> tuple[int, str] | None:
    """``(status, message)`` for a Redis error that says Redis refuses work rather than that
    it cannot be reached: 507 when it refuses writes (full memory or disk), 503 when it is busy
    or loading; None for any other error."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        word = "OOM"
    elif isinstance(exc, redis.exceptions.BusyLoadingError):
        word = "LOADING"
    else:
        match = _REFUSAL.search(str(exc))
        if match is None:
            return None
        word = match.group(1)
    status, message = _REFUSALS[word]
    return status, f"{message}: {exc}"


@dataclass(frozen=True)
class Claim:
    """A task an agent now owns; ``timeout_ms`` is its time limit (0: none)."""

    task_id: str
    timeout_ms: int


@dataclass(frozen=True)
class Event:
    """One entry of a session's or a listener's stream."""

    cursor: str
    task_id: str
    state: TaskState
    reason: str


# Shared by every script: key names, the clock, and how a change is announced. Every script
# takes the retention period as ARGV[1] and ends with settle(): per-session counters change once
# per script, not once per task.
_PRELUDE = r"""
local P = 'htcgrid:'
local RETENTION = tonumber(ARGV[1])
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function session_of(tid)
  return string.match(tid, '^(.+)_%d+$')
end
local sessions = {}  -- sid -> what this script read of the session, and its counter changes
local function session(sid)
  local s = sessions[sid]
  if not s then
    local key = P .. 'session:' .. sid
    local v = redis.call('HMGET', key, 'listener', 'priority', 'timeout_ms', 'max_retries')
    s = {sid = sid, key = key, listener = v[1] or '', priority = v[2] or '0', timeout = v[3] or '0',
         max_retries = tonumber(v[4] or '5'), delta = {}}
    sessions[sid] = s
  end
  return s
end
local function count(s, field, n)
  s.delta[field] = (s.delta[field] or 0) + n
end
local listeners = {}
-- announce a change on the session's listener stream; terminal ones on the session's stream too
local function announce(s, tid, state, reason, terminal)
  local entry = state .. ' ' .. tid .. ' ' .. reason
  if s.listener ~= '' then
    local lkey = P .. 'listener:' .. s.listener
    redis.call('XADD', lkey, '*', 'e', entry)
    listeners[lkey] = true
  end
  if terminal then
    redis.call('XADD', s.key .. ':events', '*', 'e', entry)
    count(s, state, 1)
    count(s, 'remaining', -1)
    redis.call('DEL', P .. 'task:' .. tid)
    -- data-plane keys of an ended task live for the retention period, then go
    redis.call('PEXPIRE', tid .. '-input', RETENTION)
    redis.call('PEXPIRE', tid .. '-output', RETENTION)
  end
end
-- apply the counter changes; a session whose last task ended expires after the retention period
local function settle()
  for _, s in pairs(sessions) do
    for field, n in pairs(s.delta) do
      if n ~= 0 then
        local value = redis.call('HINCRBY', s.key, field, n)
        if field == 'remaining' and value <= 0 then
          redis.call('PEXPIRE', s.key, RETENTION)
          redis.call('PEXPIRE', s.key .. ':events', RETENTION)
          redis.call('PEXPIRE', s.sid .. '-payload', RETENTION)
        end
      end
    end
  end
  for lkey in pairs(listeners) do redis.call('PEXPIRE', lkey, RETENTION) end
end
local function leave_processing(s, tid)
  redis.call('ZREM', P .. 'leases', tid)
  count(s, 'processing', -1)
end
local function ring_doorbell(tokens)
  local bell = P .. 'doorbell'
  local have = redis.call('LLEN', bell)
  if have < tokens then
    for i = have + 1, tokens do redis.call('LPUSH', bell, '1') end
  end
end
local function requeue(s, tid)  -- to the front of its queue: it has waited already
  redis.call('LPUSH', P .. 'queue:' .. s.priority, tid)
  redis.call('ZADD', P .. 'queues', s.priority, s.priority)
end
-- processing -> pending with one more retry, or failed past the limit (its worker was lost)
local function lose(tid, reason)
  local s = session(session_of(tid))
  local tkey = P .. 'task:' .. tid
  local retries = tonumber(redis.call('HGET', tkey, 'retries') or '0')
  leave_processing(s, tid)
  if retries >= s.max_retries then
    announce(s, tid, 'failed', reason .. ' (gave up after ' .. retries .. ' retries)', true)
    return 'failed'
  end
  redis.call('HSET', tkey, 'state', 'pending', 'owner', 'None', 'retries', retries + 1, 'reason', reason)
  requeue(s, tid)
  ring_doorbell(1)
  announce(s, tid, 'pending', reason, false)
  return 'pending'
end
"""

# ARGV: retention, sid, count, priority, max_retries, timeout_ms, listener -> 1 created, 0 existed
_SUBMIT = r"""
local sid, count, prio = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local skey = P .. 'session:' .. sid
if redis.call('EXISTS', skey) == 1 then return 0 end
redis.call('HSET', skey, 'count', count, 'remaining', count, 'priority', prio, 'max_retries', ARGV[5],
  'timeout_ms', ARGV[6], 'listener', ARGV[7], 'submitted_ms', now_ms(), 'processing', 0,
  'finished', 0, 'failed', 0, 'cancelled', 0)
local queue = P .. 'queue:' .. prio
local batch = {}
for i = 0, count - 1 do
  local tid = sid .. '_' .. i
  redis.call('HSET', P .. 'task:' .. tid, 'state', 'pending', 'owner', 'None', 'retries', 0)
  batch[#batch + 1] = tid
  if #batch == 1000 then redis.call('RPUSH', queue, unpack(batch)); batch = {} end
end
if #batch > 0 then redis.call('RPUSH', queue, unpack(batch)) end
redis.call('ZADD', P .. 'queues', prio, prio)
ring_doorbell(math.min(count, 8))
return 1
"""

# ARGV: retention, agent, max_batch, lease_ms -> flat list tid, timeout_ms, ...
_CLAIM = r"""
local agent, max_batch, lease_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local prios = redis.call('ZREVRANGE', P .. 'queues', 0, -1)
local queued = 0
for _, p in ipairs(prios) do queued = queued + redis.call('LLEN', P .. 'queue:' .. p) end
if queued == 0 then return {} end
-- share a shallow queue fairly between live agents; take a batch only when it is deep
local agents = math.max(1, redis.call('ZCOUNT', P .. 'agents', now, '+inf'))
local want = math.max(1, math.min(max_batch, math.floor(queued / agents)))
local out = {}
local leases = {}
for _, p in ipairs(prios) do
  local queue = P .. 'queue:' .. p
  while want > 0 do
    local ids = redis.call('LPOP', queue, want)
    if not ids then break end
    for _, tid in ipairs(ids) do
      local tkey = P .. 'task:' .. tid
      -- cancelled tasks stay in the queue (LREM is O(n)); they are skipped here
      if redis.call('HGET', tkey, 'state') == 'pending' then
        local s = session(session_of(tid))
        redis.call('HSET', tkey, 'state', 'processing', 'owner', agent)
        leases[#leases + 1] = now + lease_ms
        leases[#leases + 1] = tid
        count(s, 'processing', 1)
        announce(s, tid, 'processing', '', false)
        out[#out + 1] = tid
        out[#out + 1] = s.timeout
        want = want - 1
      end
    end
  end
  if redis.call('LLEN', queue) == 0 then redis.call('ZREM', P .. 'queues', p) end
  if want == 0 then break end
end
if #leases > 0 then redis.call('ZADD', P .. 'leases', unpack(leases)) end
if queued > #out / 2 then ring_doorbell(1) end  -- more left: wake another idle agent
settle()
return out
"""

# ARGV: retention, agent, lease_ms, tid... -> tids this agent no longer owns (cancelled, expired, gone)
_HEARTBEAT = r"""
local agent, lease_ms = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
redis.call('ZADD', P .. 'agents', now + lease_ms, agent)
local lost = {}
for i = 4, #ARGV do
  local tid = ARGV[i]
  local t = redis.call('HMGET', P .. 'task:' .. tid, 'state', 'owner')
  if t[1] == 'processing' and t[2] == agent then
    redis.call('ZADD', P .. 'leases', 'XX', now + lease_ms, tid)
  else
    lost[#lost + 1] = tid
  end
end
return lost
"""

# ARGV: retention, agent, tid, output, tid, output, ... -> tids accepted
_COMPLETE = r"""
local agent = ARGV[2]
local done = {}
for i = 3, #ARGV, 2 do
  local tid = ARGV[i]
  local t = redis.call('HMGET', P .. 'task:' .. tid, 'state', 'owner')
  -- only the owner of a task still processing may finish it: a worker that lost its lease
  -- (and whose task now runs elsewhere) or a cancelled task cannot write an output
  if t[1] == 'processing' and t[2] == agent then
    local s = session(session_of(tid))
    redis.call('SET', tid .. '-output', ARGV[i + 1])
    leave_processing(s, tid)
    announce(s, tid, 'finished', '', true)
    done[#done + 1] = tid
  end
end
settle()
return done
"""

# ARGV: retention, agent, tid... -> number released (claimed but never started: back to the front)
_RELEASE = r"""
local agent = ARGV[2]
local n = 0
for i = #ARGV, 3, -1 do
  local tid = ARGV[i]
  local tkey = P .. 'task:' .. tid
  local t = redis.call('HMGET', tkey, 'state', 'owner')
  if t[1] == 'processing' and t[2] == agent then
    local s = session(session_of(tid))
    leave_processing(s, tid)
    redis.call('HSET', tkey, 'state', 'pending', 'owner', 'None')
    requeue(s, tid)
    announce(s, tid, 'pending', 'released', false)
    n = n + 1
  end
end
if n > 0 then ring_doorbell(1) end
settle()
return n
"""

# ARGV: retention, agent ('' = TTL checker: only if the lease expired), reason, tid -> new state or ''
_EXPIRE = r"""
local agent, reason, tid = ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('HMGET', P .. 'task:' .. tid, 'state', 'owner')
if t[1] ~= 'processing' then redis.call('ZREM', P .. 'leases', tid); return '' end
if agent == '' then
  local expiry = redis.call('ZSCORE', P .. 'leases', tid)
  if expiry and tonumber(expiry) > now_ms() then return '' end
elseif t[2] ~= agent then
  return ''
end
local state = lose(tid, reason)
settle()
return state
"""

# ARGV: retention, limit, stall_ms, grace_ms -> number of tasks whose lease had expired, or -1
# when the sweep before was longer than stall_ms ago: then Redis or the checker stood still (a
# pause, a fork stall, a long script), agents could not heart-beat either, and every lease that
# ran out meanwhile gets grace_ms more instead of being taken from its agent.
_EXPIRE_DUE = r"""
local limit, stall_ms, grace_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local swept = P .. 'swept_ms'
local last = tonumber(redis.call('GET', swept) or '0')
redis.call('SET', swept, now)  -- a write every sweep: a Redis refusing writes shows here at once
if stall_ms > 0 and last > 0 and now - last > stall_ms then
  local late = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now + grace_ms)
  for _, tid in ipairs(late) do redis.call('ZADD', P .. 'leases', 'XX', now + grace_ms, tid) end
  return -1
end
local due = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, limit)
for _, tid in ipairs(due) do
  local t = redis.call('HMGET', P .. 'task:' .. tid, 'state', 'owner')
  if t[1] == 'processing' then
    lose(tid, 'worker ' .. (t[2] or '?') .. ' stopped heart-beating')
  else
    redis.call('ZREM', P .. 'leases', tid)
  end
end
settle()
return #due
"""

# ARGV: retention, agent, reason, tid -> 1 if failed
_FAIL = r"""
local agent, reason, tid = ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('HMGET', P .. 'task:' .. tid, 'state', 'owner')
if t[1] ~= 'processing' or t[2] ~= agent then return 0 end
local s = session(session_of(tid))
leave_processing(s, tid)
announce(s, tid, 'failed', reason, true)
settle()
return 1
"""

# ARGV: retention, mode ('sessions' | 'tasks'), id... -> flat list: per id [pending, processing]
_CANCEL = r"""
local mode = ARGV[2]
local function cancel_one(sid, tid, counts)
  local tkey = P .. 'task:' .. tid
  local t = redis.call('HMGET', tkey, 'state', 'owner')
  local s
  if t[1] == 'pending' then
    s = session(sid)
    counts[1] = counts[1] + 1
  elseif t[1] == 'processing' then
    s = session(sid)
    counts[2] = counts[2] + 1
    leave_processing(s, tid)
    -- tell the agent running it, which BLPOPs this list, to stop the user code now
    local ckey = P .. 'agent:' .. t[2] .. ':cancelled'
    redis.call('RPUSH', ckey, tid)
    redis.call('PEXPIRE', ckey, RETENTION)
  else
    return
  end
  announce(s, tid, 'cancelled', 'cancelled', true)
end
local out = {}
if mode == 'sessions' then
  for i = 3, #ARGV do
    local sid = ARGV[i]
    local counts = {0, 0}
    local count = tonumber(redis.call('HGET', P .. 'session:' .. sid, 'count') or '0')
    for j = 0, count - 1 do cancel_one(sid, sid .. '_' .. j, counts) end
    out[#out + 1] = counts[1]
    out[#out + 1] = counts[2]
  end
else
  local counts = {0, 0}
  for i = 3, #ARGV do
    local sid = session_of(ARGV[i])
    if sid then cancel_one(sid, ARGV[i], counts) end
  end
  out = counts
end
settle()
return out
"""


# KEYS: keys; ARGV: prefixes -> the (1-based) indices of the keys whose value starts with one.
# Read-only: the dashboard's check of outputs, run where the outputs are.
_STARTING_WITH = r"""
local longest = 0
for _, prefix in ipairs(ARGV) do longest = math.max(longest, #prefix) end
local found = {}
for i, key in ipairs(KEYS) do
  local head = redis.call('GETRANGE', key, 0, longest - 1)
  for _, prefix in ipairs(ARGV) do
    if string.sub(head, 1, #prefix) == prefix then found[#found + 1] = i; break end
  end
end
return found
"""


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
            name: client.register_script(_PRELUDE + body)
            for name, body in (
                ("submit", _SUBMIT), ("claim", _CLAIM), ("heartbeat", _HEARTBEAT),
                ("complete", _COMPLETE), ("release", _RELEASE), ("expire", _EXPIRE),
                ("expire_due", _EXPIRE_DUE), ("fail", _FAIL), ("cancel", _CANCEL),
            )
        }
        self._starting_with = client.register_script(_STARTING_WITH)

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
               timeout_ms: int = 0, listener: str = "") -> bool:
        """Create a session of ``count`` pending tasks ``<sid>_<i>`` and queue them.

        Returns False (and changes nothing) when the session exists already: a repeated submit
        is a no-op, so a retried request never runs work twice.
        """
        return bool(self._run("submit", session_id, count, priority, max_retries, timeout_ms, listener))

    # -- agents -------------------------------------------------------------------------------
    def claim(self, agent: str, max_batch: int, lease_ms: int) -> list[Claim]:
        """Take up to ``max_batch`` pending tasks, highest priority first; fewer when the queue
        is shallow, so that live agents share it. The tasks are now ``processing``, owned by
        ``agent``, with a lease of ``lease_ms``."""
        flat = self._run("claim", agent, max_batch, lease_ms)
        return [Claim(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

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
        self.redis.zrem(key_for("agents"), agent)

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
        """Cancel every pending and processing task of each session (seed's answer shape)."""
        if not session_ids:
            return {}
        flat = self._run("cancel", "sessions", *session_ids)
        return {
            sid: _counts(int(flat[2 * i]), int(flat[2 * i + 1])) for i, sid in enumerate(session_ids)
        }

    def cancel_tasks(self, task_ids: list[str]) -> dict[str, int]:
        if not task_ids:
            return _counts(0, 0)
        pending, processing = self._run("cancel", "tasks", *task_ids)
        return _counts(int(pending), int(processing))

    # -- reads ----------------------------------------------------------------------------------
    def session_info(self, session_id: str) -> dict[str, int] | None:
        """Counts per state of a session, or None if it is unknown (or expired)."""
        raw = self.redis.hgetall(key_for("session", session_id))
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
        state = self.redis.hget(key_for("task", task_id), "state")
        return TaskState(state.decode()) if state else None

    def read_events(self, stream_key: str, after: str | None, block_ms: int = 0,
                    count: int = 100_000) -> list[Event]:
        """Entries of a stream after cursor ``after`` ('0' or None: from the start), waiting up
        to ``block_ms`` for the first one when there is none yet."""
        after = after or "0"
        if block_ms > 0:
            found = self.redis.xread({stream_key: after}, count=count, block=block_ms)
            entries = found[0][1] if found else []
        else:
            entries = self.redis.xrange(stream_key, min=f"({after}" if after != "0" else "-",
                                        count=count)
        events = []
        for eid, fields in entries:
            state, task_id, reason = fields[b"e"].decode().split(" ", 2)
            events.append(Event(eid.decode(), task_id, _STATES[state], reason))
        return events

    def trim_listener(self, listener: str, before: str) -> None:
        """Drop a listener's entries older than ``before`` (the client has read them)."""
        if before and before != "0":
            self.redis.xtrim(key_for("listener", listener), minid=before)

    def live_agents(self) -> list[str]:
        import time as _time  # agents register with Redis time; local time is close enough here

        return [a.decode() for a in self.redis.zrangebyscore(key_for("agents"), int(_time.time() * 1000), "+inf")]

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
        prefix = key_for("session")
        cursor, keys = self.redis.scan(cursor, match=prefix + "*", count=count, _type="HASH")
        return int(cursor), [key.decode()[len(prefix):] for key in keys]

    def newest_queued_sessions(self) -> set[str]:
        """The session of the last task of each priority's queue: a session just submitted
        (submit appends its tasks there), found without a scan."""
        priorities = self.redis.zrange(key_for("queues"), 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for priority in priorities:
            pipe.lindex(key_for("queue", priority.decode()), -1)
        return {task_id.decode().rpartition("_")[0] for task_id in pipe.execute() if task_id}

    def sessions_overview(self, session_ids: list[str]) -> dict[str, dict[str, int]]:
        """:meth:`session_info` of each session plus its ``submitted_ms``, in one round trip;
        sessions that are gone (expired meanwhile) are left out."""
        pipe = self.redis.pipeline(transaction=False)
        for sid in session_ids:
            pipe.hgetall(key_for("session", sid))
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
                for agent, expiry in self.redis.zrange(key_for("agents"), 0, -1, withscores=True)}

    def processing_owners(self) -> dict[str, str]:
        """Every processing task (those holding a lease) → the agent that owns it."""
        task_ids = [t.decode() for t in self.redis.zrange(key_for("leases"), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(key_for("task", task_id), "owner")
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


def _counts(pending: int, processing: int) -> dict[str, int]:
    return {
        "cancelled_pending": pending,
        "cancelled_processing": processing,
        "total_cancelled_tasks": pending + processing,
    }
