"""The benchmark harness runs end to end in its --quick mode, so it cannot rot.

Only the shape of the report is checked (a row per executor): speed goals live in the
benchmarks themselves, not in tests. Peers that are not installed (the ``bench`` extra) and an
HTCGridExecutor that cannot start still get their row, saying why.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))


def _table_rows(markdown: str, heading: str) -> list[str]:
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append(line)
    return rows


@pytest.mark.timeout(150)
def test_quick_benchmark_writes_a_row_per_executor(tmp_path):
    pytest.importorskip("psutil")
    from benchmarks.executors import EXECUTORS, LABELS

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path),
         # the report's shape needs every section once, not its figures: the smallest counts
         "--repeats", "1", "--map-items", "200", "--busy-items", "50", "--latency-n", "20",
         "--sleep-n", "20", "--outstanding-n", "1000", "--scale-items", "3000", "--buffersize", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "benchmarks.md").read_text()
    rows = _table_rows(report, "## Throughput and latency")
    header, body = rows[0], rows[1:]
    assert "executor" in header
    for name in EXECUTORS:
        assert [r for r in body if r.startswith(f"| {LABELS[name]} |")], f"no row for {name} in:\n{report}"
    # The reference executor is the stdlib and always available: its figures must be there.
    process_row = next(r for r in body if r.startswith(f"| {LABELS['process']} |"))
    assert "/s" in process_row and "ms" in process_row, process_row
    assert "## Scale and memory" in report and "## Machine" in report


@pytest.mark.timeout(120)
def test_paired_runs_print_both_trees_side_by_side():
    pytest.importorskip("psutil")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paired", str(ROOT), "--rounds", "1", "--single", "20",
         "--map-items", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith(f"this: {ROOT}; other: {ROOT}")  # each run imported the tree named
    rows = [line.split(" | ")[:2] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [["| other", "1"], ["| this", "1"], ["| other", "median"], ["| this", "median"]]


@pytest.mark.timeout(120)
def test_startup_benchmark_prints_the_first_next_and_later_executor_of_both():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--rounds", "1", "--pause", "0.2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split()[:2] for line in proc.stdout.splitlines()[2:]]
    assert rows == [[executor, which] for executor in ("ProcessPoolExecutor", "HTCGridExecutor()")
                    for which in ("first", "next", "later")]
