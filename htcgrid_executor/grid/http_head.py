"""A request's header block, read the way ``http.client.parse_headers`` reads it, without
``email.parser``: the control plane's per-request parsing cost (about 120 µs of a loaded
machine's CPU a request through ``email``, a tenth of that here; two requests per single task).

Same limits as http.server's (a line of at most 65,536 bytes, at most 99 header lines) and the
same reading of what a client sends: names are case-insensitive, a value keeps its first
occurrence for :meth:`Headers.get`, a line starting with a space or tab continues the previous
header, and the first line that is not a header (no ``name:``) ends the headers, as the email
parser makes it the start of a body.
"""

from __future__ import annotations

import re
from typing import BinaryIO

__all__ = ["Headers", "HeadersTooLarge", "read_headers", "MAX_LINE", "MAX_HEADERS"]

MAX_LINE = 65536  # http.client's _MAXLINE
MAX_HEADERS = 100  # http.client's _MAXHEADERS: header lines and the blank one after them

# what the email parser takes for a header line: a name of printable characters but ':' (an
# empty name included), then ':'
_HEADER = re.compile(r"[\041-\071\073-\176]*:")


class HeadersTooLarge(Exception):
    """A header line or the header count passed the limits: ``reason`` is http.server's short
    message ("Line too long", "Too many headers"), ``detail`` says which limit."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Headers:
    """A request's headers: case-insensitive names, in the order sent (what the handlers use of
    ``email.message.Message``: :meth:`get` and :meth:`get_all`)."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name``, else ``default``."""
        name = name.lower()
        for key, value in self._items:
            if key.lower() == name:
                return value
        return default

    def get_all(self, name: str, default: list[str] | None = None) -> list[str] | None:
        """Every value of header ``name``, in order, else ``default``."""
        name = name.lower()
        values = [value for key, value in self._items if key.lower() == name]
        return values or default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


def read_headers(rfile: BinaryIO) -> Headers:
    """Read the header block up to its blank line (or the end of input). Raises
    HeadersTooLarge past the limits; what follows a non-header line is read and dropped up to
    the blank line, as ``http.client.parse_headers`` does."""
    lines: list[str] = []
    count = 0  # lines read, the blank one included (it counts against the limit there too)
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HeadersTooLarge("Line too long", f"got more than {MAX_LINE} bytes when reading header line")
        count += 1
        if count > MAX_HEADERS:
            raise HeadersTooLarge("Too many headers", f"got more than {MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            break
        lines.append(line.decode("iso-8859-1"))
    items: list[tuple[str, str]] = []  # (name, value with its raw line ends: joined below)
    continued = False  # whether a continuation line belongs to the last item
    for text in lines:
        if text[0] in " \t":
            if continued:  # the email parser joins it to the header before, line end and all
                name, value = items[-1]
                items[-1] = (name, value + text)
            continue  # (a continuation of nothing is dropped, as there)
        continued = False
        if text.startswith("From "):
            continue  # the email parser's mbox "From " line: not a header
        if not _HEADER.match(text):
            break
        name, _, value = text.partition(":")
        if name:  # ":value" has no name: dropped, as there
            items.append((name, value.lstrip(" \t")))
            continued = True
    return Headers([(name, value.rstrip("\r\n")) for name, value in items])
