"""The control plane reads a request's headers itself (grid/http_head.py, without the email
parser): what it reads must be what http.server would have read, limits included."""

from __future__ import annotations

import http.client
import io
import random
import socket

import pytest

from htcgrid_executor.grid.http_head import HeadersTooLarge, read_headers

_NAMES = ["A", "b", "x-api-key", "X-API-KEY", "Authorization", "Content-Length", "Transfer-Encoding",
          "Connection", "Expect", "From", "bad name", ""]

_CASES = [
    b"Host: x\r\nx-api-key: k\r\n\r\n",
    b"X-Api-Key:   k  \r\nx-api-key: second\r\n\r\n",  # first one wins, case-insensitive
    b"A: 1\r\n  continued\r\n\tand more\r\nB: 2\r\n\r\n",
    b" a continuation of nothing\r\nA: 1\r\n\r\n",
    b"From someone\r\nA: 1\r\nFrom x\r\n cont\r\n\r\n",
    b"A: 1\r\nnot a header line\r\nB: 2\r\n\r\n",  # ends the headers, as the email parser does
    b":no name\r\nA: 1\r\n\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"A: 1\n\n",
    b"A: \xe9\xff\r\n",  # end of input instead of a blank line
]


def _random_cases(count: int) -> list[bytes]:
    rnd = random.Random(15)
    pieces = [b"A", b"b", b":", b" ", b"\t", b"\r\n", b"\n", b"From ", b"x-api-key", b"\xe9", b"-"]
    return [b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 25))) + b"\r\n\r\n" for _ in range(count)]


def test_headers_are_read_as_the_standard_library_reads_them():
    for raw in _CASES + _random_cases(3000):
        expected = http.client.parse_headers(io.BytesIO(raw))
        got = read_headers(io.BytesIO(raw))
        for name in _NAMES:
            assert (got.get(name), got.get_all(name)) == (expected.get(name), expected.get_all(name)), (raw, name)


def test_the_limits_are_the_standard_librarys():
    read_headers(io.BytesIO(b"".join(b"H%d: x\r\n" % i for i in range(99)) + b"\r\n"))
    with pytest.raises(HeadersTooLarge, match="more than 100 headers"):
        read_headers(io.BytesIO(b"".join(b"H%d: x\r\n" % i for i in range(100)) + b"\r\n"))
    with pytest.raises(HeadersTooLarge, match="65536 bytes"):
        read_headers(io.BytesIO(b"A: " + b"x" * 65536 + b"\r\n\r\n"))


def _address(grid):
    host, port = grid.url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _ask(grid, head: bytes) -> bytes:
    with socket.create_connection(_address(grid), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_the_server_answers_431_past_the_header_limit_and_keeps_serving(grid):
    key = grid.api_key.encode()
    many = b"".join(b"X-Pad-%d: x\r\n" % i for i in range(100))
    answer = _ask(grid, b"GET /result?submission_content=x HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    # a repeated header: the first one counts, as with http.server's own parsing
    answer = _ask(grid, b"GET /result?submission_content=x HTTP/1.1\r\nHost: x\r\nx-api-key: " + key
                  + b"\r\nx-api-key: not-the-key\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")  # past the key check: the content is what is wrong
