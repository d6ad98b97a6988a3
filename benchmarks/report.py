"""The markdown report and the PNG plots of one run (``benchmarks.md``, ``img/*.png``).

The part of an existing ``benchmarks.md`` between the ``HAND_BEGIN``/``HAND_END`` markers (the
"where the time goes" analysis, written by people from profiles) is kept when the report is
regenerated; everything else is rewritten from the run's figures.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from .executors import EXECUTORS, LABELS

__all__ = ["write_report", "HAND_BEGIN", "HAND_END"]

HAND_BEGIN = "<!-- hand-written: begin (kept when the report is regenerated) -->"
HAND_END = "<!-- hand-written: end -->"
REF = "process"
MB = 1024 * 1024


def _ok(section: dict | None) -> bool:
    return bool(section) and section.get("status") == "ok"


def _status(section: dict | None) -> str:
    if not section:
        return "—"
    status = section.get("status", "?")
    return status


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return ""
    return f" ({value / ref:.2f}×)"


def _rate(x: float) -> str:
    return f"{x:,.0f}/s"


def _spread(runs: list[float] | None) -> str:
    """`` ±x%``: half the range of the runs over their median (empty for a single run)."""
    if not runs or len(runs) < 2:
        return ""
    ordered = sorted(runs)
    mid = ordered[len(ordered) // 2]
    return f" ±{(ordered[-1] - ordered[0]) / 2 / mid:.0%}" if mid else ""


def _cell(results: dict, name: str, section: str, fmt, key: str, ref_key: str | None = None,
          runs_key: str | None = None) -> str:
    sec = results.get(name, {}).get(section)
    if not _ok(sec):
        return _status(sec)
    value = sec.get(key)
    if value is None:
        return "n/a"
    ref_sec = results.get(REF, {}).get(section)
    ref = ref_sec.get(ref_key or key) if _ok(ref_sec) and name != REF else None
    return fmt(value) + _spread(sec.get(runs_key or f"runs_{key}")) + _ratio(value, ref)


def _load_line(doc: dict) -> str:
    loads = [f"{LABELS[n].split(' ')[0]} {doc['results'][n]['_loadavg'][0]:.2f} → "
             f"{doc['results'][n]['_loadavg'][1]:.2f}"
             for n in EXECUTORS if isinstance(doc["results"].get(n), dict) and "_loadavg" in doc["results"][n]]
    if not loads:
        return ""
    return ("- 1-minute load average when each executor's turn began → ended (other work on the machine "
            "skews the figures; 0 is an idle machine; an executor's own run adds about its worker count): "
            + ", ".join(loads) + "\n")


def _main_table(doc: dict) -> str:
    results, cfg = doc["results"], doc["config"]
    w = cfg["workers"]
    head = (
        f"| executor ({w} workers) | start (s) | map no-op, chunksize 1 | map no-op, chunksize 100 "
        f"| busy client: map, chunksize 1 (of its idle rate) "
        f"| submit→result p50 | p99 | 10 ms tasks: efficiency (wall) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name in EXECUTORS:
        label = LABELS[name]
        if name in cfg["skipped"]:
            rows.append(f"| {label} | not run ({cfg['skipped'][name]}) | | | | | | |")
            continue
        r = results.get(name, {})
        start = r.get("startup", {})
        start_cell = f"{start['start_s']:.2f}" if _ok(start) else _status(start)
        c1 = _cell(results, name, "map_c1", _rate, "tasks_per_s")
        c100 = _cell(results, name, "map_c100", _rate, "tasks_per_s")
        if name == "dask":
            c100 += " (chunksize ignored)" if _ok(r.get("map_c100")) else ""
        busy = _cell(results, name, "busy", _rate, "tasks_per_s")
        if _ok(r.get("busy")) and _ok(r.get("map_c1")):
            busy += f", {r['busy']['tasks_per_s'] / r['map_c1']['tasks_per_s']:.0%} of idle"
        p50 = _cell(results, name, "latency", lambda v: f"{v:.2f} ms", "p50_ms")
        p99 = _cell(results, name, "latency", lambda v: f"{v:.2f} ms", "p99_ms")
        sl = r.get("sleep10")
        if _ok(sl):
            ref = results.get(REF, {}).get("sleep10")
            eff = (f"{sl['efficiency']:.0%}{_spread([sl['ideal_s'] / w for w in sl.get('runs_wall_s', [])])} "
                   f"({sl['wall_s']:.2f} s vs {sl['ideal_s']:.2f} s)")
            if _ok(ref) and name != REF:
                eff += f", {sl['efficiency'] / ref['efficiency']:.2f}×"
        else:
            eff = _status(sl)
        rows.append(f"| {label} | {start_cell} | {c1} | {c100} | {busy} | {p50} | {p99} | {eff} |")
    return head + "\n".join(rows) + "\n"


def _scale_table(doc: dict) -> str:
    results, cfg = doc["results"], doc["config"]
    head = (
        f"| executor | {cfg['scale_items']:,}-item map, chunksize {cfg['scale_chunksize']}, buffersize "
        f"{cfg['buffersize']:,} | vs its {cfg['map_items']:,}-item run | client peak RSS (start) "
        f"| grid/worker processes peak RSS | client memory per outstanding future |\n"
        "|---|---|---|---|---|---|\n"
    )
    rows = []
    for name in EXECUTORS:
        label = LABELS[name]
        if name in cfg["skipped"]:
            rows.append(f"| {label} | not run ({cfg['skipped'][name]}) | | | | |")
            continue
        r = results.get(name, {})
        sc = r.get("scale")
        if _ok(sc):
            tput = _rate(sc["tasks_per_s"])
            base = r.get("map_c1") if cfg["scale_chunksize"] == 1 else None
            vs = f"{sc['tasks_per_s'] / base['tasks_per_s']:.0%}" if _ok(base) else ""
            peak = f"{sc['peak_rss_sampled'] / MB:.0f} MB ({sc['rss_before'] / MB:.0f} MB)"
            grid = f"{sc['peak_children_rss_sampled'] / MB:.0f} MB"
        elif sc and sc.get("status") == "n/a":
            tput, vs, peak, grid = f"n/a: {sc.get('reason', '')}", "", "", ""
        else:
            tput, vs, peak, grid = _status(sc), "", "", ""
        out = r.get("outstanding")
        if _ok(out) and out.get("bytes_per_future") is not None:
            per = (f"{out['bytes_per_future'] / 1024:.2f} KB ({out['submitted']:,} submitted, "
                   f"{out['outstanding_at_measure']:,} outstanding)")
        else:
            per = _status(out)
        rows.append(f"| {label} | {tput} | {vs} | {peak} | {grid} | {per} |")
    return head + "\n".join(rows) + "\n"


def _control_table(doc: dict) -> str:
    r = doc["results"].get("htcgrid", {})
    rows = []
    top_lines = []
    for section, label, tasks_key in (
        ("map_c1", "map, chunksize 1", "items"),
        ("map_c100", "map, chunksize 100", "items"),
        ("busy", "map, busy client", "items"),
        ("latency", "submit→result, one at a time", "n"),
        ("sleep10", "map of 10 ms tasks", "n"),
        ("scale", "scale map (buffersize)", "items"),
    ):
        sec = r.get(section)
        if not _ok(sec) or "counters" not in sec:
            continue
        n = sec[tasks_key]
        c = sec["counters"]
        conn, agents, routes = c.get("connector") or {}, c.get("agents") or {}, c.get("http_routes") or {}

        def per_k(value: float | None, n=n) -> str:
            return "n/a" if value is None else f"{value * 1000 / n:,.1f}"

        def per_task(value: float | None, n=n) -> str:
            return "n/a" if value is None else f"{value / n:,.0f}"

        # a counter that did not move is left out of the difference: 0 (the agents publish theirs
        # at their heartbeat, so a section shorter than a second may see none of its claims)
        claims = agents.get("claims", 0)
        per_claim = f"{agents['tasks_claimed'] / claims:,.1f}" if claims and "tasks_claimed" in agents else "n/a"
        rows.append(
            f"| {label} | {n:,} | {per_k(conn.get('http_requests'))} | {per_k(routes.get('/submit'))} "
            f"| {per_k(conn.get('polls'))} ({per_k(conn.get('long_polls'))} long) | {conn.get('retries', 0)} "
            f"| {per_k(conn.get('dataplane_calls'))} | {per_k(conn.get('round_trips'))} "
            f"| {per_task(conn.get('bytes_sent'))} / {per_task(conn.get('bytes_received'))} "
            f"| {per_task(conn.get('dataplane_bytes_sent'))} / {per_task(conn.get('dataplane_bytes_received'))} "
            f"| {per_k(c.get('grid_http_requests_served'))} | {per_k(claims)} ({per_claim} tasks each) "
            f"| {agents.get('heartbeats', 0)} | {agents.get('runner_restarts', 0)} "
            f"| {per_k(c.get('redis_commands'))} |")
        stats = c.get("redis_commandstats") or {}
        top = sorted(stats.items(), key=lambda kv: -kv[1])[:8]
        if top:
            top_lines.append(f"- {label}: " + ", ".join(f"`{k}` {v * 1000 / n:,.1f}" for k, v in top))
    if not rows:
        return "_Not measured: HTCGridExecutor did not run (see its row above)._\n"
    start = r.get("startup", {})
    notes = start.get("instrument_notes") or []
    text = (
        "Read from the library's own counters around each section (all runs of it): "
        "`AWSConnector.stats()` for the client's side, `LocalGrid.agent_stats()` for the agents' "
        "(published at their heartbeat, so up to a second behind), `LocalGrid.requests_served`, and "
        "the grid Redis's `INFO` (every command of every process, those inside Lua scripts "
        "included). Per 1,000 tasks unless marked *per task* (bytes) or *total*. *Round trips*: HTTP "
        "attempts plus data-plane calls; *HTTP bytes*: request lines sent / answer bodies received; "
        "*data-plane bytes*: values written / read.\n\n"
        "| workload | tasks | HTTP requests | `/submit` | `/result` polls | retries (total) "
        "| data-plane calls | client round trips | HTTP bytes per task | data-plane bytes per task "
        "| HTTP served | agent claims | agent heartbeats (total) | runner restarts (total) "
        "| all Redis commands |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )
    if top_lines:
        text += "\nMost frequent grid Redis commands per 1,000 tasks:\n\n" + "\n".join(top_lines) + "\n"
    if notes:
        text += "\nInstrumentation notes: " + "; ".join(notes) + ".\n"
    return text


def _cpu_table(doc: dict) -> str:
    """CPU per task by process role (psutil, user+system), for the sections with a task count."""
    rows = []
    for name in EXECUTORS:
        r = doc["results"].get(name) or {}
        for section, label, key in (("map_c1", "map, chunksize 1", "items"), ("map_c100", "map, chunksize 100", "items"),
                                    ("latency", "submit→result", "n")):
            sec = r.get(section)
            if not _ok(sec) or not sec.get("cpu") or not sec.get(key):
                continue
            roles: dict[str, list[float]] = {}
            for proc in sec["cpu"].values():
                roles.setdefault(proc["role"], []).append(proc["cpu_s"])
            n = sec[key]
            total = sum(sum(v) for v in roles.values())
            parts = ", ".join(
                f"{role}{f' ×{len(v)}' if len(v) > 1 else ''} {1e6 * sum(v) / n:,.0f}"
                for role, v in sorted(roles.items(), key=lambda kv: -sum(kv[1])) if sum(v) > 0)
            rows.append(f"| {LABELS[name]} | {label} | {1e6 * total / n:,.0f} | {parts} |")
    if not rows:
        return "_No CPU figures._\n"
    return ("CPU time (user + system, psutil, 10 ms ticks) per task, in µs, of the client process and "
            "of each of its descendants during the section; a role with ×n sums n processes. The "
            "local grid's HTTP routes and TTL checker run in a process of their own (*control plane*).\n\n"
            "| executor | workload | total µs/task | by process |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _poll_cost(sec: dict | None, tasks_key: str = "items") -> tuple[float, float] | None:
    """(answer bytes per /result request, /result answer bytes per task) of a section, if counted.

    If each poll answered the whole session (HTC-Grid's public design), bytes per task would grow
    with the session; with cursors they stay flat, whatever the session's size.
    """
    if not _ok(sec):
        return None
    conn = (sec.get("counters") or {}).get("connector") or {}
    polls = conn.get("polls", 0)
    if not polls or not sec.get(tasks_key):
        return None
    # every answer body, the few /submit answers included: polls are nearly all of them
    return conn.get("bytes_received", 0) / polls, conn.get("bytes_received", 0) / sec[tasks_key]


def _poll_cost_target(h: dict, cfg: dict) -> tuple[str, str, str]:
    small, large = _poll_cost(h.get("map_c1")), _poll_cost(h.get("scale"))
    what = "control-plane cost per poll independent of session size"
    if not small or not large:
        return what, "not measured", "—"
    text = (f"`/result` answer bytes per task: {small[1]:,.0f} B over {cfg['map_items']:,}-task maps, "
            f"{large[1]:,.0f} B over the {cfg['scale_items']:,}-task map (flat if polls return only "
            "what changed since the last one)")
    return what, text, verdict_text(large[1] <= 1.5 * small[1])


def verdict_text(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _targets(doc: dict) -> str:
    results, cfg = doc["results"], doc["config"]
    h, p = results.get("htcgrid", {}), results.get(REF, {})
    rows = []

    def verdict(ok: bool | None) -> str:
        return "—" if ok is None else ("met" if ok else "**not met**")

    def both(section: str) -> tuple[dict | None, dict | None]:
        a, b = h.get(section), p.get(section)
        return (a, b) if _ok(a) and _ok(b) else (None, None)

    a, b = both("map_c1")
    rows.append(("map throughput, chunksize 1 ≥ 1.5× ProcessPoolExecutor",
                 f"{a['tasks_per_s'] / b['tasks_per_s']:.2f}×" if a else "not measured",
                 verdict(a['tasks_per_s'] >= 1.5 * b['tasks_per_s'] if a else None)))
    a, b = both("map_c100")
    rows.append(("map throughput, chunksize 100 ≥ 1.2× ProcessPoolExecutor",
                 f"{a['tasks_per_s'] / b['tasks_per_s']:.2f}×" if a else "not measured",
                 verdict(a['tasks_per_s'] >= 1.2 * b['tasks_per_s'] if a else None)))
    busy, idle = h.get("busy"), h.get("map_c1")
    if _ok(busy) and _ok(idle):
        kept = busy["tasks_per_s"] / idle["tasks_per_s"]
        vs = (f", {busy['tasks_per_s'] / p['busy']['tasks_per_s']:.1f}× ProcessPoolExecutor busy"
              if _ok(p.get("busy")) else "")
        rows.append(("busy client: map keeps ≥ 90% of the grid's idle rate", f"{kept:.0%}{vs}", verdict(kept >= 0.9)))
    else:
        rows.append(("busy client: map keeps ≥ 90% of the grid's idle rate", "not measured", "—"))
    lat = h.get("latency")
    rows.append(("single-task round trip p50 < 1 ms",
                 f"{lat['p50_ms']:.2f} ms" if _ok(lat) else "not measured",
                 verdict(lat["p50_ms"] < 1 if _ok(lat) else None)))
    rows.append(("single-task round trip p99 < 2.5 ms",
                 f"{lat['p99_ms']:.2f} ms" if _ok(lat) else "not measured",
                 verdict(lat["p99_ms"] < 2.5 if _ok(lat) else None)))
    a, b = both("map_c1")
    if a and a.get("cpu") and b.get("cpu"):
        def client_us(sec: dict) -> float:
            return 1e6 * sum(x["cpu_s"] for x in sec["cpu"].values() if x["role"] == "client") / sec["items"]
        mine, theirs = client_us(a), client_us(b)
        rows.append(("client-process CPU per task, chunksize 1 ≤ ProcessPoolExecutor's",
                     f"{mine:,.0f} µs vs {theirs:,.0f} µs", verdict(mine <= theirs)))
    sc, base = h.get("scale"), h.get("map_c1")
    full = cfg["scale_items"] >= 1_000_000
    if _ok(sc):
        peak = sc["peak_rss_sampled"] / MB
        rows.append((f"{cfg['scale_items']:,}-item map: client peak < 150 MB",
                     f"{peak:.0f} MB" + ("" if full else " (not the 1M run)"), verdict(peak < 150 if full else None)))
        if _ok(base):
            ratio = sc["tasks_per_s"] / base["tasks_per_s"]
            rows.append((f"{cfg['scale_items']:,}-item map throughput ≥ 90% of the {cfg['map_items']:,}-item run",
                         f"{ratio:.0%}", verdict(ratio >= 0.9 if full else None)))
    else:
        rows.append(("1,000,000-item map: peak < 150 MB, throughput ≥ 90%", _status(sc), "—"))
    rows.append(_poll_cost_target(h, cfg))
    return ("| target | measured | |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n")


def _problems(doc: dict) -> str:
    lines = []
    for name in EXECUTORS:
        r = doc["results"].get(name)
        if not r:
            continue
        for key in ("_unavailable", "_fatal"):
            if r.get(key):
                lines.append(f"- {LABELS[name]}: {key.strip('_')}: `{r[key]}`")
        if r.get("_leftover_processes"):
            left = r["_leftover_processes"]
            names = "; ".join(f"`{w}`" for w in left) if isinstance(left, list) else str(left)
            lines.append(f"- {LABELS[name]}: process(es) still alive after a clean shutdown, killed by the "
                         f"harness: {names}")
        for section, sec in r.items():
            if isinstance(sec, dict) and sec.get("status") in ("error", "timeout"):
                detail = sec.get("error") or f"no result within {sec.get('bound_s')} s"
                lines.append(f"- {LABELS[name]} / {section}: {sec['status']}: `{str(detail)[:300]}`")
    return "\n".join(lines) + "\n" if lines else "None.\n"


def _plots(doc: dict, img: Path) -> list[tuple[str, str]]:
    """Write the PNGs; return (title, relative path) pairs. No matplotlib: no plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    img.mkdir(parents=True, exist_ok=True)
    results = doc["results"]
    names = [n for n in EXECUTORS if n in results]
    out = []

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [results[name].get(s, {}).get("tasks_per_s", 0) if _ok(results[name].get(s)) else 0
                for s in ("map_c1", "map_c100")]
        ax.bar([x + i * width for x in (0, 1)], vals, width, label=LABELS[name])
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in (0, 1)], ["chunksize 1", "chunksize 100"])
    ax.set_yscale("log")
    ax.set_ylabel("no-op tasks per second (log)")
    ax.set_title(f"map throughput, {doc['config']['map_items']:,} items, {doc['config']['workers']} workers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "bench-throughput.png", dpi=100)
    plt.close(fig)
    out.append(("Throughput by chunksize", "img/bench-throughput.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        lat = results[name].get("latency")
        if _ok(lat):
            s = sorted(lat["samples_ms"])
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=LABELS[name])
    ax.set_xscale("log")
    ax.set_xlabel("submit(noop).result() round trip (ms, log)")
    ax.set_ylabel("fraction of calls (CDF)")
    ax.set_title("single-task latency distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "bench-latency.png", dpi=100)
    plt.close(fig)
    out.append(("Latency distribution", "img/bench-latency.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        o = results[name].get("outstanding")
        if _ok(o) and o.get("samples"):
            base = o["samples"][0][1]
            a1.plot([s[0] for s in o["samples"]], [(s[1] - base) / MB for s in o["samples"]], label=LABELS[name])
        sc = results[name].get("scale")
        if _ok(sc) and sc.get("samples"):
            a2.plot([s[1] for s in sc["samples"]], [s[2] / MB for s in sc["samples"]],
                    label=f"{LABELS[name]}: client")
            a2.plot([s[1] for s in sc["samples"]], [s[3] / MB for s in sc["samples"]], linestyle="--",
                    label=f"{LABELS[name]}: grid processes")
    a1.set_xlabel("outstanding futures")
    a1.set_ylabel("client RSS growth (MB)")
    a1.set_title("client memory against outstanding futures")
    if a1.get_legend_handles_labels()[0]:
        a1.legend(fontsize=8)
    a2.set_xlabel("results consumed")
    a2.set_ylabel("RSS (MB)")
    a2.set_title(f"{doc['config']['scale_items']:,}-item map with buffersize")
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=8)
    else:
        a2.text(0.5, 0.5, "no executor ran the scale run", ha="center", transform=a2.transAxes)
    fig.tight_layout()
    fig.savefig(img / "bench-memory.png", dpi=100)
    plt.close(fig)
    out.append(("Memory against task count", "img/bench-memory.png"))
    return out


def _hand_written(existing: Path) -> str:
    if existing.exists():
        text = existing.read_text()
        if HAND_BEGIN in text and HAND_END in text:
            return text[text.index(HAND_BEGIN): text.index(HAND_END) + len(HAND_END)]
    return f"{HAND_BEGIN}\n_No analysis yet: profile with `python -m benchmarks --profile`._\n{HAND_END}"


_DEPLOYMENT_ROWS = [
    ("map_sec", "map of 200 no-ops, no chunksize (s)"),
    ("map_result_polls", "`/result` polls during that map"),
    ("map_client_dataplane_calls_per_call", "client data-plane calls per call (map)"),
    ("map_redis_commands_per_call", "Redis commands per call, every process (map)"),
    ("single_task_sec", "submit→result, one at a time (s)"),
    ("single_result_polls", "`/result` polls per single task"),
    ("single_client_dataplane_calls", "client data-plane calls per single task"),
    ("single_redis_commands", "Redis commands per single task, every process"),
]


def _deployment(section: dict | None) -> str:
    """The upstream HTC-Grid code (../shared/upstream_grid, 3 agents) next to the local grid."""
    if not section:
        return "_Not run (`--quick` or `--no-deployment`)._\n"
    if "unavailable" in section:
        return f"_Not available: {section['unavailable']}._\n"
    columns = [c for c in ("REDIS", "S3", "local") if c in section]
    head = "| | " + " | ".join("local grid" if c == "local" else f"upstream, {c}" for c in columns) + " |\n"
    head += "|---" * (len(columns) + 1) + "|\n"
    rows = "".join(f"| {label} | " + " | ".join(str(section[c].get(key, "–")) for c in columns) + " |\n"
                   for key, label in _DEPLOYMENT_ROWS)
    return ("The executor on the real upstream HTC-Grid code (finos/htc-grid: its submit, get-results, "
            "cancel and TTL-checker functions and 3 `agent.py` processes on moto and a real Redis) and "
            "on the embedded local grid, in the same run. Polls per configured interval "
            "(`dynamodb_results_pull_interval_sec` 0.5 s upstream); the Redis commands include the "
            "agents' and the handler's guard (S3 mode: no Redis). On the local grid the poll rows count every "
            "HTTP request, and `map` keeps chunksize 1 (its per-task overhead is small).\n\n" + head + rows)


def write_report(doc: dict, out: Path) -> tuple[Path, str]:
    """Write ``out/benchmarks.md`` and ``out/img/*.png``; return the path and the main table."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "benchmarks.md"
    m, cfg = doc["machine"], doc["config"]
    plots = _plots(doc, out / "img")
    table = _main_table(doc)
    versions = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    command = "python -m benchmarks " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
        ("benchmarks", "__main__.py", "run.py")) else "python -m benchmarks"
    parts = [
        "# Benchmarks\n",
        "HTCGridExecutor on the embedded local grid against its peers: the same work, the same worker "
        f"count, one run. Generated by `{command}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"in {doc['elapsed_s']:.0f} s{' (--quick: small counts)' if cfg['quick'] else ''}.\n",
        "Reproduce: `pip install -e '.[bench]'` (plus `py-spy` for `--profile`), then `python -m benchmarks` "
        "(`--workers N`, `--quick` for a run under a minute, `--out DIR`, `--only htcgrid,process`, "
        "`--profile`, `--json FILE` for the raw figures; `--help` lists the sizes and bounds). Each "
        "executor runs in its own process with a wall-clock bound per section; `timeout` in a cell "
        "means the bound passed. `python -m benchmarks.micro` times the layers of one task in isolation; "
        "`python -m benchmarks.paired OTHER_TREE` runs a short measurement on this checkout and another "
        "source tree alternately and prints the pairs (for judging a change on a busy machine); "
        "`python -m benchmarks.startup` times making an executor (the first of a process, the next "
        "right after a shutdown, and one a second later) beside ProcessPoolExecutor.\n",
        "## Machine\n",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB; {m['os']}\n"
        f"- {m['python']}; {versions}\n"
        f"- commit {m['commit']}; {cfg['workers']} workers for every executor\n"
        + _load_line(doc),
        "## Throughput and latency\n",
        "Ratios in parentheses are to ProcessPoolExecutor on the same run (higher is better for "
        "throughput, lower for latency).\n",
        table,
        "How each figure is taken:\n\n"
        f"- *map*: `list(ex.map(noop, range(n), chunksize=c))` with n = {cfg['map_items']:,} at chunksize 1 "
        f"and {cfg.get('map_c100_items', cfg['map_items']):,} at chunksize 100, timed from the call to "
        f"the last result, median of {cfg['repeats']} run(s) (one when a run takes over 10 s); `noop` returns its argument. dask's `ClientExecutor.map` drops `chunksize` "
        "(one dask task per item), so its two columns measure the same thing.\n"
        f"- *busy client*: the chunksize-1 map of {cfg['busy_items']:,} no-ops consumed by a thread while "
        "the main thread runs a pure-Python loop (a client computing while the grid works), median of "
        f"{cfg['repeats']} runs; *of its idle rate*: against the same executor's chunksize-1 map.\n"
        f"- *submit→result*: {cfg['repeats']} runs of {cfg['latency_n']:,} calls of `ex.submit(noop, i).result()`, "
        f"one at a time, after a warm-up (fewer if {1 if cfg['quick'] else 15} s run out first); p50 and "
        "p99 are the medians of the runs' own.\n"
        "- *±x%*: half the range of the runs (max − min) over their median: how far one run may be "
        "from the figure on this machine.\n"
        f"- *10 ms tasks*: `map` of {cfg['sleep_n']:,} calls (median of {cfg['repeats']} run(s)) of `time.sleep(0.01)` (a sleep, not a busy "
        f"loop, so the client and the grid do not compete with the work for the cores); efficiency = "
        f"ideal `n × 10 ms / {cfg['workers']}` over the wall time.\n"
        "- *start*: the executor's construction plus a warm-up (every worker started).\n"
        "- Every executor runs in its own process, one after the other; dask with `pure=False` (otherwise "
        "equal calls share a key and are served from memory).\n",
        "## Scale and memory\n",
        _scale_table(doc),
        "\n- The scale run is a separate process per executor, its client RSS (psutil) sampled every "
        "100 ms; the grid's or the pool's own processes are summed apart. `map(..., buffersize=)` "
        "exists in the stdlib from Python 3.14, hence *n/a* for the peers on older Pythons.\n"
        "- *memory per outstanding future*: every worker is held on a gate task, then no-ops are "
        "submitted one by one; (RSS after − RSS before) / submitted, after `gc.collect()`.\n",
        "## CPU per task, by process\n",
        _cpu_table(doc),
        "## Control-plane calls (HTCGridExecutor)\n",
        _control_table(doc),
        "## Deployment (upstream code, emulated AWS)\n",
        _deployment(doc.get("deployment")),
        "## Targets (issue 15)\n",
        _targets(doc),
        "## Plots\n",
        "\n".join(f"![{t}]({p})" for t, p in plots) + "\n" if plots else "_matplotlib not installed: no plots._\n",
        "## Timeouts, errors, leftovers\n",
        _problems(doc),
        "## Where the time goes\n",
        _hand_written(md),
        "\n",
    ]
    if doc.get("profile"):
        from .profile import profile_markdown

        parts += ["### Profile of this run (py-spy, generated)\n", profile_markdown(doc["profile"])]
    md.write_text("\n".join(parts))
    return md, table

