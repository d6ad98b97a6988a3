"""Just enough of an HTC-Grid client to drive a grid over its wire protocol (HTTP + Redis).

A module of its own, not conftest.py: test folders that each import ``conftest`` would shadow
one another on sys.path.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests

from htcgrid_executor import wire
from htcgrid_executor.grid import LocalGrid


class GridClient:
    """Just enough of a client to drive a grid over its wire protocol."""

    def __init__(self, grid: LocalGrid) -> None:
        self.grid = grid
        self.http = requests.Session()
        self.http.headers["x-api-key"] = grid.api_key

    def submit(self, tasks: list[Any], *, priority: int = 0, listener: str | None = None,
               timeout_sec: float = 3600, retries: int = 5, session_id: str | None = None) -> str:
        sid = session_id or wire.new_session_id()
        tids = wire.task_ids_for(sid, len(tasks))
        pipe = self.grid.redis.pipeline()
        for tid, task in zip(tids, tasks, strict=True):
            pipe.set(wire.input_key(tid), wire.encode_task(task))
        submission = wire.build_submission(sid, tids, priority=priority, task_timeout_sec=timeout_sec,
                                           retry_count=retries,
                                           extra_context={"listener": listener} if listener else None)
        pipe.set(wire.payload_key(sid), wire.encode_submission(submission))
        pipe.execute()
        answer = self.http.post(self.grid.url + "/submit", params={"submission_content": sid})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"session_id": sid, "task_ids": tids}
        return sid

    def result(self, sid: str, **params: Any) -> dict[str, Any]:
        answer = self.http.get(self.grid.url + "/result", params={
            "submission_content": wire.encode_query({"session_id": sid}), **params})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait(self, sid: str, count: int, timeout: float = 30) -> dict[str, Any]:
        """Block until ``count`` tasks of the session are terminal; return the plain answer."""
        deadline = time.monotonic() + timeout
        cursor = "0"
        seen = 0
        while seen < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {seen} of {count} tasks ended in {timeout}s"
            answer = self.result(sid, after=cursor, wait_ms=int(min(remaining, 2) * 1000))
            cursor = answer["cursor"]
            seen += answer["metadata"]["tasks_in_response"]
        return self.result(sid)

    def outputs(self, sid: str, answer: dict[str, Any]) -> dict[str, Any]:
        values = self.grid.redis.mget([wire.output_key(t) for t in answer["finished"]])
        return {t: json.loads(wire.decode_output_text(v)) for t, v in zip(answer["finished"], values, strict=True)}

    def cancel(self, sessions: list[str] = (), tasks: list[str] = (), pending_only: bool = False) -> dict[str, Any]:
        query: dict[str, Any] = {"session_ids_to_cancel": list(sessions)}
        if tasks:
            query["task_ids_to_cancel"] = list(tasks)
        if pending_only:
            query["pending_only"] = True
        answer = self.http.post(self.grid.url + "/cancel",
                                params={"submission_content": wire.encode_query(query)})
        assert answer.status_code == 200, answer.text
        return answer.json()


