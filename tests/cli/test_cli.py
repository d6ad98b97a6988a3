"""The command line as a user types it: grid, agent, status, cancel, demo, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from htcgrid_executor.cli import main as cli_main
from htcgrid_executor.connector import AWSConnector

HERE = Path(__file__).parent


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))


def _cli(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "htcgrid_executor", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), **kwargs)


@pytest.fixture
def running_grid(tmp_path):
    """``htcgrid-executor grid`` in the background, with one agent; yields its config path."""
    config = tmp_path / "client.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "htcgrid_executor", "grid", "--workers", "1", "--handler",
         "handlers:whoami", "--config-out", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 20
        while not config.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "grid did not write its config"
            time.sleep(0.05)
        yield config, process
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(20)
        process.stdout.close()
        process.stderr.close()


def test_grid_writes_an_owner_only_config_and_agents_join_it(running_grid):
    config, grid = running_grid
    assert config.stat().st_mode & 0o077 == 0
    settings = json.loads(config.read_text())
    assert settings["private_api_gateway_url"].startswith("http://127.0.0.1:")
    agent = subprocess.Popen([sys.executable, "-m", "htcgrid_executor", "agent", "--config", str(config),
                              "--workers", "1"], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert "joined" in agent.stdout.readline()
        with AWSConnector.from_config_file(str(config)) as connector:
            connector.authenticate()
            # two slow tasks at once: one for the grid's agent, one for the joined agent (slow
            # enough that a loaded machine's joined agent claims before the first one is done)
            answer = connector.send([{"n": 0, "sleep": 3.0}, {"n": 1, "sleep": 3.0}])
            results = connector.get_results(answer, timeout_sec=30)
        assert sorted(results["finished"]) == sorted(answer["task_ids"])
        ran_on = {json.loads(out)["agent_pid"] for out in results["finished_OUTPUT"]}
        assert len(ran_on) == 2  # both agents worked
    finally:
        agent.send_signal(signal.SIGINT)
        assert agent.wait(20) == 0
        agent.stdout.close()


def test_status_and_cancel_report_per_session(running_grid):
    config, _ = running_grid
    with AWSConnector.from_config_file(str(config)) as connector:
        connector.authenticate()
        done = connector.send([{"n": 1}])
        connector.get_results(done, timeout_sec=30)
        slow = connector.send([{"sleep": 30}, {"n": 2}, {"n": 3}])
    time.sleep(0.5)
    cancelled = _cli("cancel", slow["session_id"], "--config", str(config))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"{slow['session_id']}: 3 cancelled (2 pending, 1 running)" in cancelled.stdout
    status = _cli("status", done["session_id"], slow["session_id"], "--config", str(config))
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()[1:]}
    assert status.stdout.split()[:6] == ["session", "pending", "processing", "finished", "failed", "cancelled"]
    assert rows[done["session_id"]] == ["0", "0", "1", "0", "0"]
    assert rows[slow["session_id"]] == ["0", "0", "0", "0", "3"]


def test_status_of_a_running_session_counts_every_state(running_grid, capsys):
    config, _ = running_grid
    with AWSConnector.from_config_file(str(config)) as connector:
        connector.authenticate()
        # one agent: task 0 finishes, 1 runs past the limit (failed), 2 runs, 3 waits, 4 is cancelled
        answer = connector.send([{"n": 0}, {"sleep": 10}, {"sleep": 10}, {"n": 3}, {"n": 4}],
                                task_timeout_sec=2)
        tids = answer["task_ids"]
        connector.cancel_tasks([tids[4]])
        deadline = time.monotonic() + 20
        while (status := connector.session_status(answer["session_id"])).failed < 1 or status.processing < 1:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert (status.count, status.exact) == (5, True)
        capsys.readouterr()
        assert cli_main(["status", "--config", str(config), answer["session_id"]]) == 0
        row = capsys.readouterr().out.splitlines()[1].split()
        connector.cancel_sessions([answer["session_id"]])
    assert row == [answer["session_id"], "1", "1", "1", "1", "1"]  # pending .. cancelled
    assert (status.pending, status.processing, status.finished, status.cancelled) == (1, 1, 1, 1)


def test_grid_prints_its_dashboard_address_with_the_key(running_grid):
    config, process = running_grid
    lines = [process.stdout.readline() for _ in range(2)]
    [url] = [line.split()[-1] for line in lines if line.startswith("dashboard")]
    key = json.loads(config.read_text())["api_gateway_key"]
    assert url.startswith("http://127.0.0.1:") and url.endswith(f"/dashboard?key={key}")
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and "<title>htcgrid-executor" in page.text
    assert requests.get(url.partition("?")[0], timeout=10).status_code == 401


def test_errors_are_one_line_and_a_non_zero_exit(tmp_path):
    missing = _cli("status", "abc", "--config", str(tmp_path / "nope.json"))
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0
    assert "no client config" in missing.stderr
    assert "Traceback" not in missing.stderr
    usage = _cli("frobnicate")
    assert usage.returncode == 2
    assert "invalid choice" in usage.stderr
    zero = _cli("demo", "--workers", "0")
    assert zero.returncode == 2
    assert "Traceback" not in zero.stderr
    assert zero.stderr.splitlines()[-1] == "htcgrid-executor demo: error: argument --workers: must be at least 1, not 0"


@pytest.mark.parametrize("command", [[], ["demo"], ["grid"], ["agent"], ["status"], ["cancel"], ["logs"]])
def test_every_command_has_help(command):
    answer = _cli(*command, "--help")
    assert answer.returncode == 0
    assert "usage: htcgrid-executor" in answer.stdout


def test_demo_prices_the_sweep_on_an_embedded_grid():
    answer = _cli("demo", "--strikes", "2", "--vols", "2", "--workers", "2", "--quiet", timeout=120)
    assert answer.returncode == 0, answer.stderr
    lines = answer.stdout.splitlines()
    assert lines[0].split()[:2] == ["strike", "vol"]
    rows = [line.split() for line in lines[1:] if len(line.split()) == 6]
    assert [(float(r[0]), float(r[1])) for r in rows] == [(80.0, 0.10), (80.0, 0.15), (85.0, 0.10), (85.0, 0.15)]
    assert "4 options priced on the local grid" in answer.stdout


@pytest.mark.parametrize("how", ["process", "process group"])
def test_a_grid_stopped_with_sigterm_leaves_no_process_and_no_temporary_folder(tmp_path, how):
    import psutil

    config, temp = tmp_path / "client.json", tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "htcgrid_executor", "grid", "--workers", "1", "--config-out", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**_env(), "TMPDIR": str(temp)},
        start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not config.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "grid did not write its config"
            time.sleep(0.05)
        tree = psutil.Process(process.pid).children(recursive=True)
        assert list(temp.iterdir())  # Redis's folder and socket live there while it runs
        if how == "process":
            process.send_signal(signal.SIGTERM)
        else:  # as a service manager or `timeout` stops a job
            os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
    assert list(temp.iterdir()) == []
