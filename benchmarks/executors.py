"""How each executor under test is made, warmed up and closed (used inside a child process).

Every factory returns an ``Executor`` plus a ``close`` callable, and raises
:class:`NotAvailable` when the executor cannot be built here (package missing, import failing):
the report then says so instead of failing the run.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Executor

__all__ = ["EXECUTORS", "LABELS", "NotAvailable", "make_executor", "map_supports_buffersize"]

#: Order of the report's rows; ``process`` is the reference every ratio is taken against.
EXECUTORS = ("htcgrid", "process", "loky", "dask")

LABELS = {
    "htcgrid": "HTCGridExecutor (local grid)",
    "process": "ProcessPoolExecutor",
    "loky": "loky get_reusable_executor",
    "dask": "dask LocalCluster get_executor",
}


class NotAvailable(Exception):
    """The executor cannot be built on this machine (missing package, failing import)."""


def _executor_class(name: str) -> type:
    """The class whose ``map`` is measured, without starting anything."""
    try:
        if name == "htcgrid":
            from htcgrid_executor import HTCGridExecutor

            return HTCGridExecutor
        if name == "process":
            from concurrent.futures import ProcessPoolExecutor

            return ProcessPoolExecutor
        if name == "loky":
            from loky.process_executor import ProcessPoolExecutor as LokyExecutor

            return LokyExecutor
        if name == "dask":
            from distributed.cfexecutor import ClientExecutor

            return ClientExecutor
    except Exception as exc:  # ImportError, or a half-written module failing at import
        raise NotAvailable(f"{type(exc).__name__}: {exc}") from exc
    raise ValueError(f"unknown executor {name!r}")


def map_supports_buffersize(name: str) -> bool:
    """Whether ``map`` of that executor takes ``buffersize`` (stdlib: Python 3.14+)."""
    cls = _executor_class(name)
    return "buffersize" in inspect.signature(cls.map).parameters


def make_executor(name: str, workers: int) -> tuple[Executor, Callable[[], None], dict]:
    """Start executor ``name`` with ``workers`` workers; return it, its closer and extras.

    The extras dict carries what the instrumentation needs (the dask client, nothing else yet).
    """
    _executor_class(name)  # NotAvailable before anything starts
    if name == "htcgrid":
        from htcgrid_executor import HTCGridExecutor

        try:
            ex = HTCGridExecutor(max_workers=workers)
        except Exception as exc:
            raise NotAvailable(f"HTCGridExecutor({workers}) failed: {type(exc).__name__}: {exc}") from exc
        return ex, lambda: ex.shutdown(wait=True, cancel_futures=True), {}
    if name == "process":
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(max_workers=workers)
        return ex, lambda: ex.shutdown(wait=True, cancel_futures=True), {}
    if name == "loky":
        from loky import get_reusable_executor

        ex = get_reusable_executor(max_workers=workers, timeout=600)
        return ex, lambda: ex.shutdown(wait=True, kill_workers=True), {}
    if name == "dask":
        for noisy in ("distributed", "tornado", "bokeh"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        client.wait_for_workers(workers)
        # pure=False: otherwise equal calls share one key and dask serves them from memory,
        # which would make repeated submit(noop) calls look free.
        ex = client.get_executor(pure=False)

        def close() -> None:
            ex.shutdown(wait=True)
            client.close()
            cluster.close()

        return ex, close, {"client": client}
    raise ValueError(f"unknown executor {name!r}")
