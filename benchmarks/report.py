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


def _cell(results: dict, name: str, section: str, fmt, key: str, ref_key: str | None = None) -> str:
    sec = results.get(name, {}).get(section)
    if not _ok(sec):
        return _status(sec)
    value = sec.get(key)
    if value is None:
        return "n/a"
    ref_sec = results.get(REF, {}).get(section)
    ref = ref_sec.get(ref_key or key) if _ok(ref_sec) and name != REF else None
    return fmt(value) + _ratio(value, ref)


def _load_line(doc: dict) -> str:
    loads = [f"{LABELS[n].split(' ')[0]} {doc['results'][n]['_loadavg'][0]:.2f}"
             for n in EXECUTORS if isinstance(doc["results"].get(n), dict) and "_loadavg" in doc["results"][n]]
    if not loads:
        return ""
    return ("- 1-minute load average when each executor's turn began (other work on the machine skews "
            "the figures; 0 is an idle machine): " + ", ".join(loads) + "\n")


def _main_table(doc: dict) -> str:
    results, cfg = doc["results"], doc["config"]
    w = cfg["workers"]
    head = (
        f"| executor ({w} workers) | start (s) | map no-op, chunksize 1 | map no-op, chunksize 100 "
        f"| submit→result p50 | p99 | 10 ms tasks: efficiency (wall) |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name in EXECUTORS:
        label = LABELS[name]
        if name in cfg["skipped"]:
            rows.append(f"| {label} | not run ({cfg['skipped'][name]}) | | | | | |")
            continue
        r = results.get(name, {})
        start = r.get("startup", {})
        start_cell = f"{start['start_s']:.2f}" if _ok(start) else _status(start)
        c1 = _cell(results, name, "map_c1", _rate, "tasks_per_s")
        c100 = _cell(results, name, "map_c100", _rate, "tasks_per_s")
        if name == "dask":
            c100 += " (chunksize ignored)" if _ok(r.get("map_c100")) else ""
        p50 = _cell(results, name, "latency", lambda v: f"{v:.2f} ms", "p50_ms")
        p99 = _cell(results, name, "latency", lambda v: f"{v:.2f} ms", "p99_ms")
        sl = r.get("sleep10")
        if _ok(sl):
            ref = results.get(REF, {}).get("sleep10")
            eff = f"{sl['efficiency']:.0%} ({sl['wall_s']:.2f} s vs {sl['ideal_s']:.2f} s)"
            if _ok(ref) and name != REF:
                eff += f", {sl['efficiency'] / ref['efficiency']:.2f}×"
        else:
            eff = _status(sl)
        rows.append(f"| {label} | {start_cell} | {c1} | {c100} | {p50} | {p99} | {eff} |")
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
        ("latency", "submit→result, one at a time", "n"),
        ("sleep10", "map of 10 ms tasks", "n"),
        ("scale", "scale map (buffersize)", "items"),
    ):
        sec = r.get(section)
        if not _ok(sec) or "counters" not in sec:
            continue
        n = sec[tasks_key]
        c = sec["counters"]

        def per_k(key: str, c=c, n=n) -> str:
            return f"{c[key] * 1000 / n:,.1f}" if key in c else "n/a"

        routes = c.get("http_routes") or {}
        polls = routes.get("result_requests", 0)
        per_poll = (f"{polls * 1000 / n:,.1f}; {routes.get('result_bytes', 0) / polls:,.0f} B; "
                    f"{routes.get('result_bytes', 0) / n:,.0f} B") if polls else "n/a"
        connector = c.get("connector") or {}
        conn = ", ".join(f"{k} {v * 1000 / n:,.1f}" for k, v in sorted(connector.items())) or "not exposed"
        rows.append(f"| {label} | {n:,} | {per_k('client_http_requests')} | {per_k('grid_http_requests_served')} "
                    f"| {per_k('client_redis_round_trips')} | {per_k('grid_inprocess_redis_round_trips')} "
                    f"| {per_k('agents_redis_round_trips')} | {per_k('redis_commands')} | {per_poll} | {conn} |")
        stats = c.get("redis_commandstats") or {}
        top = sorted(stats.items(), key=lambda kv: -kv[1])[:8]
        if top:
            top_lines.append(f"- {label}: " + ", ".join(f"`{k}` {v * 1000 / n:,.1f}" for k, v in top))
    if not rows:
        return "_Not measured: HTCGridExecutor did not run (see its row above)._\n"
    start = r.get("startup", {})
    notes = start.get("instrument_notes") or []
    text = (
        "Per 1,000 tasks. *HTTP sent*: requests the client process started; *HTTP served*: "
        "`LocalGrid.requests_served`; *client Redis*: round trips (a pipeline is one) sent by the "
        "executor's and connector's threads (the data plane); *routes' Redis*: round trips sent by "
        "the local grid's threads inside the client process (HTTP routes, TTL checker); *agents' Redis*: "
        "round trips of the agent processes (all of them; heart-beats and idle waits included); *all "
        "Redis commands*: every command the grid's Redis processed, those run inside Lua scripts "
        "included, from `INFO stats`.\n\n"
        "| workload | tasks | HTTP sent | HTTP served | client Redis round trips | routes' Redis round trips "
        "| agents' Redis round trips | all Redis commands | `/result` polls per 1,000 tasks; bytes per "
        "answer; answer bytes per task | connector's own counters |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
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
            "local grid's HTTP routes and TTL checker run inside the client process.\n\n"
            "| executor | workload | total µs/task | by process |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _poll_cost(sec: dict | None, tasks_key: str = "items") -> tuple[float, float] | None:
    """(answer bytes per /result request, /result answer bytes per task) of a section, if counted.

    If each poll answered the whole session (HTC-Grid's public design), bytes per task would grow
    with the session; with cursors they stay flat, whatever the session's size.
    """
    if not _ok(sec):
        return None
    routes = (sec.get("counters") or {}).get("http_routes") or {}
    polls = routes.get("result_requests", 0)
    if not polls or not sec.get(tasks_key):
        return None
    return routes.get("result_bytes", 0) / polls, routes.get("result_bytes", 0) / sec[tasks_key]


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
    rows.append(("map throughput, chunksize 1 ≥ ProcessPoolExecutor",
                 f"{a['tasks_per_s'] / b['tasks_per_s']:.2f}×" if a else "not measured",
                 verdict(a['tasks_per_s'] >= b['tasks_per_s'] if a else None)))
    a, b = both("map_c100")
    rows.append(("map throughput, chunksize 100 ≥ ½ ProcessPoolExecutor",
                 f"{a['tasks_per_s'] / b['tasks_per_s']:.2f}×" if a else "not measured",
                 verdict(a['tasks_per_s'] >= 0.5 * b['tasks_per_s'] if a else None)))
    lat = h.get("latency")
    rows.append(("single-task round trip p50 < 2 ms",
                 f"{lat['p50_ms']:.2f} ms" if _ok(lat) else "not measured",
                 verdict(lat["p50_ms"] < 2 if _ok(lat) else None)))
    sc, base = h.get("scale"), h.get("map_c1")
    full = cfg["scale_items"] >= 1_000_000
    if _ok(sc):
        peak = sc["peak_rss_sampled"] / MB
        rows.append((f"{cfg['scale_items']:,}-item map: client peak < 300 MB",
                     f"{peak:.0f} MB" + ("" if full else " (not the 1M run)"), verdict(peak < 300 if full else None)))
        if _ok(base):
            ratio = sc["tasks_per_s"] / base["tasks_per_s"]
            rows.append((f"{cfg['scale_items']:,}-item map throughput within 20% of the {cfg['map_items']:,}-item run",
                         f"{ratio:.0%}", verdict(ratio >= 0.8 if full else None)))
    else:
        rows.append(("1,000,000-item map: peak < 300 MB, throughput within 20%", _status(sc), "—"))
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
        "means the bound passed. `python -m benchmarks.micro` times the layers of one task in isolation.\n",
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
        f"- *map*: `list(ex.map(noop, range({cfg['map_items']:,}), chunksize=c))`, timed from the call to "
        f"the last result, median of {cfg['repeats']} run(s) (one when a run takes over 10 s); `noop` returns its argument. dask's `ClientExecutor.map` drops `chunksize` "
        "(one dask task per item), so its two columns measure the same thing.\n"
        f"- *submit→result*: {cfg['latency_n']:,} calls of `ex.submit(noop, i).result()`, one at a time, "
        f"after a warm-up (fewer if {3 if cfg['quick'] else 30} s run out first: the calls made are in "
        "the raw results).\n"
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
        "## Targets (issue 6)\n",
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

