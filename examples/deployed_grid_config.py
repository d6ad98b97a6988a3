"""Example 5: connect to a deployed HTC-Grid from its client config file.

A deployment writes its client configuration to ``Agent_config.tfvars.json``; HTC-Grid's own
examples find it through the ``AGENT_CONFIG_FILE`` environment variable, and so does this script:

    AGENT_CONFIG_FILE=/path/to/Agent_config.tfvars.json python examples/deployed_grid_config.py

runs it on that deployment. Its worker function must be ``htcgrid_executor.worker.lambda_handler``
with the grid secret in ``HTCGRID_PAYLOAD_KEY``, and the file must hold the same secret as
``payload_signing_key`` (see docs/deploying.md). Log in with ``USERNAME`` and ``PASSWORD`` set
(Cognito, public API), or set ``INTRA_VPC=1`` inside the grid's VPC (private API, ``x-api-key``).

Without ``AGENT_CONFIG_FILE`` it runs as written on this machine: it starts a local grid, writes
that grid's client config file (the same keys as a deployment's) with
``grid.write_client_config(path)``, and from then on uses the file exactly as it would a
deployment's. (The local grid's file says ``"intra_vpc": 1``: it takes an API key, no Cognito.)

    python examples/deployed_grid_config.py
"""

import os
import platform
import tempfile
from pathlib import Path

from htcgrid_executor import AWSConnector, HTCGridExecutor, LocalGrid


def where_am_i(n: int) -> str:
    return f"task {n} ran on {platform.node()} in process {os.getpid()}"


def run(config_file: str) -> None:
    # 1. The executor, straight from the file (it builds, authenticates and closes its connector).
    with HTCGridExecutor(config=config_file) as executor:
        for line in executor.map(where_am_i, range(3)):
            print(line)

    # 2. HTC-Grid's client API from the same file; an executor may share the connector.
    with AWSConnector.from_config_file(config_file) as connector:
        connector.authenticate()  # Cognito SRP login (USERNAME/PASSWORD), or nothing with INTRA_VPC
        print(f"connected: {connector!r}")
        with HTCGridExecutor(connector=connector) as executor:
            print(f"sum of squares below 1000: {sum(executor.map(pow, range(1000), [2] * 1000, chunksize=100))}")


def main() -> None:
    config_file = os.environ.get("AGENT_CONFIG_FILE")
    if config_file:
        run(config_file)  # a deployment's Agent_config.tfvars.json
        return
    # No deployment: stand one in. Everything in run() is what a user of a deployment does.
    with LocalGrid(workers=2) as grid, tempfile.TemporaryDirectory() as folder:
        config_file = str(grid.write_client_config(Path(folder) / "Agent_config.tfvars.json"))
        print(f"local grid at {grid.url}; client config written to {Path(config_file).name}")
        run(config_file)


if __name__ == "__main__":
    main()
