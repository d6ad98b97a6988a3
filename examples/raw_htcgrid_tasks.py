"""Example 4: plain HTC-Grid tasks through ``AWSConnector``, run by a Lambda-style worker function.

This is HTC-Grid's own client API (``send`` / ``get_results`` / ``cancel_sessions``, as in its API
reference) for workloads that already have a worker function: a task is a JSON-serialisable
dict, the worker function gets it as ``event`` and its return value is the task's output. Here the
worker function is ``lambda_handler`` below, run by the agents of a local grid started with
``LocalGrid(handler="raw_htcgrid_tasks:lambda_handler")`` (the agents import this file as a module;
they see this script's folder on their path). Against a deployment, the same client code runs
unchanged with the deployment's config (example 5).

    python examples/raw_htcgrid_tasks.py
"""

import json
import math
import time

from htcgrid_executor import AWSConnector, HTCGridExecutor, LocalGrid, RemoteError


def lambda_handler(event: dict, context) -> dict:
    """An HTC-Grid worker function: ``event`` is the task dict exactly as it was sent."""
    if event.get("sleep"):
        time.sleep(event["sleep"])
    x = event["x"]
    if x < 0:
        raise ValueError(f"no real square root of {x}")
    return {"x": x, "sqrt": round(math.sqrt(x), 6), "task_id": context.aws_request_id}


def main() -> None:
    with LocalGrid(workers=2, handler="raw_htcgrid_tasks:lambda_handler") as grid:
        # The client API of HTC-Grid, with the grid's client config (a deployment's file has the same keys)
        with AWSConnector(client_config_data=grid.client_config) as connector:
            connector.authenticate()  # API key here; Cognito login on a deployment's public API

            submission = connector.send([{"x": 1}, {"x": 2}, {"x": 9}, {"x": -4}])
            print(f"sent session {submission['session_id']} with {len(submission['task_ids'])} tasks")
            results = connector.get_results(submission, timeout_sec=30)  # blocks until all are done
            for task_id, output in zip(results["finished"], results["finished_OUTPUT"], strict=True):
                document = json.loads(output)
                if "errorType" in document:  # a handler that raised: Lambda's error document
                    print(f"{task_id}: {document['errorType']}: {document['errorMessage']}")
                else:
                    print(f"{task_id}: sqrt({document['x']}) = {document['sqrt']}")
            print(f"tasks in response: {results['metadata']['tasks_in_response']}")

            # Cancelling a session stops its running task too and drops its pending ones.
            slow = connector.send([{"x": n, "sleep": 30} for n in range(4)])
            time.sleep(1)
            counts = connector.cancel_sessions([slow["session_id"]])[slow["session_id"]]
            print(f"cancelled {counts['total_cancelled_tasks']} tasks: "
                  f"{counts['cancelled_processing']} running, {counts['cancelled_pending']} pending")

            # The same tasks as futures: submit_task sends a task dict as it is; no pickling.
            with HTCGridExecutor(connector=connector) as executor:
                futures = [executor.submit_task({"x": x}) for x in (16, 25, -1)]
                print("futures:", [future.result()["sqrt"] for future in futures[:2]])
                try:
                    futures[2].result()
                except RemoteError as exc:  # the handler's exception, from its error document
                    print(f"future raised RemoteError: {exc}")


if __name__ == "__main__":
    main()
