"""Programs written for ProcessPoolExecutor, run as a user runs them: a script's ``__main__`` in
a subprocess, on the real local grid, compared with what ProcessPoolExecutor does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
