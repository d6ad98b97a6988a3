"""A stand-in for an upstream HTC-Grid deployment, written from its public protocol, so that the
suite guards what the executor must do on one (issue 10) without ``../shared``.

What it reproduces of upstream (finos/htc-grid), and nothing more:

- ``POST /submit`` reads ``<sid>-payload`` and (re)writes every task's row as pending and queues
  it, even for a session it already has: a replayed submission re-runs everything. A fault
  answers 504 *after* the work was submitted (API Gateway giving up at 29 s).
- ``GET /result`` lists the session's finished / failed / cancelled ids, in no particular order,
  with no cursor, no processing list and no failure reasons.
- ``POST /cancel`` cancels whole sessions only (``task_ids_to_cancel`` is ignored).
- Agents (processes, :mod:`deployment_agent`) take one task at a time, claim it only if pending,
  pass the worker the decoded task dict alone (no task id), store its JSON answer base64 in
  ``<tid>-output``, heartbeat while it runs, and ignore ``task_timeout_sec``.
- A TTL checker re-queues a task whose heartbeat stopped, a fixed 5 times, whatever
  ``retry_count`` says; then fails it. Agents that die are restarted (Kubernetes).

State lives in the data plane's Redis under ``standin:`` (as DynamoDB rows and an SQS queue).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from htcgrid_executor import wire
from htcgrid_executor.grid.redis_server import RedisServer
from htcgrid_executor.payload import new_signing_key

HERE = Path(__file__).resolve().parent
QUEUE = "standin:queue"
RETRIES = 5  # upstream's fixed retry count
HEARTBEAT_LOST_SEC = 1.0


def row_key(tid: str) -> str:
    return f"standin:task:{tid}"


def session_key(sid: str) -> str:
    return f"standin:session:{sid}"


class StandInDeployment:
    def __init__(self, agents: int = 2) -> None:
        self.n_agents = agents
        self.key = new_signing_key()
        self.redis = RedisServer()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.submit_faults = 0  # the next n /submit answer 504 after submitting
        self.agents: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> StandInDeployment:
        self.redis.start()
        self.db = self.redis.client()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self._threads = [threading.Thread(target=self.http.serve_forever, daemon=True),
                         threading.Thread(target=self._ttl_checker, daemon=True),
                         threading.Thread(target=self._supervise, daemon=True)]
        with self._lock:
            self.agents = [self._start_agent() for _ in range(self.n_agents)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.http.shutdown()
        self.http.server_close()
        with self._lock:
            for proc in self.agents:
                proc.kill()
            for proc in self.agents:
                proc.wait()
        for thread in self._threads:
            thread.join(5)
        self.redis.stop()

    def __enter__(self) -> StandInDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_agent(self) -> subprocess.Popen:
        env = {**os.environ, "HTCGRID_PAYLOAD_KEY": self.key, "HTCGRID_REDIS_PASSWORD": self.redis.password,
               "STANDIN_REDIS": self.redis.url,
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        return subprocess.Popen([sys.executable, str(HERE / "deployment_agent.py")], env=env,
                                stdin=subprocess.DEVNULL)

    def _supervise(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                self.agents = [proc if proc.poll() is None else self._start_agent() for proc in self.agents]

    def kill_agent_running(self, tid: str) -> bool:
        """SIGKILL the agent (and so the worker: they share the process) running ``tid``."""
        owner = self.db.hget(row_key(tid), "owner")
        if not owner:
            return False
        os.kill(int(owner), signal.SIGKILL)
        return True

    # -- what a test asks ------------------------------------------------------------------------

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """The deployment's ``Agent_config.tfvars.json`` as a client has it (no local-grid keys)."""
        return {"grid_storage_service": "REDIS", "redis_url": f"redis://127.0.0.1:{self.redis.port}/0",
                "redis_password": self.redis.password, "private_api_gateway_url": self.url,
                "public_api_gateway_url": self.url, "api_gateway_key": "standin", "intra_vpc": 1,
                "region": "eu-west-1", "dynamodb_results_pull_interval_sec": 0.2,
                "task_input_passed_via_external_storage": 1, "payload_signing_key": self.key,
                "htcgrid_worker_guard_lease_sec": 1.0, **extra}

    def state(self, tid: str) -> str | None:
        value = self.db.hget(row_key(tid), "state")
        return value.decode() if value else None

    def sessions(self) -> list[str]:
        return [k.decode().split(":", 2)[2] for k in self.db.keys("standin:session:*")]

    def tasks_of(self, sid: str) -> list[str]:
        return [t.decode() for t in self.db.lrange(session_key(sid), 0, -1)]

    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        if self.db.llen(QUEUE):
            return False
        return not any(self.state(t) in ("pending", "processing") for s in self.sessions() for t in self.tasks_of(s))

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.idle():
            assert time.monotonic() < deadline, "the stand-in grid did not drain"
            time.sleep(0.05)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r == (method, path))

    # -- the control plane -------------------------------------------------------------------------

    def submit(self, sid: str) -> tuple[int, Any]:
        raw = self.db.get(wire.payload_key(sid))
        if raw is None:
            return 400, {"error": f"no payload for session {sid}"}
        task_ids = wire.decode_submission(raw)["tasks_list"]["tasks"]
        pipe = self.db.pipeline()
        pipe.delete(session_key(sid))
        pipe.rpush(session_key(sid), *task_ids)
        for tid in task_ids:  # put_item: a row already there is overwritten, as upstream does
            pipe.delete(row_key(tid))
            pipe.hset(row_key(tid), mapping={"state": "pending", "retries": 0, "owner": "", "hb": 0})
            pipe.lpush(QUEUE, tid)
        pipe.execute()
        with self._lock:
            fault, self.submit_faults = self.submit_faults > 0, max(0, self.submit_faults - 1)
        if fault:
            return 504, {"message": "Endpoint request timed out"}
        return 200, {"session_id": sid, "task_ids": task_ids}

    def result(self, sid: str) -> tuple[int, Any]:
        body = wire.empty_result_body()
        tids = self.tasks_of(sid)
        random.shuffle(tids)  # upstream answers from a GSI query: no order to rely on
        for tid in tids:
            state = self.state(tid)
            if state in ("finished", "failed", "cancelled"):
                body[state].append(tid)
                body[f"{state}_OUTPUT"].append(wire.OUTPUT_PLACEHOLDER)
        body["metadata"] = {"tasks_in_response": sum(len(body[s]) for s in ("finished", "failed", "cancelled"))}
        return 200, body

    def cancel(self, query: dict[str, Any]) -> tuple[int, Any]:
        answer = {}
        for sid in query.get("session_ids_to_cancel") or []:  # single tasks: not in upstream
            counts = {"cancelled_pending": 0, "cancelled_processing": 0}
            for tid in self.tasks_of(sid):
                state = self.state(tid)
                if state in ("pending", "processing"):
                    self.db.hset(row_key(tid), "state", "cancelled")
                    counts[f"cancelled_{state}"] += 1
            answer[sid] = {**counts, "total_cancelled_tasks": sum(counts.values())}
        return 200, answer

    def _ttl_checker(self) -> None:
        while not self._stop.wait(0.2):
            try:
                for sid in self.sessions():
                    for tid in self.tasks_of(sid):
                        row = {k.decode(): v.decode() for k, v in self.db.hgetall(row_key(tid)).items()}
                        if row.get("state") != "processing" or time.time() - float(row["hb"]) < HEARTBEAT_LOST_SEC:
                            continue
                        if int(row["retries"]) >= RETRIES:
                            self.db.hset(row_key(tid), "state", "failed")
                        else:
                            self.db.hset(row_key(tid), mapping={"state": "pending", "owner": "",
                                                                "retries": int(row["retries"]) + 1})
                            self.db.lpush(QUEUE, tid)
            except Exception:  # noqa: BLE001 - Redis stopping at teardown
                if self._stop.is_set():
                    return
                raise


def _handler(grid: StandInDeployment) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            params = parse_qs(url.query)
            with grid._lock:
                grid.requests.append((self.command, url.path))
            content = params.get("submission_content", [""])[0]
            if (self.command, url.path) == ("POST", "/submit"):
                status, body = grid.submit(content)
            elif (self.command, url.path) == ("GET", "/result"):
                status, body = grid.result(wire.decode_query(content)["session_id"])
            elif (self.command, url.path) == ("POST", "/cancel"):
                status, body = grid.cancel(wire.decode_query(content))
            else:
                status, body = 404, {"message": "Not Found"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve  # noqa: N815 - http.server's naming

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
