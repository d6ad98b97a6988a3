"""Programs written for ProcessPoolExecutor, run as a user runs them: a script's ``__main__`` in
a subprocess, on the real local grid, compared with what ProcessPoolExecutor does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import CancelledError
from pathlib import Path

import psutil
import pytest

from htcgrid_executor import GridUnavailableError, HTCGridExecutor, TaskFailedError
from htcgrid_executor.grid import LocalGrid


def run_script(tmp_path: Path, body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_program.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


INITIALIZER_SCRIPT = """
    import json, os, sys
    from concurrent.futures import ProcessPoolExecutor
    from htcgrid_executor import HTCGridExecutor

    MODEL = None
    CALLS = 0

    def load_model(value):
        global MODEL
        MODEL = {"value": value}

    def helper():
        return MODEL["value"]

    def predict(x):
        global CALLS
        CALLS += 1  # state kept between the calls a worker process runs
        return MODEL["value"] * x, helper(), os.getpid(), CALLS

    def make(kind, value):
        if kind == "process":
            return ProcessPoolExecutor(2, initializer=load_model, initargs=(value,))
        return HTCGridExecutor(config=sys.argv[2], initializer=load_model, initargs=(value,))

    if __name__ == "__main__":
        out = {}
        for value in (3, 5):  # two executors, each with its own initializer's state
            with make(sys.argv[1], value) as executor:
                out[value] = list(executor.map(predict, range(8))) + [executor.submit(predict, 10).result()]
        print(json.dumps(out))
"""


def check_initializer_output(text: str) -> None:
    out = json.loads(text)
    for value, rows in out.items():
        assert [r[0] for r in rows] == [int(value) * x for x in [*range(8), 10]]
        assert all(r[1] == int(value) for r in rows)
        for pid in {r[2] for r in rows}:  # each worker process counts its own calls, 1, 2, ...
            counts = sorted(r[3] for r in rows if r[2] == pid)
            assert counts == list(range(1, len(counts) + 1))


def test_an_initializer_setting_a_global_of_the_script_is_seen_by_the_calls(grid: LocalGrid, tmp_path: Path):
    config = grid.write_client_config(tmp_path / "grid.json")
    reference = run_script(tmp_path, INITIALIZER_SCRIPT, "process", str(config))
    assert reference.returncode == 0, reference.stderr
    check_initializer_output(reference.stdout)  # the ProcessPoolExecutor behaviour asserted below
    result = run_script(tmp_path, INITIALIZER_SCRIPT, "htcgrid", str(config))
    assert result.returncode == 0, result.stderr
    check_initializer_output(result.stdout)


SLOW_MAP_SCRIPT = """
    import os, sys, time
    from htcgrid_executor import HTCGridExecutor

    def slow(x, folder):
        open(os.path.join(folder, f"started-{os.getpid()}"), "w").close()
        time.sleep(60)
        return x

    if __name__ == "__main__":
        folder = sys.argv[2]
        if sys.argv[1] == "with":
            with HTCGridExecutor(max_workers=2) as executor:
                for result in executor.map(slow, range(20), [folder] * 20):
                    print(result, flush=True)
        else:  # no with block: the interpreter's exit winds the executor down
            executor = HTCGridExecutor(max_workers=2)
            print(list(executor.map(slow, range(20), [folder] * 20)))
"""


@pytest.mark.parametrize("shape", ["with", "bare"])
def test_ctrl_c_in_a_terminal_ends_the_program_at_once_leaving_nothing(tmp_path: Path, shape: str):
    script = tmp_path / "user_program.py"
    script.write_text(textwrap.dedent(SLOW_MAP_SCRIPT))
    markers, temp = tmp_path / "markers", tmp_path / "tmp"
    markers.mkdir()
    temp.mkdir()
    # its own process group, as a terminal's foreground job is; Ctrl-C signals the whole group
    program = subprocess.Popen([sys.executable, str(script), shape, str(markers)], cwd=tmp_path,
                               env={**os.environ, "TMPDIR": str(temp)}, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(markers.iterdir())) < 2 and time.monotonic() < deadline:
            assert program.poll() is None, program.communicate()
            time.sleep(0.05)
        assert len(list(markers.iterdir())) == 2, "the tasks did not start"
        tree = psutil.Process(program.pid).children(recursive=True)
        task_pids = [int(marker.name.split("-")[1]) for marker in markers.iterdir()]
        assert set(task_pids) <= {p.pid for p in tree}
        os.killpg(program.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = program.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if program.poll() is None:
            os.killpg(program.pid, signal.SIGKILL)
            program.wait()
    assert took < 10, f"took {took:.1f} s to exit after Ctrl-C"
    assert program.returncode != 0
    assert stderr.rstrip().splitlines()[-1] == "KeyboardInterrupt", stderr
    assert len(stderr.splitlines()) < 20, stderr  # a traceback, not a flood of grid logs
    assert _alive(tree, timeout=5) == []
    assert list(temp.iterdir()) == []


def _alive(processes: list[psutil.Process], timeout: float = 0) -> list[psutil.Process]:
    """Those of ``processes`` still alive after waiting up to ``timeout`` s for them to end."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.parametrize("stop", ["time limit", "kill_running", "shutdown"])
def test_a_stopped_task_ends_with_its_subprocesses(grid: LocalGrid, tmp_path: Path, stop: str):
    from executor_tasks import start_subprocess_and_sleep

    marker = tmp_path / "child"
    executor = HTCGridExecutor(config=grid.client_config, task_timeout_sec=1.0 if stop == "time limit" else None)
    try:
        future = executor.submit(start_subprocess_and_sleep, str(marker), 30)
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = psutil.Process(int(marker.read_text()))
        if stop == "kill_running":
            _wait_for(future.running)
            assert executor.kill_running() == 1
        elif stop == "shutdown":
            _wait_for(future.running)
            executor.shutdown(wait=True, kill_running=True)
        expected = TaskFailedError if stop == "time limit" else CancelledError
        with pytest.raises(expected):
            future.result(timeout=30)
    finally:
        executor.shutdown(wait=True, cancel_futures=True, kill_running=True)
    assert _alive([child], timeout=5) == []


def test_multiprocessing_inside_a_task_works(grid_executor: HTCGridExecutor):
    from executor_tasks import pool_inside_a_task

    assert grid_executor.submit(pool_inside_a_task, [-1, -2, 3]).result(timeout=60) == [1, 2, 3]


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_executor_on_a_grid_that_is_not_running_fails_at_once_naming_it():
    with LocalGrid(workers=0) as stopped:
        config = stopped.client_config
    started = time.monotonic()
    with pytest.raises(GridUnavailableError, match=f"control plane at {config['public_api_gateway_url']}"):
        HTCGridExecutor(config=config)
    assert time.monotonic() - started < 15  # the connector's few quick retries, not broken_after_sec


def test_progress_over_as_completed_moves_as_futures_complete(grid_executor: HTCGridExecutor, tmp_path: Path):
    from concurrent.futures import as_completed

    from executor_tasks import sleep_return

    from htcgrid_executor.progress import progress

    fast = grid_executor.submit(sleep_return, 0, "fast")
    slow = grid_executor.submit(sleep_return, 3, "slow")
    bar = progress(as_completed([slow, fast]), total=2, disable=True)
    first = next(bar)  # yielded while the slow call still runs, not once every future is done
    assert first is fast and not slow.done()
    assert [f.result() for f in bar] == ["slow"]


def test_what_cannot_be_called_or_pickled_raises_type_error_as_in_a_process_pool(make_executor):
    import threading

    from executor_tasks import identity, return_unpicklable

    executor = make_executor()
    with pytest.raises(TypeError, match="'int' object is not callable"):
        executor.submit(12345).result(timeout=30)
    with pytest.raises(TypeError, match="lock"):  # the grid refuses it at submit, the pool in result()
        executor.submit(identity, threading.Lock()).result(timeout=30)
    with pytest.raises(TypeError, match="lock"):
        executor.submit(return_unpicklable).result(timeout=30)
    assert executor.submit(identity, 7).result(timeout=30) == 7


LATE_MODULE_SCRIPT = """
    import importlib.util, json, os, sys
    from htcgrid_executor import HTCGridExecutor

    def module_at(folder, name):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name + ".py"), "w") as handle:
            handle.write("def twice(x):\\n    return 2 * x\\n")

    if __name__ == "__main__":
        out = {}
        with HTCGridExecutor(config=sys.argv[1]) as executor:
            module_at("late_path", "late_on_path")
            sys.path.append(os.path.abspath("late_path"))  # after the grid started
            import late_on_path
            module_at("elsewhere", "loaded_by_hand")
            spec = importlib.util.spec_from_file_location("loaded_by_hand", "elsewhere/loaded_by_hand.py")
            by_hand = importlib.util.module_from_spec(spec)
            sys.modules["loaded_by_hand"] = by_hand
            spec.loader.exec_module(by_hand)
            for module in (late_on_path, by_hand):
                try:
                    out[module.__name__] = executor.submit(module.twice, 21).result()
                except Exception as exc:
                    out[module.__name__] = [type(exc).__name__, str(exc)]
            out["next call"] = executor.submit(abs, -3).result()
        print(json.dumps(out))
"""


def test_a_module_the_workers_cannot_import_fails_naming_it_and_what_to_do(grid: LocalGrid, tmp_path: Path):
    config = grid.write_client_config(tmp_path / "grid.json")
    result = run_script(tmp_path, LATE_MODULE_SCRIPT, str(config))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for name in ("late_on_path", "loaded_by_hand"):
        kind, message = out[name]
        assert kind == "ModuleNotFoundError"
        assert f"needs the module {name!r}" in message
        assert "PYTHONPATH" in message and "register_pickle_by_value" in message
        assert "malformed" not in message
    assert out["next call"] == 3


def test_calls_start_in_submission_order_after_a_burst_of_tiny_tasks():
    """Agents claim tiny tasks in batches (throughput), but a later burst of slow calls must start
    in order across agents, or wait(FIRST_EXCEPTION) waits for calls submitted after the bad one."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    from executor_tasks import sleep_or_fail

    with HTCGridExecutor(max_workers=2) as executor:  # the embedded grid claims up to 16 at a time
        for _ in range(3):  # which agent gives its batch back first is a race: try it thrice
            assert sum(executor.map(abs, range(2000))) == sum(range(2000))
            futures = [executor.submit(sleep_or_fail, i, 5, 0.1) for i in range(40)]
            done, _ = wait(futures, timeout=30, return_when=FIRST_EXCEPTION)
            assert futures[5] in done
            # a process pool has 5 done here (0-4, two at a time); 16 calls claimed by one agent
            # and given back behind the other's made it 21
            assert len(done) <= 8, sorted(futures.index(f) for f in done)
            for future in futures:
                future.cancel()
            wait(futures, timeout=30)
