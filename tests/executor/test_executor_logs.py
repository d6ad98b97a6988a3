"""Task logs: a task's stdout, stderr and logging records are captured by the worker handler
(the last 64 KiB), come back with its output, are attached to a failed future's exception,
outlive the deletion of the session's data, are printed by ``htcgrid-executor logs TASK_ID``,
and still reach the terminal on a local grid."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from executor_tasks import noisy, print_kib

from htcgrid_executor import wire
from htcgrid_executor.cli import main as cli_main
from htcgrid_executor.connector import AWSConnector
from htcgrid_executor.executor import HTCGridExecutor
from htcgrid_executor.worker import LOG_LIMIT_CHARS

pytestmark = pytest.mark.timeout(90)

T = 30


def _notes(exc: BaseException) -> str:
    # a note on 3.11+, a line of the message on 3.10
    return "\n".join(getattr(exc, "__notes__", [])) or str(exc)


def test_a_failed_future_carries_its_task_logs(grid_executor):
    exc = grid_executor.submit(noisy, 7, fail=True).exception(timeout=T)
    assert isinstance(exc, ValueError) and str(exc).startswith("failed on 7")
    notes = _notes(exc)
    assert "stdout line of 7" in notes and "stderr line of 7" in notes
    assert "WARNING user.module: a warning about 7" in notes
    assert "htcgrid-executor logs " in notes  # where the rest is
    assert grid_executor.submit(noisy, 8).result(timeout=T) == 8  # a success has no note to carry


def test_logs_outlive_the_session_data_and_the_cli_prints_them(grid, tmp_path, capsys):
    config = tmp_path / "client.json"
    config.write_text(json.dumps(grid.client_config))
    with HTCGridExecutor(config=grid.client_config) as executor:
        futures = [executor.submit(noisy, 1), executor.submit(noisy, 2, fail=True)]
        [record] = executor.sessions(flush=True, timeout=T)
        assert futures[0].result(timeout=T) == 1 and futures[1].exception(timeout=T) is not None
    ok_task, failed_task = record["task_ids"]
    store = grid.redis  # the collected session's outputs are gone; its logs are kept, and expire
    assert store.exists(wire.output_key(ok_task)) == 0
    assert 0 < store.pttl(wire.logs_key(failed_task)) <= grid.retention_sec * 1000
    capsys.readouterr()
    assert cli_main(["logs", "--config", str(config), failed_task]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines() == ["stdout line of 2", "stderr line of 2", "WARNING user.module: a warning about 2"]
    assert cli_main(["logs", "--config", str(config), ok_task]) == 0
    assert "stdout line of 1" in capsys.readouterr().out
    assert cli_main(["logs", "--config", str(config), record["session_id"] + "_99"]) == 1
    assert "no logs of task" in capsys.readouterr().err


def test_logs_keep_the_last_64_kib(grid_executor):
    future = grid_executor.submit(print_kib, 200, "THE END")
    [record] = grid_executor.sessions(flush=True, timeout=T)
    assert future.result(timeout=T) == 200
    grid_executor.shutdown(wait=True)  # its kept logs are written before its threads stop
    with AWSConnector(grid_executor._connector.client_config) as connector:
        logs = connector.task_logs(record["task_ids"][0])
    assert logs is not None and logs.endswith("THE END\n")
    assert LOG_LIMIT_CHARS - 1024 <= len(logs) <= LOG_LIMIT_CHARS


def test_on_a_local_grid_task_output_still_reaches_the_terminal(tmp_path):
    script = tmp_path / "prints.py"
    script.write_text(textwrap.dedent("""
        import logging, sys
        from htcgrid_executor import HTCGridExecutor

        def work(x):
            print("printed by the task", x)
            print("error output of the task", x, file=sys.stderr)
            logging.getLogger("task").warning("warned by the task %s", x)
            return x

        if __name__ == "__main__":
            with HTCGridExecutor(max_workers=1) as executor:
                assert executor.submit(work, 5).result() == 5
    """))
    answer = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    assert "printed by the task 5" in answer.stdout
    assert "error output of the task 5" in answer.stderr
    assert "warned by the task 5" in answer.stderr
