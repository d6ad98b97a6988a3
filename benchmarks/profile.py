"""Where HTCGridExecutor's time goes: py-spy samples of the client and every grid process.

``python -m benchmarks --profile`` (or :func:`profile_htcgrid`) reruns HTCGridExecutor's sections
with ``BENCH_PYSPY_DIR`` set; the child (:mod:`benchmarks.child`) then attaches
``py-spy record --subprocesses`` to itself for the length of each section only (not start-up,
not warm-up) and the raw stacks are folded here into, per process:

- samples by *layer* of the innermost frame (executor, connector, HTTP client, HTTP routes,
  state table, agent, pickling, redis-py, ...), i.e. whose code the CPU was running;
- the library functions (``htcgrid_executor``) with the most inclusive samples;
- the leaf functions with the most samples.

py-spy samples only threads that hold the GIL (``--gil``): Python code running, not a wait in
``select``/``recv``/``BLPOP`` (without it, short blocking reads are counted as busy). ``redis-server`` is not Python; its CPU is reported from ``psutil`` instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .launch import run_child

__all__ = ["SpySession", "fold", "profile_htcgrid", "profile_markdown", "process_cpu", "LAYERS"]

ENV = "BENCH_PYSPY_DIR"
RATE = 250  # samples per second and process

#: (substring of a frame's file, layer), first match wins.
LAYERS = (
    ("htcgrid_executor/executor", "executor"),
    ("htcgrid_executor/connector", "connector"),
    ("htcgrid_executor/grid/http_api", "grid: HTTP routes"),
    ("htcgrid_executor/grid/routes", "grid: HTTP routes"),
    ("htcgrid_executor/grid/state_table", "grid: state table"),
    ("htcgrid_executor/grid/agent", "grid: agent"),
    ("htcgrid_executor/grid/", "grid: other"),
    ("htcgrid_executor/payload", "payload codec"),
    ("htcgrid_executor/wire", "wire codec"),
    ("htcgrid_executor/codec", "task codec"),
    ("htcgrid_executor/worker", "worker handler"),
    ("htcgrid_executor/", "htcgrid_executor: other"),
    ("cloudpickle", "pickling"),
    ("pickle", "pickling"),
    ("json/", "json"),
    ("base64", "base64"),
    ("hmac", "signing"),
    ("hashlib", "signing"),
    ("redis/", "redis-py"),
    ("requests/", "HTTP client"),
    ("urllib3/", "HTTP client"),
    ("http/client", "HTTP client"),
    ("http/server", "HTTP server"),
    ("socketserver", "HTTP server"),
    ("werkzeug", "HTTP server"),
    ("socket.py", "sockets"),
    ("selectors", "sockets"),
    ("concurrent/futures", "concurrent.futures"),
    ("threading", "threading"),
    ("queue.py", "threading"),
    ("uuid", "uuid"),
    ("benchmarks/", "benchmark harness"),
    ("logging/", "logging"),
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<cmd>.*)"$')


def layer_of(filename: str) -> str:
    for needle, layer in LAYERS:
        if needle in filename:
            return layer
    return "other"


class SpySession:
    """Inside the child: py-spy attached to this process (and its subprocesses) per section."""

    def __init__(self) -> None:
        self.dir = os.environ.get(ENV)
        self.proc: subprocess.Popen | None = None
        exe = Path(sys.executable).parent / "py-spy"
        self.exe = str(exe) if exe.exists() else shutil.which("py-spy")

    @property
    def enabled(self) -> bool:
        return bool(self.dir and self.exe)

    def start(self, section: str) -> None:
        if not self.enabled:
            return
        out = Path(self.dir) / f"{section}.txt"
        self.proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(os.getpid()), "--subprocesses", "--rate", str(RATE),
             "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
            stdout=subprocess.DEVNULL, stderr=open(Path(self.dir) / f"{section}.pyspy.log", "wb"),
        )
        time.sleep(1.0)  # py-spy needs a moment to attach before the section starts

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None


def process_cpu(executor: str = "") -> dict[str, dict[str, Any]]:
    """CPU seconds (user+system) so far of this process and each descendant, keyed by pid."""
    import psutil

    me = psutil.Process()
    out: dict[str, dict[str, Any]] = {}
    roles: dict[int, str] = {}
    for proc in [me, *me.children(recursive=True)]:  # parents come before their children
        try:
            times = proc.cpu_times()
            parent = roles.get(proc.ppid(), "")
            role = roles[proc.pid] = _role(proc.cmdline(), proc.pid == me.pid, proc.name(), parent, executor)
            out[str(proc.pid)] = {"role": role, "cpu_s": times.user + times.system}
        except psutil.Error:
            continue
    return out


def _role(cmd: list[str] | str, is_client: bool, name: str = "", parent: str = "", executor: str = "") -> str:
    """What a process of the measured tree is, from its command line and its parent's role."""
    text = cmd if isinstance(cmd, str) else " ".join(cmd)
    if is_client:
        return "client"
    rules = (
        ("redis-server", "redis-server"), ("py-spy", "py-spy"), ("resource_tracker", "resource tracker"),
        ("grid.agent", "agent"), ("grid.control_plane", "control plane"), ("popen_loky", "loky worker"), ("semaphore_tracker", "resource tracker"),
    )
    for needle, role in rules:
        if needle in text or name.startswith(needle):
            return role
    if parent == "agent":
        return "runner"
    if "multiprocessing" in text or "forkserver" in text:
        # dask's LocalCluster: the nannies are coroutines of the client, the workers its children
        return "dask worker" if executor == "dask" else "spawned child"
    if "benchmarks.child" in text:
        return "pool worker (forked)" if parent == "client" else "forked child"
    return (text[:40] or name) + "…"


def _split_stack(stack: str) -> tuple[list[re.Match], list[str]]:
    """py-spy's ``process <pid>:"<cmdline>"`` frames, and the code frames, of one raw line.

    A command line may itself hold ``;`` (``-c "from multiprocessing.spawn import spawn_main;
    spawn_main(...)"``), so a process frame runs on until its closing quote is followed by
    another process frame or a code frame.
    """
    tokens = stack.split(";")
    procs: list[re.Match] = []
    code: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("process ") and ':"' in token:
            j = i
            while j + 1 < len(tokens) and not (
                tokens[j].endswith('"') and (tokens[j + 1].startswith("process ") or _FRAME.match(tokens[j + 1]))
            ):
                j += 1
            match = _PROCESS.match(";".join(tokens[i:j + 1]))
            if match:
                procs.append(match)
            i = j + 1
            continue
        code.append(token)
        i += 1
    return procs, code


def fold(raw_path: Path, client_pid: int | None = None) -> dict[str, Any]:
    """Fold a py-spy raw file into per-process layer/function counts."""
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "samples": 0, "layers": Counter(), "lib_inclusive": Counter(), "leaf": Counter(), "entry": Counter(),
        "role": "?"})
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        procs, code = _split_stack(stack)
        if not procs or not code:
            continue
        leaf_proc = procs[-1]
        key = leaf_proc["pid"]
        entry = per[key]
        parent_role = per[procs[-2]["pid"]]["role"] if len(procs) > 1 else ""
        entry["role"] = _role(leaf_proc["cmd"], len(procs) == 1, "", parent_role)
        entry["depth"] = len(procs) - 1
        entry["samples"] += n
        parsed = [m for m in (_FRAME.match(f) for f in code) if m]
        if not parsed:
            continue
        leaf = parsed[-1]
        entry["layers"][layer_of(leaf["file"])] += n
        entry["entry"][_entry_point(parsed)] += n
        entry["leaf"][f"{leaf['func']} ({leaf['file']})"] += n
        seen = set()
        for m in parsed:
            if "htcgrid_executor/" in m["file"]:
                name = f"{m['func']} ({m['file']})"
                if name not in seen:
                    seen.add(name)
                    entry["lib_inclusive"][name] += n
    return {pid: {**e, "layers": dict(e["layers"]), "lib_inclusive": dict(e["lib_inclusive"]),
                  "leaf": dict(e["leaf"]), "entry": dict(e["entry"])} for pid, e in per.items()}


def _entry_point(parsed: list[re.Match]) -> str:
    """The thread a stack belongs to, named by its outermost library function.

    The main thread (the benchmark loop, ``submit``/``map`` and their result waits) starts in
    ``runpy``; other threads start in ``threading``; the first ``htcgrid_executor`` frame names them.
    """
    main = parsed[0]["file"].startswith("<frozen runpy>") or parsed[0]["func"] == "<module>"
    for m in parsed:
        if "htcgrid_executor/" in m["file"]:
            name = f"{m['func']} ({m['file'].split('htcgrid_executor/')[-1]})"
            return ("main thread → " + name) if main else name
    return "main thread (benchmark loop)" if main else "other thread"


def profile_htcgrid(cfg, sections=("map_c1", "map_c100", "latency")) -> dict[str, Any]:
    """Run HTCGridExecutor's sections under py-spy; return the folded profiles and CPU per process."""

    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists() and not shutil.which("py-spy"):
        return {"error": "py-spy not installed (pip install py-spy)"}
    spy_dir = Path(tempfile.mkdtemp(prefix="htcgrid-pyspy-"))
    out = run_child("htcgrid", list(sections), cfg, spy_dir, env_extra={ENV: str(spy_dir)})
    profile: dict[str, Any] = {"dir": str(spy_dir), "sections": {}}
    for section in sections:
        res = out.get(section, {})
        raw = spy_dir / f"{section}.txt"
        entry: dict[str, Any] = {"status": res.get("status"), "result": {
            k: v for k, v in res.items() if k in ("items", "n", "tasks_per_s", "p50_ms", "wall_s")}}
        entry["cpu"] = res.get("cpu")
        if raw.exists():
            entry["processes"] = fold(raw)
        else:
            log = spy_dir / f"{section}.pyspy.log"
            entry["error"] = log.read_text(errors="replace")[-500:] if log.exists() else "no py-spy output"
        profile["sections"][section] = entry
    return profile


def _pct(part: float, total: float) -> str:
    return f"{100 * part / total:.0f}%" if total else "—"


def profile_markdown(profile: dict[str, Any], top: int = 8) -> str:
    if profile.get("error"):
        return f"_Not profiled: {profile['error']}._\n"
    lines = [f"py-spy at {RATE} Hz per process, samples of threads holding the GIL (Python running), "
             "during each section alone; CPU seconds by process from psutil.\n"]
    for section, entry in profile["sections"].items():
        res = entry.get("result", {})
        lines.append(f"#### {section}: " + ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v:,}"
                                                       for k, v in res.items()) + "\n")
        cpu = entry.get("cpu") or {}
        if cpu:
            tasks = res.get("items") or res.get("n") or 0
            per_role: Counter = Counter()
            for p in cpu.values():
                per_role[p["role"]] += p["cpu_s"]
            total = sum(per_role.values())
            lines.append("CPU seconds by process (psutil), and per task: " + "; ".join(
                f"{role} {s:.2f} s ({1e6 * s / tasks:.0f} µs/task)" if tasks else f"{role} {s:.2f} s"
                for role, s in per_role.most_common()) + f"; total {total:.2f} s.\n")
        if entry.get("error"):
            lines.append(f"_py-spy failed: `{entry['error']}`_\n")
            continue
        by_role: dict[str, dict[str, Any]] = {}
        for p in entry.get("processes", {}).values():
            agg = by_role.setdefault(p["role"], {"n": 0, "samples": 0, "layers": Counter(), "lib_inclusive": Counter(),
                                                "leaf": Counter(), "entry": Counter()})
            agg["n"] += 1
            agg["samples"] += p["samples"]
            for key in ("layers", "lib_inclusive", "leaf", "entry"):
                agg[key].update(p.get(key, {}))
        for role, p in sorted(by_role.items(), key=lambda kv: -kv[1]["samples"]):
            if p["samples"] < 20:
                continue
            s = p["samples"]
            mult = f" (×{p['n']})" if p["n"] > 1 else ""
            lines.append(f"- **{role}**{mult}: {s} samples ≈ {s / RATE:.2f} CPU-s")
            lines.append("  - by thread: " + ", ".join(f"{k} {_pct(v, s)}" for k, v in p["entry"].most_common(5)))
            lines.append("  - by layer: " + ", ".join(f"{k} {_pct(v, s)}" for k, v in p["layers"].most_common(top)))
            if p["lib_inclusive"]:
                lines.append("  - htcgrid_executor functions (inclusive): " + ", ".join(
                    f"`{k}` {_pct(v, s)}" for k, v in p["lib_inclusive"].most_common(top)))
            lines.append("  - leaf functions: " + ", ".join(
                f"`{k}` {_pct(v, s)}" for k, v in p["leaf"].most_common(top)))
        lines.append("")
    return "\n".join(lines) + "\n"
