"""Plain-HTTP keep-alive connections to one origin, for the transport's fast path.

Used by :class:`~.transport.HTTPTransport` for ``http://`` URLs that no proxy applies to (the
embedded local grid, a grid on a private network); HTTPS and proxied URLs go through urllib3.
Why not urllib3 or ``http.client`` for these too: on loopback a request's own cost is the round
trip, and each layer adds to it. Measured on one ``GET /result`` of the local grid (2 cores):
about 640 µs through urllib3, 410 µs through a bare ``http.client`` keep-alive connection, whose
answer parsing goes through ``email.parser``. A single-task round trip makes two such requests.
Here a request is one ``sendall`` and its answer is read from a buffered socket file: the status
line, the header lines (only ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` are
used), the body.

What it implements of HTTP/1.1, as a client of a server it did not write (an API gateway, a proxy
in front of one): answers framed by ``Content-Length``, by chunked transfer coding (trailers
skipped), or by the end of the connection; interim ``1xx`` answers skipped; keep-alive by HTTP/1.1
default, ``Connection: close`` honoured, HTTP/1.0 kept alive only when it says so. Limits as
``http.client``'s: a line of at most 65,536 bytes, at most 100 header lines. No request body (every
route takes its input in the query string), no compression asked for.

Errors are raised as :class:`ConnectFailed` (nothing was sent), :class:`socket.timeout` (no
answer in time) and :class:`AnswerBroken` (the connection failed or the answer is not HTTP once
the request may have been sent), for the transport to map.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import BinaryIO

__all__ = ["PlainHTTPPool", "ConnectFailed", "AnswerBroken", "Answer"]

_MAX_LINE = 65536
_MAX_HEADERS = 100


class ConnectFailed(Exception):
    """No connection could be made: nothing was sent."""


class AnswerBroken(Exception):
    """The connection failed, or what came back is not an HTTP answer, after the request may have
    been sent."""


class Answer:
    """One answer: ``status``, ``reason`` and the whole ``body``."""

    __slots__ = ("status", "reason", "body")

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.body = body


class _Connection:
    """One socket to the origin and its buffered reader."""

    __slots__ = ("sock", "rfile")

    def __init__(self, address: tuple[str, int], connect_timeout: float) -> None:
        try:
            self.sock = socket.create_connection(address, timeout=connect_timeout)
        except OSError as exc:  # refused, unreachable, timed out: nothing was sent
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile: BinaryIO = self.sock.makefile("rb")

    def dropped(self) -> bool:
        """True if the server closed the idle connection (or sent something unasked)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


def _line(rfile: BinaryIO) -> bytes:
    line = rfile.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise AnswerBroken("an answer line is longer than 65536 bytes")
    return line


def _read_head(rfile: BinaryIO) -> tuple[str, int, str, dict[str, str]]:
    """(version, status, reason, the headers used here, lower-cased) of one answer."""
    status_line = _line(rfile)
    if not status_line:
        raise AnswerBroken("the server closed the connection without answering")
    version, _, rest = status_line.decode("iso-8859-1").rstrip("\r\n").partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise AnswerBroken(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = _line(rfile)
        if line in (b"\r\n", b"\n"):
            return version, int(code), reason, headers
        if not line:
            raise AnswerBroken("the connection closed within the answer's headers")
        name, colon, value = line.decode("iso-8859-1").partition(":")
        name = name.strip().lower()
        if colon and name in ("content-length", "transfer-encoding", "connection") and name not in headers:
            headers[name] = value.strip()
    raise AnswerBroken(f"an answer with more than {_MAX_HEADERS} header lines")


def _read_exactly(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise AnswerBroken(f"the connection closed after {len(data)} of the answer's {size} bytes")
    return data


def _read_chunked(rfile: BinaryIO) -> bytes:
    parts: list[bytes] = []
    while True:
        size_text = _line(rfile).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise AnswerBroken(f"a malformed chunk size: {size_text[:20]!r}") from None
        if size < 0:
            raise AnswerBroken("a negative chunk size")
        if size == 0:
            while _line(rfile) not in (b"\r\n", b"\n", b""):  # trailers: not used
                pass
            return b"".join(parts)
        parts.append(_read_exactly(rfile, size))
        _line(rfile)  # the CRLF after the chunk


def _exchange(conn: _Connection, request: bytes, method: str) -> tuple[Answer, bool]:
    """Send one request and read its answer: (answer, whether the connection may be reused)."""
    try:
        conn.sock.sendall(request)
        rfile = conn.rfile
        while True:
            version, status, reason, headers = _read_head(rfile)
            if not 100 <= status < 200:
                break  # (interim answers, such as 100 Continue, are followed by the real one)
        connection = headers.get("connection", "").lower()
        reusable = ("close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection)
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = _read_chunked(rfile)
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise AnswerBroken(f"a malformed Content-Length: {length[:20]!r}")
            body = _read_exactly(rfile, int(length))
        else:  # framed by the end of the connection
            body, reusable = rfile.read(), False
    except TimeoutError:
        raise
    except (ConnectionError, OSError) as exc:
        raise AnswerBroken(str(exc) or type(exc).__name__) from exc
    return Answer(status, reason, body), reusable


class PlainHTTPPool:
    """Keep-alive connections to ``host:port``, shared by threads: a request takes an idle one
    (or makes one) and gives it back once its answer is read whole. At most ``maxsize`` are kept
    idle; more may be open at once (one per thread in a request)."""

    def __init__(self, host: str, port: int, *, maxsize: int) -> None:
        self._address = (host, port)
        host_text = f"[{host}]" if ":" in host else host
        self._host_line = f"Host: {host_text}:{port}\r\n"
        self._maxsize = maxsize
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, target: str, headers: dict[str, str], *, connect_timeout: float,
                read_timeout: float, body: bytes = b"") -> Answer:
        """One request (``body``: its bytes, sent with their Content-Length); raises as the module
        docstring says."""
        lines = [f"{method} {target} HTTP/1.1\r\n", self._host_line,
                 f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r}: a line break in a header")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        request = "".join(lines).encode("latin-1") + body
        conn = self._take(connect_timeout)
        try:
            conn.sock.settimeout(read_timeout)
            answer, reusable = _exchange(conn, request, method)
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._give_back(conn)
        else:
            conn.close()
        return answer

    def _take(self, connect_timeout: float) -> _Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _Connection(self._address, connect_timeout)
            if not conn.dropped():
                return conn
            conn.close()  # closed by the server while idle: try the next one

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections; those in a request close when it ends. Repeatable."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
