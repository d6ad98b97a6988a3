"""The local grid's control plane in a process of its own: the HTTP routes and the TTL checker.

A deployment's control plane (API gateway, lambdas, TTL checker) runs away from its clients; so
does the embedded grid's, so that the user's process runs only the executor's threads and the
grid's routes never wait for the user's GIL (a busy main thread used to cost the grid a third of
its rate). :class:`~htcgrid_executor.grid.local_grid.LocalGrid` starts it as it starts agents::

    python -c "from htcgrid_executor.grid.control_plane import main; ..."
        settings: JSON in $HTCGRID_CONTROL_PLANE_CONFIG (never on the command line: they hold the
                  api key and the Redis password of the ``control`` role)
        stdout:   "ready <port> <url>" once it listens, or "error <why>" if it cannot start;
                  then "<tag> {json counters}" per "stats" command, and "log {json record}"
                  per record logged at or above the parent's level (the parent logs it)
        stdin:    one command per line: "stats <tag>", "level <logging level>";
                  end of input (the parent is gone, or asks it to stop) -> it stops

Ending when stdin closes is the second of two guards against an orphan: the first is the kernel's
parent-death signal that :func:`~.child_processes.spawn` sets (Linux); the pipe's end also works
elsewhere. SIGTERM stops it cleanly too.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import GridUnavailableError
from .child_processes import describe_exit, python_child_env, spawn

__all__ = ["ControlPlaneSettings", "ControlPlaneProcess", "CONTROL_PLANE_CONFIG_ENV", "main"]

logger = logging.getLogger(__name__)

CONTROL_PLANE_CONFIG_ENV = "HTCGRID_CONTROL_PLANE_CONFIG"
_MAIN = "from htcgrid_executor.grid.control_plane import main; raise SystemExit(main())"


@dataclass
class ControlPlaneSettings:
    """What the control-plane process needs. ``redis_url`` and ``api_key`` are secrets.

    ``port``: 0 picks a free one (the process reports which). ``sweep_sec``: the TTL checker's
    period; ``lease_sec``: the agents' lease (see :class:`~.ttl_checker.TTLChecker`).
    """

    redis_url: str
    api_key: str
    host: str = "127.0.0.1"
    port: int = 0
    retry_limit: int = 5
    retention_sec: float = 3600.0
    sweep_sec: float = 1.0
    lease_sec: float = 5.0



# -- the parent's side -------------------------------------------------------------------------
#: the loggers of the modules that run in the control-plane process: a record of theirs is sent
#: to the parent if one of these is enabled for its level there (see ControlPlaneProcess)
_FORWARDED_LOGGERS = tuple(f"htcgrid_executor.grid.{name}"
                           for name in ("http_api", "dashboard", "ttl_checker", "state_table", "control_plane"))


def _parent_log_level() -> int:
    return min(logging.getLogger(name).getEffectiveLevel() for name in _FORWARDED_LOGGERS)


def _log_record(child_pid: int, fields: dict[str, Any]) -> None:
    """Hand a record the control plane logged to this process's logging, as if logged here."""
    target = logging.getLogger(fields["name"])
    if not target.isEnabledFor(fields["levelno"]):
        return
    record = target.makeRecord(fields["name"], fields["levelno"], fields["pathname"], fields["lineno"],
                               fields["msg"], None, None, func=fields["funcName"])
    record.created, record.exc_text = fields["created"], fields["exc_text"]
    record.process, record.processName, record.threadName = child_pid, "htcgrid-control-plane", fields["threadName"]
    target.handle(record)


class ControlPlaneProcess:
    """The control-plane child, seen from the grid that owns it.

    :meth:`launch` starts it and returns at once, :meth:`wait_ready` waits for it to listen (so a
    grid starts its agents meanwhile); :meth:`revive` starts it again on the same port if it
    died, :meth:`stop` ends it. Thread-safe: the grid's supervisor and its callers share it.

    What the control plane logs is logged here too, under the same logger names, so that the
    user's logging configuration sees it as when the routes were threads of this process: the
    child sends the records at or above the level this process's loggers of its modules are
    enabled for, which :meth:`sync_log_level` tells it (at launch, and when the grid's
    supervisor sees it changed, within half a second).
    """

    def __init__(self, settings: ControlPlaneSettings, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self._env = dict(env or {})
        self._process: subprocess.Popen | None = None
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # the child's non-log lines
        self._reader: threading.Thread | None = None
        self._lock = threading.RLock()  # one launch, stop, revival or command at a time
        self._tag = 0
        self._log_level = logging.NOTSET  # the level the child was last told
        self._closed = False  # close() was called: never launched again
        self.url: str | None = None

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    @property
    def running(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def launch(self) -> None:
        """Start the process; :meth:`wait_ready` says when it serves."""
        with self._lock:
            if self._closed:
                raise GridUnavailableError("the grid's control plane was closed with its grid")
            self._log_level = _parent_log_level()
            env = python_child_env(self._env)
            env[CONTROL_PLANE_CONFIG_ENV] = json.dumps({**asdict(self.settings), "log_level": self._log_level})
            self._process = spawn([sys.executable, "-c", _MAIN], env=env, cwd=os.getcwd(),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._lines = queue.SimpleQueue()
            self._reader = threading.Thread(target=self._read, args=(self._process, self._lines),
                                            name="htcgrid-control-plane-reader", daemon=True)
            self._reader.start()

    @staticmethod
    def _read(process: subprocess.Popen, lines: queue.SimpleQueue[str | None]) -> None:
        """The child's stdout until it ends: log records are logged, the rest queued."""
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("log "):
                try:
                    _log_record(process.pid, json.loads(line[4:]))
                except Exception:  # a record we cannot take must not end the reading
                    logger.debug("control plane: unreadable log record %r", line[:200])
            else:
                lines.put(line)
        process.stdout.close()
        lines.put(None)

    def _next_line(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def wait_ready(self, timeout: float = 30.0) -> ControlPlaneProcess:
        """Wait until the process listens; raises GridUnavailableError (and ends it) if it
        says it cannot, exits, or stays silent for ``timeout`` seconds."""
        with self._lock:
            line = self._next_line(timeout) if self._process is not None else None
            words = (line or "").split(" ", 2)
            if words[0] == "ready" and len(words) == 3:
                self.settings.port = int(words[1])  # a restart takes the same port
                self.url = words[2]
                return self
            where = f"{self.settings.host}:{self.settings.port or '(any port)'}"
            if words[0] == "error":
                why = line[len("error "):]
            elif self._process is not None and self._process.poll() is not None:
                why = describe_exit(self._process.returncode)
            else:
                why = f"no answer in {timeout:.0f} s"
            self.stop()
            raise GridUnavailableError(f"the grid's control plane did not start on {where}: {why}")

    def _send(self, command: str) -> bool:
        """Write one command line; False if the process is gone."""
        process = self._process
        if process is None or process.poll() is not None:
            return False
        try:
            process.stdin.write(command.encode() + b"\n")
            process.stdin.flush()
            return True
        except OSError:  # it died just now
            return False

    def sync_log_level(self) -> None:
        """Tell the process the level this process's loggers now take, if it changed."""
        with self._lock:
            level = _parent_log_level()
            if level != self._log_level and self._send(f"level {level}"):
                self._log_level = level

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The process's counters: ``requests_served`` (HTTP requests answered since it
        started), ``ttl_stalls`` (TTL sweeps that found Redis or the process had stood still),
        ``write_refusal`` (why Redis refused the last write, None while it takes them) and
        ``pid``. Every record it logged before is handled here by the time this returns.
        {} while it is not running; raises GridUnavailableError if it does not answer within
        ``timeout``."""
        with self._lock:
            self.sync_log_level()
            self._tag += 1
            tag = str(self._tag)
            process = self._process
            if not self._send(f"stats {tag}"):
                return {}
            deadline = time.monotonic() + timeout
            while (line := self._next_line(deadline - time.monotonic())) is not None:
                answer_tag, _, body = line.partition(" ")
                if answer_tag == tag:  # (an answer to an earlier, timed-out question is skipped)
                    return {**json.loads(body), "pid": process.pid}
            if process.poll() is not None:
                return {}
            raise GridUnavailableError(f"the grid's control plane (pid {process.pid}) did not answer in "
                                       f"{timeout:.0f} s")

    def start(self, timeout: float = 30.0) -> ControlPlaneProcess:
        self.launch()
        return self.wait_ready(timeout)

    def revive(self, timeout: float = 30.0) -> bool:
        """Start the process again on the same port if it died (killed, crashed); True if it
        did. One stopped by :meth:`stop` stays down. Raises GridUnavailableError if it does
        not start (the port was taken meanwhile, say); a later call tries again."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is None:
                return False
            logger.warning("local grid: control plane pid %d died (%s); starting it again on port %d",
                           process.pid, describe_exit(process.returncode), self.settings.port)
            self._close(process)
            self.start(timeout)
            return True

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting: :meth:`stop` or :meth:`close`
        then waits, so a grid stops its processes side by side."""
        with self._lock:
            if self.running:
                self._process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> None:
        """End the process: it answers the requests in hand (a long poll for up to a second),
        then exits; killed after ``timeout`` seconds. Idempotent."""
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._close(process)
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.join(timeout)  # ends with the process's stdout

    def close(self) -> None:
        """:meth:`stop`, for good: a later :meth:`launch` (a restart drill in another thread)
        raises instead of starting a process nobody would stop."""
        with self._lock:
            self._closed = True
            self.stop()

    @staticmethod
    def _close(process: subprocess.Popen) -> None:
        try:
            process.stdin.close()  # (stdout is the reader thread's: it closes at the end of input)
        except OSError:  # a write to it failed: nothing to flush
            pass


# -- the child's side --------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the SIGTERM handler to end the wait for the next command."""


_write_lock = threading.Lock()  # one line at a time on stdout: routes log from many threads


def _answer(line: str) -> None:
    with _write_lock:
        sys.stdout.buffer.write(line.encode() + b"\n")
        sys.stdout.buffer.flush()


class _ToParent(logging.Handler):
    """Sends each record to the parent as a ``log {json}`` line; the parent logs it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = record.exc_text or (logging.Formatter().formatException(record.exc_info)
                                           if record.exc_info else None)
            _answer("log " + json.dumps({
                "name": record.name, "levelno": record.levelno, "msg": record.getMessage(),
                "pathname": record.pathname, "lineno": record.lineno, "funcName": record.funcName,
                "created": record.created, "threadName": record.threadName, "exc_text": exc_text,
            }))
        except Exception:
            self.handleError(record)


def _forward_logs(level: int) -> logging.Logger:
    """Send this package's records at ``level`` and above to the parent (and nowhere else)."""
    package = logging.getLogger("htcgrid_executor")
    package.addHandler(_ToParent())
    package.propagate = False
    package.setLevel(level or logging.WARNING)
    return package


def _serve(settings: ControlPlaneSettings, package_logger: logging.Logger) -> int:
    from .direct_redis import DirectRedis
    from .http_api import ControlPlaneServer
    from .state_table import StateTable
    from .ttl_checker import TTLChecker

    client = DirectRedis.from_url(settings.redis_url, socket_timeout=30)
    table = StateTable(client, retention_sec=settings.retention_sec)
    try:
        http = ControlPlaneServer(table, settings.api_key, host=settings.host, port=settings.port,
                                  retry_limit=settings.retry_limit).start()
    except OSError as exc:  # the port is taken, the address is not this machine's
        _answer(f"error {exc}")
        return 1
    ttl = TTLChecker(table, period_sec=settings.sweep_sec, lease_sec=settings.lease_sec,
                     after_sweep=http.trim_listeners).start()
    try:
        _answer(f"ready {http.port} {http.url}")
        for line in sys.stdin.buffer:  # until the parent closes it, or dies
            command, _, argument = line.decode(errors="replace").strip().partition(" ")
            if command == "stats":
                _answer(argument + " " + json.dumps({"requests_served": http.requests_served,
                                                     "ttl_stalls": ttl.stalls,
                                                     "write_refusal": table.write_refusal}))
            elif command == "level" and argument.isdigit():
                package_logger.setLevel(int(argument) or logging.WARNING)
    except (_Stop, BrokenPipeError):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
        ttl.stop()
        http.stop()
        client.close()
    return 0


def main() -> int:
    """Process entry point of the control plane a LocalGrid starts."""

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise _Stop

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    values = json.loads(os.environ.pop(CONTROL_PLANE_CONFIG_ENV))
    package_logger = _forward_logs(values.pop("log_level", logging.WARNING))
    try:
        return _serve(ControlPlaneSettings(**values), package_logger)
    except _Stop:  # stopped before it served: nothing to clean up
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
