"""The executor on the real upstream HTC-Grid code (``../shared/upstream_grid``, emulated AWS).

``python -m benchmarks.deployment [--storage REDIS|S3] [--checks]`` prints map and single-task
figures (time, ``/result`` polls and data-plane calls per task) and, with ``--checks``, the
issue-10 checks: cancel/shutdown time, 504 replay run counts, time limit, ``retry_count=0``, CLI
status. Needs ``../shared/upstream_grid`` and its dependencies (its README); without them
:func:`available` says why and nothing runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared"


def available() -> str | None:
    """None when the upstream grid can run here, else why not."""
    if not (SHARED / "upstream_grid").is_dir():
        return f"{SHARED / 'upstream_grid'} is absent"
    if str(SHARED) not in sys.path:
        sys.path.insert(0, str(SHARED))
    try:
        import moto  # noqa: F401
        import upstream_grid  # noqa: F401
    except ImportError as exc:
        return f"cannot import the upstream grid: {exc}"
    return None


def _worker(grid: Any, storage: str) -> Any:
    """The library's handler as a lambda.zip would hold it, with what its guard needs: redis-py
    for REDIS (in the zip), boto3 for S3 (from this interpreter: it is part of Lambda's images)."""
    import cloudpickle
    import redis
    from upstream_grid import Worker

    import htcgrid_executor

    root = tempfile.mkdtemp(prefix="wt-worker-")
    try:
        for module in (htcgrid_executor, cloudpickle, redis):
            package = os.path.dirname(module.__file__)
            shutil.copytree(package, os.path.join(root, os.path.basename(package)),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with open(os.path.join(root, "htcgrid_worker.py"), "w") as handle:
            handle.write("from htcgrid_executor.worker import lambda_handler  # noqa: F401\n")
        worker = Worker.from_dir(root, "htcgrid_worker.lambda_handler",
                                 {"HTCGRID_PAYLOAD_KEY": grid.worker.env["HTCGRID_PAYLOAD_KEY"],
                                  "HTCGRID_REDIS_PASSWORD": grid.redis_password})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if storage != "REDIS":
        worker.isolated = False  # boto3 from site-packages, as the Lambda image has it
    return worker


@contextlib.contextmanager
def upstream(storage: str = "REDIS", agents: int = 3, **options: Any):
    """An upstream grid running this package's handler with its guard, and its client config."""
    from upstream_grid import UpstreamGrid

    grid = UpstreamGrid(agents=agents, storage=storage, **options)
    grid.worker = _worker(grid, storage)
    upload = grid._upload_worker

    def upload_with_endpoints(worker: Any) -> None:
        worker.env.update(grid.client_env())  # moto's endpoint and dummy credentials for boto3
        upload(worker)

    grid._upload_worker = upload_with_endpoints
    with grid:
        saved = dict(os.environ)
        os.environ.update(grid.client_env())
        os.environ["INTRA_VPC"] = "1"
        try:
            config = grid.client_config(payload_signing_key=grid.payload_signing_key,
                                        htcgrid_worker_guard_lease_sec=5)
            yield grid, config
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _noop(x: int) -> int:
    return x


def _sleep(sec: float) -> float:
    time.sleep(sec)
    return sec


def _count_run(path: str, value: int) -> int:
    with open(path, "a") as handle:
        handle.write(f"{value}\n")
    return value


def _polls(grid: Any) -> int:
    stats = grid.stats()
    routes = stats.get("routes") or stats.get("requests") or {}
    return sum(v for k, v in routes.items() if "/result" in k) if isinstance(routes, dict) else -1


def figures(grid: Any, config: dict[str, Any], n: int = 200) -> dict[str, Any]:
    """map of ``n`` no-op calls (no chunksize) and one single task: seconds and /result polls."""
    from htcgrid_executor import HTCGridExecutor

    out: dict[str, Any] = {}
    with HTCGridExecutor(config=config) as executor:
        executor.submit(_noop, 0).result(timeout=120)  # warm up
        before = _polls(grid)
        started = time.perf_counter()
        assert list(executor.map(_noop, range(n))) == list(range(n))
        out["map_sec"] = round(time.perf_counter() - started, 2)
        out["map_result_polls"] = _polls(grid) - before
        before = _polls(grid)
        started = time.perf_counter()
        executor.submit(_noop, 1).result(timeout=120)
        out["single_sec"] = round(time.perf_counter() - started, 2)
        out["single_result_polls"] = _polls(grid) - before
    return out


def checks(grid: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The issue-10 checks on the real upstream code; each figure as measured."""
    from concurrent.futures import CancelledError

    from htcgrid_executor import HTCGridExecutor, TaskFailedError
    from htcgrid_executor.cli import main as cli

    out: dict[str, Any] = {}
    runs = tempfile.mktemp(prefix="wt-runs-")
    Path(runs).touch()

    # 1. shutdown(cancel_futures=True) with a queue behind a few long calls
    executor = HTCGridExecutor(config=config)
    futures = [executor.submit(_sleep, 1.0) for _ in range(3)] + [executor.submit(_count_run, runs, i)
                                                                    for i in range(13)]
    time.sleep(2.0)
    started = time.perf_counter()
    executor.shutdown(wait=True, cancel_futures=True)
    out["shutdown_cancel_sec"] = round(time.perf_counter() - started, 2)
    out["cancelled_futures"] = sum(f.cancelled() for f in futures)
    time.sleep(4.0)
    out["cancelled_calls_that_ran"] = len(Path(runs).read_text().split()) - sum(
        1 for f in futures[3:] if not f.cancelled())

    # Future.cancel() returns at once; the call never runs
    Path(runs).write_text("")
    with HTCGridExecutor(config=config) as executor:
        blockers = [executor.submit(_sleep, 2.0) for _ in range(3)]
        victim = executor.submit(_count_run, runs, 99)
        time.sleep(1.0)
        started = time.perf_counter()
        out["future_cancel"] = victim.cancel()
        out["future_cancel_sec"] = round(time.perf_counter() - started, 3)
        for f in blockers:
            f.result(timeout=60)
        executor.submit(_noop, 0).result(timeout=60)
    time.sleep(2.0)
    out["cancelled_victim_ran"] = "99" in Path(runs).read_text().split()

    # 2. a 504-replayed submission runs each call once
    Path(runs).write_text("")
    grid.inject_fault("POST /submit", 504, times=1, delay=0.5)
    with HTCGridExecutor(config=config) as executor:
        values = [f.result(timeout=120) for f in [executor.submit(_count_run, runs, i) for i in range(10)]]
        time.sleep(3.0)  # the replayed copies are delivered too
    counts = [Path(runs).read_text().split().count(str(i)) for i in range(10)]
    out["replay_504_results_ok"] = values == list(range(10))
    out["replay_504_runs_per_call"] = sorted(set(counts))

    # 3. a time limit stops the call with TaskFailedError
    with HTCGridExecutor(config=config, task_timeout_sec=1) as executor:
        started = time.perf_counter()
        try:
            executor.submit(_sleep, 3.0).result(timeout=60)
            out["timeout"] = "returned a result"
        except TaskFailedError as exc:
            out["timeout"] = f"TaskFailedError after {time.perf_counter() - started:.1f} s: {exc.reason}"

    # 4. retry_count=0: a call whose pod is lost (agent and worker killed) fails
    with HTCGridExecutor(config=config, retry_count=0) as executor:
        future = executor.submit(_sleep, 6.0)
        victim_pod = None
        deadline = time.time() + 20
        while victim_pod is None and time.time() < deadline:
            time.sleep(0.3)
            rows = [row for sid in [s["session_id"] for s in executor.sessions()] for row in grid.tasks(sid)]
            owners = [row.get("task_owner") for row in rows if str(row.get("task_status", "")).startswith("processing")]
            victim_pod = next((o for o in owners if o and o != "None"), None)
        if victim_pod is not None:
            pod = next(p for p in grid._pods if p["name"] == victim_pod)
            pod["worker"].kill()
            grid.kill_agent(victim_pod)
        try:
            future.result(timeout=120)
            out["retry_count_0"] = "returned a result"
        except TaskFailedError as exc:
            out["retry_count_0"] = f"TaskFailedError: {exc.reason}"
        except CancelledError:
            out["retry_count_0"] = "cancelled"

    # 5. CLI status of a collected session
    with HTCGridExecutor(config=config) as executor:
        executor.submit(_noop, 1).result(timeout=60)
        sid = next(iter(executor._core.tasks), None)
        records = executor.sessions()
    path = tempfile.mktemp(suffix=".json")
    Path(path).write_text(json.dumps(config))
    # the session of the call above: the only one this executor made
    del sid, records
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        cli(["status", "--config", path, *sorted(grid_sessions(grid))[-1:]])
    out["cli_status"] = buffer.getvalue().strip().splitlines()[-1]
    os.unlink(path)
    return out


def grid_sessions(grid: Any) -> set[str]:
    ddb = grid.aws("dynamodb")
    items = ddb.scan(TableName=grid.names["ddb_state_table"], ProjectionExpression="session_id,submission_timestamp")
    latest: dict[str, int] = {}
    for item in items["Items"]:
        latest[item["session_id"]["S"]] = int(item.get("submission_timestamp", {}).get("N", 0))
    newest = max(latest.values())
    return {sid for sid, t in latest.items() if t == newest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment")
    parser.add_argument("--storage", default="REDIS")
    parser.add_argument("--checks", action="store_true")
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args(argv)
    why = available()
    if why:
        print(f"deployment (upstream code, emulated AWS): not available: {why}")
        return 0
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import it
    with upstream(args.storage) as (grid, config):
        result = {"storage": args.storage, **figures(grid, config, args.tasks)}
        if args.checks:
            result.update(checks(grid, config))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
