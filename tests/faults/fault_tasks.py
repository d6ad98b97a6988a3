"""Functions the fault tests run on the grid (imported by the agents' runners by reference).

Module-level and in a module with a unique name: the local grid hands the test process's
``sys.path`` to its agents, and a client subprocess gets it through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def square(x):
    return x * x


def gated_square(gate, x, timeout=60.0):
    """``x * x`` once the file ``gate`` exists: a load test holds its sessions in flight with it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return x * x


def logged_square(log, x):
    """``x * x``, leaving one line per execution in ``log`` (appends of a short line are atomic)."""
    with open(log, "a") as handle:
        handle.write(f"{x}\n")
    return x * x


def logged_sleep_square(log, x, seconds):
    with open(log, "a") as handle:
        handle.write(f"{x}\n")
    time.sleep(seconds)
    return x * x


def kill_my_worker(log):
    """SIGKILL the process running this call, every time (after logging the attempt)."""
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for_file(path, value, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def hang_then_write(marker, proof, seconds):
    """Say "started" with ``marker``, hang, then write ``proof``: a stopped call never writes it."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(proof).write_text("ran to the end")
    return "finished"


def getpid(_=None):
    return os.getpid()


def return_a_lock():
    return threading.Lock()


def return_bytes(n):
    return b"x" * n


def chunk_item_result(x):
    """A map item whose result cannot be pickled at x == 3."""
    return threading.Lock() if x == 3 else x


class LockedError(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_locked_error():
    raise LockedError("this one cannot travel")


class StubbornError(Exception):
    """Pickles on the worker, but does not unpickle anywhere (``__init__`` needs two arguments)."""

    def __init__(self, message, code):
        super().__init__(f"{message} ({code})")
        self.code = code


def raise_stubborn_error():
    raise StubbornError("half-travelling", 7)


class Trap:
    """Unpickling a Trap creates a file: proof that a forged payload was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # loading it opens (creates) the file


def identity(x):
    return x
