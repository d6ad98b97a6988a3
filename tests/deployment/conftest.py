"""Fixtures of the deployment tests: one stand-in deployment (deployment_standin.py) per module,
executors on it, and a check that each test leaves no executor thread behind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from deployment_standin import StandInDeployment

from htcgrid_executor import HTCGridExecutor


@pytest.fixture(scope="module")
def standin() -> Iterator[StandInDeployment]:
    with StandInDeployment(agents=2) as grid:
        yield grid


@pytest.fixture
def make_executor(standin: StandInDeployment) -> Iterator[Callable[..., HTCGridExecutor]]:
    made: list[HTCGridExecutor] = []

    def make(**options: Any) -> HTCGridExecutor:
        executor = HTCGridExecutor(config=standin.client_config(), **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)
    standin.wait_idle()
    # the executor's own threads; a grid's (spawner, supervisor, HTTP workers) may belong to
    # another suite's fixture that is still alive in this process
    assert [t.name for t in threading.enumerate()
            if t.name.startswith(("htcgrid-sender", "htcgrid-poller"))] == []
