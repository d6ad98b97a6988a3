"""Functions the executor tests run remotely (in ProcessPoolExecutor workers and grid runners).

Module-level so both executors pickle them by reference: grid runners import this module from the
test process's ``sys.path``, which the local grid hands to its agents.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def square(x):
    return x * x


def add(x, y=0, *, z=0):
    return x + y + z


def identity(x):
    return x


def noop(x=None):
    return None


def raise_value_error(message="boom"):
    raise ValueError(message)


def fail_on(x, bad):
    if x == bad:
        raise KeyError(x)
    return x


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def start_and_sleep(marker, seconds, value=None):
    """Say "I started" with a file, then sleep: lets a test know the call really runs."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return value


def start_and_wait_for_file(marker, gate, timeout=30.0):
    """Say "I started" with a file, then wait for ``gate``: holds a worker busy until the test
    has queued what it needs, however slow the machine."""
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def sleep_then_write(path, seconds):
    """Write ``path`` after sleeping: if the file appears, the call was not stopped."""
    time.sleep(seconds)
    Path(path).write_text("ran to the end")
    return "written"


def pid_and_thread():
    return os.getpid(), threading.get_ident()


def getpid(_=None):
    return os.getpid()


def exit_process(code=3):
    os._exit(code)


def kill_runner_once(marker, value):
    """SIGKILL our own process the first time (marker absent), succeed the second time."""
    path = Path(marker)
    if not path.exists():
        path.write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def wait_for_file_then_return(path, value, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


class CustomError(Exception):
    """An exception with extra state, to check that it travels as itself."""

    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


def raise_custom(code):
    raise CustomError("custom failure", code)


class UnpicklableError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()  # cannot be pickled


def raise_unpicklable():
    raise UnpicklableError("cannot travel")


def return_unpicklable():
    return threading.Lock()


def get_initialized():
    value = INITIALIZED.get("value")
    return value, INITIALIZED.get(("count", value), 0)


# A grid's runner outlives an executor, and this module is imported by reference, not sent by
# value: its globals are the runner's, shared by every executor's initializer that ran there. So
# the count is kept per initargs value (one per test), not per process.
INITIALIZED: dict = {}


def initializer(value):
    INITIALIZED["value"] = value
    INITIALIZED[("count", value)] = INITIALIZED.get(("count", value), 0) + 1


def failing_initializer():
    raise RuntimeError("initializer failed")


def big_result(n):
    return b"x" * n


def kwargs_of(**kwargs):
    return kwargs


def raw_handler(event, context):
    """A plain HTC-Grid worker function (not this package's), for raw task dicts."""
    if "fail" in event:
        raise ValueError(event["fail"])
    if "say" in event:
        return event["say"]
    return {"echo": event}


def start_subprocess_and_sleep(marker, seconds):
    """Start a child process (as user code that shells out does), record its pid, then sleep."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(marker).write_text(str(child.pid))
    time.sleep(seconds)
    return child.pid


def pool_inside_a_task(values):
    """Use multiprocessing inside a task, as a user's library might."""
    import multiprocessing

    with multiprocessing.Pool(2) as pool:
        return pool.map(abs, values)


def sleep_or_fail(x, bad, seconds):
    """Fail at once for ``bad``, else sleep: a map whose one bad item must be seen early."""
    if x == bad:
        raise KeyError(x)
    time.sleep(seconds)
    return x


def record_start(path, tag):
    """Append ``tag`` to ``path`` when the call starts: the order the grid ran calls in."""
    with open(path, "a") as handle:
        handle.write(tag + "\n")
    return tag


def noisy(x, fail=False):
    """Write to stdout, stderr and logging, then return x (or raise)."""
    import logging
    import sys

    print(f"stdout line of {x}")
    print(f"stderr line of {x}", file=sys.stderr)
    logging.getLogger("user.module").warning("a warning about %s", x)
    if fail:
        raise ValueError(f"failed on {x}")
    return x


def print_kib(kib, last):
    """Print ``kib`` KiB of filler, then ``last``."""
    for _ in range(kib):
        print("x" * 1023)
    print(last)
    return kib


def size_and_pid(data, i=0):
    """The size of a (shared) object and the worker process that saw it."""
    return len(data), os.getpid()
