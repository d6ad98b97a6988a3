"""The executor layer's declared connector interface (``_connector_protocol.GridConnector``) is
what it really uses, and what ``AWSConnector`` really provides."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import htcgrid_executor
from htcgrid_executor import AWSConnector
from htcgrid_executor._connector_protocol import GridConnector

PACKAGE = Path(htcgrid_executor.__file__).parent
# the executor layer: executor.py and the private modules it is made of
EXECUTOR_LAYER = ["executor.py", *sorted(p.name for p in PACKAGE.glob("_*.py")
                                         if p.name not in {"__init__.py", "__main__.py"})]
PROTOCOL_MEMBERS = {name for name in dir(GridConnector) if not name.startswith("_")} | set(
    GridConnector.__annotations__)


def _connector_members_used(source: str) -> set[str]:
    """Attributes read from anything named ``connector``/``_connector`` (a name or an attribute)."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            holder = node.value
            name = holder.id if isinstance(holder, ast.Name) else holder.attr if isinstance(holder, ast.Attribute) \
                else None
            if name in {"connector", "_connector"}:
                used.add(node.attr)
    return used


def test_the_executor_layer_uses_only_the_declared_connector_members():
    used: dict[str, set[str]] = {}
    for name in EXECUTOR_LAYER:
        for member in _connector_members_used((PACKAGE / name).read_text()):
            used.setdefault(member, set()).add(name)
    assert "poll_session" in used and "send" in used  # the scan sees the calls it is meant to see
    undeclared = {member: files for member, files in used.items() if member not in PROTOCOL_MEMBERS}
    assert undeclared == {}, f"connector members used but not in GridConnector: {undeclared}"
    private = [member for member in used if member.startswith("_")]
    assert private == []


def test_aws_connector_provides_every_declared_member(grid):
    with AWSConnector(grid.client_config) as connector:
        assert isinstance(connector, GridConnector)
        for name in PROTOCOL_MEMBERS:
            declared = getattr(GridConnector, name, None)
            if not callable(declared) or isinstance(declared, property):
                continue
            ours = inspect.signature(getattr(connector, name)).parameters
            wanted = inspect.signature(declared).parameters
            for parameter in wanted.values():
                if parameter.name == "self":
                    continue
                assert parameter.name in ours, f"AWSConnector.{name} lacks {parameter.name}"
                assert ours[parameter.name].kind == parameter.kind, f"AWSConnector.{name}({parameter.name})"
                has_default = parameter.default is not inspect.Parameter.empty
                assert not has_default or ours[parameter.name].default is not inspect.Parameter.empty
