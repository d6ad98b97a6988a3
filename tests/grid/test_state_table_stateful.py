"""A hypothesis state machine drives the state table with random submits, claims, heartbeats,
completions, releases, crashes, expiries and cancels, and checks after every step that no task
is lost, none ends twice, every count agrees with a simple model, and every change the Lua
scripts make is one that ``states.TRANSITIONS`` allows."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from htcgrid_executor import wire
from htcgrid_executor.grid.state_table import StateTable
from htcgrid_executor.grid.state_table import _key_for as key_for
from htcgrid_executor.states import TaskState, Transition, is_allowed

AGENTS = ["agent-a", "agent-b"]
MAX_RETRIES = 2
TERMINAL = {"finished", "failed", "cancelled"}


class StateTableMachine(RuleBasedStateMachine):
    client = None  # set by the test below

    def __init__(self) -> None:
        super().__init__()
        self.client.flushall()
        self.table = StateTable(self.client)
        for agent in AGENTS:
            self.table.heartbeat(agent, [], 60_000)
        self.state: dict[str, str] = {}
        self.owner: dict[str, str] = {}
        self.retries: Counter[str] = Counter()
        self.priority: dict[str, int] = {}
        self.sessions: dict[str, int] = {}

    def _move(self, transition: Transition, tid: str, new: str) -> None:
        """Record a change the state table made, checking it against the lifecycle's table."""
        old = TaskState(self.state[tid]) if tid in self.state else None
        assert is_allowed(transition, old, TaskState(new)), f"{transition.value}: {old} -> {new}"
        self.state[tid] = new

    def _tasks(self, state: str, agent: str | None = None) -> list[str]:
        return sorted(t for t, s in self.state.items()
                      if s == state and (agent is None or self.owner.get(t) == agent))

    # -- rules ------------------------------------------------------------------------------
    @rule(count=st.integers(1, 4), priority=st.integers(0, 2))
    def submit(self, count, priority):
        sid = f"session-{len(self.sessions):03d}"  # deterministic: hypothesis replays draws
        assert self.table.submit(sid, count, priority=priority, max_retries=MAX_RETRIES)
        assert not self.table.submit(sid, count, priority=priority)  # repeated: no-op
        self.sessions[sid] = count
        for tid in wire.task_ids_for(sid, count):
            self._move(Transition.SUBMIT, tid, "pending")
            self.priority[tid] = priority

    @rule(agent=st.sampled_from(AGENTS), batch=st.integers(1, 4))
    def claim(self, agent, batch):
        pending_before = self._tasks("pending")
        claims = self.table.claim(agent, batch, 60_000)
        claimed = [c.task_id for c in claims]
        if pending_before:
            assert claimed, "pending tasks exist but none could be claimed: a task was lost"
        assert len(claimed) <= batch
        for tid in claimed:
            assert self.state[tid] == "pending"
            self._move(Transition.CLAIM, tid, "processing")
            self.owner[tid] = agent
        still_pending = self._tasks("pending")
        if claimed and still_pending:  # highest priority first
            assert min(self.priority[t] for t in claimed) >= max(self.priority[t] for t in still_pending)

    @rule(agent=st.sampled_from(AGENTS), data=st.data())
    def heartbeat(self, agent, data):
        believed = data.draw(st.lists(st.sampled_from(sorted(self.state) or ["none_0"]), max_size=4,
                                      unique=True))
        lost = set(self.table.heartbeat(agent, believed, 60_000))
        expected = {t for t in believed if not (self.state.get(t) == "processing" and self.owner.get(t) == agent)}
        assert lost == expected

    @rule(agent=st.sampled_from(AGENTS), data=st.data())
    def complete(self, agent, data):
        candidates = sorted(self.state)
        if not candidates:
            return
        tid = data.draw(st.sampled_from(candidates))
        done = self.table.complete(agent, {tid: b"output of " + tid.encode()})
        allowed = self.state[tid] == "processing" and self.owner[tid] == agent
        assert done == ([tid] if allowed else [])
        if allowed:
            self._move(Transition.COMPLETE, tid, "finished")

    @rule(agent=st.sampled_from(AGENTS))
    def release(self, agent):
        mine = self._tasks("processing", agent)
        assert self.table.release(agent, mine) == len(mine)
        for tid in mine:
            self._move(Transition.RELEASE, tid, "pending")

    @precondition(lambda self: self._tasks("processing"))
    @rule(data=st.data())
    def runner_dies(self, data):
        tid = data.draw(st.sampled_from(self._tasks("processing")))
        new_state = self.table.lose(self.owner[tid], tid, "runner died")
        self._lost(tid, new_state.value)

    @precondition(lambda self: self._tasks("processing"))
    @rule(data=st.data())
    def lease_expires(self, data):
        tid = data.draw(st.sampled_from(self._tasks("processing")))
        self.client.zadd(key_for("leases"), {tid: 0})
        assert self.table.expire_due() == 1
        self._lost(tid, "failed" if self.retries[tid] >= MAX_RETRIES else "pending")

    def _lost(self, tid, new_state):
        expected = "failed" if self.retries[tid] >= MAX_RETRIES else "pending"
        assert new_state == expected
        self.retries[tid] += expected == "pending"
        self._move(Transition.EXPIRE, tid, expected)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def cancel_session(self, data):
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        tids = wire.task_ids_for(sid, self.sessions[sid])
        pending = sum(self.state[t] == "pending" for t in tids)
        processing = sum(self.state[t] == "processing" for t in tids)
        answer = self.table.cancel_sessions([sid])[sid]
        assert answer == {"cancelled_pending": pending, "cancelled_processing": processing,
                          "total_cancelled_tasks": pending + processing}
        for tid in tids:
            if self.state[tid] not in TERMINAL:
                self._move(Transition.CANCEL, tid, "cancelled")

    @precondition(lambda self: self.state)
    @rule(data=st.data())
    def cancel_task(self, data):
        tid = data.draw(st.sampled_from(sorted(self.state)))
        answer = self.table.cancel_tasks([tid])
        assert answer["total_cancelled_tasks"] == (self.state[tid] not in TERMINAL)
        if self.state[tid] not in TERMINAL:
            self._move(Transition.CANCEL, tid, "cancelled")

    @precondition(lambda self: self.state)
    @rule(data=st.data())
    def cancel_unclaimed(self, data):
        # Future.cancel()'s kind: only pending tasks; the others named, claimed or ended
        tids = data.draw(st.lists(st.sampled_from(sorted(self.state)), min_size=1, max_size=4, unique=True))
        claimed, ended = self.table.cancel_pending_tasks(tids)
        assert sorted(claimed) == sorted(t for t in tids if self.state[t] == "processing")
        assert sorted(ended) == sorted(t for t in tids if self.state[t] in TERMINAL)
        for tid in tids:
            if self.state[tid] == "pending":
                self._move(Transition.CANCEL, tid, "cancelled")

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def every_task_is_where_the_model_says(self):
        for sid, count in self.sessions.items():
            tids = wire.task_ids_for(sid, count)
            events = self.table.read_session_events(sid, None)
            ended = [e.task_id for e in events]
            assert len(ended) == len(set(ended)), "a task ended twice"
            assert {e.task_id: e.state.value for e in events} == {
                t: self.state[t] for t in tids if self.state[t] in TERMINAL}
            for tid in tids:
                if self.state[tid] not in TERMINAL:
                    assert self.table.task_state(tid).value == self.state[tid]
            info = self.table.session_info(sid)
            states = Counter(self.state[t] for t in tids)
            for name in ("pending", "processing", "finished", "failed", "cancelled"):
                assert info[name] == states[name], name

    @invariant()
    def finished_tasks_have_their_output(self):
        finished = self._tasks("finished")
        if finished:
            values = self.client.mget([wire.output_key(t) for t in finished])
            assert values == [b"output of " + t.encode() for t in finished]


def test_the_state_table_never_loses_or_duplicates_a_task(redis_client):
    StateTableMachine.client = redis_client
    runner = StateTableMachine.TestCase
    runner.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])
    runner().runTest()


def test_the_state_table_in_tiny_chunks_never_loses_or_duplicates_a_task(redis_client, monkeypatch):
    """The same, with submits and cancels split into a script per task or two, and claims that
    look at two queue entries per script: the chunked paths must keep every rule."""
    from htcgrid_executor.grid import state_table

    for name, size in (("SUBMIT_CHUNK", 2), ("CANCEL_CHUNK", 1), ("CLAIM_LOOK", 2)):
        monkeypatch.setattr(state_table, name, size)
    StateTableMachine.client = redis_client
    runner = StateTableMachine.TestCase
    runner.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])
    runner().runTest()


def test_the_lua_spells_no_key_or_state_and_gets_them_from_python():
    # the layout is changed in one place: the scripts use the names the header defines, and the
    # header is made from PREFIX, wire's data-plane suffixes and TaskState
    from htcgrid_executor.grid import lua_scripts
    from htcgrid_executor.grid.state_table import _HEADER, PREFIX

    spelt = [f"'{PREFIX}", "P ..", f"'{wire.INPUT_SUFFIX}'", f"'{wire.OUTPUT_SUFFIX}'",
             f"'{wire.PAYLOAD_SUFFIX}'", *(f"'{state.value}'" for state in TaskState)]
    for name in lua_scripts.__all__:
        body = getattr(lua_scripts, name)
        assert [s for s in spelt if s in body] == [], name
    assert f"local QUEUES_KEY = '{PREFIX}queues'" in _HEADER
    assert f"return name .. '{wire.OUTPUT_SUFFIX}'" in _HEADER
    assert all(f"local {state.name} = '{state.value}'" in _HEADER for state in TaskState)
