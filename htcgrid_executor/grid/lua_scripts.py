"""The Lua of the state table's transitions (see :mod:`.state_table`, their only user).

Every script runs after :data:`PRELUDE`, and the prelude after the header that
:mod:`.state_table` formats from its Python constants: the key layout (``task_key(tid)``,
``QUEUES_KEY``, ...), the data-plane keys (``input_key(tid)``, ``output_key(tid)``,
``payload_key(sid)``, from :mod:`..wire`) and the task states (``PENDING``, ``PROCESSING``, ...,
from :class:`~htcgrid_executor.states.TaskState`). No key or state is spelt in the Lua itself.
"""

__all__ = ["PRELUDE", "SUBMIT", "CLAIM", "HEARTBEAT", "COMPLETE", "RELEASE", "EXPIRE", "EXPIRE_DUE", "FAIL", "CANCEL", "STARTING_WITH",
           "WITHIN_BUDGET"]

# Shared by every script: the clock, and how a change is announced. Every script
# takes the retention period as ARGV[1] and ends with settle(): per-session counters change once
# per script, not once per task.
PRELUDE = r"""
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
    local key = session_key(sid)
    local v = redis.call('HMGET', key, 'listener', 'priority', 'timeout_ms', 'max_retries', 'cancelling')
    -- cancelling: a cancel of the session has begun (it walks the tasks in chunks); no task of
    -- it is claimed or finished meanwhile, as if the whole cancel had been one step
    s = {sid = sid, key = key, listener = v[1] or '', priority = v[2] or '0', timeout = v[3] or '0',
         max_retries = tonumber(v[4] or '5'), cancelling = v[5] ~= false, delta = {}}
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
    local lkey = listener_key(s.listener)
    redis.call('XADD', lkey, '*', 'e', entry)
    listeners[lkey] = true
  end
  if terminal then
    redis.call('XADD', events_key(s.sid), '*', 'e', entry)
    count(s, state, 1)
    count(s, 'remaining', -1)
    redis.call('DEL', task_key(tid))
    -- data-plane keys of an ended task live for the retention period, then go
    redis.call('PEXPIRE', input_key(tid), RETENTION)
    redis.call('PEXPIRE', output_key(tid), RETENTION)
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
          redis.call('PEXPIRE', events_key(s.sid), RETENTION)
          redis.call('PEXPIRE', payload_key(s.sid), RETENTION)
        end
      end
    end
  end
  for lkey in pairs(listeners) do redis.call('PEXPIRE', lkey, RETENTION) end
end
local function leave_processing(s, tid)
  redis.call('ZREM', LEASES_KEY, tid)
  count(s, PROCESSING, -1)
end
local function ring_doorbell(tokens)
  local bell = DOORBELL_KEY
  local have = redis.call('LLEN', bell)
  if have < tokens then
    for i = have + 1, tokens do redis.call('LPUSH', bell, '1') end
  end
end
local function requeue(s, tid)  -- to the front of its queue: it has waited already
  redis.call('LPUSH', queue_key(s.priority), tid)
  redis.call('ZADD', QUEUES_KEY, s.priority, s.priority)
end
-- processing -> pending with one more retry, or failed past the limit (its worker was lost)
local function lose(tid, reason)
  local s = session(session_of(tid))
  local tkey = task_key(tid)
  local retries = tonumber(redis.call('HGET', tkey, 'retries') or '0')
  leave_processing(s, tid)
  if retries >= s.max_retries then
    announce(s, tid, FAILED, reason .. ' (gave up after ' .. retries .. ' retries)', true)
    return FAILED
  end
  redis.call('HSET', tkey, 'state', PENDING, 'owner', 'None', 'retries', retries + 1, 'reason', reason)
  requeue(s, tid)
  ring_doorbell(1)
  announce(s, tid, PENDING, reason, false)
  return PENDING
end
"""

# ARGV: retention, sid, count, priority, max_retries, timeout_ms, listener, chunk -> {created, left}:
# created 1 when this call created the session, left = tasks still to create. One call creates at
# most chunk tasks (after the ones the session's 'created' says exist), so a big submit is a
# series of short scripts and Redis serves agents in between; any call, a retried request's
# included, goes on where the last one stopped, with the session's own count and priority.
SUBMIT = r"""
local sid, chunk = ARGV[2], tonumber(ARGV[8])
local skey = session_key(sid)
local fresh = 0
if redis.call('EXISTS', skey) == 0 then
  redis.call('HSET', skey, 'count', ARGV[3], 'remaining', ARGV[3], 'priority', ARGV[4], 'max_retries', ARGV[5],
    'timeout_ms', ARGV[6], 'listener', ARGV[7], 'submitted_ms', now_ms(), 'created', 0, PROCESSING, 0,
    FINISHED, 0, FAILED, 0, CANCELLED, 0)
  fresh = 1
  -- an inline submission (ARGV[9]: the payload, then the inputs in task order) is written with
  -- the session's creation, before any of its tasks is queued, and never over a session's own
  if #ARGV > 8 then
    redis.call('SET', payload_key(sid), ARGV[9])
    for i = 10, #ARGV do
      redis.call('SET', input_key(sid .. '_' .. (i - 10)), ARGV[i])
    end
  end
end
local v = redis.call('HMGET', skey, 'count', 'created', 'priority')
local count = tonumber(v[1])
local from = tonumber(v[2] or v[1])
local upto = math.min(count, from + chunk)
if upto > from then
  local queue = queue_key(v[3])
  local batch = {}
  for i = from, upto - 1 do
    local tid = sid .. '_' .. i
    redis.call('HSET', task_key(tid), 'state', PENDING, 'owner', 'None', 'retries', 0)
    batch[#batch + 1] = tid
    if #batch == 1000 then redis.call('RPUSH', queue, unpack(batch)); batch = {} end
  end
  if #batch > 0 then redis.call('RPUSH', queue, unpack(batch)) end
  redis.call('HSET', skey, 'created', upto)
  redis.call('ZADD', QUEUES_KEY, v[3], v[3])
  ring_doorbell(math.min(upto - from, 8))
end
return {fresh, count - upto}
"""

# ARGV: retention, agent, max_batch, lease_ms, look, inline_bytes -> flat list more, left, tid,
# timeout_ms, length, input, ...: more is 1 when the call stopped after looking at ``look`` queue
# entries (cancelled ones, after a big cancel, can fill a queue) with fewer tasks than wanted: call
# again; left is 1 when queue entries were left (work, or cancelled entries not yet skipped).
# length is the task's input's (0: missing or empty), input the input itself when it is at most
# inline_bytes long, else false: the agent gets small inputs with the claim, in its round trip.
CLAIM = r"""
local agent, max_batch, lease_ms, look = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local inline_bytes = tonumber(ARGV[6])
local now = now_ms()
local prios = redis.call('ZREVRANGE', QUEUES_KEY, 0, -1)
local queued = 0
for _, p in ipairs(prios) do queued = queued + redis.call('LLEN', queue_key(p)) end
if queued == 0 then return {0, 0} end
-- share a shallow queue fairly between live agents; take a batch only when it is deep
local agents = math.max(1, redis.call('ZCOUNT', AGENTS_KEY, now, '+inf'))
local want = math.max(1, math.min(max_batch, math.floor(queued / agents)))
local out = {0, 0}
local leases = {}
for _, p in ipairs(prios) do
  local queue = queue_key(p)
  while want > 0 and look > 0 do
    local ids = redis.call('LPOP', queue, math.min(want, look))
    if not ids then break end
    look = look - #ids
    for _, tid in ipairs(ids) do
      local tkey = task_key(tid)
      -- cancelled tasks stay in the queue (LREM is O(n)); they are skipped here, and so are the
      -- pending tasks of a session being cancelled: that cancel's walk cancels them when it comes
      local s = redis.call('HGET', tkey, 'state') == PENDING and session(session_of(tid))
      if s and not s.cancelling then
        redis.call('HSET', tkey, 'state', PROCESSING, 'owner', agent)
        leases[#leases + 1] = now + lease_ms
        leases[#leases + 1] = tid
        count(s, PROCESSING, 1)
        announce(s, tid, PROCESSING, '', false)
        out[#out + 1] = tid
        out[#out + 1] = s.timeout
        local length = redis.call('STRLEN', input_key(tid))
        out[#out + 1] = length
        out[#out + 1] = length > 0 and length <= inline_bytes and redis.call('GET', input_key(tid))
        want = want - 1
      end
    end
  end
  if redis.call('LLEN', queue) == 0 then redis.call('ZREM', QUEUES_KEY, p) end
  if want == 0 then break end
  if look == 0 then out[1] = 1; break end
end
if #leases > 0 then redis.call('ZADD', LEASES_KEY, unpack(leases)) end
if queued > (#out - 2) / 4 then  -- more left: wake another idle agent
  out[2] = 1
  ring_doorbell(1)
end
settle()
return out
"""

# ARGV: retention, agent, lease_ms, tid... -> tids this agent no longer owns (cancelled, expired, gone)
HEARTBEAT = r"""
local agent, lease_ms = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
redis.call('ZADD', AGENTS_KEY, now + lease_ms, agent)
local lost = {}
for i = 4, #ARGV do
  local tid = ARGV[i]
  local t = redis.call('HMGET', task_key(tid), 'state', 'owner')
  if t[1] == PROCESSING and t[2] == agent then
    redis.call('ZADD', LEASES_KEY, 'XX', now + lease_ms, tid)
  else
    lost[#lost + 1] = tid
  end
end
return lost
"""

# ARGV: retention, agent, tid, output, tid, output, ... -> tids accepted. The output is written
# inside the transition, not before it: only the owner of a task still processing may write one,
# so a worker that lost its lease, or a cancelled task, never overwrites the output a client reads.
COMPLETE = r"""
local agent = ARGV[2]
local done = {}
for i = 3, #ARGV, 2 do
  local tid = ARGV[i]
  local t = redis.call('HMGET', task_key(tid), 'state', 'owner')
  -- only the owner of a task still processing may finish it: a worker that lost its lease
  -- (and whose task now runs elsewhere) or a cancelled task cannot write an output
  local s = t[1] == PROCESSING and t[2] == agent and session(session_of(tid))
  if s and not s.cancelling then
    redis.call('SET', output_key(tid), ARGV[i + 1])
    leave_processing(s, tid)
    announce(s, tid, FINISHED, '', true)
    done[#done + 1] = tid
  end
end
settle()
return done
"""

# ARGV: retention, agent, tid... -> number released (claimed but never started: back to the front)
RELEASE = r"""
local agent = ARGV[2]
local n = 0
for i = #ARGV, 3, -1 do
  local tid = ARGV[i]
  local tkey = task_key(tid)
  local t = redis.call('HMGET', tkey, 'state', 'owner')
  if t[1] == PROCESSING and t[2] == agent then
    local s = session(session_of(tid))
    leave_processing(s, tid)
    redis.call('HSET', tkey, 'state', PENDING, 'owner', 'None')
    requeue(s, tid)
    announce(s, tid, PENDING, 'released', false)
    n = n + 1
  end
end
if n > 0 then ring_doorbell(1) end
settle()
return n
"""

# ARGV: retention, agent ('' = TTL checker: only if the lease expired), reason, tid -> new state or ''
EXPIRE = r"""
local agent, reason, tid = ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('HMGET', task_key(tid), 'state', 'owner')
if t[1] ~= PROCESSING then redis.call('ZREM', LEASES_KEY, tid); return '' end
if agent == '' then
  local expiry = redis.call('ZSCORE', LEASES_KEY, tid)
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
EXPIRE_DUE = r"""
local limit, stall_ms, grace_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local swept = SWEPT_KEY
local last = tonumber(redis.call('GET', swept) or '0')
redis.call('SET', swept, now)  -- a write every sweep: a Redis refusing writes shows here at once
if stall_ms > 0 and last > 0 and now - last > stall_ms then
  local late = redis.call('ZRANGEBYSCORE', LEASES_KEY, '-inf', now + grace_ms)
  for _, tid in ipairs(late) do redis.call('ZADD', LEASES_KEY, 'XX', now + grace_ms, tid) end
  return -1
end
local due = redis.call('ZRANGEBYSCORE', LEASES_KEY, '-inf', now, 'LIMIT', 0, limit)
for _, tid in ipairs(due) do
  local t = redis.call('HMGET', task_key(tid), 'state', 'owner')
  if t[1] == PROCESSING then
    lose(tid, 'worker ' .. (t[2] or '?') .. ' stopped heart-beating')
  else
    redis.call('ZREM', LEASES_KEY, tid)
  end
end
settle()
return #due
"""

# ARGV: retention, agent, reason, tid -> 1 if failed
FAIL = r"""
local agent, reason, tid = ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('HMGET', task_key(tid), 'state', 'owner')
if t[1] ~= PROCESSING or t[2] ~= agent then return 0 end
local s = session(session_of(tid))
if s.cancelling then return 0 end  -- the cancel walking its session cancels it
leave_processing(s, tid)
announce(s, tid, FAILED, reason, true)
settle()
return 1
"""

# ARGV: retention, mode ('session' | 'tasks' | 'unclaimed'), ... -> {pending, processing, next}
# 'session', sid, from, chunk: cancels the tasks <sid>_<from> .. <sid>_<from + chunk - 1>; next is
# from + chunk, or -1 past the session's last task. Called with from = 0, 0 + chunk, ... it marks
# every task of the session, however big, in short scripts, and acts as one step: the first call
# marks the session 'cancelling', so that no task of it is claimed or finished meanwhile (a task
# running already, or requeued meanwhile, is cancelled as processing or pending when reached).
# A submit still creating the session's tasks (or one that stopped half way) is stopped for good:
# the tasks it had not created yet are cancelled here, as pending ones that never ran.
# 'tasks', tid...: cancels those tasks (next is -1).
# 'unclaimed', tid...: cancels those of the tasks still pending, in the queue, and leaves the others
# as they are: {pending, 0, -1, {claimed tid...}, {ended tid...}} (claimed: processing on an agent;
# ended: no longer in the table, or unknown). What the executor's Future.cancel() asks: True
# only for a call no worker can have begun.
CANCEL = r"""
local mode = ARGV[2]
local counts = {0, 0}
local claimed, ended = {}, {}
local function cancel_one(sid, tid, pending_only)
  local tkey = task_key(tid)
  local t = redis.call('HMGET', tkey, 'state', 'owner')
  local s
  if pending_only and t[1] ~= PENDING then
    if t[1] == PROCESSING then claimed[#claimed + 1] = tid else ended[#ended + 1] = tid end
    return
  end
  if t[1] == PENDING then
    s = session(sid)
    counts[1] = counts[1] + 1
  elseif t[1] == PROCESSING then
    s = session(sid)
    counts[2] = counts[2] + 1
    leave_processing(s, tid)
    -- tell the agent running it, which BLPOPs this list, to stop the user code now
    local ckey = cancelled_key(t[2])
    redis.call('RPUSH', ckey, tid)
    redis.call('PEXPIRE', ckey, RETENTION)
  else
    return
  end
  announce(s, tid, CANCELLED, CANCELLED, true)
end
if mode == 'tasks' or mode == 'unclaimed' then
  for i = 3, #ARGV do
    local sid = session_of(ARGV[i])
    if sid then cancel_one(sid, ARGV[i], mode == 'unclaimed')
    elseif mode == 'unclaimed' then ended[#ended + 1] = ARGV[i] end
  end
  settle()
  if mode == 'unclaimed' then return {counts[1], counts[2], -1, claimed, ended} end
  return {counts[1], counts[2], -1}
end
local sid, from, chunk = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local skey = session_key(sid)
local v = redis.call('HMGET', skey, 'count', 'created', 'uncreated')
local count = tonumber(v[1] or '0')
local created = tonumber(v[2] or v[1] or '0')
-- uncreated: the first task no submit created, and that this cancel (or an earlier one) has not
-- announced yet; the walk moves it on, so that a repeated cancel announces none twice
local uncreated = tonumber(v[3] or created)
if created < count then redis.call('HSET', skey, 'created', count) end
if count > 0 and from == 0 then redis.call('HSET', skey, 'cancelling', 1) end
local upto = math.min(count, from + chunk)
for j = from, upto - 1 do
  local tid = sid .. '_' .. j
  if j < uncreated then
    cancel_one(sid, tid)
  else
    counts[1] = counts[1] + 1
    announce(session(sid), tid, CANCELLED, CANCELLED, true)
  end
end
if v[3] or created < count then redis.call('HSET', skey, 'uncreated', math.max(uncreated, upto)) end
settle()
if upto >= count then return {counts[1], counts[2], -1} end
return {counts[1], counts[2], upto}
"""


# KEYS: keys; ARGV: prefixes -> the (1-based) indices of the keys whose value starts with one.
# Read-only: the dashboard's check of outputs, run where the outputs are.
STARTING_WITH = r"""
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


# KEYS: keys; ARGV: the most bytes in all, the most bytes of one value -> per key its value, or
# false where it is missing or past either limit. Read-only: /result's inline outputs. STRLEN
# first, so that a value past the limits never leaves Redis.
WITHIN_BUDGET = r"""
local left = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local values = {}
for i, key in ipairs(KEYS) do
  local size = redis.call('STRLEN', key)
  local value = false
  if size > 0 and size <= cap and size <= left then
    value = redis.call('GET', key)
    left = left - size
  end
  values[i] = value
end
return values
"""
