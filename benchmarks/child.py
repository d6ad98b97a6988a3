"""One executor's measurements, run in its own process: ``python -m benchmarks.child ...``.

The parent (:mod:`benchmarks.run`) starts one child per executor (and one more for the scale run,
so that its peak memory is its own), and reads JSON lines from it on the original stdout::

    {"event": "start", "section": "map_c1"}
    {"event": "result", "section": "map_c1", "data": {...}}
    {"event": "error", "section": "map_c1", "error": "...", "traceback": "..."}

Anything else the executors print goes to stderr (fd 1 is redirected there), so a chatty peer
cannot corrupt the protocol. The parent enforces each section's wall-clock bound by killing this
process group; sections that can shorten themselves (``outstanding``) also get their budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from . import tasks
from .executors import NotAvailable, make_executor, map_supports_buffersize
from .instrument import GridRedisCounters, find_attr_of_type, summed_agent_stats
from .profile import SpySession, process_cpu

__all__ = ["main"]

#: a timed run longer than this is not repeated
REPEAT_LIMIT_S = 10.0


class _Protocol:
    """Writes JSON lines on the original stdout, whatever the executors do with fd 1."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        with self._lock:
            self._out.write(json.dumps(message, default=str) + "\n")
            self._out.flush()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _children_rss() -> int:
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class _Sampler(threading.Thread):
    """Samples (elapsed s, progress, client RSS, children RSS) every ``interval`` seconds."""

    def __init__(self, progress, interval: float = 0.1, with_children: bool = True) -> None:
        super().__init__(name="bench-rss-sampler", daemon=True)
        self._progress = progress
        self._interval = interval
        self._with_children = with_children
        self._halt = threading.Event()
        self.samples: list[tuple[float, int, int, int]] = []
        self._t0 = time.perf_counter()

    def sample(self) -> None:
        children = _children_rss() if self._with_children else 0
        self.samples.append((time.perf_counter() - self._t0, self._progress(), _rss(), children))

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            self.sample()

    def stop(self) -> list[tuple[float, int, int, int]]:
        self._halt.set()
        self.join()
        self.sample()
        return self.samples


class _Instruments:
    """Control-plane counters of HTCGridExecutor (the library's own); empty snapshots for the peers."""

    def __init__(self, name: str) -> None:
        self.connector = None
        self.redis: GridRedisCounters | None = None
        self.grid = None
        self.notes: list[str] = []
        self.enabled = name == "htcgrid"

    def attach(self, executor: Any) -> None:
        if not self.enabled:
            return
        self.connector = find_attr_of_type(executor, ("AWSConnector",))
        if self.connector is None:
            self.notes.append("no AWSConnector found on the executor")
        grid = self.grid = find_attr_of_type(executor, ("LocalGrid",))
        server = getattr(grid, "redis_server", None)
        if server is not None:  # INFO is an admin command: the client config's Redis user may not
            try:
                self.redis = GridRedisCounters(server.url)
            except Exception as exc:
                self.notes.append(f"grid Redis INFO unavailable: {type(exc).__name__}: {exc}")
        else:
            self.notes.append("no LocalGrid with its own Redis found: no Redis INFO counts")

    def snapshot(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        snap: dict[str, Any] = {}
        if self.grid is not None:
            snap["grid_http_requests_served"] = self.grid.requests_served
            snap["agents"] = summed_agent_stats(self.grid)
        if self.connector is not None:
            stats = self.connector.stats()
            snap["http_routes"] = stats.pop("http_requests_by_route")
            snap["connector"] = stats
        if self.redis is not None:
            try:
                snap.update(self.redis.snapshot())
            except Exception as exc:
                snap["redis_error"] = f"{type(exc).__name__}: {exc}"
        return snap


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            sub = {k: v - old.get(k, 0) for k, v in value.items() if isinstance(v, int | float)}
            out[key] = {k: v for k, v in sub.items() if v}
        elif isinstance(value, int | float) and isinstance(old, int | float):
            out[key] = value - old
    return out


# --- sections ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _map_throughput(ex, items: int, chunksize: int, repeats: int) -> dict[str, Any]:
    """``repeats`` timed maps; the median wall time is the figure (the machine may be shared)."""
    walls: list[float] = []
    for _ in range(repeats):
        if walls and walls[0] > REPEAT_LIMIT_S:
            break  # a slow executor: one run is figure enough, and keeps the section in its bound
        t0 = time.perf_counter()
        count = 0
        for _ in ex.map(tasks.noop, range(items), chunksize=chunksize):
            count += 1
        walls.append(time.perf_counter() - t0)
        if count != items:
            raise RuntimeError(f"map returned {count} results for {items} items")
    wall = _median(walls)
    return {"items": items * len(walls), "items_per_run": items, "chunksize": chunksize, "wall_s": wall,
            "tasks_per_s": items / wall, "runs_tasks_per_s": [items / w for w in walls]}


def _latency_run(ex, n: int, max_s: float) -> list[float]:
    samples: list[float] = []
    stop_at = time.perf_counter() + max_s
    for i in range(n):
        if samples and time.perf_counter() > stop_at:
            break
        t0 = time.perf_counter_ns()
        ex.submit(tasks.noop, i).result()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def _pct(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _latency(ex, n: int, max_s: float, repeats: int) -> dict[str, Any]:
    """``repeats`` runs of ``n`` round trips (fewer if ``max_s`` runs out first: a slow executor
    still reports); the figures are the medians of the runs' percentiles."""
    runs = [sorted(_latency_run(ex, n, max_s)) for _ in range(repeats)]
    samples = [x for run in runs for x in run]
    out: dict[str, Any] = {"n": len(samples), "n_per_run": n, "samples_ms": samples,
                           "mean_ms": sum(samples) / len(samples), "max_ms": max(samples)}
    for p in (50, 90, 99):
        per_run = [_pct(run, p) for run in runs]
        out[f"p{p}_ms"] = _median(per_run)
        out[f"runs_p{p}_ms"] = per_run
    return out


def _busy_map(ex, items: int, repeats: int) -> dict[str, Any]:
    """The chunksize-1 no-op ``map`` consumed by a thread while the main thread runs a pure-Python
    loop (a client that computes while the grid works): how much of its idle rate an executor
    keeps when its own threads must share the GIL with the user's."""
    walls: list[float] = []
    spins: list[int] = []
    for _ in range(repeats):
        if walls and walls[0] > REPEAT_LIMIT_S:
            break
        count = [0]

        def consume(count: list[int] = count) -> None:
            for _ in ex.map(tasks.noop, range(items)):
                count[0] += 1

        consumer = threading.Thread(target=consume, name="bench-busy-consumer")
        t0 = time.perf_counter()
        consumer.start()
        spin = 0
        while consumer.is_alive():
            for _ in range(10_000):  # pure Python, holds the GIL but for the interpreter's switches
                spin += 1
        walls.append(time.perf_counter() - t0)
        spins.append(spin)
        if count[0] != items:
            raise RuntimeError(f"map returned {count[0]} results for {items} items")
    wall = _median(walls)
    return {"items": items * len(walls), "items_per_run": items, "wall_s": wall, "tasks_per_s": items / wall,
            "runs_tasks_per_s": [items / w for w in walls],
            "main_loop_per_s": _median([s / w for s, w in zip(spins, walls, strict=True)])}


def _sleep10(ex, n: int, workers: int, repeats: int) -> dict[str, Any]:
    walls: list[float] = []
    for _ in range(repeats):
        if walls and walls[0] > REPEAT_LIMIT_S:
            break
        t0 = time.perf_counter()
        results = list(ex.map(tasks.sleep_10ms, range(n)))
        walls.append(time.perf_counter() - t0)
        if len(results) != n:
            raise RuntimeError(f"map returned {len(results)} results for {n} items")
    wall = _median(walls)
    ideal = n * 0.010 / workers
    return {"n": n * len(walls), "n_per_run": n, "wall_s": wall, "ideal_s": ideal, "efficiency": ideal / wall,
            "runs_wall_s": walls}


def _outstanding(ex, n: int, workers: int, budget_s: float) -> dict[str, Any]:
    """Client memory per outstanding future: hold every worker on a gate, submit n no-ops."""
    gate_dir = tempfile.mkdtemp(prefix="bench-gate-")
    gate = os.path.join(gate_dir, "open")
    gates = [ex.submit(tasks.wait_for_file, gate, budget_s) for _ in range(workers)]
    time.sleep(0.2)  # let the gates reach the workers before the no-ops queue behind them
    futures: list[Any] = []
    sampler = _Sampler(lambda: len(futures), with_children=False)
    gc.collect()
    rss0 = _rss()
    sampler.sample()
    deadline = time.perf_counter() + 0.5 * budget_s  # leave time to drain and shut down
    step = max(1, n // 50)
    t0 = time.perf_counter()
    for i in range(n):
        futures.append(ex.submit(tasks.noop, i))
        if i % step == step - 1:
            sampler.sample()
            if time.perf_counter() > deadline:
                break
    submit_s = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss()
    sampler.sample()
    outstanding = sum(1 for f in futures if not f.done())
    submitted = len(futures)
    with open(gate, "w"):
        pass
    # The measurement is taken: cancel what has not started rather than wait for it (dask runs
    # a no-op in about 2 ms, so draining 100,000 would outlast the section's bound).
    cancelled = sum(1 for f in futures if f.cancel())
    drain_until = time.perf_counter() + 0.3 * budget_s
    drained = True
    for f in gates + futures:
        if f.cancelled():
            continue
        try:
            f.result(timeout=max(0.0, drain_until - time.perf_counter()))
        except Exception:  # TimeoutError, or a cancellation that raced with the wait
            drained = False
            break
    os.remove(gate)
    os.rmdir(gate_dir)
    return {
        "cancelled_after": cancelled,
        "drained": drained,
        "submitted": submitted,
        "outstanding_at_measure": outstanding,
        "submit_s": submit_s,
        "submit_per_s": submitted / submit_s if submit_s else None,
        "rss_before": rss0,
        "rss_after": rss1,
        "bytes_per_future": (rss1 - rss0) / submitted if submitted else None,
        "samples": [(s[1], s[2]) for s in sampler.samples],
    }


def _scale(ex, items: int, chunksize: int, buffersize: int) -> dict[str, Any]:
    consumed = 0
    sampler = _Sampler(lambda: consumed, interval=0.1)
    gc.collect()
    rss0 = _rss()
    sampler.start()
    t0 = time.perf_counter()
    for _ in ex.map(tasks.noop, range(items), chunksize=chunksize, buffersize=buffersize):
        consumed += 1
    wall = time.perf_counter() - t0
    samples = sampler.stop()
    if consumed != items:
        raise RuntimeError(f"map returned {consumed} results for {items} items")
    # ru_maxrss: kB on Linux; the whole process's life, start-up included.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "items": items,
        "chunksize": chunksize,
        "buffersize": buffersize,
        "wall_s": wall,
        "tasks_per_s": items / wall,
        "rss_before": rss0,
        "peak_rss_sampled": max(s[2] for s in samples),
        "peak_children_rss_sampled": max(s[3] for s in samples),
        "ru_maxrss": maxrss,
        "samples": samples,
    }


def _measure(section: str, ex: Any, p: dict[str, Any], workers: int, budget: float) -> dict[str, Any]:
    """One section's figures on the warm executor ``ex``."""
    if section in ("map_c1", "map_c100"):
        return _map_throughput(ex, p["items"], 1 if section == "map_c1" else 100, p["repeats"])
    if section == "latency":
        return _latency(ex, p["n"], p["max_s"], p["repeats"])
    if section == "busy":
        return _busy_map(ex, p["items"], p["repeats"])
    if section == "sleep10":
        return _sleep10(ex, p["n"], workers, p["repeats"])
    if section == "outstanding":
        return _outstanding(ex, p["n"], workers, budget)
    if section == "scale":
        return _scale(ex, p["items"], p["chunksize"], p["buffersize"])
    raise ValueError(f"unknown section {section!r}")


def _run(args: argparse.Namespace, proto: _Protocol) -> None:
    params = json.loads(args.params)
    budgets = json.loads(args.budgets)
    sections = args.sections.split(",")
    name, workers = args.executor, args.workers

    if "scale" in sections:
        try:
            supported = map_supports_buffersize(name)
        except NotAvailable as exc:
            proto.send(event="unavailable", error=str(exc))
            return
        if not supported:
            proto.send(event="result", section="scale", data={"status": "n/a", "reason": "map() has no buffersize"})
            return

    instruments = _Instruments(name)
    proto.send(event="start", section="startup")
    t0 = time.perf_counter()
    try:
        ex, close, _extras = make_executor(name, workers)
    except NotAvailable as exc:
        proto.send(event="unavailable", error=str(exc))
        return
    try:
        # Warm-up: every worker started and every code path imported before any timing.
        list(ex.map(tasks.noop, range(8 * workers)))
        for i in range(20):
            ex.submit(tasks.noop, i).result()
        instruments.attach(ex)
        proto.send(
            event="result",
            section="startup",
            data={"start_s": time.perf_counter() - t0, "instrument_notes": instruments.notes},
        )
        spy = SpySession()
        for section in sections:
            p = params.get(section, {})
            proto.send(event="start", section=section)
            spy.start(section)
            cpu_before = process_cpu(name)
            before = instruments.snapshot()
            try:
                data = _measure(section, ex, p, workers, budgets.get(section, 120))
            except Exception as exc:
                spy.stop()
                proto.send(event="error", section=section, error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
                continue
            delta = _diff(instruments.snapshot(), before)
            if delta:
                data["counters"] = delta
            cpu_after = process_cpu(name)
            spy.stop()
            data["cpu"] = {
                pid: {"role": p["role"], "cpu_s": p["cpu_s"] - cpu_before.get(pid, {}).get("cpu_s", 0.0)}
                for pid, p in cpu_after.items() if p["role"] != "py-spy"
            }
            data["loadavg_1m_after"] = os.getloadavg()[0]
            proto.send(event="result", section=section, data=data)
    finally:
        proto.send(event="start", section="shutdown")
        t1 = time.perf_counter()
        close()
        proto.send(event="result", section="shutdown", data={"shutdown_s": time.perf_counter() - t1})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.child")
    parser.add_argument("--executor", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--sections", required=True, help="comma-separated section names")
    parser.add_argument("--params", default="{}", help="JSON: section -> parameters")
    parser.add_argument("--budgets", default="{}", help="JSON: section -> wall-clock bound (s)")
    args = parser.parse_args(argv)
    proto = _Protocol()
    try:
        _run(args, proto)
    except BaseException as exc:
        proto.send(event="fatal", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return 1
    proto.send(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
