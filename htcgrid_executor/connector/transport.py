"""HTTP to the grid's control plane: one urllib3 connection pool, timeouts, retries, error mapping.

urllib3 rather than ``requests``: a call through ``requests.Session`` costs about twice as much
client time (~0.6 ms against ~0.3 ms on loopback), and a single-task round trip makes two or
three calls. Proxies from the environment are honoured, except for loopback URLs.

Every route of HTC-Grid takes its input in the query string and answers JSON. This layer knows
nothing about routes' meaning; the caller says whether a call is safe to repeat.

Retries (with exponential backoff and jitter), only for calls marked ``retry=True``:
connection failures, read timeouts, and answers 429, 500, 502, 503, 504 (API Gateway answers 502/504
when it gives up on a function after 29 s while the function runs on). A failed connection attempt
(nothing sent) is retried for every call.

Errors, after retries:

==============================  ======================================================
no answer at all                :class:`GridUnavailableError`
401, 403                        :class:`AuthenticationError` (after one renewal attempt)
other 4xx (400, 404, 413, ...)  :class:`BadRequestError` with the server's message
507                             :class:`StorageFullError`: the grid's Redis refuses writes
5xx (542, 543, 502, ...)        :class:`ControlPlaneError` with status and message
==============================  ======================================================

The server's message is the ``error`` (or ``message``/``errorMessage``) field of a JSON body, else the
plain-text body. Query strings and bodies are never logged.

Counters (:meth:`HTTPTransport.counters`): calls per route, attempts (round trips, retries
included), retries, bytes of request lines sent (every route's input is in the query string) and
of answer bodies received. Updated once per attempt under one small lock: an attempt costs
hundreds of microseconds, the lock well under one.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import threading
import time
import urllib.request
from typing import Any
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from ..errors import (
    AuthenticationError,
    BadRequestError,
    ControlPlaneError,
    GridUnavailableError,
    StorageFullError,
)
from .auth import Auth

__all__ = ["HTTPTransport", "RETRY_STATUSES", "server_message"]

logger = logging.getLogger(__name__)

#: statuses retried for calls that are safe to repeat
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

_MAX_MESSAGE = 1000


def server_message(status: int, text: str, reason: str = "") -> str:
    """The server's own explanation of an error answer, without tracebacks or HTML noise."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "errorMessage", "Message"):
            value = body.get(key)
            if isinstance(value, str) and value:
                text = value
                break
    elif isinstance(body, str):
        text = body
    text = text.strip()
    if not text:
        text = reason or f"HTTP {status}"
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "..."
    return text


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pool_for(base_url: str, pool_size: int) -> urllib3.PoolManager:
    """A pool to ``base_url``: through the environment's proxy if it names one for that host
    (never for loopback: a local grid must not be captured by HTTP(S)_PROXY)."""
    kwargs: dict[str, Any] = {"maxsize": pool_size, "retries": False}
    try:
        import certifi  # requests' CA bundle, which users of the public client rely on

        kwargs["ca_certs"] = certifi.where()
    except ImportError:  # pragma: no cover - the system's CAs then
        pass
    parts = urlsplit(base_url)
    if not _is_loopback(base_url) and not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy:
            return urllib3.ProxyManager(proxy, **kwargs)
    return urllib3.PoolManager(**kwargs)


class HTTPTransport:
    """Requests to one base URL (an API Gateway stage, or the local grid), through one pooled
    session shared by every thread of the connector.

    ``max_attempts`` counts the first try; ``backoff_sec`` doubles per retry up to
    ``max_backoff_sec``, with jitter. ``read_timeout_sec`` bounds the wait for an answer (a call
    may add to it: a long poll waits on the server on purpose).
    """

    def __init__(
        self,
        base_url: str,
        auth: Auth,
        *,
        connect_timeout_sec: float = 10.0,
        read_timeout_sec: float = 40.0,
        max_attempts: int = 6,
        backoff_sec: float = 0.2,
        max_backoff_sec: float = 5.0,
        pool_size: int = 10,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.connect_timeout_sec = connect_timeout_sec
        self.read_timeout_sec = read_timeout_sec
        self.max_attempts = max(1, max_attempts)
        self.backoff_sec = backoff_sec
        self.max_backoff_sec = max_backoff_sec
        self._pool = _pool_for(self.base_url, pool_size)
        self._closed = False
        self._counts_lock = threading.Lock()
        self._requests: dict[str, int] = {}  # route -> calls (retries not counted again)
        self._attempts = 0
        self._retries = 0
        self._bytes_sent = 0
        self._bytes_received = 0

    def counters(self) -> dict[str, Any]:
        """A snapshot: ``requests`` (route -> calls), ``round_trips`` (attempts, retries
        included), ``retries``, ``bytes_sent`` (request lines) and ``bytes_received`` (answer
        bodies). Monotonic over the transport's life."""
        with self._counts_lock:
            return {"requests": dict(self._requests), "round_trips": self._attempts,
                    "retries": self._retries, "bytes_sent": self._bytes_sent,
                    "bytes_received": self._bytes_received}

    def __repr__(self) -> str:
        return f"HTTPTransport({self.base_url!r})"

    def close(self) -> None:
        """Close the pooled connections. Repeatable."""
        self._closed = True
        self._pool.clear()

    def _sleep_before_retry(self, attempt: int, why: str, method: str, route: str) -> None:
        delay = min(self.max_backoff_sec, self.backoff_sec * (2 ** (attempt - 1)))
        delay *= 0.5 + random.random() / 2  # jitter: clients retrying together do not stay in step
        with self._counts_lock:
            self._retries += 1
        logger.debug("%s %s: attempt %d failed (%s), retrying in %.2f s", method, route, attempt, why, delay)
        time.sleep(delay)

    def request(
        self,
        method: str,
        route: str,
        params: dict[str, str],
        *,
        retry: bool,
        extra_read_timeout_sec: float = 0.0,
    ) -> Any:
        """Send one call and return its decoded JSON answer. Blocks for the call, its retries and
        their backoff (bounded: ``max_attempts`` tries, each with its timeouts).

        ``retry``: the call is safe to repeat (see the module docstring). Raises the errors listed
        in the module docstring.
        """
        if self._closed:
            raise GridUnavailableError("connector is closed")
        query = urlencode(params)
        url = f"{self.base_url}{route}?{query}"
        timeout = urllib3.Timeout(connect=self.connect_timeout_sec,
                                  read=self.read_timeout_sec + max(0.0, extra_read_timeout_sec))
        attempt = 0
        renewed = False
        sent = len(method) + len(route) + len(query) + 12  # the request line "<method> <route>?<query> HTTP/1.1"
        with self._counts_lock:
            self._requests[route] = self._requests.get(route, 0) + 1
        while True:
            attempt += 1
            headers = self.auth.headers()  # raises AuthenticationError before authenticate()
            started = time.monotonic()
            with self._counts_lock:
                self._attempts += 1
                self._bytes_sent += sent
            try:
                response = self._pool.request(method, url, headers=headers, timeout=timeout)
            except (ConnectTimeoutError, NewConnectionError) as exc:
                # no connection was made, so nothing was sent: safe to repeat for every call
                # (ConnectTimeoutError first: NewConnectionError is one of its subclasses)
                if attempt < self.max_attempts:
                    self._sleep_before_retry(attempt, "cannot connect", method, route)
                    continue
                raise GridUnavailableError(f"{method} {route}: cannot reach the grid at {self.base_url}: {exc}") from exc
            except ReadTimeoutError as exc:
                if retry and attempt < self.max_attempts:
                    self._sleep_before_retry(attempt, "read timeout", method, route)
                    continue
                raise GridUnavailableError(
                    f"{method} {route}: the grid at {self.base_url} did not answer within {timeout.read_timeout:.0f} s"
                ) from exc
            except ProtocolError as exc:
                # reset or closed mid-call: the request may have arrived, so only calls safe to
                # repeat are retried
                if retry and attempt < self.max_attempts:
                    self._sleep_before_retry(attempt, "connection error", method, route)
                    continue
                raise GridUnavailableError(f"{method} {route}: cannot reach the grid at {self.base_url}: {exc}") from exc
            except HTTPError as exc:
                raise GridUnavailableError(f"{method} {route}: request to {self.base_url} failed: {exc}") from exc

            status = response.status
            with self._counts_lock:
                self._bytes_received += len(response.data)
            logger.debug("%s %s -> %d in %.1f ms", method, route, status,
                         (time.monotonic() - started) * 1000)
            if 200 <= status < 300:
                try:
                    return json.loads(response.data)
                except ValueError as exc:
                    raise ControlPlaneError(f"{method} {route}: the grid's answer is not JSON", status) from exc
            message = server_message(status, response.data.decode("utf-8", "replace"), response.reason or "")
            if status in (401, 403):
                if not renewed and self.auth.on_rejected():
                    renewed = True  # one more try with new credentials; does not count as a retry
                    attempt -= 1
                    continue
                raise AuthenticationError(f"{method} {route}: the grid refused the credentials: {message}", status)
            if status in RETRY_STATUSES and retry and attempt < self.max_attempts:
                self._sleep_before_retry(attempt, f"HTTP {status}", method, route)
                continue
            if 400 <= status < 500 and status != 429:
                raise BadRequestError(f"{method} {route}: {message}", status)
            if status == 507:  # the grid's storage refuses writes: no retry helps until space is freed
                raise StorageFullError(f"{method} {route}: {message}", status)
            raise ControlPlaneError(f"{method} {route}: {message}", status)
