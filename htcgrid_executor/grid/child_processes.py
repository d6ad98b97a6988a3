"""Child processes that never outlive the process that started them.

On Linux a child is given ``PR_SET_PDEATHSIG = SIGKILL``: the kernel kills it when its parent
dies, even by SIGKILL, so a crashed grid leaves no Redis server or agent behind. The signal
fires when the *thread* that forked the child exits, not the process; so every child is forked
from one long-lived thread of our own (``htcgrid-spawner``) rather than from whichever user
thread happened to build the grid.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any

__all__ = ["spawn", "python_child_env", "die_with_parent", "describe_exit"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent goes (Linux; no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        pass


class _Spawner:
    """One thread that forks every child, so PDEATHSIG is tied to the process's lifetime."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Future, tuple, dict] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def popen(self, args: Any, **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            # after a fork the child process has no spawner thread: start a new one
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._requests = queue.SimpleQueue()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._serve, name="htcgrid-spawner", daemon=True)
                self._thread.start()
            done: Future = Future()
            self._requests.put((done, args, kwargs))
        return done.result()

    def _serve(self) -> None:
        requests = self._requests
        while True:
            item = requests.get()
            if item is None:  # pragma: no cover - never sent; the thread lives as long as the process
                return
            done, args, kwargs = item
            try:
                done.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as exc:  # hand every failure to the caller
                done.set_exception(exc)


_spawner = _Spawner()


def spawn(args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
          stdout: Any = None, stderr: Any = None, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``args`` as a child that is killed when this process dies (Linux).

    The child leads a session of its own: the signals a terminal sends its foreground process
    group (Ctrl-C's SIGINT, Ctrl-\\'s SIGQUIT) reach the user's program, which decides what stops,
    and not the grid's processes behind its back (a Redis killed under a running executor).
    """
    preexec = die_with_parent if sys.platform.startswith("linux") else None
    return _spawner.popen(
        args, env=env, cwd=cwd, stdout=stdout, stderr=stderr, stdin=stdin,
        preexec_fn=preexec, close_fds=True, start_new_session=True,
    )


def python_child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Python child of the grid (an agent, the control plane): this
    process's, plus ``extra``, with ``PYTHONPATH`` holding this process's ``sys.path``, so the
    child imports this package, and the caller's modules, from where this process does."""
    env = dict(os.environ)
    env.update(extra or {})
    paths = [p for p in sys.path if p] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def describe_exit(returncode: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL' for a Popen/Process return code."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
