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
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from typing import Any

from .errors import PayloadError

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
    "encode_output",
    "decode_output",
    "encode_submission",
    "decode_submission",
    "build_submission",
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


def input_key(task_id: str) -> str:
    return f"{task_id}-input"


def output_key(task_id: str) -> str:
    return f"{task_id}-output"


def payload_key(session_id: str) -> str:
    return f"{session_id}-payload"


def logs_key(task_id: str) -> str:
    """Where the executor keeps a task's captured logs after deleting its session's data."""
    return f"{task_id}-logs"


def shared_key(share_id: str) -> str:
    """Where ``HTCGridExecutor.share`` stores an object that tasks load by reference."""
    return f"{share_id}-shared"


def encode_task(task: Any) -> bytes:
    """A task dict as ``<task_id>-input`` holds it. Raises PayloadError if it is not JSON."""
    try:
        text = json.dumps(task, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"task is not JSON-serialisable: {exc}") from exc
    return base64.b64encode(text.encode())


#: the largest ``<task_id>-input`` or ``-output`` value the grid moves by default: under Redis's
#: 512 MiB limit on one value (``proto-max-bulk-len``), which drops the connection of a client
#: that sends more. Executors and grids take a smaller (or, for a Redis configured for it, a
#: larger) ``max_payload_bytes``.
DEFAULT_MAX_PAYLOAD_BYTES = 500 * 1024 * 1024


def encoded_size(json_length: int) -> int:
    """Bytes a value whose JSON text is ``json_length`` characters takes in the data plane
    (``<task_id>-input`` and ``-output`` hold standard base64 of it)."""
    return 4 * ((json_length + 2) // 3)


def decode_task(data: bytes | str) -> Any:
    try:
        return json.loads(base64.b64decode(data, validate=True))
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise PayloadError(f"task input is not base64 JSON: {exc}") from exc


def encode_output(text: str) -> bytes:
    """The worker's response text as ``<task_id>-output`` holds it."""
    return base64.b64encode(text.encode())


def decode_output(data: bytes | str) -> str:
    try:
        return base64.b64decode(data, validate=True).decode()
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"task output is not base64 UTF-8: {exc}") from exc


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
