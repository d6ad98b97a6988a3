"""HTTP to the grid's control plane: one connection pool, timeouts, retries, error mapping.

``https://`` URLs, and any URL a proxy from the environment applies to (never loopback), go
through one urllib3 pool; urllib3 rather than ``requests``, whose ``Session`` costs about twice as
much client time (~0.6 ms against ~0.3 ms on loopback). Plain ``http://`` URLs that no proxy
applies to (the embedded local grid) go through :mod:`.plain_http`'s keep-alive connections,
which cost about a third less per request again; a single-task round trip makes two calls.

Every route of HTC-Grid takes its input in the query string and answers JSON. This layer knows
nothing about routes' meaning; the caller says whether a call is safe to repeat.

Retries (exponential backoff with jitter, one :class:`~htcgrid_executor.backoff.Backoff` per call),
only for calls marked ``retry=True``:
connection failures, read timeouts, and answers 429, 500, 502, 503, 504 (API Gateway answers 502/504
when it gives up on a function after 29 s while the function runs on). A failed connection attempt
(nothing sent) is retried for every call.

A call made inside the caller's budget (:func:`~htcgrid_executor.backoff.spend_until`, as the
executor's threads do with ``broken_after_sec``) spends that budget, not its own: retries stop, and
each attempt's connect and read timeouts are cut, at what is left of it; once it is spent the
call raises :class:`GridUnavailableError` without another attempt.

Errors, after retries:

==============================  ======================================================
the transport is closed         :class:`ConnectorClosedError` (nothing is sent)
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

import contextlib
import enum
import ipaddress
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
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

from ..backoff import Backoff, time_left
from ..errors import (
    AuthenticationError,
    BadRequestError,
    ConnectorClosedError,
    ControlPlaneError,
    GridError,
    GridUnavailableError,
    StorageFullError,
)
from .auth import Auth
from .plain_http import AnswerBroken, ConnectFailed, PlainHTTPPool

__all__ = ["HTTPTransport", "TransportState", "RETRY_STATUSES", "server_message"]

logger = logging.getLogger(__name__)

#: statuses retried for calls that are safe to repeat
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

_MAX_MESSAGE = 1000
_MIN_ATTEMPT_SEC = 0.01  # less of the caller's budget left than this: no attempt is worth starting


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


def _proxy_for(base_url: str) -> str | None:
    """The environment's proxy for ``base_url``, if it names one for that host (never for
    loopback: a local grid must not be captured by HTTP(S)_PROXY)."""
    parts = urlsplit(base_url)
    if _is_loopback(base_url) or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


def _plain_pool_for(base_url: str, pool_size: int) -> PlainHTTPPool | None:
    """Keep-alive connections for a plain ``http://`` URL that no proxy applies to, else None."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname or _proxy_for(base_url):
        return None
    return PlainHTTPPool(parts.hostname, parts.port or 80, maxsize=pool_size)


def _pool_for(base_url: str, pool_size: int) -> urllib3.PoolManager:
    """A urllib3 pool to ``base_url``, through the environment's proxy if one applies."""
    kwargs: dict[str, Any] = {"maxsize": pool_size, "retries": False}
    try:
        import certifi  # requests' CA bundle, which users of the public client rely on

        kwargs["ca_certs"] = certifi.where()
    except ImportError:  # pragma: no cover - the system's CAs then
        pass
    proxy = _proxy_for(base_url)
    if proxy:
        return urllib3.ProxyManager(proxy, **kwargs)
    return urllib3.PoolManager(**kwargs)


class TransportState(enum.Enum):
    """An :class:`HTTPTransport`'s lifecycle: OPEN until :meth:`HTTPTransport.close`, then CLOSED
    for good (a closed transport refuses every call with :class:`ConnectorClosedError`)."""

    OPEN = "open"
    CLOSED = "closed"


class _Retryable(Exception):
    """One attempt failed in a way a retry may cure. ``error`` is what the caller gets once no
    retry is left; ``always``: nothing reached the server, so even a call unsafe to repeat may."""

    def __init__(self, why: str, error: GridError, *, always: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.error = error
        self.always = always


class _Rejected(Exception):
    """The server refused the credentials (401/403); ``error`` is raised unless a renewal helps."""

    def __init__(self, error: AuthenticationError) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _http_errors(call: str, base_url: str, read_timeout: float | None) -> Iterator[None]:
    """Translate urllib3's and :mod:`.plain_http`'s exceptions for one attempt of ``call``
    (``"<method> <route>"``): the transient ones into :class:`_Retryable`, the others into
    :class:`GridUnavailableError`."""
    try:
        yield
    except (ConnectTimeoutError, NewConnectionError, ConnectFailed) as exc:
        # no connection was made, so nothing was sent: safe to repeat for every call
        # (ConnectTimeoutError first: NewConnectionError is one of its subclasses)
        error = GridUnavailableError(f"{call}: cannot reach the grid at {base_url}: {exc}")
        error.__cause__ = exc
        raise _Retryable("cannot connect", error, always=True) from exc
    except (TimeoutError, ReadTimeoutError) as exc:
        error = GridUnavailableError(f"{call}: the grid at {base_url} did not answer within {read_timeout:.3g} s")
        error.__cause__ = exc
        raise _Retryable("read timeout", error) from exc
    except (ProtocolError, AnswerBroken) as exc:
        # reset or closed mid-call: the request may have arrived, so only calls safe to repeat
        # are retried
        error = GridUnavailableError(f"{call}: cannot reach the grid at {base_url}: {exc}")
        error.__cause__ = exc
        raise _Retryable("connection error", error) from exc
    except HTTPError as exc:
        raise GridUnavailableError(f"{call}: request to {base_url} failed: {exc}") from exc


def _decode_answer(call: str, status: int, data: bytes, reason: str) -> Any:
    """The JSON of a 2xx answer; for any other status the error of the module docstring's table
    (as :class:`_Rejected` for 401/403 and :class:`_Retryable` for the retried statuses)."""
    if 200 <= status < 300:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ControlPlaneError(f"{call}: the grid's answer is not JSON", status) from exc
    message = server_message(status, data.decode("utf-8", "replace"), reason)
    if status in (401, 403):
        raise _Rejected(AuthenticationError(f"{call}: the grid refused the credentials: {message}", status))
    if status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {status}", ControlPlaneError(f"{call}: {message}", status))
    if 400 <= status < 500:
        raise BadRequestError(f"{call}: {message}", status)
    if status == 507:  # the grid's storage refuses writes: no retry helps until space is freed
        raise StorageFullError(f"{call}: {message}", status)
    raise ControlPlaneError(f"{call}: {message}", status)


class HTTPTransport:
    """Requests to one base URL (an API Gateway stage, or the local grid), through one pooled
    session shared by every thread of the connector.

    ``max_attempts`` counts the first try; ``backoff_sec`` doubles per retry up to
    ``max_backoff_sec``, with jitter (a :class:`~htcgrid_executor.backoff.Backoff`).
    ``read_timeout_sec`` bounds the wait for an answer (a call may add to it: a long poll waits
    on the server on purpose). Hand one to ``AWSConnector(..., transport=...)`` to tune these.
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
        self._plain = _plain_pool_for(self.base_url, pool_size)
        self._pool = _pool_for(self.base_url, pool_size)
        # the host's pool itself: PoolManager.request() parses the URL and looks its pool up
        # again on every call (~0.1 ms of client CPU a request); through a proxy the manager
        # must build each request
        self._host_pool = (None if isinstance(self._pool, urllib3.ProxyManager)
                           else self._pool.connection_from_url(self.base_url))
        self._origin_len = len(self.base_url) - len(urlsplit(self.base_url).path)
        self._state = TransportState.OPEN
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

    @property
    def state(self) -> TransportState:
        return self._state

    def close(self) -> None:
        """Close the pooled connections. Repeatable."""
        self._state = TransportState.CLOSED
        self._pool.clear()
        if self._plain is not None:
            self._plain.close()

    def request(
        self,
        method: str,
        route: str,
        params: dict[str, str],
        *,
        retry: bool,
        extra_read_timeout_sec: float = 0.0,
        body: bytes = b"",
    ) -> Any:
        """Send one call and return its decoded JSON answer. Blocks for the call, its retries and
        their backoff (bounded: ``max_attempts`` tries, each with its timeouts, and never past the
        caller's budget, :func:`~htcgrid_executor.backoff.spend_until`).

        ``retry``: the call is safe to repeat (see the module docstring). ``body``: the request's
        body (sent again by each retry). Raises
        :class:`ConnectorClosedError` once closed, and the errors listed in the module docstring.
        """
        if self._state is TransportState.CLOSED:
            raise ConnectorClosedError("the connector is closed")
        query = urlencode(params)
        url = f"{self.base_url}{route}?{query}"
        read_timeout = self.read_timeout_sec + max(0.0, extra_read_timeout_sec)
        sent = len(method) + len(route) + len(query) + 12 + len(body)  # "<method> <route>?<query> HTTP/1.1", body
        with self._counts_lock:
            self._requests[route] = self._requests.get(route, 0) + 1
        backoff = Backoff(self.backoff_sec, max(self.backoff_sec, self.max_backoff_sec), jitter=True,
                          max_retries=self.max_attempts - 1)
        renewed = False
        last: _Retryable | None = None
        while True:
            timeout = self._timeout(read_timeout)
            if timeout is None:  # the caller's budget is spent: no further attempt
                if last is not None:
                    raise last.error from last.error.__cause__
                raise GridUnavailableError(f"{method} {route}: not sent to {self.base_url}: the caller's "
                                           "deadline has passed")
            try:
                return self._attempt(method, route, url, timeout, sent, body)
            except _Rejected as rejected:
                if renewed or not self.auth.on_rejected():
                    raise rejected.error from None
                renewed = True  # one more try with new credentials; does not count as a retry
            except _Retryable as failure:
                if not (retry or failure.always) or backoff.exhausted:
                    raise failure.error from failure.error.__cause__
                last = failure
                self._wait_before_retry(backoff, failure.why, method, route)

    def _timeout(self, read_timeout: float) -> urllib3.Timeout | None:
        """One attempt's timeouts: the transport's, cut at what is left of the caller's budget;
        None when nothing is left."""
        connect, left = self.connect_timeout_sec, time_left()
        if left is not None:
            if left < _MIN_ATTEMPT_SEC:
                return None
            connect, read_timeout = min(connect, left), min(read_timeout, left)
        return urllib3.Timeout(connect=connect, read=read_timeout)

    def _attempt(self, method: str, route: str, url: str, timeout: urllib3.Timeout, sent: int,
                 body: bytes) -> Any:
        """One round trip: its answer's JSON, or the exception that says what went wrong."""
        headers = self.auth.headers()  # raises AuthenticationError before authenticate()
        started = time.monotonic()
        with self._counts_lock:
            self._attempts += 1
            self._bytes_sent += sent
        call = f"{method} {route}"
        with _http_errors(call, self.base_url, timeout.read_timeout):
            if self._plain is not None:
                answer = self._plain.request(method, url[self._origin_len:], headers,
                                             connect_timeout=timeout.connect_timeout,
                                             read_timeout=timeout.read_timeout, body=body)
                status, data, reason = answer.status, answer.body, answer.reason
            else:
                if self._host_pool is not None:  # the same request, without the manager's look-up
                    response = self._host_pool.urlopen(method, url[self._origin_len:], headers=headers,
                                                       timeout=timeout, body=body or None)
                else:
                    response = self._pool.request(method, url, headers=headers, timeout=timeout,
                                                  body=body or None)
                status, data, reason = response.status, response.data, response.reason or ""
        with self._counts_lock:
            self._bytes_received += len(data)
        logger.debug("%s -> %d in %.1f ms", call, status, (time.monotonic() - started) * 1000)
        return _decode_answer(call, status, data, reason)

    def _wait_before_retry(self, backoff: Backoff, why: str, method: str, route: str) -> None:
        delay = backoff.next_delay()
        with self._counts_lock:
            self._retries += 1
        logger.debug("%s %s: attempt %d failed (%s), retrying in %.2f s", method, route, backoff.retries,
                     why, delay)
        time.sleep(delay)
