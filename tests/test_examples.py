"""Every example, and every Python snippet of the README, run as a user runs them; their output checked.

Each runs in its own interpreter (as ``python examples/NAME.py``), with the environment cleared of
the variables that would point it at a real deployment. Also: the README's and the docs' links lead
somewhere, and every test the docs cite as proof exists.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
TESTED = {
    "drop_in_replacement.py",
    "parameter_sweep.py",
    "library_as_completed.py",
    "raw_htcgrid_tasks.py",
    "deployed_grid_config.py",
}
# variables that would send an example to a deployment or change how it logs in
_DEPLOYMENT_VARIABLES = ("AGENT_CONFIG_FILE", "INTRA_VPC", "USERNAME", "PASSWORD")

pytestmark = pytest.mark.timeout(240)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DEPLOYMENT_VARIABLES}
    env.update(extra)
    return env


class Run:
    """A finished interpreter: its pid (to tell it apart from the grid's workers) and output."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> None:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            self.stdout, self.stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            self.stdout, self.stderr = process.communicate()
            raise AssertionError(f"{args} timed out; stdout:\n{self.stdout}\nstderr:\n{self.stderr}") from None
        self.pid = process.pid
        self.returncode = process.returncode
        assert self.returncode == 0, f"{args} exited {self.returncode}; stderr:\n{self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr
        self.lines = self.stdout.splitlines()


def run_example(name: str, tmp_path: Path) -> Run:
    # from a folder of its own, as a user may: the example must not depend on the working folder
    return Run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=clean_env())


def load_example(name: str) -> ModuleType:
    """Import an example as a module, to compute its expected results here."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- the set


def test_every_example_is_tested_and_is_a_guarded_script():
    present = {path.name for path in EXAMPLES.glob("*.py")}
    assert present == TESTED, "an example was added or removed: test it here"
    for name in sorted(present):
        tree = ast.parse((EXAMPLES / name).read_text(), name)
        assert ast.get_docstring(tree), f"{name} has no docstring saying what it shows"
        guards = [node for node in tree.body if isinstance(node, ast.If)
                  and ast.unparse(node.test) in ("__name__ == '__main__'", '__name__ == "__main__"')]
        assert guards, f"{name} has no `if __name__ == \"__main__\":`"


# ---------------------------------------------------------------------------------- examples


def test_drop_in_replacement(tmp_path):
    run = run_example("drop_in_replacement.py", tmp_path)
    primes = load_example("drop_in_replacement.py")
    expected = [f"{n} is prime: {primes.is_prime(n)}" for n in primes.PRIMES]
    assert run.lines[:len(expected)] == expected
    assert "1000001 is prime: False" in expected  # the check is not vacuous
    assert f"20! = {math.factorial(20)}" in run.lines
    where = next(line for line in run.lines if line.startswith("this process:"))
    here, worker = re.fullmatch(r"this process: (\d+), grid worker: (\d+)", where).groups()
    assert int(here) == run.pid and int(worker) != run.pid  # it really ran elsewhere
    assert "ValueError came back from the grid: invalid literal for int() with base 10: 'forty-two'" in run.lines


def test_parameter_sweep(tmp_path):
    run = run_example("parameter_sweep.py", tmp_path)
    sweep = load_example("parameter_sweep.py")
    assert run.lines[0] == "peak infected, % of the population"
    assert run.lines[1].split() == [f"gamma={gamma}" for gamma in sweep.RECOVERY_RATES]
    rows = run.lines[2:2 + len(sweep.INFECTION_RATES)]
    for beta, row in zip(sweep.INFECTION_RATES, rows, strict=True):
        label, *cells = row.split()
        assert label == f"beta={beta}"
        assert cells == [f"{100 * sweep.peak_infected(beta, gamma):.2f}" for gamma in sweep.RECOVERY_RATES]
    worst = max(sweep.peak_infected(0.2 + 0.001 * k, 0.1) for k in range(400))
    assert run.lines[-1] == f"fine sweep of 400 infection rates: worst peak {100 * worst:.2f} %"
    # the progress bar went to stderr and reached the end
    assert "20/20" in run.stderr


def test_library_as_completed(tmp_path):
    run = run_example("library_as_completed.py", tmp_path)
    answers = {}
    for line in run.lines:
        name, _, answer = line.partition(":")
        answers[name.strip()] = answer.strip()
    assert list(answers) == ["threads", "processes", "HTC-Grid"]
    # the same answer from each executor, failure report included; and it is the right answer
    assert len(set(answers.values())) == 1
    assert answers["HTC-Grid"] == ("longest chain below 100000 starts at 77031 (351 steps); "
                                   "problems: ['block at 0: Collatz chains start at 1, not 0']")
    chains = load_example("library_as_completed.py")
    assert chains.longest_collatz_chain(77031, 77032) == (77031, 351)


def test_raw_htcgrid_tasks(tmp_path):
    run = run_example("raw_htcgrid_tasks.py", tmp_path)
    sid = re.fullmatch(r"sent session ([0-9a-f-]+) with 4 tasks", run.lines[0]).group(1)
    assert run.lines[1:5] == [
        f"{sid}_0: sqrt(1) = 1.0",
        f"{sid}_1: sqrt(2) = {round(math.sqrt(2), 6)}",
        f"{sid}_2: sqrt(9) = 3.0",
        f"{sid}_3: ValueError: no real square root of -4",  # the handler raised: Lambda's error document
    ]
    assert run.lines[5] == "tasks in response: 4"
    running, pending = map(int, re.fullmatch(r"cancelled 4 tasks: (\d+) running, (\d+) pending",
                                             run.lines[6]).groups())
    assert running >= 1 and running + pending == 4  # the two agents were running some of them
    assert run.lines[7] == "futures: [4.0, 5.0]"
    assert run.lines[8] == "future raised RemoteError: ValueError: no real square root of -1"


def test_deployed_grid_config(tmp_path):
    run = run_example("deployed_grid_config.py", tmp_path)
    url = re.fullmatch(r"local grid at (http://127\.0\.0\.1:\d+); client config written to "
                       r"Agent_config\.tfvars\.json", run.lines[0]).group(1)
    pids = []
    for n, line in enumerate(run.lines[1:4]):
        pids.append(int(re.fullmatch(rf"task {n} ran on .+ in process (\d+)", line).group(1)))
    assert run.pid not in pids  # run by the grid's workers, not by the script
    assert run.lines[4] == f"connected: AWSConnector({url!r}, intra-vpc, REDIS)"
    assert run.lines[5] == f"sum of squares below 1000: {sum(n * n for n in range(1000))}"


# ---------------------------------------------------------------------------------- README


def readme_snippets() -> list[tuple[str, str | None]]:
    """(code, expected output or None) of each ```python block; the output is the ```text block
    right after it, if any."""
    blocks = list(re.finditer(r"```(\w+)\n(.*?)```", README.read_text(), re.S))
    snippets = []
    for block, following in itertools.zip_longest(blocks, blocks[1:]):
        if block.group(1) != "python":
            continue
        expected = None
        if following is not None and following.group(1) == "text" \
                and not README.read_text()[block.end():following.start()].strip():
            expected = following.group(2)
        snippets.append((block.group(2), expected))
    return snippets


@pytest.fixture(scope="module")
def deployment_config(tmp_path_factory):
    """A local grid standing in for a deployment: its client config file, for the README's
    deployment snippet (which reads the file's path from AGENT_CONFIG_FILE)."""
    from htcgrid_executor import LocalGrid

    with LocalGrid(workers=2) as grid:
        yield grid.write_client_config(tmp_path_factory.mktemp("deployment") / "Agent_config.tfvars.json")


def test_readme_has_the_snippets_it_should():
    snippets = readme_snippets()
    assert len(snippets) == 3
    assert all(expected is not None for _, expected in snippets), "every snippet shows its output"


@pytest.mark.parametrize("index", range(3))
def test_readme_snippet_runs_as_written(index, tmp_path, deployment_config):
    code, expected = readme_snippets()[index]
    script = tmp_path / "snippet.py"
    script.write_text(code)
    run = Run([sys.executable, str(script)], cwd=tmp_path, env=clean_env(AGENT_CONFIG_FILE=str(deployment_config)))
    assert run.stdout == expected


def test_readme_set_up_commands():
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert block.splitlines() == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && htcgrid-executor demo",
        "python -m pytest",
    ]


def test_the_installed_demo_command_prints_the_sweep(tmp_path):
    """The last step of the README's first command, through the installed console script."""
    script = Path(sys.executable).parent / "htcgrid-executor"
    assert script.exists(), "the package is not installed with its console script (pip install -e .)"
    run = Run([str(script), "demo", "--strikes", "2", "--vols", "2", "--workers", "2"], cwd=tmp_path,
              env=clean_env())
    assert run.lines[0].split()[:2] == ["strike", "vol"]
    assert "4 options priced on the local grid" in run.stdout
    assert "pricing" in run.stderr  # the progress bar



def test_deploying_client_snippet_runs_as_written(tmp_path, deployment_config):
    """docs/deploying.md, step 6: the deployment's file without the secret, the secret from payload.key."""
    text = (ROOT / "docs" / "deploying.md").read_text()
    [code] = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "payload_signing_key" in c]
    config = json.loads(deployment_config.read_text())
    (tmp_path / "payload.key").write_text(config.pop("payload_signing_key") + "\n")
    bare = tmp_path / "Agent_config.tfvars.json"
    bare.write_text(json.dumps(config))  # as a deployment writes it: no payload_signing_key
    script = tmp_path / "client.py"
    script.write_text(code)
    run = Run([sys.executable, str(script)], cwd=tmp_path, env=clean_env(AGENT_CONFIG_FILE=str(bare)))
    assert run.stdout == "[1, 2, 3]\n"


# ---------------------------------------------------------------------------------- docs

DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    return {slug(match) for match in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_lead_somewhere(document):
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        assert resolved.exists(), f"{document.name} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{document.name} links to {target}: no such heading"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_cited_tests_exist(document):
    for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", document.read_text()):
        source = ROOT / path
        assert source.exists(), f"{document.name} cites {path}, which does not exist"
        assert re.search(rf"^def {name}\(", source.read_text(), re.M), \
            f"{document.name} cites {path}::{name}, which does not exist"
