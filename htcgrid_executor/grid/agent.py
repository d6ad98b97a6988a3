"""An agent: takes tasks from the grid, runs them in its runner child, reports the outcome.

::

    claim (Lua, a batch when the queue is deep, small inputs with it) ─▶ runner child, one task at a time
         ▲                                                              │
         └──── complete (Lua: output + finished, only if still owned) ◀─┘

A second thread, the watcher, heart-beats the agent's tasks every ``heartbeat_sec`` and BLPOPs
the agent's cancellation list in between: when the task being run is cancelled (or its lease was
lost to the TTL checker) it kills the runner at once, so user code stops well under a second after
the cancel. The main thread then sorts out the batch: outputs already produced are completed,
the interrupted task is timed out / retried / left cancelled, tasks not yet started go back to the
queue, and a new runner is started for the next task.

Who does what: :class:`Agent` (here) is the claim loop and decides each batch;
:class:`~.agent_batch.RunningBatch` holds a running batch and its three deadlines (time limit,
flush delay, straggler check);
:mod:`.agent_ledger` holds what the agent owns, the outcomes an outage kept back and the
:class:`~.agent_ledger.Watcher`; :mod:`.runner` holds both ends of the pipe to the runner child.

Run as a process: ``python -m htcgrid_executor.grid.agent`` with its settings in the JSON
environment variable ``HTCGRID_AGENT_CONFIG`` (never on the command line: it holds the Redis
password), as :class:`~htcgrid_executor.grid.local_grid.LocalGrid` and the CLI do. SIGTERM stops
it (its unstarted tasks go back to the queue); :data:`RENEW_RUNNER_SIGNAL` has it replace its
runner with a fresh process once it is idle.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from ..backoff import Backoff
from ..wire import encode_output, input_key
from .agent_batch import RunnerStopped, RunningBatch
from .agent_ledger import Ledger, PendingOutcomes, Watcher
from .child_processes import die_with_parent
from .direct_redis import DirectRedis
from .runner import DEFAULT_MAX_OUTPUT_BYTES, RunnerProcess, error_document
from .state_table import Claim, StateTable
from .task_inputs import INLINE_INPUT_BYTES, BigInput, read_inputs

__all__ = ["AgentSettings", "Agent", "AGENT_CONFIG_ENV", "RENEW_RUNNER_SIGNAL", "main"]

logger = logging.getLogger(__name__)

AGENT_CONFIG_ENV = "HTCGRID_AGENT_CONFIG"
# Asks an agent process to replace its runner before its next claim. SIGURG because its default
# action is to ignore it: an agent still importing, before its handler is set, is not killed by
# it (and it has a fresh runner coming anyway); an agent uses no out-of-band socket data.
RENEW_RUNNER_SIGNAL = signal.SIGURG
_BATCH_SEC = 0.05  # the most work (by the last batch's pace) one claim takes
_FIRST_RETRY_SEC, _MAX_RETRY_SEC = 0.05, 2.0  # waits between tries while Redis does not answer
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


class StopRequested(Exception):
    """Raised by the SIGTERM handler to end an idle wait at once."""


class Agent:
    """Runs tasks until ``stop`` is set. Thread-safe only in the ways the watcher needs."""

    idle = False  # True while the main thread waits on the doorbell (safe to interrupt)
    renewal_requested = False  # set by RENEW_RUNNER_SIGNAL: replace the runner before the next claim

    def __init__(self, settings: AgentSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.agent_id = settings.agent_id
        self.redis = client or DirectRedis.from_url(settings.redis_url, socket_timeout=30,
                                                    health_check_interval=30)
        self.table = StateTable(self.redis, retention_sec=settings.retention_sec)
        self.lease_ms = int(settings.lease_sec * 1000)
        self.stop_event = threading.Event()
        self.ledger = Ledger()
        self.outcomes = PendingOutcomes(self.table, self.agent_id, self.ledger, self.stop_event,
                                         settings.lease_sec)
        self.watcher = Watcher(self.table, self.agent_id, self.ledger, self.stop_event,
                               settings.heartbeat_sec, self.lease_ms, self.publish_counters)
        # Claim size grows while tasks are short and drops to 1 when they are slow (see
        # _next_claim_size), so a deep queue of tiny tasks goes in batches but long tasks stay
        # pending (and cancellable as pending, and free for other agents) until an agent is
        # really ready for them.
        self._batch = 1
        # Counters for agent_stats(), plain ints: each is written by one thread only (claims by
        # the main loop, heartbeats by the watcher) and published at the heartbeat, not per task.
        self.tasks_claimed = 0
        self.claims = 0
        self.runner_restarts = 0

    def counters(self) -> dict[str, int]:
        """This agent's counters since it started (see :func:`agent_stats`)."""
        return {"tasks_claimed": self.tasks_claimed, "claims": self.claims,
                "runner_restarts": self.runner_restarts, "heartbeats": self.watcher.heartbeats}

    def publish_counters(self) -> None:
        """Write :meth:`counters` to the agent's stats hash (one round trip, at the heartbeat),
        expiring a while after the agent stops beating. Best effort: a failure is skipped."""
        try:
            self.table.publish_agent_counters(self.agent_id, self.counters(),
                                              max(30, int(10 * self.settings.heartbeat_sec)))
        except redis.exceptions.RedisError:  # counters are for reading, never worth a late heartbeat
            logger.debug("agent %s: could not publish its counters", self.agent_id, exc_info=True)

    # -- the main loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Claim and run tasks until :attr:`stop_event` is set; then give back what is unstarted."""
        self._register()
        self.watcher.start()
        with self.ledger.lock:  # start the runner now: the first task should not wait for its imports
            self.ledger.runner = self._new_runner()
        backoff = Backoff(_FIRST_RETRY_SEC, _MAX_RETRY_SEC)
        try:
            while not self.stop_event.is_set():
                try:
                    self._step()
                    backoff.reset()
                except StopRequested:
                    break
                except redis.exceptions.RedisError as exc:
                    # unreachable, restarting, or refusing (a full Redis): wait and try again; an
                    # agent, often alone on its machine, must outlive the outage
                    delay = backoff.next_delay()
                    logger.warning("agent %s: redis failed (%s); retrying in %.1fs", self.agent_id, exc, delay)
                    self.stop_event.wait(delay)
        finally:
            self._leave()

    def _step(self) -> None:
        """One turn of the main loop: recover from an outage, claim, run (or wait for work)."""
        if self.renewal_requested:
            self._renew_runner()
        if self.outcomes.waiting:
            self.outcomes.recover()
        claims, left = self.table.claim_and_look(self.agent_id, self._claim_size(), self.lease_ms,
                                                 INLINE_INPUT_BYTES)
        if claims:
            self.claims += 1
            self.tasks_claimed += len(claims)
            started = time.monotonic()
            self._run_batch(claims)
            self._batch = self._next_claim_size(len(claims), time.monotonic() - started)
            if not left and not self.outcomes.waiting:
                # the claim emptied the queue: whatever was queued since rang the doorbell, so
                # wait on it rather than spend a claim (a round trip per task) on an empty queue
                self._wait_for_work()
        else:
            # idle: the next work may be long tasks, which must start in submission order across
            # agents (not 16 to one agent): claims grow again from 1
            self._batch = 1
            self._wait_for_work()

    def _wait_for_work(self) -> None:
        """Sleep on the doorbell (rung by submits, requeues and claims that left work), at most
        a second; a SIGTERM ends the wait at once."""
        self.idle = True
        try:
            if not self.stop_event.is_set():  # checked once idle: a SIGTERM now raises instead
                self.table.wait_for_work(timeout=1)
        finally:
            self.idle = False

    def _leave(self) -> None:
        """Stop the watcher and the runner, give back what is unstarted and leave the grid."""
        self.stop_event.set()
        self.watcher.stop()
        if self.ledger.runner is not None:
            self.ledger.runner.stop()
        try:
            with self.ledger.lock:
                unstarted = sorted(self.ledger.owned)
            self.table.release(self.agent_id, unstarted)
            self.table.unregister(self.agent_id)
        except redis.exceptions.RedisError:
            pass  # the leases expire and the TTL checker requeues them

    def _register(self) -> None:
        """Join the grid (the agents set that claims share work by), waiting out a Redis that is
        not there yet: an agent started from the CLI has no supervisor to start it again."""
        backoff = Backoff(_FIRST_RETRY_SEC, _MAX_RETRY_SEC)
        while not self.stop_event.is_set():
            try:
                self.table.heartbeat(self.agent_id, [], self.lease_ms)
                return
            except redis.exceptions.RedisError as exc:
                delay = backoff.next_delay()
                logger.warning("agent %s: cannot join the grid yet (%s); retrying in %.1fs",
                               self.agent_id, exc, delay)
                self.stop_event.wait(delay)

    def _next_claim_size(self, claimed: int, took_sec: float) -> int:
        """The next claim's size after a batch of ``claimed`` tasks took ``took_sec``: doubling,
        up to what :data:`_BATCH_SEC` of tasks as long as these is (one for tasks longer than it).

        Each claim costs its round trips (claim, inputs, completes), a few milliseconds on a busy
        machine: claimed one by one, 10 ms tasks spent a quarter of their time on them. A claim
        of at most _BATCH_SEC of work keeps that cost small while a task waits behind others in
        its agent's batch no longer than that (so calls start about in submission order, and a
        long task stays pending, free for another agent and cancellable, until one is ready)."""
        per_task = took_sec / claimed
        fits = int(_BATCH_SEC / per_task) if per_task > 0 else self.settings.max_batch
        return max(1, min(self.settings.max_batch, self._batch * 2, fits))

    def _claim_size(self) -> int:
        limit = self.settings.max_tasks_per_child
        runner = self.ledger.runner
        if limit and runner is not None:  # never more than the runner may still run
            return max(1, min(self._batch, limit - runner.tasks_run))
        return self._batch

    def _renew_runner(self) -> None:
        """Replace the idle runner with a fresh process (an embedded grid kept for the next
        executor: its calls must find no module state of the last one's). The new one is started
        before the old one is stopped, so that its imports overlap the old one's exit."""
        self.renewal_requested = False
        with self.ledger.lock:
            old, self.ledger.runner = self.ledger.runner, self._new_runner()
        if old is not None:
            old.stop()

    def _new_runner(self) -> RunnerProcess:
        return RunnerProcess(self.settings.handler, self.settings.max_batch, self.settings.max_output_bytes,
                             self.settings.redis_url)

    def _run_batch(self, claims: list[Claim]) -> None:
        task_ids = [c.task_id for c in claims]
        with self.ledger.lock:
            self.ledger.owned.update(task_ids)
        try:
            inputs = self._inputs(claims)
        except redis.exceptions.RedisError:
            # claimed, heart-beaten by the watcher, and never to run: they would wait for ever.
            # Given back to the front of their queue once Redis answers again (recover)
            with self.ledger.lock:
                self.outcomes.keep({}, task_ids)
            raise
        outputs: dict[str, bytes] = {}
        items: list[tuple[str, bytes | BigInput, int]] = []
        for claim, raw_input in zip(claims, inputs, strict=True):
            if raw_input is None:
                message = f"task input {input_key(claim.task_id)} not found in the data plane"
                outputs[claim.task_id] = encode_output(error_document(message, "Runtime.InputNotFound"))
            else:
                items.append((claim.task_id, raw_input, claim.timeout_ms))
        if items:
            self._run_in_runner(items, outputs)
        self.outcomes.flush(outputs)

    def _inputs(self, claims: list[Claim]) -> list[bytes | BigInput | None]:
        """Each claim's input (None: missing): the small ones came with the claim; the others
        are read now, in one round trip (a big one stays in Redis: the runner reads it)."""
        later = [c.task_id for c in claims if c.task_input is None and c.input_length]
        read = dict(zip(later, read_inputs(self.redis, later), strict=True)) if later else {}
        return [c.task_input if c.task_input is not None else read.get(c.task_id) for c in claims]

    def _run_in_runner(self, items: list[tuple[str, bytes | BigInput, int]], outputs: dict[str, bytes]) -> None:
        """Run a batch in the runner, completing outputs as they come back (in groups, but
        never later than a few milliseconds after they are ready)."""
        batch = RunningBatch(self._start_batch(items), items, outputs)
        try:
            while not batch.done:
                batch.collect(batch.next_wait())
                if batch.flush_due():
                    self.outcomes.flush(outputs)  # raises: the outputs stay for the handler below
                    batch.flushed()
                if batch.done:
                    break
                straggler = batch.enforce_limits(self.stop_event)
                if straggler is not None:
                    self._release_behind(batch, straggler)
        except (EOFError, OSError, RunnerStopped) as exc:
            why = exc.why if isinstance(exc, RunnerStopped) else "crash"
            self.outcomes.flush(outputs)
            batch.flushed()
            self._after_runner_stopped(batch, why)
            return
        except BaseException:
            # Redis failed in a step that decides a task (time-out, retry) or we are interrupted:
            # this batch can no longer be followed, so its runner goes; finished outputs wait for
            # Redis to come back, and the unfinished tasks are given back then
            batch.runner.kill()
            with self.ledger.lock:
                self.ledger.runner = None
                self.outcomes.keep(outputs, [t for t, _, _ in items if t in self.ledger.owned and t not in outputs])
            batch.flushed()
            raise
        self._finish_batch(batch.runner, len(items))

    def _start_batch(self, items: list[tuple[str, bytes | BigInput, int]]) -> RunnerProcess:
        """Hand the batch to the runner (a fresh one if it died while idle), with the skip flag
        set for each task cancelled while it was queued in this agent."""
        with self.ledger.lock:
            runner = self._fresh_runner()
            try:
                runner.start_batch(items)
            except OSError:  # it died between the check and the send: nothing started, no charge
                runner = self._fresh_runner()
                runner.start_batch(items)
            for index, (task_id, _, _) in enumerate(items):
                if task_id in self.ledger.lost:
                    runner.skip_task(index)
        return runner

    def _finish_batch(self, runner: RunnerProcess, count: int) -> None:
        """Count the batch's tasks against the runner; stop it at ``max_tasks_per_child``."""
        runner.tasks_run += count
        with self.ledger.lock:
            runner.batch = []
        limit = self.settings.max_tasks_per_child
        if limit and runner.tasks_run >= limit:
            with self.ledger.lock:
                self.ledger.runner = None
            runner.stop()

    def _release_behind(self, batch: RunningBatch, index: int) -> None:
        """The task at ``index`` is slow: give the tasks queued behind it in this batch back to the
        queue, so idle agents run them now instead of after it."""
        runner = batch.runner
        with self.ledger.lock:
            for later in range(index + 1, len(batch.items)):
                runner.skip_task(later)
            # read progress after setting the flags: the runner may have moved on meanwhile, and a
            # task it reached may already have passed its flag check, so it stays here
            started = runner.running_index
            behind = [task_id for task_id, _, _ in batch.items[started + 1:]]
        self.outcomes.give_back(behind)
        if behind:
            logger.debug("agent %s: %d tasks given back from behind a slow task", self.agent_id, len(behind))

    def _fresh_runner(self) -> RunnerProcess:
        """The runner, replaced first if it died while idle (killed by an operator or the OOM
        killer between tasks): no task was running, so no task is charged for it. Lock held."""
        runner = self.ledger.runner
        if runner is not None and runner.alive:
            return runner
        if runner is not None:
            logger.warning("agent %s: idle runner died (%s); starting another", self.agent_id,
                           runner.exit_description())
            runner.discard()
        self.runner_restarts += 1  # run() starts the first runner: every one made here replaces one
        self.ledger.runner = self._new_runner()
        return self.ledger.runner

    def _after_runner_stopped(self, batch: RunningBatch, why: str) -> None:
        """Decide the batch after its runner was killed or died: the task it was running is
        timed out, retried (crash) or released (stop); the others go back to the queue."""
        runner = batch.runner
        how = runner.reap()
        index = runner.running_index  # -1: it died before starting the batch, no task to blame
        with self.ledger.lock:
            self.ledger.runner = None
            ids = [task_id for task_id, _, _ in batch.items]
            current = ids[index] if 0 <= index < len(ids) else None
            lost = current in self.ledger.lost
            unfinished = [t for t in ids if t in self.ledger.owned and t != current]
        if current is not None and current in self.ledger.owned:
            if lost:
                logger.debug("agent %s: stopped %s (cancelled or lease lost)", self.agent_id, current)
            elif why == "stop":
                unfinished.append(current)
            else:
                self._charge(current, why, batch.limit_ms(index), how)
            with self.ledger.lock:
                self.ledger.forget(current)
        self.outcomes.give_back(unfinished)

    def _charge(self, task_id: str, why: str, limit_ms: int, how: str) -> None:
        """The running task stopped its runner: time it out, or retry it after a crash."""
        if why == "timeout":
            reason = f"ran over its time limit of {limit_ms / 1000:g} s and was stopped"
            self.table.fail(self.agent_id, task_id, reason)
            logger.info("agent %s: %s %s", self.agent_id, task_id, reason)
        else:
            reason = f"its runner process died ({how}) while running it"
            state = self.table.lose(self.agent_id, task_id, reason)
            logger.warning("agent %s: %s: %s; now %s", self.agent_id, task_id, reason, state)


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

    def request_renewal(signum, frame):  # noqa: ARG001 - signal handler signature
        agent.renewal_requested = True  # the grid rings the doorbell next, which ends the wait

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(RENEW_RUNNER_SIGNAL, request_renewal)
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
