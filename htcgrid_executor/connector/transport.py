"""HTTP to the grid's control plane: one pooled ``requests.Session``, timeouts, retries, error mapping.

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
5xx (542, 543, 502, ...)        :class:`ControlPlaneError` with status and message
==============================  ======================================================

The server's message is the ``error`` (or ``message``/``errorMessage``) field of a JSON body, else the
plain-text body. Query strings and bodies are never logged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import time
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from ..errors import AuthenticationError, BadRequestError, ControlPlaneError, GridUnavailableError
from .auth import Auth

__all__ = ["HTTPTransport", "RETRY_STATUSES", "server_message"]

logger = logging.getLogger(__name__)

#: statuses retried for calls that are safe to repeat
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

_MAX_MESSAGE = 1000


def server_message(response: requests.Response) -> str:
    """The server's own explanation of an error answer, without tracebacks or HTML noise."""
    text = response.text or ""
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
        text = response.reason or "no message"
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
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if _is_loopback(self.base_url):
            # A local grid: an HTTP(S)_PROXY from the environment must not capture loopback calls.
            self._session.trust_env = False
        self._closed = False

    def __repr__(self) -> str:
        return f"HTTPTransport({self.base_url!r})"

    def close(self) -> None:
        """Close the pooled connections. Repeatable."""
        self._closed = True
        self._session.close()

    def _sleep_before_retry(self, attempt: int, why: str, method: str, route: str) -> None:
        delay = min(self.max_backoff_sec, self.backoff_sec * (2 ** (attempt - 1)))
        delay *= 0.5 + random.random() / 2  # jitter: clients retrying together do not stay in step
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
        url = f"{self.base_url}{route}"
        timeout = (self.connect_timeout_sec, self.read_timeout_sec + max(0.0, extra_read_timeout_sec))
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            headers = self.auth.headers()  # raises AuthenticationError before authenticate()
            started = time.monotonic()
            try:
                response = self._session.request(method, url, params=params, headers=headers, timeout=timeout)
            except requests.exceptions.ConnectTimeout as exc:
                # nothing was sent: safe to repeat for every call
                if attempt < self.max_attempts:
                    self._sleep_before_retry(attempt, "connect timeout", method, route)
                    continue
                raise GridUnavailableError(f"{method} {route}: cannot reach the grid at {self.base_url}: {exc}") from exc
            except requests.exceptions.ReadTimeout as exc:
                if retry and attempt < self.max_attempts:
                    self._sleep_before_retry(attempt, "read timeout", method, route)
                    continue
                raise GridUnavailableError(
                    f"{method} {route}: the grid at {self.base_url} did not answer within {timeout[1]:.0f} s"
                ) from exc
            except requests.exceptions.ConnectionError as exc:
                # Refused or reset: a refused connection sent nothing; a reset one might have, so
                # only calls safe to repeat are retried.
                if (retry or _refused(exc)) and attempt < self.max_attempts:
                    self._sleep_before_retry(attempt, "connection error", method, route)
                    continue
                raise GridUnavailableError(f"{method} {route}: cannot reach the grid at {self.base_url}: {exc}") from exc
            except requests.exceptions.RequestException as exc:
                raise GridUnavailableError(f"{method} {route}: request to {self.base_url} failed: {exc}") from exc

            status = response.status_code
            logger.debug("%s %s -> %d in %.1f ms", method, route, status,
                         (time.monotonic() - started) * 1000)
            if 200 <= status < 300:
                try:
                    return response.json()
                except ValueError as exc:
                    raise ControlPlaneError(f"{method} {route}: the grid's answer is not JSON", status) from exc
            message = server_message(response)
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
            raise ControlPlaneError(f"{method} {route}: {message}", status)


def _refused(exc: requests.exceptions.ConnectionError) -> bool:
    """True when no connection could be made (refused, no route, DNS): the request never left
    this machine, so repeating it cannot run anything twice."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)  # DNS failures are a subclass in urllib3 2
