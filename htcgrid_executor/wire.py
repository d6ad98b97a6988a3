"""HTC-Grid's wire format: identifiers, data-plane keys, encodings and message shapes.

What a real deployment (awslabs/aws-htc-grid 0.4.x) puts on the wire, in one place, so that the
connector (which writes it) and the local grid (which reads it) cannot drift apart.
Pure Python: no I/O here.

=============================  ===================================================
data-plane key                 value
=============================  ===================================================
``<task_id>-input``            standard base64 of ``json.dumps(task_dict)``
``<session_id>-payload``       urlsafe base64 of the JSON submission object
``<task_id>-output``           standard base64 of the worker's response text
``<task_id>-logs``             a task's captured logs, UTF-8 (this package's extension)
``<share_id>-shared``          an object shared by reference: its signed pickle (extension)
=============================  ===================================================

On the embedded local grid, where this package writes and reads both ends, an executor task's
input and its output go **raw** instead (:func:`encode_raw`): :data:`RAW_MAGIC`, the length of a
small JSON header, the header (the task or envelope, each signed pickle replaced by its MAC and
length), then the pickles' bytes. No JSON string of a pickle, no base64: a 200 MB argument is
200 MB in Redis. The magic's first byte is not base64, so a raw value is never taken for the
JSON format, which a deployment keeps seeing exactly as above.

The embedded grid also takes a small session's data-plane values in the body of its
``POST /submit`` (:func:`encode_inline_submission`) and writes them to the same keys, in the
script that creates the session: the client's own write, one round trip, goes away.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from typing import Any

from .errors import PayloadError
from .payload import SignedPickle, mac_from_text

__all__ = [
    "OUTPUT_PLACEHOLDER",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "encoded_size",
    "new_session_id",
    "task_ids_for",
    "session_of",
    "input_key",
    "output_key",
    "payload_key",
    "logs_key",
    "shared_key",
    "encode_task",
    "decode_task",
    "RAW_MAGIC",
    "RawOutput",
    "encode_raw",
    "decode_raw",
    "is_raw",
    "json_size",
    "pickles_text_length",
    "raw_header_length",
    "encode_output",
    "decode_output_text",
    "encode_submission",
    "decode_submission",
    "build_submission",
    "INLINE_SUBMIT_BYTES",
    "INLINE_SUBMIT_TASKS",
    "encode_inline_submission",
    "decode_inline_submission",
    "encode_query",
    "decode_query",
    "empty_result_body",
    "now_ms",
]

#: what a deployment puts in ``*_OUTPUT`` lists: a pointer to the data plane, never data
OUTPUT_PLACEHOLDER = "read_from_dataplane"

_SESSION_ID = re.compile(r"[A-Za-z0-9-]{1,128}")  # fullmatch: "$" would let a final "\n" in

# The stats keys a deployment's functions index into: all must be present.
_STATS_LABELS = {
    "stage1_grid_api_01_task_creation_tstmp": " ",
    "stage1_grid_api_02_task_submission_tstmp": "upload_data_to_storage",
    "stage2_sbmtlmba_01_invocation_tstmp": "grid_api_2_lambda_ms",
    "stage2_sbmtlmba_02_before_batch_write_tstmp": "task_construction_ms",
    "stage3_agent_01_task_acquired_sqs_tstmp": "sqs_queuing_time_ms",
    "stage3_agent_02_task_acquired_ddb_tstmp": "ddb_task_claiming_time_ms",
    "stage4_agent_01_user_code_finished_tstmp": "user_code_exec_time_ms",
    "stage4_agent_02_S3_stdout_delivered_tstmp": "S3_stdout_upload_time_ms",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def new_session_id() -> str:
    """A fresh session id: a uuid string, which never contains ``_`` (it separates task ids)."""
    return str(uuid.uuid4())


def is_valid_session_id(session_id: object) -> bool:
    return isinstance(session_id, str) and bool(_SESSION_ID.fullmatch(session_id))


def task_ids_for(session_id: str, count: int) -> list[str]:
    """Task ids of a session: ``<session_id>_<i>``, ``i`` the position in the submitted list."""
    return [f"{session_id}_{i}" for i in range(count)]


def session_of(task_id: str) -> str:
    """The session id a task id belongs to."""
    session_id, sep, index = task_id.rpartition("_")
    if not sep or not index.isdigit() or not is_valid_session_id(session_id):
        raise PayloadError(f"not an HTC-Grid task id: {task_id!r}")
    return session_id


# The data-plane key suffixes, spelt here only: the grid's Lua and its Redis ACLs are built from them
INPUT_SUFFIX = "-input"
OUTPUT_SUFFIX = "-output"
PAYLOAD_SUFFIX = "-payload"
LOGS_SUFFIX = "-logs"
SHARED_SUFFIX = "-shared"
CANCEL_SUFFIX = "-cancel"  # worker_guard's cancel flag
RUN_SUFFIX = "-run"  # worker_guard's run marker
DATA_PLANE_SUFFIXES = (INPUT_SUFFIX, OUTPUT_SUFFIX, PAYLOAD_SUFFIX, LOGS_SUFFIX, SHARED_SUFFIX)


def input_key(task_id: str) -> str:
    return task_id + INPUT_SUFFIX


def output_key(task_id: str) -> str:
    return task_id + OUTPUT_SUFFIX


def payload_key(session_id: str) -> str:
    return session_id + PAYLOAD_SUFFIX


def logs_key(task_id: str) -> str:
    """Where the executor keeps a task's captured logs after deleting its session's data."""
    return task_id + LOGS_SUFFIX


def shared_key(share_id: str) -> str:
    """Where ``HTCGridExecutor.share`` stores an object that tasks load by reference."""
    return share_id + SHARED_SUFFIX


def _blob_text(value: Any) -> str:
    # json.dumps' default: a signed pickle in memory is written as its text form
    if isinstance(value, SignedPickle):
        return value.text()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps with a ``default`` builds its encoder on every call: a third of a small task's cost
_TASK_ENCODER = json.JSONEncoder(allow_nan=False, default=_blob_text)
_SIZE_ENCODER = json.JSONEncoder(default=_blob_text)


def encode_task(task: Any) -> bytes:
    """A task dict as ``<task_id>-input`` holds it. Raises PayloadError if it is not JSON."""
    try:
        text = _TASK_ENCODER.encode(task)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"task is not JSON-serialisable: {exc}") from exc
    return base64.b64encode(text.encode())


#: the largest ``<task_id>-input`` or ``-output`` value the grid moves by default: under Redis's
#: 512 MiB limit on one value (``proto-max-bulk-len``), which drops the connection of a client
#: that sends more. Executors and grids take a smaller (or, for a Redis configured for it, a
#: larger) ``max_payload_bytes``.
DEFAULT_MAX_PAYLOAD_BYTES = 500 * 1024 * 1024
#: a value over this size is written to, and read from, Redis in pieces of this size (SET then
#: APPENDs; GETRANGEs): Redis runs one command at a time and copies a piece in milliseconds, so
#: other clients (the agents' heartbeats among them) are served between the pieces of a 200 MB value
REDIS_PIECE_BYTES = 32 * 1024 * 1024

#: task ids per ``POST /cancel``: the query string stays well under the 64 KiB request line
CANCEL_IDS_PER_REQUEST = 500


def encoded_size(json_length: int) -> int:
    """Bytes a value whose JSON text is ``json_length`` characters takes in the data plane
    (``<task_id>-input`` and ``-output`` hold standard base64 of it)."""
    return 4 * ((json_length + 2) // 3)


def decode_task(data: bytes | str) -> Any:
    """A task from what ``<task_id>-input`` holds: base64 JSON, or a raw input (its signed
    pickles are then :class:`SignedPickle` views into ``data``). Raises PayloadError."""
    if is_raw(data):
        return decode_raw(data)  # type: ignore[arg-type]
    try:
        return json.loads(base64.b64decode(data, validate=True))
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise PayloadError(f"task input is not base64 JSON: {exc}") from exc


def encode_output(text: str) -> bytes:
    """The worker's response text as ``<task_id>-output`` holds it."""
    return base64.b64encode(text.encode())


def decode_output_text(data: bytes | str) -> str:
    """The worker's response text from what ``<task_id>-output`` holds; for a raw output a
    :class:`RawOutput` (its header's JSON text, the envelope in ``doc``)."""
    if is_raw(data):
        header, doc = _decode_raw(memoryview(data))  # type: ignore[arg-type]
        return RawOutput(header, doc)  # the header's text as written, not dumped again
    try:
        return base64.b64decode(data, validate=True).decode()
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"task output is not base64 UTF-8: {exc}") from exc


# ------------------------------------------------------------------------------------ raw values

#: how a raw input or output starts (then 8 bytes: the header's length, big-endian)
RAW_MAGIC = b"\x00htcgrid-raw-1\n"
_BLOB = "$signed"  # a header field that stands for a signed pickle: {"$signed": [mac, length]}


def is_raw(data: Any) -> bool:
    """Whether a data-plane value is a raw input or output (:func:`encode_raw`)."""
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:len(RAW_MAGIC)]) == RAW_MAGIC


def _blob_placeholder(value: Any) -> Any:
    if isinstance(value, SignedPickle):
        return {_BLOB: [value.mac_text, len(value.data)]}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_HEADER_ENCODER = json.JSONEncoder(allow_nan=False, default=_blob_placeholder)


def encode_raw(doc: dict[str, Any]) -> bytes:
    """A task or an output envelope as a raw data-plane value: the header, then the bytes of its
    signed pickles (top-level fields only), in the header's order. Raises PayloadError if the
    rest is not JSON."""
    try:
        header = _HEADER_ENCODER.encode(doc).encode()
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"task is not JSON-serialisable: {exc}") from exc
    parts = [RAW_MAGIC, len(header).to_bytes(8, "big"), header]
    parts += [value.data for value in doc.values() if isinstance(value, SignedPickle)]
    return b"".join(parts)  # the one copy: into the buffer that goes to Redis


def decode_raw(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The dict of :func:`encode_raw`, its signed pickles views into ``data`` (not copied, not
    verified: that is the reader's, before it unpickles). Raises PayloadError when malformed."""
    return _decode_raw(memoryview(data))[1]


def _decode_raw(view: memoryview) -> tuple[str, dict[str, Any]]:
    # (the header's JSON text, the dict of decode_raw)
    start = len(RAW_MAGIC) + 8
    offset = start + raw_header_length(view)
    try:
        header = bytes(view[start:offset]).decode()
        doc = json.loads(header)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PayloadError(f"raw value has a malformed header: {exc}") from exc
    if not isinstance(doc, dict):
        raise PayloadError("raw value has a malformed header: not an object")
    for name, value in doc.items():
        if isinstance(value, dict) and _BLOB in value:
            try:
                mac_text, size = value[_BLOB]
                mac = mac_from_text(mac_text)
            except (TypeError, ValueError) as exc:
                raise PayloadError(f"raw value has a malformed field {name!r}: {exc}") from exc
            if not isinstance(size, int) or size < 0 or offset + size > len(view):
                raise PayloadError(f"raw value is truncated: field {name!r} runs past its end")
            doc[name] = SignedPickle(mac, view[offset:offset + size])
            offset += size
    if offset != len(view):
        raise PayloadError("raw value has bytes after its last field")
    return header, doc


def raw_header_length(data: bytes | memoryview) -> int:
    """The length of a raw value's JSON header (:func:`encode_raw`)."""
    return int.from_bytes(data[len(RAW_MAGIC):len(RAW_MAGIC) + 8], "big")


class RawOutput(str):
    """What :func:`decode_output_text` gives for a raw output: the text of its header (the
    envelope, each pickle as its MAC and length) with the envelope itself in :attr:`doc`."""

    doc: dict[str, Any]

    def __new__(cls, text: str, doc: dict[str, Any]) -> RawOutput:
        self = super().__new__(cls, text)
        self.doc = doc
        return self


def json_size(doc: dict[str, Any]) -> int:
    """``len(json.dumps(doc))`` as the JSON wire format writes it, its signed pickles as text,
    without copying its long strings. Sizes are counted this way on both formats, so that a call
    that fits the limit on the local grid fits it on a deployment."""
    strings = sum(_long_length(v) for v in doc.values())
    short = {k: ("" if _long_length(v) else v) for k, v in doc.items()}
    return len(_SIZE_ENCODER.encode(short)) + strings


def pickles_text_length(doc: dict[str, Any]) -> int:
    """What the signed pickles of ``doc`` take in its JSON, quotes included: a lower bound of
    :func:`json_size`, and with :func:`raw_header_length` of its raw value an upper one."""
    return sum(value.text_length() + 2 for value in doc.values() if isinstance(value, SignedPickle))


def _long_length(value: Any) -> int:
    # the characters a long field adds between its quotes; 0 for a short one (dumped as it is)
    if isinstance(value, SignedPickle):
        return value.text_length()
    if not isinstance(value, str) or len(value) <= 256:
        return 0
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return len(value)  # nothing escaped (a blob's text): counted without a copy
    return len(json.dumps(value)) - 2  # logs and messages: newlines and quotes are escaped


def build_submission(
    session_id: str,
    task_ids: list[str],
    *,
    priority: int = 0,
    task_timeout_sec: float = 3600,
    retry_count: int = 5,
    extra_context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The submission object a deployment reads from ``<session_id>-payload``.

    Every ``stats`` key is present (deployed functions index into them); the client fills the
    two stage-1 timestamps. ``extra_context`` keys are extensions a deployment ignores.
    """
    stamp = now_ms()
    stats = {name: {"label": label, "tstmp": 0} for name, label in _STATS_LABELS.items()}
    stats["stage1_grid_api_01_task_creation_tstmp"]["tstmp"] = stamp
    stats["stage1_grid_api_02_task_submission_tstmp"]["tstmp"] = stamp
    context: dict[str, Any] = {"tasks_priority": priority}
    if extra_context:
        context.update(extra_context)
    return {
        "session_id": session_id,
        "scheduler_data": {
            "task_timeout_sec": task_timeout_sec,
            "retry_count": retry_count,
            "tstamp_api_grid_connector_ms": stamp,
            "tstamp_agent_read_from_sqs_ms": 0,
        },
        "stats": stats,
        "context": context,
        "tasks_list": {"tasks": list(task_ids)},
    }


def encode_submission(submission: dict[str, Any]) -> bytes:
    return base64.urlsafe_b64encode(json.dumps(submission).encode())


def decode_submission(data: bytes | str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(data))
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise PayloadError(f"submission payload is not urlsafe base64 JSON: {exc}") from exc


#: a session whose payload and inputs take at most this many bytes goes inline, in the body of its
#: ``POST /submit``, to the embedded grid (whose routes take bodies up to twice this)
INLINE_SUBMIT_BYTES = 512 * 1024
#: and at most this many tasks: the grid writes the inputs in the script that creates the first
#: tasks, which must stay short (as many as one submit script creates: state_table.SUBMIT_CHUNK)
INLINE_SUBMIT_TASKS = 5000
_INLINE_MAGIC = b"htcgrid-inline-1\n"
_INLINE_LENGTH = re.compile(rb"0|[1-9][0-9]{0,11}")  # one way to write each length: one body per values


def encode_inline_submission(payload: bytes, inputs: list[bytes]) -> bytes:
    """The body of an inline ``POST /submit`` (an extension of the embedded grid): the session's
    ``<sid>-payload`` value and its tasks' ``<sid>_<i>-input`` values in task order, as
    ``htcgrid-inline-1\n``, their lengths (decimal, comma-separated), ``\n``, then the values.
    Only values travel: the grid derives every key from the session id, so a body cannot name
    another session's keys."""
    lengths = ",".join([str(len(payload)), *(str(len(value)) for value in inputs)]).encode()
    return b"".join([_INLINE_MAGIC, lengths, b"\n", payload, *inputs])


def decode_inline_submission(body: bytes) -> tuple[bytes, list[bytes]]:
    """``(payload, inputs)`` of an :func:`encode_inline_submission` body. Raises PayloadError
    naming what is wrong when the body is not one (bad magic, lengths, or sizes that do not add
    up to the body's)."""
    if not body.startswith(_INLINE_MAGIC):
        raise PayloadError("the body is not an inline submission (it must start with 'htcgrid-inline-1')")
    end = body.find(b"\n", len(_INLINE_MAGIC))
    fields = body[len(_INLINE_MAGIC):end].split(b",") if end >= 0 else []
    if not fields or not all(_INLINE_LENGTH.fullmatch(field) for field in fields):
        raise PayloadError("an inline submission needs a line of value lengths (decimal without "
                           "leading zeros, comma-separated)")
    lengths = [int(field) for field in fields]
    start = end + 1
    if sum(lengths) != len(body) - start:
        raise PayloadError(f"the inline submission's lengths add up to {sum(lengths)} bytes, "
                           f"its values take {len(body) - start}")
    values = []
    for length in lengths:
        values.append(body[start:start + length])
        start += length
    return values[0], values[1:]


def encode_query(obj: dict[str, Any]) -> str:
    """``submission_content`` of ``/result`` and ``/cancel``: urlsafe base64 of a JSON object."""
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def decode_query(text: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(text.encode()))
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise PayloadError(f"submission_content is not urlsafe base64 JSON: {exc}") from exc


def empty_result_body() -> dict[str, Any]:
    """The seed's ``/result`` shape with nothing in it."""
    return {
        "finished": [],
        "finished_OUTPUT": [],
        "cancelled": [],
        "cancelled_OUTPUT": [],
        "failed": [],
        "failed_OUTPUT": [],
        "metadata": {"tasks_in_response": 0},
    }
