"""Puts this folder on ``sys.path`` for every test: ``support`` (waiting, fast leases) and
``handlers`` (the Lambda-style worker functions the local grid's agents import) live here, once.
Agents and runners inherit the path (``child_processes.python_child_env``)."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
