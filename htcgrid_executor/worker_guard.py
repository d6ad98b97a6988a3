"""The deployment guard: what the worker handler does so that the executor's promises hold on any
HTC-Grid, not only on the embedded local grid.

A deployment's control plane (upstream HTC-Grid) cannot cancel a single task, re-queues every
task of a submission it is sent twice (a ``POST /submit`` answered 504 and retried), ignores a
task's time limit and retries a lost task five times whatever the client asked. So on a
deployment each task of ours carries a *guard* (field :data:`GUARD_FIELD`, signed with the grid
secret like the pickles: only a key holder can name where the worker connects), and the handler
keeps the promises itself, through two keys per task in the data plane::

    <task_id>-cancel    written by the client (one batched write) when the call is cancelled
                        and it need not know whether the call had begun
    <task_id>-run       the run marker, first writer wins (Redis Lua script / S3 conditional put):
                        {"state": "running", "owner", "until", "attempt"}  a lease the run renews
                        {"state": "done", "envelope"}                       the first run's answer
                        {"state": "collected"}                              written by the client
                        {"state": "cancelled"}                              created by the client

A cancel that must know whether the call began (``Future.cancel()``, ``shutdown(cancel_futures=
True)``) creates the run marker as ``cancelled`` unless a worker created it first: the one
conditional write on the one key decides, on Redis and on S3 alike, so a call is either
cancelled and never runs, or begun and kept.

Before running user code the handler asks the marker (one atomic step):

- cancel mark present, or a ``cancelled`` marker: answer ``"error": "cancelled"`` without
  running anything;
- ``done``: answer the first run's envelope again (a duplicate delivery runs nothing);
- ``collected``: answer ``"error": "duplicate"`` (the client has the result already);
- ``running`` with a live lease: another run is under way; wait for it and answer its envelope;
- ``running`` with an expired lease (its worker was lost), or no marker: take the marker with
  ``attempt + 1`` and run, unless that exceeds ``retry_count + 1`` attempts: then answer
  ``"error": "retries"`` without running.

While the user code runs a thread renews the lease every third of its length. The time limit
(``task_timeout_sec``) interrupts the call with an exception raised by ``SIGALRM`` when the
handler runs in the main thread (as in Lambda's runtime); in any case a call that ran past its
limit answers ``"error": "timeout"``, its result discarded.

The client side is here too (:func:`guard_location`, :func:`seal_guard`, the key names). The worker
side imports ``redis`` or ``boto3`` only when a task carries a guard; the handler without it
needs only the standard library and cloudpickle.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .backoff import Backoff
from .errors import ConfigurationError, PayloadError, SignatureError
from .payload import sign_bytes, signing_key_from_env, verify_bytes
from .wire import CANCEL_SUFFIX, RUN_SUFFIX

__all__ = [
    "GUARD_FIELD",
    "REDIS_PASSWORD_ENV",
    "cancel_key",
    "run_key",
    "guard_location",
    "seal_guard",
    "run_guarded",
    "read_data_plane_key",
    "COLLECTED",
    "CANCELLED",
]

#: the task field that carries the signed guard
GUARD_FIELD = "guard"
#: worker environment variable with the data plane Redis password (not sent in tasks: a secret)
REDIS_PASSWORD_ENV = "HTCGRID_REDIS_PASSWORD"
#: what the client writes on a task's run marker once it has collected the task's result
COLLECTED = b'{"state": "collected"}'
#: the run marker the client creates for a task it cancels before any worker took it
CANCELLED = b'{"state": "cancelled"}'
_CONTEXT = "guard"  # what a guard is signed for: a guard does not verify as any other blob
_DEFAULT_LEASE_SEC = 30.0
_DEFAULT_RETRIES = 5  # the grid's default retry_count: upstream's own fixed number
_BEGIN_TRIES = 6  # data-plane errors ridden out before the run marker is taken (about 12 s)


def cancel_key(task_id: str) -> str:
    return task_id + CANCEL_SUFFIX


def run_key(task_id: str) -> str:
    return task_id + RUN_SUFFIX


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------


def guard_location(config: Any) -> dict[str, Any]:
    """Where the workers find the markers: the data plane a
    :class:`~htcgrid_executor.connector.config.ClientConfig` names, without its secrets. Redis is
    preferred where there is one (one round trip per step); else S3."""
    if config.uses_redis:
        url = config.redis_url
        parts = urlsplit(url) if "://" in url else None
        if parts is not None and parts.password is not None:
            # a password in the URL is a secret: the workers take it from their environment
            url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return {"store": "REDIS", "redis_url": url}
    return {"store": "S3", "bucket": config.s3_bucket, "region": config.region, "kms": config.s3_kms_key_id}


def seal_guard(location: dict[str, Any], task_id: str, key: str, *, task_timeout_sec: float | None,
               retry_count: int | None, lease_sec: float = _DEFAULT_LEASE_SEC) -> str:
    """The signed guard of one task (the value of ``task[GUARD_FIELD]``)."""
    doc = {"task_id": task_id, "timeout": task_timeout_sec,
           "retries": _DEFAULT_RETRIES if retry_count is None else retry_count,
           "lease": lease_sec, **location}
    return sign_bytes(json.dumps(doc, separators=(",", ":")).encode(), key, _CONTEXT)


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


class _TimeLimit(BaseException):
    """Raised in the user's code at its time limit (a BaseException: ``except Exception`` in user
    code does not swallow it)."""


def _failure(kind: str, message: str, binding: str) -> dict[str, Any]:
    return {"htcgrid_executor": 1, "ok": False, "error": kind, "message": message, "binding": binding}


def run_guarded(event: dict[str, Any], run: Callable[[dict[str, Any], str | None], dict[str, Any]],
                binding: str) -> dict[str, Any]:
    """Run ``run(task, task_id)`` (the handler on the task without its guard, for the task id the
    guard names) under the task's guard.

    Returns the envelope to answer: the run's, or one of the guard's failures (``cancelled``,
    ``duplicate``, ``retries``, ``timeout``; ``signature``/``config`` for a guard that cannot be
    used). Never raises for a problem of the task or the data plane.
    """
    key = signing_key_from_env()
    task = {k: v for k, v in event.items() if k != GUARD_FIELD}
    if key is None:
        return run(task, None)  # the handler answers its "config" envelope
    try:
        spec = json.loads(verify_bytes(event[GUARD_FIELD], key, _CONTEXT))
        tid = str(spec["task_id"])
        retries = int(spec["retries"])
        lease = float(spec.get("lease") or _DEFAULT_LEASE_SEC)
        timeout = spec.get("timeout")
        timeout = None if timeout is None else float(timeout)
        marks = _marks_for(spec)
    except SignatureError as exc:
        return _failure("signature", f"task guard: {exc}", binding)
    except ConfigurationError as exc:
        return _failure("config", str(exc), binding)
    except (PayloadError, ValueError, KeyError, TypeError) as exc:
        return _failure("payload", f"malformed task guard: {exc!r}", binding)
    owner = uuid.uuid4().hex
    refusal = _take_marker(marks, tid, owner, lease, retries, binding)
    if refusal is not None:
        return refusal
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(marks, tid, owner, lease, stop),
                               name="htcgrid-guard-lease", daemon=True)
    renewer.start()
    started = time.monotonic()
    try:
        with _alarm(timeout):
            envelope = run(task, tid)
    except _TimeLimit:
        envelope = None
    finally:
        stop.set()
        renewer.join()
    envelope = _timed(envelope, time.monotonic() - started, timeout, event.get("calls"), binding)
    try:
        marks.finish(tid, owner, json.dumps(envelope))
    except Exception:  # noqa: BLE001 - the answer still goes back; a duplicate may run it again
        pass
    return envelope


def _take_marker(marks: Any, tid: str, owner: str, lease: float, retries: int,
                 binding: str) -> dict[str, Any] | None:
    """Take the task's run marker (None: run the call), or the envelope to answer instead."""
    backoff = Backoff(0.4, 6.4, max_retries=_BEGIN_TRIES - 1)  # 0.4 + 0.8 + ... : about 12 s
    try:
        while True:
            try:
                verdict, marker = marks.begin(tid, owner, lease, retries + 1)
            except Exception:
                # a blip of the data plane (failover, network): worth a few tries before the task
                # fails; the agent's heartbeat keeps the task ours meanwhile
                if backoff.exhausted:
                    raise
                time.sleep(backoff.next_delay())
                continue
            if verdict == "run":
                return None
            if verdict == "done":
                return json.loads(marker["envelope"])
            if verdict != "wait":
                return _refusal(verdict, marker, retries, binding)
            time.sleep(min(1.0, lease / 6))  # another run holds a live lease
    except Exception as exc:  # noqa: BLE001 - redis/boto3 errors: the data plane is unusable
        return _failure("config", f"task guard: the data plane is unreachable: {type(exc).__name__}: {exc}",
                        binding)


def _refusal(verdict: str, marker: dict[str, Any], retries: int, binding: str) -> dict[str, Any]:
    if verdict == "cancelled":
        return _failure("cancelled", "the call was cancelled before it started", binding)
    if verdict == "collected":
        return _failure("duplicate", "a duplicate delivery of a call that ran already", binding)
    return _failure("retries", f"its worker was lost in each of its {marker.get('attempt')} "
                    f"attempt(s); retry_count={retries} allows no more", binding)


def _timed(envelope: Any, elapsed: float, timeout: float | None, calls: Any, binding: str) -> Any:
    """The run's envelope, or the timeout's; a successful one says the time per call."""
    interrupted = envelope is None or (isinstance(envelope, dict)
                                       and str(envelope.get("type", "")).endswith("._TimeLimit"))
    if timeout is not None and (interrupted or elapsed > timeout):
        return _failure("timeout", f"the call ran over its time limit of {timeout:g} s", binding)
    if isinstance(envelope, dict) and envelope.get("ok"):
        # last key, read by the client from the output's tail to size map's chunks
        envelope["call_sec"] = round(elapsed / (calls if isinstance(calls, int) and calls > 0 else 1), 7)
    return envelope


def _renew(marks: Any, tid: str, owner: str, lease: float, stop: threading.Event) -> None:
    while not stop.wait(lease / 3):
        try:
            if not marks.renew(tid, owner, lease):
                return  # taken over (our lease had expired): nothing left to renew
        except Exception:  # noqa: BLE001 - a blip: try again at the next tick
            continue


class _alarm:  # noqa: N801 - a context manager used like a function
    """Raise :class:`_TimeLimit` in this thread after ``seconds`` (main thread only; elsewhere a
    no-op, and the caller's after-the-fact check answers the timeout)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.previous: Any = None
        self.armed = False

    def __enter__(self) -> None:
        if self.seconds is None or threading.current_thread() is not threading.main_thread():
            return
        self.previous = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.001))
        self.armed = True

    @staticmethod
    def _fire(signum: int, frame: Any) -> None:
        raise _TimeLimit()

    def __exit__(self, *exc_info: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


# -- the markers ----------------------------------------------------------------------------------

_MARKS: dict[str, Any] = {}  # one client per data plane per worker process


def _marks_for(spec: dict[str, Any]) -> Any:
    where = json.dumps({k: spec.get(k) for k in ("store", "redis_url", "bucket", "region", "kms")})
    marks = _MARKS.get(where)
    if marks is None:
        marks = _RedisMarks(spec["redis_url"]) if spec.get("store") == "REDIS" else _S3Marks(spec)
        _MARKS[where] = marks
    return marks


_BEGIN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', ''} end
local cur = redis.call('GET', KEYS[1])
local attempt = 0
if cur then
  local m = cjson.decode(cur)
  if m['state'] ~= 'running' then return {m['state'], cur} end
  if tonumber(m['until']) > tonumber(ARGV[2]) then return {'wait', cur} end
  attempt = tonumber(m['attempt'])
end
if attempt >= tonumber(ARGV[4]) then return {'exhausted', cur} end
local new = cjson.encode({state='running', owner=ARGV[1], ['until']=tonumber(ARGV[3]), attempt=attempt + 1})
redis.call('SET', KEYS[1], new)
return {'run', new}
"""
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local m = cjson.decode(cur)
if m['state'] ~= 'running' or m['owner'] ~= ARGV[1] then return 0 end
m['until'] = tonumber(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(m))
return 1
"""
_FINISH = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local m = cjson.decode(cur)
  if m['state'] ~= 'running' or m['owner'] ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def _redis_client(url: str, needed_for: str = "the task guard") -> Any:
    """A redis-py client of the data plane at ``url``, its password from the environment
    (:data:`REDIS_PASSWORD_ENV`) unless the URL holds one."""
    try:
        import redis
    except ImportError as exc:
        raise ConfigurationError(f"{needed_for} needs redis-py in the worker (add 'redis' to "
                                 "lambda.zip), or turn the guard off on the client") from exc
    password = os.environ.get(REDIS_PASSWORD_ENV) or None
    timeouts = {"socket_timeout": 10.0, "socket_connect_timeout": 10.0}
    if "://" in url:
        return redis.Redis.from_url(url, **({"password": password} if password else {}), **timeouts)
    # a bare host name, as a deployment's config has it: ElastiCache, TLS on 6379
    host, _, port = url.partition(":")
    return redis.Redis(host=host, port=int(port or 6379), ssl=True, password=password, **timeouts)


_readers: dict[str, Callable[[str], bytes | None]] = {}  # one connection per location and process


def read_data_plane_key(location: dict[str, Any], key: str) -> bytes | None:
    """Read one key of the data plane at ``location`` (:func:`guard_location`'s shape) from a
    worker; None if it does not exist. The connection is kept for the process's next reads.
    Raises ConfigurationError (no redis-py / boto3) and the store's own errors."""
    where = json.dumps(location, sort_keys=True)
    reader = _readers.get(where)
    if reader is None:
        if location.get("store") == "S3":
            marks = _S3Marks(location)

            def reader(name: str) -> bytes | None:
                try:
                    answer = marks._client.get_object(Bucket=marks._bucket, Key=name)
                except Exception as exc:
                    if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                        return None
                    raise
                with answer["Body"] as body:
                    return body.read()
        else:
            reader = _redis_client(str(location["redis_url"]), "a shared object").get
        _readers[where] = reader
    return reader(key)


class _RedisMarks:
    def __init__(self, url: str) -> None:
        client = _redis_client(url)
        self._begin = client.register_script(_BEGIN)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)

    def begin(self, tid: str, owner: str, lease: float, attempts: int) -> tuple[str, dict[str, Any]]:
        now = time.time()
        verdict, raw = self._begin(keys=[run_key(tid), cancel_key(tid)], args=[owner, now, now + lease, attempts])
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        return verdict, json.loads(raw) if raw else {}

    def renew(self, tid: str, owner: str, lease: float) -> bool:
        return bool(self._renew(keys=[run_key(tid)], args=[owner, time.time() + lease]))

    def finish(self, tid: str, owner: str, envelope: str) -> None:
        self._finish(keys=[run_key(tid)], args=[owner, json.dumps({"state": "done", "envelope": envelope})])


class _S3Marks:
    """The same protocol on S3 with conditional writes (``If-None-Match: *`` for the first
    writer, ``If-Match: <etag>`` to take over or renew)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        try:
            import boto3
        except ImportError as exc:
            raise ConfigurationError("the task guard needs boto3 in the worker (part of the Lambda "
                                     "Python images; else add it to lambda.zip)") from exc
        self._client = boto3.client("s3", region_name=spec.get("region") or None)
        self._bucket = spec["bucket"]
        self._extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": spec["kms"]} if spec.get("kms") else {}

    def _get(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        try:
            answer = self._client.get_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        with answer["Body"] as body:
            data = body.read()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = {}
        return doc, answer.get("ETag")

    def _put(self, key: str, doc: dict[str, Any], etag: str | None) -> bool:
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self._bucket, Key=key, Body=json.dumps(doc).encode(),
                                    **condition, **self._extra)
        except Exception as exc:
            # the marker changed (or, for If-Match, went) since we read it: read it again
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                return False
            raise
        return True

    def begin(self, tid: str, owner: str, lease: float, attempts: int) -> tuple[str, dict[str, Any]]:
        while True:
            cancelled, _ = self._get(cancel_key(tid))
            if cancelled is not None:
                return "cancelled", {}
            marker, etag = self._get(run_key(tid))
            attempt = 0
            if marker is not None:
                if marker.get("state") != "running":
                    return str(marker.get("state")), marker
                if float(marker.get("until", 0)) > time.time():
                    return "wait", marker
                attempt = int(marker.get("attempt", 0))
            if attempt >= attempts:
                return "exhausted", marker or {}
            new = {"state": "running", "owner": owner, "until": time.time() + lease, "attempt": attempt + 1}
            # the conditional write decides against a client's cancel: the client creates the
            # marker as "cancelled" unless this write made it first (then the call runs, and the
            # client keeps its future); a write that loses reads the marker again
            if self._put(run_key(tid), new, etag):
                return "run", new

    def renew(self, tid: str, owner: str, lease: float) -> bool:
        marker, etag = self._get(run_key(tid))
        if marker is None or marker.get("state") != "running" or marker.get("owner") != owner:
            return False
        return self._put(run_key(tid), {**marker, "until": time.time() + lease}, etag)

    def finish(self, tid: str, owner: str, envelope: str) -> None:
        self._end(tid, owner, {"state": "done", "envelope": envelope})

    def _end(self, tid: str, owner: str, final: dict[str, Any]) -> None:
        """Replace our own running marker by ``final``; a marker another run took over stays."""
        for _ in range(5):
            marker, etag = self._get(run_key(tid))
            if marker is not None and (marker.get("state") != "running" or marker.get("owner") != owner):
                return
            if self._put(run_key(tid), final, etag):
                return


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
