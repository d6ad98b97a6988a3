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
def upstream(storage: str = "REDIS", agents: int = 3, zip_path: str | None = None, **options: Any):
    """An upstream grid running this package's handler with its guard, and its client config.
    ``zip_path``: a lambda.zip built as docs/worker-handler.md says, run as it is."""
    from upstream_grid import UpstreamGrid, Worker

    grid = UpstreamGrid(agents=agents, storage=storage, **options)
    if zip_path:
        env = {"HTCGRID_PAYLOAD_KEY": grid.worker.env["HTCGRID_PAYLOAD_KEY"],
               "HTCGRID_REDIS_PASSWORD": grid.redis_password}
        grid.worker = Worker.from_zip(zip_path, "htcgrid_worker.lambda_handler", env)
    else:
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
    return sum(v for k, v in stats.get("requests", {}).items() if "/result" in k)


class _Counted:
    """Counts the client's data-plane calls (batched reads, writes, deletes) through the
    connector the executor was given, from its own counters (``AWSConnector.stats``)."""

    def __init__(self, connector: Any) -> None:
        self._connector = connector
        self._start = self._total()

    def _total(self) -> int:
        return int(self._connector.stats()["dataplane_calls"])

    @property
    def calls(self) -> int:
        return self._total() - self._start

    def restart(self) -> None:
        self._start = self._total()


def _redis_commands(client: Any) -> int:
    return int(client.info("stats")["total_commands_processed"]) if client is not None else -1


def figures(executor: Any, connector: Any, polls: Any, redis_client: Any, n: int = 200) -> dict[str, Any]:
    """map of ``n`` no-op calls (no chunksize) and 20 single tasks one by one, on ``executor``
    (built on ``connector``): seconds, ``/result`` polls (``polls()`` counts them on the grid), the
    client's data-plane calls and the data plane's Redis commands (every process: client, agents,
    handler) per call."""
    out: dict[str, Any] = {}
    executor.submit(_noop, 0).result(timeout=120)  # warm up (and a first call time measured)
    counted = _Counted(connector)
    before, commands, started = polls(), _redis_commands(redis_client), time.perf_counter()
    assert list(executor.map(_noop, range(n))) == list(range(n))
    out["map_sec"] = round(time.perf_counter() - started, 2)
    out["map_result_polls"] = polls() - before
    out["map_client_dataplane_calls_per_call"] = round(counted.calls / n, 3)
    if redis_client is not None:
        out["map_redis_commands_per_call"] = round((_redis_commands(redis_client) - commands) / n, 2)
    singles = 20
    counted.restart()
    before, commands, started = polls(), _redis_commands(redis_client), time.perf_counter()
    for i in range(singles):
        executor.submit(_noop, i).result(timeout=120)
    out["single_task_sec"] = round((time.perf_counter() - started) / singles, 3)
    out["single_result_polls"] = round((polls() - before) / singles, 2)
    out["single_client_dataplane_calls"] = round(counted.calls / singles, 2)
    if redis_client is not None:
        out["single_redis_commands"] = round((_redis_commands(redis_client) - commands) / singles, 1)
    return out


def upstream_figures(grid: Any, config: dict[str, Any], n: int = 200) -> dict[str, Any]:
    import redis

    from htcgrid_executor import AWSConnector, HTCGridExecutor

    client = None
    if grid.redis_address:
        host, port = grid.redis_address.split(":")
        client = redis.Redis(host=host, port=int(port), password=grid.redis_password)
    with AWSConnector(config) as connector, HTCGridExecutor(connector=connector) as executor:
        return figures(executor, connector, lambda: _polls(grid), client, n)


def local_figures(n: int = 200, workers: int = 3) -> dict[str, Any]:
    """The same figures on the embedded local grid (``workers`` agents), for comparison."""
    from htcgrid_executor import AWSConnector, HTCGridExecutor, LocalGrid

    with LocalGrid(workers=workers) as grid:
        with AWSConnector(grid.client_config) as connector, HTCGridExecutor(connector=connector) as executor:
            # the grid's own (admin) connection: a client's ACL user may not run INFO
            return figures(executor, connector, lambda: grid.requests_served, grid.redis, n)


def _step(text: str) -> None:
    print(f"[deployment] {text}", file=sys.stderr, flush=True)


def checks(grid: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The issue-10 checks on the real upstream code; each figure as measured."""
    from concurrent.futures import CancelledError
    from concurrent.futures import TimeoutError as ResultTimeout  # not the builtin on 3.10

    from htcgrid_executor import HTCGridExecutor, TaskFailedError
    from htcgrid_executor.cli import main as cli

    out: dict[str, Any] = {}
    runs = tempfile.mktemp(prefix="wt-runs-")
    Path(runs).touch()

    _step("shutdown(cancel_futures=True)")
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
    ran = {int(value) for value in Path(runs).read_text().split()}
    counted = dict(enumerate(futures[3:]))
    out["cancelled_calls_that_ran"] = sum(1 for i, f in counted.items() if f.cancelled() and i in ran)
    # S3's documented window: a begun-looking call the handler then skipped (its kept future
    # raises CancelledError); counted apart, it is no cancelled call that ran
    out["kept_futures_whose_call_was_skipped"] = sum(1 for i, f in counted.items()
                                                     if not f.cancelled() and i not in ran)

    _step("Future.cancel()")
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

    _step("504 replay")
    # 2. a 504-replayed submission runs each call once
    Path(runs).write_text("")
    grid.inject_fault("POST /submit", 504, times=1, delay=0.5)
    with HTCGridExecutor(config=config) as executor:
        values = [f.result(timeout=120) for f in [executor.submit(_count_run, runs, i) for i in range(10)]]
        time.sleep(3.0)  # the replayed copies are delivered too
    counts = [Path(runs).read_text().split().count(str(i)) for i in range(10)]
    out["replay_504_results_ok"] = values == list(range(10))
    out["replay_504_runs_per_call"] = sorted(set(counts))

    _step("time limit")
    # 3. a time limit stops the call with TaskFailedError
    with HTCGridExecutor(config=config, task_timeout_sec=1) as executor:
        started = time.perf_counter()
        try:
            executor.submit(_sleep, 3.0).result(timeout=60)
            out["timeout"] = "returned a result"
        except TaskFailedError as exc:
            out["timeout"] = f"TaskFailedError after {time.perf_counter() - started:.1f} s: {exc.reason}"

    _step("retry_count=0")
    # 4. retry_count=0: a call whose pod is lost (agent and worker killed) fails
    executor = HTCGridExecutor(config=config, retry_count=0)
    finished = False
    try:
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
        except ResultTimeout:
            # upstream did not deliver the lost task again within the time (its retry waits
            # for the TTL checker and the queue's visibility timeout): a figure, not a hang
            out["retry_count_0"] = "no answer within 120 s (upstream did not retry the lost task)"
        finished = future.done()
    finally:
        executor.shutdown(wait=finished, cancel_futures=True)

    _step("CLI status")
    # 5. CLI status of a collected session
    with HTCGridExecutor(config=config) as executor:
        executor.submit(_noop, 1).result(timeout=60)
        records = executor.sessions()
    path = tempfile.mktemp(suffix=".json")
    Path(path).write_text(json.dumps(config))
    # the session of the call above: the only one this executor made
    del records
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


def run(storages: list[str], with_checks: bool, n: int = 200, local: bool = True,
        zip_path: str | None = None) -> dict[str, Any]:
    """Figures (and checks) per storage mode on the upstream grid, and on the local grid."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import it
    results: dict[str, Any] = {}
    for storage in storages:
        _step(f"upstream grid, {storage}: figures")
        with upstream(storage, zip_path=zip_path) as (grid, config):
            results[storage] = upstream_figures(grid, config, n)
            if with_checks:
                results[storage].update(checks(grid, config))
    if local:
        _step("local grid: figures")
        results["local"] = local_figures(n)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment")
    parser.add_argument("--storage", default="REDIS", help="REDIS, S3 or both (REDIS,S3)")
    parser.add_argument("--checks", action="store_true", help="also the issue-10 checks")
    parser.add_argument("--no-local", action="store_true", help="skip the local grid's figures")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--zip", help="run this lambda.zip (built as docs/worker-handler.md says)")
    args = parser.parse_args(argv)
    why = available()
    if why:
        print(json.dumps({"unavailable": why}))
        return 0
    import faulthandler

    faulthandler.dump_traceback_later(240, repeat=True)
    print(json.dumps(run(args.storage.split(","), args.checks, args.tasks, not args.no_local, args.zip), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
