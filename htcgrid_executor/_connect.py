"""How an executor gets its grid: a connector given, one made from a client config, or an
embedded ``LocalGrid`` started for it; the checks that fail construction early; and the reads an
``attach`` needs. The connector and grid stacks load only here, and only when used."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ._poller import FAR_CURSOR
from .codec import is_executor_task, task_binding
from .errors import (
    AuthenticationError,
    ControlPlaneError,
    GridUnavailableError,
    PayloadError,
    StorageError,
)
from .wire import DEFAULT_MAX_PAYLOAD_BYTES, decode_task, input_key, output_key

if TYPE_CHECKING:  # pragma: no cover
    from ._connector_protocol import GridConnector

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)

_PROBE_SESSION = "00000000-0000-0000-0000-000000000000"  # a session id no grid hands out
_READ_CHUNK = 1000  # task inputs per data-plane read


def open_grid(connector: GridConnector | None, config: dict[str, Any] | str | os.PathLike[str] | None, *,
              max_workers: int | None, max_tasks_per_child: int | None,
              max_payload_bytes: int | None) -> tuple[GridConnector, Any, bool]:
    """``(connector, embedded grid or None, whether the executor owns the connector)``. With
    neither ``connector`` nor ``config`` a ``LocalGrid`` is started (and stopped again if the
    connector cannot be made); a grid named by ``config`` is checked to answer."""
    if connector is not None:
        return connector, None, False
    from .connector import AWSConnector  # the HTTP/Redis/S3 stack loads only when used

    grid = None
    if config is None:
        from .grid.idle_grids import take_grid

        # the grid the last such executor of this process left, when it is the same (see idle_grids)
        grid = take_grid(max_workers, max_tasks_per_child, max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES)
        config = grid.client_config
    try:
        made = AWSConnector(load_config(config))
        made.authenticate()
        if grid is None:  # a grid started elsewhere: is it there?
            check_reachable(made)
    except BaseException:
        if grid is not None:
            grid.stop()
        raise
    return made, grid, True


def release_grid(grid: Any) -> None:
    """The executor that :func:`open_grid` started (or took) ``grid`` for is done with it: it is
    kept for the next executor, or stopped."""
    from .grid.idle_grids import hand_back

    hand_back(grid)


def close_opened(connector: GridConnector, owns_connector: bool, grid: Any) -> None:
    """Undo :func:`open_grid` when the executor's construction fails after it."""
    if owns_connector:
        connector.close()
    if grid is not None:
        release_grid(grid)


def payload_limit(connector: GridConnector, max_payload_bytes: int | None) -> int:
    """The smaller of the caller's limit and the one the grid states (a LocalGrid does)."""
    stated = (connector.client_config or {}).get("max_payload_bytes")
    limits = [n for n in (max_payload_bytes, stated) if isinstance(n, int) and n > 0]
    return min(limits) if limits else DEFAULT_MAX_PAYLOAD_BYTES


def check_reachable(connector: GridConnector) -> None:
    """Fail at construction, naming the address tried, when the grid's control plane or data
    plane does not answer: else the first call would learn it only ``broken_after_sec`` later.
    One cheap read of each (with the connector's own few quick retries)."""
    try:
        connector.poll_session(_PROBE_SESSION, after=FAR_CURSOR)
    except AuthenticationError:
        raise  # wrong credentials: better said now than at the first call
    except ControlPlaneError:
        pass  # an answer all the same (a 404 here; a deployment's 542): the control plane is there
    except GridUnavailableError as exc:
        url = getattr(connector.config, "api_url", "?")
        raise GridUnavailableError(f"the grid's control plane at {url} does not answer (is the grid "
                                   f"running?): {exc}") from exc
    try:
        connector.store.get_many([output_key(f"{_PROBE_SESSION}_0")])
    except (GridUnavailableError, StorageError) as exc:
        raise GridUnavailableError(f"the grid's data plane ({connector.store!r}) does not answer: {exc}") from exc


def task_bindings(connector: GridConnector, task_ids: list[str]) -> dict[str, str]:
    """The bindings of adopted tasks, from their inputs in the data plane (the client that
    sent them is gone). A task whose input is gone, or not ours, gets no check."""
    found: dict[str, str] = {}
    for start in range(0, len(task_ids), _READ_CHUNK):
        chunk = task_ids[start:start + _READ_CHUNK]
        try:
            inputs = connector.store.get_many([input_key(tid) for tid in chunk])
        except Exception as exc:  # noqa: BLE001 - without inputs, outputs are checked unbound
            logger.debug("attach: cannot read task inputs (%s); outputs checked without binding", exc)
            return found
        for tid, raw in zip(chunk, inputs, strict=True):
            try:
                task = decode_task(raw) if raw is not None else None
            except PayloadError:
                task = None
            if is_executor_task(task):
                found[tid] = task_binding(task)
    return found


def load_config(config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A client config dict as given, or read from a JSON file. Raises ``ConfigurationError``."""
    from .connector.config import ClientConfig  # the one config-file reader

    return dict(config) if isinstance(config, dict) else ClientConfig.load_file(config)
