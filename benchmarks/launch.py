"""How the benchmark's parent runs one executor's sections in a child process
(:mod:`benchmarks.child`), bounded section by section: :class:`Config` (sizes and bounds) and
:func:`run_child`. Used by :mod:`benchmarks.run` and :mod:`benchmarks.profile`."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .executors import EXECUTORS

__all__ = ["Config", "MAIN_SECTIONS", "ROOT", "run_child"]

MAIN_SECTIONS = ("map_c1", "map_c100", "busy", "latency", "sleep10", "outstanding")

ROOT = Path(__file__).resolve().parent.parent

class Config:
    """Sizes and wall-clock bounds of one run (``quick`` shrinks both)."""

    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.quick = quick
        self.workers = args.workers
        # --quick: 3 runs of a third of what its single run used to be, so that the suite's run of
        # it takes no longer than before
        self.map_items = args.map_items or (700 if quick else 20_000)
        # chunksize 100 over ten times the items, as issue 15 measures it: 200 chunks of 20,000
        # items timed mostly the map's start (claims growing from one, the first polls), not its rate
        self.map_c100_items = 10 * self.map_items
        self.repeats = args.repeats or (3 if quick else 5)
        self.busy_items = args.busy_items or (100 if quick else 10_000)
        self.latency_n = args.latency_n or (70 if quick else 1_000)
        self.sleep_n = args.sleep_n or (35 * self.workers if quick else 300 * self.workers)
        self.outstanding_n = args.outstanding_n or (5_000 if quick else 100_000)
        self.scale_items = args.scale_items or (20_000 if quick else 1_000_000)
        self.scale_chunksize = args.scale_chunksize
        self.buffersize = args.buffersize or (1_000 if quick else 10_000)
        self.run_scale = not args.no_scale
        self.executors = [e for e in (args.only.split(",") if args.only else EXECUTORS)]
        if quick and not args.only and not args.with_dask:
            # dask's LocalCluster alone takes several seconds to start and its per-task
            # overhead is high; the quick mode keeps it out unless asked for.
            self.executors = [e for e in self.executors if e != "dask"]
        why = "--quick; --with-dask to include" if quick and not args.only else "--only"
        self.skipped = {e: why for e in EXECUTORS if e not in self.executors}
        scale = 0.25 if quick else 1.0
        self.budgets = {
            "startup": 30 if quick else 120,
            "map_c1": 180 * scale,
            "map_c100": 120 * scale,
            "busy": 180 * scale,
            "latency": 120 * scale,
            "sleep10": 120 * scale,
            "outstanding": 240 * scale,
            "scale": args.scale_timeout or (60 if quick else 900),
            "shutdown": 20 if quick else 60,
        }
        if args.section_timeout:
            for key in MAIN_SECTIONS:
                self.budgets[key] = args.section_timeout

    def params(self) -> dict[str, dict[str, Any]]:
        return {
            "map_c1": {"items": self.map_items, "repeats": self.repeats},
            "map_c100": {"items": self.map_c100_items, "repeats": self.repeats},
            "busy": {"items": self.busy_items, "repeats": self.repeats},
            "latency": {"n": self.latency_n, "max_s": 1.0 if self.quick else 15.0, "repeats": self.repeats},
            "sleep10": {"n": self.sleep_n, "repeats": self.repeats},
            "outstanding": {"n": self.outstanding_n},
            "scale": {"items": self.scale_items, "chunksize": self.scale_chunksize,
                      "buffersize": self.buffersize},
        }

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "budgets"} | {"budgets": self.budgets}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_tree(proc: subprocess.Popen, known: dict[int, Any]) -> int:
    """SIGKILL the child's process group and every descendant seen while it ran; count them."""
    import contextlib

    killed = 0
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in known.values():
        try:
            if p.is_running():
                p.kill()
                killed += 1
        except Exception:  # psutil.NoSuchProcess and friends: already gone
            pass
    return killed


def run_child(name: str, sections: list[str], cfg: Config, log_dir: Path,
              env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one child; return ``{section: result}`` with a status in each result.

    ``env_extra`` is added to the child's environment (the profiler's switch). Sections are
    bounded one by one; the start-up and shutdown of the executor count as sections too.
    """
    cmd = [sys.executable, "-m", "benchmarks.child", "--executor", name, "--workers", str(cfg.workers),
           "--sections", ",".join(sections), "--params", json.dumps(cfg.params()),
           "--budgets", json.dumps(cfg.budgets)]
    log_path = log_dir / f"{name}-{'-'.join(sections)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env() | (env_extra or {}),
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    run = _ChildRun(proc, cfg, log_path, name)
    run.follow()
    run.reap()
    run.fill_missing(sections)
    return run.out


class _ChildRun:
    """One child's messages (JSON lines on its stdout), its section deadlines and its process tree."""

    def __init__(self, proc: subprocess.Popen, cfg: Config, log_path: Path, name: str) -> None:
        try:
            import psutil
        except ImportError:  # the tree can still be killed as a process group
            psutil = None
        self.psutil = psutil
        self.proc, self.cfg, self.log_path = proc, cfg, log_path
        self.out: dict[str, Any] = {"_log": str(log_path)}
        self.known: dict[int, Any] = {}  # every descendant seen: killed with the child if need be
        self.current, self.deadline = "startup", time.monotonic() + cfg.budgets["startup"] + 15
        self.finished = False
        self.timed_out: str | None = None
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name=f"bench-reader-{name}", daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def _scan_tree(self) -> None:
        try:
            for p in self.psutil.Process(self.proc.pid).children(recursive=True):
                self.known.setdefault(p.pid, p)
        except self.psutil.Error:
            pass

    def follow(self) -> None:
        """Take the child's messages until it ends or its current section outlives its bound."""
        next_scan = 0.0
        while True:
            if self.psutil is not None and time.monotonic() >= next_scan:
                # once a second: enough to know the tree, cheap enough not to skew the figures
                next_scan = time.monotonic() + 1.0
                self._scan_tree()
            try:
                raw = self.lines.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() > self.deadline:
                    self.timed_out = self.current
                    return
                continue
            if raw is None:
                return
            try:
                self._on_message(json.loads(raw))
            except ValueError:
                continue

    def _on_message(self, msg: dict[str, Any]) -> None:
        event, out = msg.get("event"), self.out
        if event == "start":
            self.current = msg["section"]
            self.deadline = time.monotonic() + self.cfg.budgets.get(self.current, 120)
        elif event == "result":
            out[msg["section"]] = {"status": msg["data"].pop("status", "ok"), **msg["data"]}
        elif event == "error":
            out[msg["section"]] = {"status": "error", "error": msg["error"], "traceback": msg.get("traceback")}
        elif event == "unavailable":
            out["_unavailable"] = msg["error"]
        elif event == "fatal":
            out["_fatal"] = msg["error"]
            out["_traceback"] = msg.get("traceback")
        elif event == "done":
            self.finished = True

    def reap(self) -> None:
        """Wait for the child (killing its tree after a timeout) and kill what it left behind."""
        proc, out = self.proc, self.out
        if self.timed_out:
            out[self.timed_out] = {"status": "timeout", "bound_s": self.cfg.budgets.get(self.timed_out)}
            out["_killed"] = _kill_tree(proc, self.known)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_tree(proc, self.known)
            proc.wait()
        # Grid processes left behind by a clean exit are a finding too (and must not skew the
        # next executor's measurements).
        leftovers: list[str] = []
        for p in self.known.values():
            try:
                if p.is_running() and p.status() != "zombie":
                    what = " ".join(p.cmdline())[:80] or p.name()
                    p.kill()
                    leftovers.append(what)
            except Exception:
                pass
        if leftovers and not self.timed_out:
            out["_leftover_processes"] = leftovers
        out["_rc"] = proc.returncode
        if not self.finished and not self.timed_out and "_unavailable" not in out:
            out.setdefault("_fatal", f"child exited with status {proc.returncode}")
            out["_stderr_tail"] = self.log_path.read_text(errors="replace")[-2000:]

    def fill_missing(self, sections: list[str]) -> None:
        """A status for every section the child gave no result for, saying why."""
        out = self.out
        for section in ["startup", *sections]:
            if section in out:
                continue
            if "_unavailable" in out:
                out[section] = {"status": "not available", "error": out["_unavailable"]}
            elif self.timed_out:
                out[section] = {"status": "skipped", "error": f"{self.timed_out} timed out"}
            elif self.finished:
                out[section] = {"status": "not run"}
            else:
                out[section] = {"status": "error", "error": out.get("_fatal", "no result")}
