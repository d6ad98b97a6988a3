"""The embedded HTC-Grid: control plane, state table, agents, TTL checker, on a real Redis.

See :mod:`htcgrid_executor.grid.local_grid` for the data flow. ``LocalGrid`` is the one name most
users need; the parts are importable for tests and for agents joining from other machines.
Imports are lazy so that ``python -m htcgrid_executor.grid.agent`` loads only what an agent needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LocalGrid"]

if TYPE_CHECKING:  # pragma: no cover
    from .local_grid import LocalGrid


def __getattr__(name: str) -> Any:
    if name == "LocalGrid":
        from .local_grid import LocalGrid

        return LocalGrid
    raise AttributeError(f"module 'htcgrid_executor.grid' has no attribute {name!r}")
