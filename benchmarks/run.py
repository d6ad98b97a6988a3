"""``python -m benchmarks``: HTCGridExecutor against its peers, same work, same worker count.

Usage::

    python -m benchmarks [--workers N] [--quick] [--out docs/] [--only htcgrid,process]

For each executor (``htcgrid``, ``process``, ``loky``, ``dask``) one child process
(:mod:`benchmarks.child`) starts the executor, warms it up and runs the sections in turn:

1. ``map_c1`` / ``map_c100``: ``map`` of a no-op over ``--map-items`` items at chunksize 1, and ten
   times as many at chunksize 100;
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .executors import EXECUTORS, LABELS
from .launch import MAIN_SECTIONS, ROOT, Config, run_child
from .sysinfo import machine_info

__all__ = ["main", "run_all", "Config"]



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
