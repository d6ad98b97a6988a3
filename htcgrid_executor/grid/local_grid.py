"""LocalGrid: a whole HTC-Grid on this machine, started and stopped as one object.

::

    LocalGrid.start()
      ├─ RedisServer        redis-server child: state table, queue and data plane (restarted if it dies)
      ├─ control plane      ``python -c ...grid.control_plane`` child (restarted on its port if it dies):
      │    ├─ ControlPlaneServer  HTTP routes /submit /result /cancel /dashboard on 127.0.0.1
      │    └─ TTLChecker          retries tasks whose heartbeat expired
      ├─ agents             ``python -m htcgrid_executor.grid.agent`` children, restarted if they die
      └─ client_config      the dict AWSConnector takes (api key, Redis URL, signing key)

The control plane runs in a process of its own, as a deployment's does: this process (the
user's) runs only its own threads and the grid's supervisor, and the routes never wait for the
user's GIL. Every child process is tied to this process (it dies with it, even on SIGKILL), and ``stop()``
removes every process, socket and temporary file the grid made. With ``folder`` the Redis
append-only file and the grid's credentials live there, so a grid restarted on the same folder
keeps its tasks and its clients' signed payloads stay valid.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from ..errors import ConfigurationError, GridUnavailableError
from ..payload import PAYLOAD_KEY_ENV, new_signing_key
from ..wire import DEFAULT_MAX_PAYLOAD_BYTES
from .agent import AGENT_CONFIG_ENV, DEFAULT_HANDLER, RENEW_RUNNER_SIGNAL, AgentSettings
from .child_processes import describe_exit, python_child_env, spawn
from .control_plane import ControlPlaneProcess, ControlPlaneSettings
from .redis_server import GRID_ROLES, RedisServer
from .state_table import StateTable

__all__ = ["LocalGrid", "GridState", "start_agent_process", "DEFAULT_HANDLER"]

logger = logging.getLogger(__name__)

_live_grids: weakref.WeakSet[LocalGrid] = weakref.WeakSet()
_atexit_registered = False


def _stop_live_grids() -> None:
    for grid in list(_live_grids):
        grid.stop()


def _write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only, whatever a file already there
    allowed: a new file (created 0600, so never readable by others even for a moment) replaces
    it by rename, which is atomic: a reader sees the old secrets or the new, never half."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def start_agent_process(settings: AgentSettings, payload_signing_key: str | None,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start one agent process (tied to this process's life) with ``settings``.

    The agent sees this process's ``sys.path`` and working folder, so functions of the caller's
    modules unpickle there as they would in a ProcessPoolExecutor.
    """
    child_env = python_child_env(env)
    child_env[AGENT_CONFIG_ENV] = settings.to_json()
    if payload_signing_key:
        child_env[PAYLOAD_KEY_ENV] = payload_signing_key
    # -c, not -m: the runners (multiprocessing spawn children) then import no __main__ module
    # again, nor the agent's imports (redis), so a new runner is ready sooner
    main = "from htcgrid_executor.grid.agent import main; raise SystemExit(main())"
    return spawn([sys.executable, "-c", main], env=child_env, cwd=os.getcwd())


class GridState(enum.Enum):
    """A :class:`LocalGrid`'s lifecycle: ``NEW`` -> ``RUNNING`` (``start()``) -> ``STOPPED``
    (``stop()``, or a start that failed). A stopped grid does not start again."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class LocalGrid:
    """An embedded HTC-Grid: real Redis, HTTP control plane, agent processes.

    ``workers``: agent processes (default: one per CPU). ``handler``: the worker function,
    ``"module:function"`` (default: this package's handler that runs executor calls).
    ``folder``: keep Redis data (append-only) and credentials there; None: a temporary folder.
    ``redis_url``: use that Redis instead of starting one. ``host``/``port``: where the HTTP API
    (and the grid's own Redis) listen: loopback by default; binding elsewhere lets agents and
    clients on other machines join, still behind the api key and the Redis password.
    ``heartbeat_sec``/``lease_sec``: how often agents heart-beat, and how long a silent agent
    keeps its tasks before the TTL checker retries them. ``retry_limit``: the most retries a lost task
    gets before it fails (a submission's ``retry_count`` may ask for fewer). ``max_tasks_per_child``: tasks a
    runner process runs before it is replaced. ``env``: extra environment for the agents.
    ``retention_sec``: how long an ended session's keys are kept. ``max_payload_bytes``: the most
    bytes a task's output may take in the data plane (a larger one fails the task instead of
    being written); stated in :attr:`client_config`, so executors on this grid check their calls
    and results against it too.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        handler: str = DEFAULT_HANDLER,
        folder: str | os.PathLike | None = None,
        redis_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_sec: float = 1.0,
        lease_sec: float = 5.0,
        retry_limit: int = 5,
        max_tasks_per_child: int | None = None,
        env: dict[str, str] | None = None,
        payload_signing_key: str | None = None,
        api_key: str | None = None,
        retention_sec: float = 3600.0,
        claim_batch: int = 16,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if workers is not None and workers < 0:
            raise ConfigurationError("workers must be >= 0")
        if lease_sec <= heartbeat_sec:
            raise ConfigurationError("lease_sec must be longer than heartbeat_sec")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ConfigurationError("max_tasks_per_child must be >= 1")
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
            raise ConfigurationError("max_payload_bytes must be a positive integer")
        self.max_payload_bytes = max_payload_bytes
        self.workers = os.cpu_count() or 1 if workers is None else workers
        self.handler = handler
        self.folder = Path(folder) if folder is not None else None
        self.host, self.port = host, port
        self.retry_limit = retry_limit
        self.env = dict(env or {})
        self.heartbeat_sec = heartbeat_sec
        self._external_redis_url = redis_url
        self._agent_template = dict(
            handler=handler, heartbeat_sec=heartbeat_sec, lease_sec=lease_sec, max_batch=claim_batch,
            max_tasks_per_child=max_tasks_per_child, retention_sec=retention_sec,
            max_output_bytes=max_payload_bytes,
        )
        self.retention_sec = retention_sec
        credentials = self._load_credentials()
        self.api_key = api_key or credentials.get("api_key") or secrets.token_urlsafe(24)
        self.payload_signing_key = (payload_signing_key or credentials.get("payload_signing_key")
                                    or new_signing_key())
        self._redis_password = credentials.get("redis_password")  # the admin's: never leaves the grid
        # one password per ACL role (redis_server.GRID_ROLES); a client config carries the client's
        roles = credentials.get("redis_role_passwords") or {}
        self._role_passwords = {role: roles.get(role) or secrets.token_urlsafe(24) for role in GRID_ROLES}
        self._client_redis_password: str | None = None
        self._control_redis: redis.Redis | None = None
        self.redis_server: RedisServer | None = None
        self.redis: redis.Redis | None = None
        self.table: StateTable | None = None
        self._control_plane: ControlPlaneProcess | None = None
        self._agents: list[subprocess.Popen] = []
        self._agent_lock = threading.Lock()  # guards _agents between callers and the supervisor
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.state = GridState.NEW

    # -- credentials ------------------------------------------------------------------------
    def _credentials_path(self) -> Path | None:
        return self.folder / "credentials.json" if self.folder is not None else None

    def _load_credentials(self) -> dict[str, str]:
        path = self._credentials_path()
        if path is None or not path.exists():
            return {}
        return json.loads(path.read_text())

    def _save_credentials(self) -> None:
        path = self._credentials_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"api_key": self.api_key, "payload_signing_key": self.payload_signing_key,
                           "redis_password": self._redis_password,
                           "redis_role_passwords": self._role_passwords})
        _write_secret_file(path, data)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> LocalGrid:
        """Start Redis, the control-plane process (HTTP API, TTL checker) and the agents; returns
        self once the HTTP API listens (the agents warm up meanwhile, and go on doing so after).
        Raises GridUnavailableError, with everything it started stopped, if Redis or the
        control plane cannot start (a port taken, say); RuntimeError once the grid was stopped.
        Repeatable while it runs."""
        global _atexit_registered
        if self.state is GridState.RUNNING:
            return self
        if self.state is GridState.STOPPED:
            # its Redis, temporary folders and processes are gone, and its supervisor with them:
            # half a grid that no longer replaces dead agents would be worse than an error
            raise RuntimeError("this LocalGrid was stopped and cannot start again: make a new one "
                               "(with the same folder= it finds its tasks and credentials again)")
        self.state = GridState.RUNNING
        try:
            if self._external_redis_url:
                self.redis_url = self._external_redis_url
                self._agent_redis_url = self._joining_agent_redis_url = self._external_redis_url
                self._client_redis_password = self._redis_password
                self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=30)
                control = self.redis
                control_url = self._external_redis_url
            else:
                # Redis listens where the HTTP API does: loopback unless told otherwise, so that
                # agents on other machines can join a grid bound to a public address. Each role
                # has its own ACL user; the admin password is for this process's tools only.
                self.redis_server = RedisServer(
                    self.folder / "redis" if self.folder else None, host=self.host,
                    password=self._redis_password,
                    users={role: (self._role_passwords[role], rules) for role, rules in GRID_ROLES.items()},
                ).start()
                self._redis_password = self.redis_server.password
                self.redis_url = self.redis_server.url_for("client")
                self._client_redis_password = self._role_passwords["client"]
                self._agent_redis_url = self.redis_server.unix_url_for("agent")
                self._joining_agent_redis_url = self.redis_server.url_for("agent")
                self.redis = self.redis_server.client(socket_timeout=30)
                control = self._control_redis = self.redis_server.client("control", socket_timeout=30)
                control_url = self.redis_server.unix_url_for("control")
            self._save_credentials()
            self.table = StateTable(control, retention_sec=self.retention_sec)
            self._control_plane = ControlPlaneProcess(ControlPlaneSettings(
                redis_url=control_url, api_key=self.api_key, host=self.host, port=self.port,
                retry_limit=self.retry_limit, retention_sec=self.retention_sec,
                sweep_sec=self.heartbeat_sec, lease_sec=self._agent_template["lease_sec"],
            ))
            self._control_plane.launch()
            self.add_agents(self.workers)  # while the control plane starts
            self._control_plane.wait_ready()
            self._supervisor = threading.Thread(target=self._supervise, name="htcgrid-supervisor",
                                                daemon=True)
            self._supervisor.start()
        except BaseException:
            self.stop()
            raise
        _live_grids.add(self)
        if not _atexit_registered:
            atexit.register(_stop_live_grids)
            _atexit_registered = True
        logger.debug("local grid: started at %s with %d agents", self.url, self.workers)
        return self

    def add_agents(self, count: int) -> None:
        """Start ``count`` more agent processes."""
        for _ in range(count):
            settings = AgentSettings(redis_url=self._agent_redis_url, **self._agent_template)
            process = start_agent_process(settings, self.payload_signing_key, self.env)
            with self._agent_lock:
                self._agents.append(process)

    def _supervise(self) -> None:
        """Replace agents, Redis and the control plane when they die (killed, crashed): a grid
        keeps its worker count and its addresses."""
        while not self._stopping.wait(0.5):
            self._revive_redis()
            self._revive_control_plane()
            with self._agent_lock:
                dead = [p for p in self._agents if p.poll() is not None]
                self._agents = [p for p in self._agents if p.poll() is None]
            for process in dead:
                logger.warning("local grid: agent pid %d died (%s); starting another",
                               process.pid, describe_exit(process.returncode))
                if not self._stopping.is_set():
                    self.add_agents(1)

    def renew_runners(self) -> None:
        """Have every agent of this grid replace its runner with a fresh process once it is
        idle (at once when it is): the next calls find no module state, no imports and no
        children of the ones before, as the workers of a new process pool would. The agents
        started elsewhere (``htcgrid-executor agent``) are not asked. Returns at once."""
        pids = self.agent_pids()
        for pid in pids:
            try:
                os.kill(pid, RENEW_RUNNER_SIGNAL)
            except ProcessLookupError:  # it just died: the supervisor starts a fresh one
                pass
        if pids and self.table is not None:
            self.table.ring_doorbell(len(pids))  # an agent waiting for work wakes to renew now

    def restart_control_plane(self, down_sec: float = 0.0) -> None:
        """Stop the HTTP API and start it again on the same address after ``down_sec``
        (a fault drill: clients must retry through it; the state table is untouched)."""
        control_plane = self._control_plane
        if control_plane is None:
            raise RuntimeError("the grid is not started")
        control_plane.stop()  # stopped, not dead: the supervisor leaves it down
        if down_sec:
            self._stopping.wait(down_sec)
        if not self._stopping.is_set():  # (a grid stopped meanwhile stays stopped)
            control_plane.start()

    def restart_redis(self) -> None:
        """Restart the grid's own Redis on the same port and socket (a fault drill). With a
        ``folder`` its append-only file keeps every task and result; without one all is lost."""
        if self.redis_server is None:
            raise RuntimeError("this grid does not run its own Redis")
        self.redis_server.restart()

    def _revive_control_plane(self) -> None:
        """Start the control plane again, on the same port, if it died: clients retry through
        the gap, and the state table in Redis is untouched."""
        control_plane = self._control_plane
        if control_plane is None or self._stopping.is_set():
            return
        try:
            control_plane.revive()
            control_plane.sync_log_level()  # a level the user set since reaches its records
        except GridUnavailableError as exc:  # tried again on the next round
            logger.warning("local grid: %s", exc)

    def _revive_redis(self) -> None:
        """Start the grid's own Redis again if it died: with a ``folder`` it reloads its
        append-only file and clients and agents ride out the gap; without one its tasks are
        gone, and clients learn it ("the grid no longer knows session ...")."""
        if self.redis_server is None or self._stopping.is_set():
            return
        try:
            self.redis_server.revive()
        except GridUnavailableError as exc:  # tried again on the next round
            logger.warning("local grid: %s", exc)

    def stop(self) -> None:
        """Stop agents, HTTP API, TTL checker and Redis; remove temporary files. Idempotent."""
        if self.state is GridState.STOPPED:
            return
        self._stopping.set()
        self.state = GridState.STOPPED
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        with self._agent_lock:
            agents, self._agents = self._agents, []
        for process in agents:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # agents give their unstarted tasks back
        if self._control_plane is not None:
            self._control_plane.terminate()  # it ends its long polls while the agents stop
        for process in agents:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._control_plane is not None:
            self._control_plane.close()
            self._control_plane = None
        if self.redis is not None:
            self.redis.close()
        if self._control_redis is not None:
            self._control_redis.close()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        _live_grids.discard(self)

    def __enter__(self) -> LocalGrid:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- what clients and tests see ---------------------------------------------------------------
    @property
    def url(self) -> str:
        """The control plane's base URL."""
        if self._control_plane is None or self._control_plane.url is None:
            raise RuntimeError("the grid is not started")
        return self._control_plane.url

    @property
    def dashboard_url(self) -> str:
        """The live dashboard's address (``/dashboard`` on the control plane), with the grid's key
        in its query: whoever has this URL has the key, so share it as you would the key."""
        return f"{self.url}/dashboard?key={quote(self.api_key, safe='')}"

    @property
    def requests_served(self) -> int:
        """HTTP requests the control plane has answered since its process started (for
        benchmarks); 0 while it is not running. Asks the control-plane process."""
        return self.control_plane_stats().get("requests_served", 0)

    def control_plane_stats(self) -> dict[str, Any]:
        """The control-plane process's counters: ``pid``, ``requests_served`` (HTTP requests
        answered since it started), ``ttl_stalls`` (TTL sweeps that found Redis or the process
        had stood still and granted leases instead of taking them), ``write_refusal`` (why Redis
        refused the TTL checker's last write, None while it takes writes). {} while it is not
        running; raises GridUnavailableError if it does not answer within 5 s.

        What the control plane logs is logged in this process under the same logger names, at
        the level set here (a level changed after start reaches it within half a second); by
        the time this returns, the level is its and every record it logged before is handled."""
        control_plane = self._control_plane
        return control_plane.stats() if control_plane is not None else {}

    def agent_stats(self) -> dict[str, dict[str, int]]:
        """Each registered agent's counters, as it last published them at its heartbeat (so up to
        one ``heartbeat_sec`` old): agent id -> ``{"tasks_claimed", "claims" (claim round trips,
        one per batch), "runner_restarts", "heartbeats"}``. One pipelined read; {} before start."""
        if self.redis is None:
            return {}
        return StateTable(self.redis).agent_counters()

    @property
    def client_config(self) -> dict[str, Any]:
        """The configuration AWSConnector takes: the keys of a deployment's
        ``Agent_config.tfvars.json``, with the api key for ``x-api-key`` (intra-VPC mode)."""
        return {
            "grid_storage_service": "REDIS",
            "s3_bucket": "",
            "redis_url": self.redis_url,
            "redis_password": self._client_redis_password or "",
            "public_api_gateway_url": self.url,
            "private_api_gateway_url": self.url,
            "api_gateway_key": self.api_key,
            "user_pool_id": "",
            "cognito_userpool_client_id": "",
            "dynamodb_results_pull_interval_sec": 0.05,
            "task_input_passed_via_external_storage": 1,
            "max_payload_bytes": self.max_payload_bytes,  # an extension: executors check against it
            "region": "local",
            "intra_vpc": 1,
            "payload_signing_key": self.payload_signing_key,
            "htcgrid_redis_control_url": self._joining_agent_redis_url,
            "htcgrid_retention_sec": self.retention_sec,  # how long kept task logs live
            "htcgrid_agent_settings": {k: v for k, v in self._agent_template.items() if k != "handler"}
            | {"handler": self.handler},
        }

    def write_client_config(self, path: str | os.PathLike) -> Path:
        """Write :attr:`client_config` as JSON readable by its owner only."""
        path = Path(path)
        _write_secret_file(path, json.dumps(self.client_config, indent=2))
        return path

    def agent_pids(self) -> list[int]:
        """PIDs of the live agent processes."""
        with self._agent_lock:
            return [p.pid for p in self._agents if p.poll() is None]

    def runner_pids(self) -> list[int]:
        """PIDs of the runner children (where user code runs) of the live agents (Linux)."""
        pids: list[int] = []
        for agent in self.agent_pids():
            for task in Path(f"/proc/{agent}/task").glob("*"):
                try:
                    children = [int(p) for p in (task / "children").read_text().split()]
                except OSError:
                    continue
                for pid in children:  # not multiprocessing's resource tracker
                    try:
                        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                            pids.append(pid)
                    except OSError:
                        continue
        return pids
