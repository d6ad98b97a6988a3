"""Benchmarks of ``HTCGridExecutor`` against its peers, side by side in one run.

``python -m benchmarks`` (see :mod:`benchmarks.run`) measures, for the same work and the same
worker count, ``HTCGridExecutor`` on the embedded local grid, ``ProcessPoolExecutor``, loky's
reusable executor and dask.distributed's ``LocalCluster`` client executor, and writes a markdown
report with plots. Each executor runs in its own subprocess (:mod:`benchmarks.child`) under a
wall-clock bound per section, so a hung peer is reported as ``timeout`` instead of hanging the run.
"""

__all__: list[str] = []
