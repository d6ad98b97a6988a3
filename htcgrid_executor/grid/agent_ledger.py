"""What an agent holds, and the two helpers that keep it true against the grid.

- :class:`Ledger`: the tasks the agent owns, those the grid took back, and its runner; shared
  by the agent's main thread and its watcher under one lock.
- :class:`PendingOutcomes`: completing finished tasks and giving back unstarted ones, and what
  a Redis outage kept from being written, until it can be.
- :class:`Watcher`: the agent's second thread, heartbeats and cancellations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from ..backoff import Backoff
from .runner import RunnerProcess
from .state_table import StateTable

__all__ = ["Ledger", "PendingOutcomes", "Watcher"]

logger = logging.getLogger("htcgrid_executor.grid.agent")  # one logger for everything an agent does


class Ledger:
    """The tasks an agent holds and its runner, shared by the main thread and the watcher: every
    field is read and written under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owned: set[str] = set()  # claimed and not yet completed, released or lost
        self.lost: set[str] = set()  # owned tasks the grid took back (cancelled, lease lost)
        self.runner: RunnerProcess | None = None

    def forget(self, task_id: str) -> None:  # lock held
        self.owned.discard(task_id)
        self.lost.discard(task_id)


class PendingOutcomes:
    """Completing finished tasks and giving back unfinished ones, through Redis outages: what a
    failure kept from being written waits here until :meth:`recover` succeeds, so the batch goes
    on and no finished call is run a second time because of the outage."""

    def __init__(self, table: StateTable, agent_id: str, ledger: Ledger, stop_event: threading.Event,
                 lease_sec: float) -> None:
        self.table = table
        self.agent_id = agent_id
        self.ledger = ledger
        self.stop_event = stop_event
        self.lease_sec = lease_sec
        self.unflushed: dict[str, bytes] = {}  # outputs a Redis failure kept from completing (lock)
        self.to_release: set[str] = set()  # unfinished tasks of a batch a Redis failure broke (lock)

    @property
    def waiting(self) -> bool:
        return bool(self.unflushed or self.to_release)

    def keep(self, outputs: dict[str, bytes], unfinished: list[str]) -> None:
        """A batch could not be followed (Redis failed in a step that decides a task): keep its
        outputs and its unfinished tasks for :meth:`recover`. Lock held."""
        self.unflushed.update(outputs)
        self.to_release.update(unfinished)

    def flush(self, outputs: dict[str, bytes]) -> None:
        """Complete finished tasks. If Redis is away, keep their outputs for :meth:`recover`."""
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
            with self.ledger.lock:
                self.unflushed.update(outputs)
            logger.warning("agent %s: cannot complete %d tasks yet (%s); keeping their outputs",
                           self.agent_id, len(outputs), exc)
            return
        with self.ledger.lock:
            for task_id in outputs:
                self.ledger.forget(task_id)

    def recover(self) -> None:
        """After Redis failed mid-batch: complete the outputs kept meanwhile and give back the
        tasks that did not finish (raises again while Redis is still away)."""
        with self.ledger.lock:
            outputs, to_release = dict(self.unflushed), sorted(self.to_release)
        if outputs:
            try:
                self.table.complete(self.agent_id, outputs)  # raises while Redis is away: run() waits
            except redis.exceptions.ResponseError as exc:
                if not _is_full(exc):
                    raise
                self._refused(outputs, exc)
                return
            with self.ledger.lock:
                for task_id in outputs:
                    self.ledger.forget(task_id)
                    self.unflushed.pop(task_id, None)
        if to_release:
            with self.ledger.lock:
                self.to_release.difference_update(to_release)
            self.give_back(to_release)

    def give_back(self, task_ids: list[str]) -> None:
        """Release owned tasks that were not started to their queue (later, if Redis is away)."""
        ledger = self.ledger
        with ledger.lock:
            mine = [t for t in task_ids if t in ledger.owned and t not in ledger.lost]
            for task_id in task_ids:
                ledger.forget(task_id)
        try:
            self.table.release(self.agent_id, mine)
        except redis.exceptions.RedisError:
            with ledger.lock:  # given back once Redis is back (the TTL checker would, later)
                ledger.owned.update(mine)
                self.to_release.update(mine)

    def _refused(self, outputs: dict[str, bytes], exc: Exception) -> None:
        """The data plane is full and refused these outputs (Redis runs with noeviction, so it
        never drops data to make room): each task fails alone, with the reason, instead of being
        retried into the same wall. The failure itself is a small write, retried for a while:
        Redis stays over its limit until it has freed the refused write's buffers."""
        for task_id, output in outputs.items():
            reason = (f"the data plane is out of memory and refused its output of {len(output)} "
                      "bytes; free memory on the grid's Redis or return less")
            self._fail_for_a_while(task_id, reason)
            with self.ledger.lock:
                self.ledger.forget(task_id)
                self.unflushed.pop(task_id, None)
        logger.warning("agent %s: data plane full (%s): %d outputs refused", self.agent_id, exc, len(outputs))

    def _fail_for_a_while(self, task_id: str, reason: str) -> None:
        backoff = Backoff(0.05, 0.5, deadline_sec=self.lease_sec)
        while True:
            try:
                self.table.fail(self.agent_id, task_id, reason)
                return
            except redis.exceptions.RedisError as again:
                if backoff.exhausted or self.stop_event.is_set():
                    # forgotten all the same: its lease lapses, the TTL checker decides
                    logger.warning("agent %s: cannot fail %s either: %s", self.agent_id, task_id, again)
                    return
                self.stop_event.wait(backoff.next_delay())


class Watcher(threading.Thread):
    """An agent's second thread: heart-beats its tasks every ``heartbeat_sec`` and waits on its
    cancellation list in between; when the grid takes a task back (cancelled, or its lease lost
    to the TTL checker) it skips it in the runner's batch, or kills the runner if it runs it.
    ``publish_counters`` is called after each heartbeat."""

    def __init__(self, table: StateTable, agent_id: str, ledger: Ledger, stop_event: threading.Event,
                 heartbeat_sec: float, lease_ms: int, publish_counters: Callable[[], None]) -> None:
        super().__init__(name="htcgrid-agent-watcher", daemon=True)
        self.table = table
        self.agent_id = agent_id
        self.ledger = ledger
        self.stop_event = stop_event
        self.heartbeat_sec = heartbeat_sec
        self.lease_ms = lease_ms
        self.publish_counters = publish_counters
        self.heartbeats = 0  # written by this thread only

    def run(self) -> None:
        next_beat = 0.0
        while not self.stop_event.is_set():
            try:
                wait = max(0.01, next_beat - time.monotonic())
                self.take_back(self.table.take_cancellations(self.agent_id, min(wait, 1.0)))
                if time.monotonic() >= next_beat:
                    with self.ledger.lock:
                        owned = sorted(self.ledger.owned)
                    self.take_back(set(self.table.heartbeat(self.agent_id, owned, self.lease_ms)))
                    self.heartbeats += 1
                    self.publish_counters()
                    next_beat = time.monotonic() + self.heartbeat_sec
            except redis.exceptions.RedisError as exc:
                logger.warning("agent %s: heartbeat failed: %s", self.agent_id, exc)
                self.stop_event.wait(0.5)

    def take_back(self, task_ids: set[str]) -> None:
        """The grid took these tasks back: skip them if they wait in the runner's batch, kill the
        runner if it is running one of them now."""
        ledger = self.ledger
        with ledger.lock:
            lost = task_ids & ledger.owned
            ledger.lost |= lost
            runner = ledger.runner
            if runner is None or not lost:
                return
            for index, task_id in enumerate(runner.batch):
                if task_id in lost:
                    runner.skip_task(index)
                    # read progress after setting the flag: if the runner has reached this task
                    # it may have checked the flag already, so it must be stopped
                    if runner.running_index == index:
                        runner.kill()

    def stop(self) -> None:
        """End the watcher (``stop_event`` is set): wake it from its wait, then join it."""
        try:
            self.table.wake_watcher(self.agent_id)
        except redis.exceptions.RedisError:
            pass
        self.join(self.heartbeat_sec + 5)


def _is_full(exc: redis.exceptions.ResponseError) -> bool:
    """Redis refused a write for want of memory (also when the write was inside a script)."""
    return "OOM command not allowed" in str(exc)
