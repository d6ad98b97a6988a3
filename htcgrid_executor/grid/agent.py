"""An agent: takes tasks from the grid, runs them in its runner child, reports the outcome.

::

    claim (Lua, a batch when the queue is deep) ─▶ MGET inputs ─▶ runner child, one task at a time
         ▲                                                              │
         └──── complete (Lua: output + finished, only if still owned) ◀─┘

A second thread, the watcher, heart-beats the agent's tasks every ``heartbeat_sec`` and BLPOPs
the agent's cancellation list in between: when the task being run is cancelled (or its lease was
lost to the TTL checker) it kills the runner at once, so user code stops well under a second after
the cancel. The main thread then sorts out the batch: outputs already produced are completed,
the interrupted task is timed out / retried / left cancelled, tasks not yet started go back to the
queue, and a new runner is started for the next task.

Run as a process: ``python -m htcgrid_executor.grid.agent`` with its settings in the JSON
environment variable ``HTCGRID_AGENT_CONFIG`` (never on the command line: it holds the Redis
password), as :class:`~htcgrid_executor.grid.local_grid.LocalGrid` and the CLI do.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from ..wire import encode_output, input_key
from .child_processes import describe_exit, die_with_parent
from .runner import DEFAULT_MAX_OUTPUT_BYTES, error_document, runner_main
from .state_table import Claim, StateTable, key_for

__all__ = ["AgentSettings", "Agent", "AGENT_CONFIG_ENV", "main"]

logger = logging.getLogger(__name__)

AGENT_CONFIG_ENV = "HTCGRID_AGENT_CONFIG"
_FLUSH_SEC = 0.005  # the longest a finished output waits to be completed with others
_STRAGGLER_SEC = 0.05  # a task in a batch running this long frees the tasks queued behind it
DEFAULT_HANDLER = "htcgrid_executor.worker:lambda_handler"


@dataclass
class AgentSettings:
    """What an agent needs to join a grid. ``redis_url`` holds the password."""

    redis_url: str
    handler: str = DEFAULT_HANDLER
    heartbeat_sec: float = 1.0
    lease_sec: float = 5.0
    max_batch: int = 16
    max_tasks_per_child: int | None = None
    retention_sec: float = 3600.0
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    agent_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> AgentSettings:
        values = json.loads(text)
        values.pop("agent_id", None)  # each process makes its own
        return cls(**values)


class _Runner:
    """The runner child, its pipe and the shared arrays it reports progress in.

    ``kill()`` may be called from the watcher thread.
    """

    _context = multiprocessing.get_context("spawn")  # no fork of a threaded agent

    def __init__(self, settings: AgentSettings) -> None:
        self.conn, child_conn = self._context.Pipe()
        # [index of the task running now, its start in time.monotonic_ns()]; no lock: one writer
        self.progress = self._context.RawArray("q", 2)
        self.skip = self._context.RawArray("b", max(settings.max_batch, 1))
        # not daemonic: user code may start processes of its own (multiprocessing refuses a
        # daemonic parent); the agent stops its runner itself, and the kernel kills it with it
        self.process = self._context.Process(
            target=runner_main, name="htcgrid-runner", daemon=False,
            args=(child_conn, settings.handler, os.getpid(), settings.max_output_bytes,
                  self.progress, self.skip),
        )
        self.process.start()
        child_conn.close()
        self.tasks_run = 0
        self.batch: list[str] = []  # task ids of the batch it is running (agent's lock)

    def start_batch(self, items: list[tuple[str, bytes, int]]) -> None:
        for index in range(len(items)):
            self.skip[index] = 0
        self.progress[0] = -1
        self.batch = [task_id for task_id, _, _ in items]
        self.conn.send(items)

    @property
    def running_index(self) -> int:
        """Index in the batch of the task running now (-1: none started yet)."""
        return self.progress[0]

    def kill(self) -> None:
        """Kill the runner and every process the task started: the runner leads a process group
        of its own (see ``runner_main``), so a task's subprocesses go with it."""
        if self.process.is_alive():
            self.process.kill()
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL what is left of the runner's process group (its pid is the group's id, and
        the kernel does not reuse it while the group has members)."""
        pid = self.process.pid
        if pid is None or not hasattr(os, "killpg"):
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no group left (or not made yet)
            pass

    def stop(self) -> None:
        """Let the runner exit cleanly (max_tasks_per_child reached, agent stopping); processes
        its tasks left behind end with it."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(2)
        self.kill()
        self.process.join()
        self.kill_group()
        self.conn.close()


class StopRequested(Exception):
    """Raised by the SIGTERM handler to end an idle wait at once."""


class _RunnerStopped(Exception):
    """The runner had to be stopped (or died) in the middle of a batch."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why  # 'crash', 'timeout', 'stop' or 'lost'


class Agent:
    """Runs tasks until ``stop`` is set. Thread-safe only in the ways the watcher needs."""

    idle = False  # True while the main thread waits on the doorbell (safe to interrupt)

    def __init__(self, settings: AgentSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.agent_id = settings.agent_id
        self.redis = client or redis.Redis.from_url(settings.redis_url, socket_timeout=30,
                                                    health_check_interval=30)
        self.table = StateTable(self.redis, retention_sec=settings.retention_sec)
        self.lease_ms = int(settings.lease_sec * 1000)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()  # guards the fields below, shared with the watcher
        self._owned: set[str] = set()  # claimed and not yet completed, released or lost
        self._lost: set[str] = set()  # owned tasks the grid took back (cancelled, lease lost)
        self._runner: _Runner | None = None
        self._unflushed: dict[str, bytes] = {}  # outputs a Redis failure kept from completing
        self._to_release: set[str] = set()  # unfinished tasks of a batch a Redis failure broke
        # Claim size grows while tasks are short and drops to 1 when one is slow, so a deep
        # queue of tiny tasks goes in batches but long tasks stay pending (and cancellable as
        # pending, and free for other agents) until an agent is really ready for them.
        self._batch = 1
        # Counters for agent_stats(), plain ints: each is written by one thread only (claims by
        # the main loop, heartbeats by the watcher) and published at the heartbeat, not per task.
        self.tasks_claimed = 0
        self.claims = 0
        self.runner_restarts = 0
        self.heartbeats = 0

    def counters(self) -> dict[str, int]:
        """This agent's counters since it started (see :func:`agent_stats`)."""
        return {"tasks_claimed": self.tasks_claimed, "claims": self.claims,
                "runner_restarts": self.runner_restarts, "heartbeats": self.heartbeats}

    def _publish_counters(self) -> None:
        """Write :meth:`counters` to ``agent:<id>:stats`` (one round trip, at the heartbeat),
        expiring a while after the agent stops beating. Best effort: a failure is skipped."""
        key = key_for("agent_stats", self.agent_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=self.counters())
        pipe.expire(key, max(30, int(10 * self.settings.heartbeat_sec)))
        try:
            pipe.execute()
        except redis.exceptions.RedisError:  # counters are for reading, never worth a late heartbeat
            logger.debug("agent %s: could not publish its counters", self.agent_id, exc_info=True)

    # -- the main loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Claim and run tasks until :attr:`stop_event` is set; then give back what is unstarted."""
        watcher = threading.Thread(target=self._watch, name="htcgrid-agent-watcher", daemon=True)
        self._register()
        watcher.start()
        with self._lock:  # start the runner now: the first task should not wait for its imports
            self._runner = _Runner(self.settings)
        waiter = redis.Redis(connection_pool=self.redis.connection_pool)
        backoff = 0.05
        try:
            while not self.stop_event.is_set():
                try:
                    if self._unflushed or self._to_release:
                        self._recover()
                    claims = self.table.claim(self.agent_id, self._claim_size(), self.lease_ms)
                    if claims:
                        self.claims += 1
                        self.tasks_claimed += len(claims)
                        started = time.monotonic()
                        self._run_batch(claims)
                        per_task = (time.monotonic() - started) / len(claims)
                        self._batch = (min(self.settings.max_batch, self._batch * 2)
                                       if per_task < 0.005 else 1)
                    else:
                        # idle: the next work may be long tasks, which must start in submission
                        # order across agents (not 16 to one agent): claims grow again from 1
                        self._batch = 1
                        # sleep on the doorbell, rung by submits and by claims that left work
                        self.idle = True
                        try:
                            waiter.blpop([key_for("doorbell")], timeout=1)
                        finally:
                            self.idle = False
                    backoff = 0.05
                except StopRequested:
                    break
                except redis.exceptions.RedisError as exc:
                    # unreachable, restarting, or refusing (a full Redis): wait and try again; an
                    # agent, often alone on its machine, must outlive the outage
                    logger.warning("agent %s: redis failed (%s); retrying in %.1fs",
                                   self.agent_id, exc, backoff)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            self.stop_event.set()
            try:  # wake the watcher from its BLPOP: an empty id is not a task
                self.redis.rpush(key_for("agent_cancelled", self.agent_id), "")
            except redis.exceptions.RedisError:
                pass
            watcher.join(self.settings.heartbeat_sec + 5)
            if self._runner is not None:
                self._runner.stop()
            try:
                with self._lock:
                    unstarted = sorted(self._owned)
                self.table.release(self.agent_id, unstarted)
                self.table.unregister(self.agent_id)
            except redis.exceptions.RedisError:
                pass  # the leases expire and the TTL checker requeues them

    def _register(self) -> None:
        """Join the grid (the agents set that claims share work by), waiting out a Redis that is
        not there yet: an agent started from the CLI has no supervisor to start it again."""
        backoff = 0.05
        while not self.stop_event.is_set():
            try:
                self.table.heartbeat(self.agent_id, [], self.lease_ms)
                return
            except redis.exceptions.RedisError as exc:
                logger.warning("agent %s: cannot join the grid yet (%s); retrying in %.1fs",
                               self.agent_id, exc, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _claim_size(self) -> int:
        limit = self.settings.max_tasks_per_child
        if limit and self._runner is not None:  # never more than the runner may still run
            return max(1, min(self._batch, limit - self._runner.tasks_run))
        return self._batch

    def _run_batch(self, claims: list[Claim]) -> None:
        with self._lock:
            self._owned.update(c.task_id for c in claims)
        inputs = self.redis.mget([input_key(c.task_id) for c in claims])
        outputs: dict[str, bytes] = {}
        items: list[tuple[str, bytes, int]] = []
        limits: list[int] = []
        for claim, raw_input in zip(claims, inputs, strict=True):
            if raw_input is None:
                message = f"task input {input_key(claim.task_id)} not found in the data plane"
                outputs[claim.task_id] = encode_output(error_document(message, "Runtime.InputNotFound"))
            else:
                items.append((claim.task_id, raw_input, claim.timeout_ms))
                limits.append(claim.timeout_ms)
        if items:
            self._run_in_runner(items, limits, outputs)
        self._flush(outputs)

    def _run_in_runner(self, items: list[tuple[str, bytes, int]], limits: list[int],
                       outputs: dict[str, bytes]) -> None:
        """Run a batch in the runner, completing outputs as they come back (in groups, but
        never later than a few milliseconds after they are ready)."""
        with self._lock:
            runner = self._fresh_runner()
            try:
                runner.start_batch(items)
            except OSError:  # it died between the check and the send: nothing started, no charge
                runner = self._fresh_runner()
                runner.start_batch(items)
            # cancelled while queued in this agent: give the runner a skip flag, not the work
            for index, (task_id, _, _) in enumerate(items):
                if task_id in self._lost:
                    runner.skip[index] = 1
        received = 0
        first_unflushed = 0.0
        straggler_checked = False
        try:
            while received < len(items):
                wait = 1.0
                index = runner.running_index
                if 0 <= index < len(items) and limits[index]:
                    deadline = runner.progress[1] / 1e9 + limits[index] / 1000
                    wait = min(wait, max(0.0, deadline - time.monotonic()) + 0.001)
                if outputs:  # never sit on a finished output for more than a few milliseconds
                    wait = min(wait, max(0.0, first_unflushed + _FLUSH_SEC - time.monotonic()))
                if not straggler_checked and len(items) > 1:
                    wait = min(wait, _STRAGGLER_SEC)
                if runner.conn.poll(wait):
                    for index, output in runner.conn.recv():
                        received += 1
                        if output is not None:
                            outputs[items[index][0]] = output
                    first_unflushed = first_unflushed or time.monotonic()
                now = time.monotonic()
                if outputs and (now - first_unflushed >= _FLUSH_SEC or len(outputs) >= 64
                                or received == len(items)):
                    self._flush(outputs)
                    outputs.clear()
                    first_unflushed = 0.0
                if received == len(items):
                    break
                index = runner.running_index
                running_ns = time.monotonic_ns() - runner.progress[1]
                if 0 <= index < len(items) and limits[index] and running_ns / 1e6 >= limits[index]:
                    runner.kill()
                    raise _RunnerStopped("timeout")
                if self.stop_event.is_set():  # asked to stop: unfinished work goes back
                    runner.kill()
                    raise _RunnerStopped("stop")
                if not straggler_checked and 0 <= index and running_ns / 1e9 >= _STRAGGLER_SEC:
                    straggler_checked = True  # once per batch: the batch was sized for short tasks
                    self._release_behind(runner, items, index)
        except (EOFError, OSError, _RunnerStopped) as exc:
            why = exc.why if isinstance(exc, _RunnerStopped) else "crash"
            self._flush(outputs)
            outputs.clear()
            self._after_runner_stopped(runner, items, limits, why)
            return
        except BaseException:
            # Redis failed in a step that decides a task (time-out, retry) or we are interrupted:
            # this batch can no longer be followed, so its runner goes; finished outputs wait in
            # _unflushed for Redis to come back, and the unfinished tasks are given back then
            runner.kill()
            with self._lock:
                self._runner = None
                self._unflushed.update(outputs)
                self._to_release.update(t for t, _, _ in items if t in self._owned and t not in outputs)
            outputs.clear()
            raise
        runner.tasks_run += len(items)
        with self._lock:
            runner.batch = []
        limit = self.settings.max_tasks_per_child
        if limit and runner.tasks_run >= limit:
            with self._lock:
                self._runner = None
            runner.stop()

    def _release_behind(self, runner: _Runner, items: list[tuple[str, bytes, int]], index: int) -> None:
        """The task at ``index`` is slow: give the tasks queued behind it in this batch back to the
        queue, so idle agents run them now instead of after it."""
        with self._lock:
            for later in range(index + 1, len(items)):
                runner.skip[later] = 1
            # read progress after setting the flags: the runner may have moved on meanwhile, and a
            # task it reached may already have passed its flag check, so it stays here
            started = runner.running_index
            behind = [task_id for task_id, _, _ in items[started + 1:]]
        self._give_back(behind)
        if behind:
            logger.debug("agent %s: %d tasks given back from behind a slow task", self.agent_id, len(behind))

    def _recover(self) -> None:
        """After Redis failed mid-batch: complete the outputs kept meanwhile and give back the
        tasks that did not finish (raises again while Redis is still away)."""
        with self._lock:
            outputs, to_release = dict(self._unflushed), sorted(self._to_release)
        if outputs:
            try:
                self.table.complete(self.agent_id, outputs)  # raises while Redis is away: run() waits
            except redis.exceptions.ResponseError as exc:
                if not _is_full(exc):
                    raise
                self._refused(outputs, exc)
                return
            with self._lock:
                for task_id in outputs:
                    self._forget(task_id)
                    self._unflushed.pop(task_id, None)
        if to_release:
            with self._lock:
                self._to_release.difference_update(to_release)
            self._give_back(to_release)

    def _fresh_runner(self) -> _Runner:
        """The runner, replaced first if it died while idle (killed by an operator or the OOM
        killer between tasks): no task was running, so no task is charged for it. Lock held."""
        runner = self._runner
        if runner is not None and runner.process.is_alive():
            return runner
        if runner is not None:
            logger.warning("agent %s: idle runner died (%s); starting another", self.agent_id,
                           describe_exit(runner.process.exitcode))
            runner.kill_group()
            runner.conn.close()
        self.runner_restarts += 1  # run() starts the first runner: every one made here replaces one
        self._runner = _Runner(self.settings)
        return self._runner

    def _after_runner_stopped(self, runner: _Runner, items: list[tuple[str, bytes, int]],
                              limits: list[int], why: str) -> None:
        """Decide the batch after its runner was killed or died: the task it was running is
        timed out, retried (crash) or released (stop); the others go back to the queue."""
        runner.process.join(5)
        # what the task started dies with it (a crash leaves them running), and a runner that did
        # not end is not left for multiprocessing to wait for at the agent's exit (not daemonic)
        runner.kill()
        runner.process.join(1)
        how = describe_exit(runner.process.exitcode)
        runner.conn.close()
        index = runner.running_index  # -1: it died before starting the batch, no task to blame
        with self._lock:
            self._runner = None
            ids = [task_id for task_id, _, _ in items]
            current = ids[index] if 0 <= index < len(ids) else None
            lost = current in self._lost
            unfinished = [t for t in ids if t in self._owned and t != current]
        if current is not None and current in self._owned:
            if lost:
                logger.debug("agent %s: stopped %s (cancelled or lease lost)", self.agent_id, current)
            elif why == "stop":
                unfinished.append(current)
            elif why == "timeout":
                reason = f"ran over its time limit of {limits[index] / 1000:g} s and was stopped"
                self.table.fail(self.agent_id, current, reason)
                logger.info("agent %s: %s %s", self.agent_id, current, reason)
            else:
                reason = f"its runner process died ({how}) while running it"
                state = self.table.lose(self.agent_id, current, reason)
                logger.warning("agent %s: %s: %s; now %s", self.agent_id, current, reason, state)
            with self._lock:
                self._forget(current)
        self._give_back(unfinished)

    def _flush(self, outputs: dict[str, bytes]) -> None:
        """Complete finished tasks. If Redis is away, keep their outputs for :meth:`_recover`:
        the batch goes on, and no finished call is run a second time because of the outage."""
        if not outputs:
            return
        try:
            self.table.complete(self.agent_id, outputs)
        except redis.exceptions.ResponseError as exc:
            if not _is_full(exc):
                raise
            self._refused(outputs, exc)
            return
        except redis.exceptions.RedisError as exc:
            with self._lock:
                self._unflushed.update(outputs)
            logger.warning("agent %s: cannot complete %d tasks yet (%s); keeping their outputs",
                           self.agent_id, len(outputs), exc)
            return
        with self._lock:
            for task_id in outputs:
                self._forget(task_id)

    def _refused(self, outputs: dict[str, bytes], exc: Exception) -> None:
        """The data plane is full and refused these outputs (Redis runs with noeviction, so it
        never drops data to make room): each task fails alone, with the reason, instead of being
        retried into the same wall. The failure itself is a small write, retried for a while:
        Redis stays over its limit until it has freed the refused write's buffers."""
        for task_id, output in outputs.items():
            reason = (f"the data plane is out of memory and refused its output of {len(output)} "
                      "bytes; free memory on the grid's Redis or return less")
            deadline = time.monotonic() + self.settings.lease_sec
            delay = 0.05
            while True:
                try:
                    self.table.fail(self.agent_id, task_id, reason)
                    break
                except redis.exceptions.RedisError as again:
                    if time.monotonic() + delay > deadline or self.stop_event.is_set():
                        # forgotten all the same: its lease lapses, the TTL checker decides
                        logger.warning("agent %s: cannot fail %s either: %s", self.agent_id, task_id, again)
                        break
                    self.stop_event.wait(delay)
                    delay = min(delay * 2, 0.5)
            with self._lock:
                self._forget(task_id)
                self._unflushed.pop(task_id, None)
        logger.warning("agent %s: data plane full (%s): %d outputs refused", self.agent_id, exc, len(outputs))

    def _give_back(self, task_ids: list[str]) -> None:
        with self._lock:
            mine = [t for t in task_ids if t in self._owned and t not in self._lost]
            for task_id in task_ids:
                self._forget(task_id)
        try:
            self.table.release(self.agent_id, mine)
        except redis.exceptions.RedisError:
            with self._lock:  # given back once Redis is back (the TTL checker would, later)
                self._owned.update(mine)
                self._to_release.update(mine)

    def _forget(self, task_id: str) -> None:  # lock held
        self._owned.discard(task_id)
        self._lost.discard(task_id)

    # -- the watcher thread -------------------------------------------------------------------
    def _watch(self) -> None:
        cancel_key = key_for("agent_cancelled", self.agent_id)
        blocking = redis.Redis(connection_pool=self.redis.connection_pool)
        next_beat = 0.0
        while not self.stop_event.is_set():
            try:
                wait = max(0.01, next_beat - time.monotonic())
                item = blocking.blpop([cancel_key], timeout=min(wait, 1.0))
                if item is not None:
                    more = blocking.lpop(cancel_key, 1000) or []
                    self._take_back({item[1].decode(), *(t.decode() for t in more)} - {""})
                if time.monotonic() >= next_beat:
                    with self._lock:
                        owned = sorted(self._owned)
                    self._take_back(set(self.table.heartbeat(self.agent_id, owned, self.lease_ms)))
                    self.heartbeats += 1
                    self._publish_counters()
                    next_beat = time.monotonic() + self.settings.heartbeat_sec
            except redis.exceptions.RedisError as exc:
                logger.warning("agent %s: heartbeat failed: %s", self.agent_id, exc)
                self.stop_event.wait(0.5)

    def _take_back(self, task_ids: set[str]) -> None:
        """The grid took these tasks back: skip them if they wait in the runner's batch, kill the
        runner if it is running one of them now."""
        with self._lock:
            lost = task_ids & self._owned
            self._lost |= lost
            runner = self._runner
            if runner is None or not lost:
                return
            for index, task_id in enumerate(runner.batch):
                if task_id in lost:
                    runner.skip[index] = 1
                    # read progress after setting the flag: if the runner has reached this task
                    # it may have checked the flag already, so it must be stopped
                    if runner.running_index == index:
                        runner.kill()


def _is_full(exc: redis.exceptions.ResponseError) -> bool:
    """Redis refused a write for want of memory (also when the write was inside a script)."""
    return "OOM command not allowed" in str(exc)


def main() -> int:
    """Process entry point for agents started by a LocalGrid or the CLI."""
    die_with_parent_flag = os.environ.get("HTCGRID_AGENT_DIE_WITH_PARENT") == "1"
    if die_with_parent_flag:
        die_with_parent()
    settings = AgentSettings.from_json(os.environ[AGENT_CONFIG_ENV])
    agent = Agent(settings)

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        agent.stop_event.set()
        if agent.idle:  # interrupt the blocking wait; elsewhere the loop sees the flag itself
            raise StopRequested

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
