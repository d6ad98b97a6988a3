"""Counting hook for the benchmark's HTCGridExecutor run; inert unless ``BENCH_COUNT_DIR`` is set.

Python imports ``sitecustomize`` at start-up from ``sys.path``. The benchmark puts this folder on
``PYTHONPATH`` of its HTCGridExecutor child only; the local grid starts its agents with the
client's ``sys.path``, so they load it too, and each process then counts its own HTTP requests
and Redis round trips into a memory-mapped file the child reads (:mod:`benchmarks.instrument`).
This measures the library from outside, without changing it.
"""

import os

if os.environ.get("BENCH_COUNT_DIR"):
    try:
        from benchmarks.instrument import install_process_counters

        install_process_counters(os.environ["BENCH_COUNT_DIR"])
    except Exception:  # never break the process being measured
        pass
