"""``python -m benchmarks``: HTCGridExecutor against its peers, same work, same worker count.

Usage::

    python -m benchmarks [--workers N] [--quick] [--out docs/] [--only htcgrid,process]

For each executor (``htcgrid``, ``process``, ``loky``, ``dask``) one child process
(:mod:`benchmarks.child`) starts the executor, warms it up and runs the sections in turn:

1. ``map_c1`` / ``map_c100``: ``map`` of a no-op over ``--map-items`` items, chunksize 1 and 100;
2. ``busy``: the chunksize-1 ``map`` (``--busy-items``) while the client's main thread runs a
   pure-Python loop;
3. ``latency``: ``submit(noop).result()`` one at a time, p50/p99;
4. ``sleep10``: ``map`` of a 10 ms ``time.sleep`` task, wall time against ``n * 10 ms / workers``;
5. ``outstanding``: client memory per outstanding future (workers held on a gate);

and a second child per executor runs ``scale``: a ``--scale-items`` ``map`` with ``buffersize``,
sampling the client's RSS (its own process, so peaks don't mix). Every section but those two runs
``--repeats`` times (5; 3 with ``--quick``): the report gives the median and the spread (max - min
over the median), with the load average. Control-plane calls of HTCGridExecutor are read from
the library's own counters around every section (see :mod:`benchmarks.instrument`).

Every section has a wall-clock bound; past it the child's whole process tree is killed and the
report says ``timeout``. The report (``benchmarks.md``) and plots (``img/*.png``) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .executors import EXECUTORS, LABELS
from .sysinfo import machine_info

__all__ = ["main", "run_all", "Config"]

ROOT = Path(__file__).resolve().parent.parent

MAIN_SECTIONS = ("map_c1", "map_c100", "busy", "latency", "sleep10", "outstanding")


class Config:
    """Sizes and wall-clock bounds of one run (``quick`` shrinks both)."""

    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.quick = quick
        self.workers = args.workers
        # --quick: 3 runs of a third of what its single run used to be, so that the suite's run of
        # it takes no longer than before
        self.map_items = args.map_items or (700 if quick else 20_000)
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
            "map_c100": {"items": self.map_items, "repeats": self.repeats},
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
    try:
        import psutil
    except ImportError:  # the tree can still be killed as a process group
        psutil = None
    cmd = [sys.executable, "-m", "benchmarks.child", "--executor", name, "--workers", str(cfg.workers),
           "--sections", ",".join(sections), "--params", json.dumps(cfg.params()),
           "--budgets", json.dumps(cfg.budgets)]
    log_path = log_dir / f"{name}-{'-'.join(sections)}.log"
    out: dict[str, Any] = {"_log": str(log_path)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env() | (env_extra or {}),
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def reader() -> None:
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=reader, name=f"bench-reader-{name}", daemon=True).start()
    known: dict[int, Any] = {}
    current, deadline = "startup", time.monotonic() + cfg.budgets["startup"] + 15
    finished = False
    timed_out = None
    next_scan = 0.0
    while True:
        if psutil is not None and time.monotonic() >= next_scan:
            # once a second: enough to know the tree, cheap enough not to skew the figures
            next_scan = time.monotonic() + 1.0
            try:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    known.setdefault(p.pid, p)
            except psutil.Error:
                pass
        try:
            raw = lines.get(timeout=0.25)
        except queue.Empty:
            if time.monotonic() > deadline:
                timed_out = current
                break
            continue
        if raw is None:
            break
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        event = msg.get("event")
        if event == "start":
            current = msg["section"]
            deadline = time.monotonic() + cfg.budgets.get(current, 120)
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
            finished = True
    if timed_out:
        out[timed_out] = {"status": "timeout", "bound_s": cfg.budgets.get(timed_out)}
        out["_killed"] = _kill_tree(proc, known)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_tree(proc, known)
        proc.wait()
    # Grid processes left behind by a clean exit are a finding too (and must not skew the
    # next executor's measurements).
    leftovers: list[str] = []
    for p in known.values():
        try:
            if p.is_running() and p.status() != "zombie":
                what = " ".join(p.cmdline())[:80] or p.name()
                p.kill()
                leftovers.append(what)
        except Exception:
            pass
    if leftovers and not timed_out:
        out["_leftover_processes"] = leftovers
    out["_rc"] = proc.returncode
    if not finished and not timed_out and "_unavailable" not in out:
        tail = log_path.read_text(errors="replace")[-2000:]
        out.setdefault("_fatal", f"child exited with status {proc.returncode}")
        out["_stderr_tail"] = tail
    for section in ["startup", *sections]:
        if section not in out:
            if "_unavailable" in out:
                out[section] = {"status": "not available", "error": out["_unavailable"]}
            elif timed_out:
                out[section] = {"status": "skipped", "error": f"{timed_out} timed out"}
            elif finished:
                out[section] = {"status": "not run"}
            else:
                out[section] = {"status": "error", "error": out.get("_fatal", "no result")}
    return out


def _run_sections(name: str, sections: list[str], cfg: Config, log_dir: Path) -> dict[str, Any]:
    """Run the sections in one child; after a timeout, the rest in a fresh child (fresh executor)."""
    merged: dict[str, Any] = {}
    remaining = sections
    while remaining:
        out = run_child(name, remaining, cfg, log_dir)
        for key, value in out.items():
            if key in remaining or key not in merged:
                merged[key] = value
        timed_out = [s for s in remaining if out.get(s, {}).get("status") == "timeout"]
        if not timed_out or out.get("startup", {}).get("status") == "timeout":
            break
        remaining = remaining[remaining.index(timed_out[0]) + 1:]
    return merged


def run_all(cfg: Config, log=print) -> dict[str, Any]:
    """Every executor's sections, one after the other (never concurrently: they share cores)."""
    results: dict[str, Any] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="htcgrid-bench-"))
    for name in cfg.executors:
        t0 = time.monotonic()
        load_before = os.getloadavg()[0]
        log(f"[bench] {LABELS[name]}: main sections ...", flush=True)
        results[name] = _run_sections(name, list(MAIN_SECTIONS), cfg, log_dir)
        if cfg.run_scale:
            log(f"[bench] {LABELS[name]}: scale ({cfg.scale_items:,} items) ...", flush=True)
            scale = run_child(name, ["scale"], cfg, log_dir)
            results[name]["scale"] = scale["scale"]
            results[name]["scale_startup"] = scale.get("startup")
        results[name]["_loadavg"] = (load_before, os.getloadavg()[0])
        log(f"[bench] {LABELS[name]}: done in {time.monotonic() - t0:.1f} s", flush=True)
    results["_logs"] = str(log_dir)
    return results


def run_deployment(timeout: float = 900.0) -> dict[str, Any]:
    """The deployment section (:mod:`benchmarks.deployment`) in a child process, bounded; a dict
    with ``unavailable`` when ../shared/upstream_grid or its dependencies are missing or it fails."""
    cmd = [sys.executable, "-m", "benchmarks.deployment", "--storage", "REDIS,S3"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"timed out after {timeout:g} s"}
    try:
        return json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"unavailable": f"failed (exit {done.returncode}): {tail[0]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="workers per executor")
    parser.add_argument("--quick", action="store_true", help="small counts, under a minute")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for benchmarks.md and img/")
    parser.add_argument("--only", help="comma-separated executors (htcgrid,process,loky,dask)")
    parser.add_argument("--with-dask", action="store_true", help="include dask in --quick")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale (buffersize) run")
    parser.add_argument("--map-items", type=int)
    parser.add_argument("--repeats", type=int,
                        help="timed runs of every section but outstanding and scale (median and spread kept)")
    parser.add_argument("--busy-items", type=int, help="items of the busy-client map")
    parser.add_argument("--latency-n", type=int, help="round trips per latency run")
    parser.add_argument("--sleep-n", type=int)
    parser.add_argument("--outstanding-n", type=int)
    parser.add_argument("--scale-items", type=int)
    parser.add_argument("--scale-chunksize", type=int, default=1)
    parser.add_argument("--buffersize", type=int)
    parser.add_argument("--scale-timeout", type=float, help="bound of the scale run (s)")
    parser.add_argument("--section-timeout", type=float, help="bound of each main section (s)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--no-deployment", action="store_true",
                        help="skip the deployment section (upstream HTC-Grid code on emulated AWS, "
                             "from ../shared/upstream_grid when present; not run with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile HTCGridExecutor with py-spy (see benchmarks.profile)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(EXECUTORS) if args.only else set()
    if unknown:
        parser.error(f"unknown executors: {sorted(unknown)}")
    cfg = Config(args)
    info = machine_info(ROOT)
    t0 = time.monotonic()
    results = run_all(cfg)
    elapsed = time.monotonic() - t0
    deployment = None
    if not (args.quick or args.no_deployment):
        print("[bench] deployment (upstream code, emulated AWS) ...", flush=True)
        deployment = run_deployment()
    profile = None
    if args.profile:
        from .profile import profile_htcgrid

        print("[bench] profiling HTCGridExecutor with py-spy ...", flush=True)
        profile = profile_htcgrid(cfg)
    from .report import write_report

    doc = {"machine": info, "config": cfg.describe(), "results": results, "elapsed_s": elapsed,
           "profile": profile, "deployment": deployment}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    md_path, table = write_report(doc, Path(args.out))
    print(table)
    print(f"[bench] report: {md_path} ({elapsed:.1f} s; child logs in {results['_logs']})")
    return 0
