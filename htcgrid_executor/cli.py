"""``htcgrid-executor`` (also ``python -m htcgrid_executor``): run and use a grid from a shell.

    htcgrid-executor demo                 the main job: a parameter sweep on an embedded grid
    htcgrid-executor grid                 run a local grid in the foreground, write its client config
    htcgrid-executor agent                add agents to a running grid (this or another machine)
    htcgrid-executor status SESSION...    counts per state of sessions (pending ... cancelled)
    htcgrid-executor cancel SESSION...    cancel sessions
    htcgrid-executor logs TASK_ID         a task's captured stdout, stderr and logging

Errors are one line on stderr and a non-zero exit status. Logging is configured here, in the
entry point, never by the library.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, GridError

__all__ = ["main"]

DEFAULT_CONFIG = "htcgrid-client-config.json"


def _config_path(given: str | None) -> Path:
    return Path(given or os.environ.get("AGENT_CONFIG_FILE") or DEFAULT_CONFIG)


def _read_config(given: str | None) -> dict[str, Any]:
    from .connector.config import ClientConfig

    path = _config_path(given)
    try:
        return ClientConfig.load_file(path)
    except ConfigurationError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):  # the one case with a CLI-specific hint
            raise ConfigurationError(
                f"no client config at {path}: start a grid with 'htcgrid-executor grid' or pass --config") from None
        raise


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass


# -- commands ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import price_call, sweep_parameters
    from .executor import HTCGridExecutor
    from .progress import progress

    strikes = [80.0 + 5 * i for i in range(args.strikes)]
    volatilities = [0.1 + 0.05 * i for i in range(args.vols)]
    strike_list, vol_list = sweep_parameters(strikes, volatilities)
    started = time.perf_counter()
    with HTCGridExecutor(max_workers=args.workers) as executor:
        quotes = list(progress(executor.map(price_call, strike_list, vol_list),
                               total=len(strike_list), desc="pricing", disable=args.quiet))
    elapsed = time.perf_counter() - started
    print(f"{'strike':>8} {'vol':>6} {'monte carlo':>12} {'± 1 s.e.':>9} {'closed form':>12} {'diff':>8}")
    for quote in quotes:
        print(f"{quote.strike:8.1f} {quote.volatility:6.2f} {quote.monte_carlo:12.4f} "
              f"{quote.std_error:9.4f} {quote.closed_form:12.4f} {quote.monte_carlo - quote.closed_form:8.4f}")
    within = sum(abs(q.monte_carlo - q.closed_form) <= 3 * q.std_error for q in quotes)
    print(f"\n{len(quotes)} options priced on the local grid in {elapsed:.1f} s; "
          f"{within}/{len(quotes)} within 3 standard errors of the closed form.")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .grid import LocalGrid

    grid = LocalGrid(workers=args.workers, handler=args.handler, folder=args.folder, host=args.host,
                     port=args.port, retry_limit=args.retry_limit)
    with grid:
        path = grid.write_client_config(args.config_out)
        print(f"local grid at {grid.url} with {args.workers if args.workers is not None else os.cpu_count()} "
              f"agents; client config written to {path} (owner-only)", flush=True)
        print(f"dashboard (the URL holds the grid's key): {grid.dashboard_url}", flush=True)
        print("add agents from another shell: htcgrid-executor agent --config " + str(path), flush=True)
        print("stop with Ctrl-C", flush=True)
        _wait_for_signal()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from .grid.agent import AgentSettings
    from .grid.child_processes import describe_exit
    from .grid.local_grid import start_agent_process

    config = _read_config(args.config)
    redis_url = config.get("htcgrid_redis_control_url")
    if not redis_url:
        raise ConfigurationError("the client config has no 'htcgrid_redis_control_url': "
                                 "agents can join only a grid started by 'htcgrid-executor grid'")
    options = dict(config.get("htcgrid_agent_settings") or {})
    if args.handler:
        options["handler"] = args.handler
    settings = AgentSettings(redis_url=redis_url, **options)
    count = args.workers or os.cpu_count() or 1
    processes = [start_agent_process(settings, config.get("payload_signing_key")) for _ in range(count)]
    print(f"{count} agents joined the grid; stop with Ctrl-C", flush=True)
    try:
        _wait_for_signal()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
            if process.returncode not in (0, -signal.SIGTERM):
                print(f"agent {process.pid} ended with {describe_exit(process.returncode)}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .connector import AWSConnector
    from .states import TaskState

    states = [state.value for state in TaskState]
    config = _read_config(args.config)
    with AWSConnector(config) as connector:
        connector.authenticate()
        print(f"{'session':<38} " + " ".join(f"{name:>10}" for name in states))
        inexact = False
        for sid in args.sessions:
            status = connector.session_status(sid)  # the grid's states, not the outputs
            inexact = inexact or not status.exact
            counts = [getattr(status, name) for name in states]
            print(f"{sid:<38} " + " ".join(f"{'?' if n is None else n:>10}" for n in counts))
    if inexact:
        # a deployment's API lists terminal tasks only (docs/api.md, "Command line")
        print("(?: unknown here; pending/processing on a deployment come from the data plane)", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .connector import AWSConnector

    config = _read_config(args.config)
    with AWSConnector(config) as connector:
        connector.authenticate()
        answer = connector.cancel_sessions(args.sessions)
    for sid, counts in answer.items():
        print(f"{sid}: {counts['total_cancelled_tasks']} cancelled "
              f"({counts['cancelled_pending']} pending, {counts['cancelled_processing']} running)")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from .connector import AWSConnector

    config = _read_config(args.config)
    with AWSConnector(config) as connector:
        connector.authenticate()
        logs = connector.task_logs(args.task_id)
    if logs is None:
        raise GridError(f"no logs of task {args.task_id}: it wrote nothing, has not ended, or its logs expired")
    sys.stdout.write(logs if logs.endswith("\n") else logs + "\n")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (else argparse's one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htcgrid-executor",
                                     description="Run Python on an HTC-Grid through concurrent.futures.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the grid does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the main job: a parameter sweep on an embedded local grid")
    demo.add_argument("--workers", type=_positive_int, default=None, help="agents (default: one per CPU)")
    demo.add_argument("--strikes", type=int, default=8, help="strikes in the sweep (default 8)")
    demo.add_argument("--vols", type=int, default=6, help="volatilities in the sweep (default 6)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=cmd_demo)

    grid = commands.add_parser("grid", help="run a local grid in the foreground")
    grid.add_argument("--workers", type=int, default=None, help="agents (default: one per CPU)")
    grid.add_argument("--folder", help="keep the grid's data here (survives restarts)")
    grid.add_argument("--host", default="127.0.0.1", help="HTTP API address (default loopback only)")
    grid.add_argument("--port", type=int, default=0, help="HTTP API port (default: a free one)")
    grid.add_argument("--handler", default="htcgrid_executor.worker:lambda_handler",
                      help="worker function, module:function")
    grid.add_argument("--retry-limit", type=int, default=5, help="retries of a task whose worker died")
    grid.add_argument("--config-out", default=DEFAULT_CONFIG, help=f"client config file (default {DEFAULT_CONFIG})")
    grid.set_defaults(run=cmd_grid)

    agent = commands.add_parser("agent", help="add agents to a running grid")
    agent.add_argument("--config", help=f"the grid's client config (default $AGENT_CONFIG_FILE or {DEFAULT_CONFIG})")
    agent.add_argument("--workers", type=int, default=None, help="agents (default: one per CPU)")
    agent.add_argument("--handler", help="worker function, module:function (default: the grid's)")
    agent.set_defaults(run=cmd_agent)

    for name, run, text in (("status", cmd_status, "tasks per state of sessions"),
                            ("cancel", cmd_cancel, "cancel sessions")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("sessions", nargs="+", metavar="SESSION")
        sub.add_argument("--config", help=f"client config (default $AGENT_CONFIG_FILE or {DEFAULT_CONFIG})")
        sub.set_defaults(run=run)
    logs = commands.add_parser("logs", help="a task's captured stdout, stderr and logging (the last 64 KiB)")
    logs.add_argument("task_id", metavar="TASK_ID")
    logs.add_argument("--config", help=f"client config (default $AGENT_CONFIG_FILE or {DEFAULT_CONFIG})")
    logs.set_defaults(run=cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.run(args)
    except (GridError, OSError) as exc:
        print(f"htcgrid-executor {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
