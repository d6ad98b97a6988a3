"""What the connector checks before it sends anything: ids, submission responses, the options of
``send``, and the tasks themselves (encoded once, here).

A bad argument that names a grid request (an id, a submission response) raises
:class:`BadRequestError`, the error the grid gives for the same request, so one bad id is one
error type whichever side notices; a wrong type of option raises ``TypeError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .. import wire
from ..codec import is_executor_task, seal_task
from ..errors import BadRequestError, PayloadError
from ..options import TaskOptions

__all__ = ["check_id", "check_task_ids", "check_submission", "check_id_list", "send_options", "encode_tasks"]

_ID = re.compile(r"^[A-Za-z0-9-]{1,128}$")


def check_id(value: object, what: str) -> str:
    """``value`` if it is a valid session or listener id, else BadRequestError naming ``what``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise BadRequestError(f"{what} must be a string of letters, digits and '-' (at most 128), got {value!r}")
    return value


def check_id_list(values: object, what: str) -> list[Any]:
    """``values`` as a list, if it is a list or tuple (not a string), else BadRequestError."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise BadRequestError(f"{what} must be a list of {what.replace('_', ' ')}")
    return list(values)


def check_task_ids(task_ids: object) -> list[str]:
    """``task_ids`` if it is a list of task ids (``<session id>_<n>``), else BadRequestError."""
    ids = check_id_list(task_ids, "task_ids")
    for tid in ids:
        if not isinstance(tid, str):
            raise BadRequestError(f"task ids must be strings, got {tid!r}")
        try:
            wire.session_of(tid)
        except PayloadError:
            raise BadRequestError(f"not an HTC-Grid task id: {tid!r}") from None
    return ids


def check_submission(submission_response: object) -> tuple[str, list[str]]:
    """(session id, task ids) of a ``send`` answer, else BadRequestError naming the bad part."""
    if not isinstance(submission_response, Mapping):
        raise BadRequestError("submission_response must be the dict that send() returned")
    sid = check_id(submission_response.get("session_id"), "submission_response['session_id']")
    task_ids = submission_response.get("task_ids")
    if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
        raise BadRequestError("submission_response['task_ids'] must be the list of task ids send() returned")
    return sid, task_ids


def send_options(priority: Any, task_timeout_sec: Any, retry_count: Any,
                 options: TaskOptions | None) -> tuple[int, dict[str, Any]]:
    """``send``'s priority and its other options for ``wire.build_submission``, checked.
    ``options`` replaces the three keywords (TypeError when both are given)."""
    if options is not None:
        if not isinstance(options, TaskOptions):
            raise TypeError(f"options must be a TaskOptions, got {type(options).__name__}")
        if priority != 0 or task_timeout_sec is not None or retry_count is not None:
            raise TypeError("pass options= or priority/task_timeout_sec/retry_count, not both")
        priority, task_timeout_sec, retry_count = options.priority, options.task_timeout_sec, options.retry_count
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadRequestError(f"priority must be an integer, got {priority!r}")
    extra: dict[str, Any] = {}
    if task_timeout_sec is not None:
        if isinstance(task_timeout_sec, bool) or not isinstance(task_timeout_sec, (int, float)) \
                or not task_timeout_sec > 0:
            raise BadRequestError(f"task_timeout_sec must be a positive number, got {task_timeout_sec!r}")
        extra["task_timeout_sec"] = task_timeout_sec
    if retry_count is not None:
        if isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0:
            raise BadRequestError(f"retry_count must be an integer >= 0, got {retry_count!r}")
        extra["retry_count"] = retry_count
    return priority, extra


def encode_tasks(tasks_list: object, session_id: str, signing_key: str | None, *,
                 raw: bool = False) -> tuple[list[str], list[bytes]]:
    """The task ids of a session's tasks and each task's data-plane input; BadRequestError for an
    empty or non-list ``tasks_list``, PayloadError naming the first task that is not JSON. A task
    of ``codec.make_task`` is sealed for its task id (``codec.seal_task``) with ``signing_key``.
    ``raw``: the grid is the embedded local grid, whose agents read raw inputs
    (``wire.encode_raw``): a sealed task goes raw, its pickles as bytes; any other task, and every
    task for a deployment, as the base64 JSON HTC-Grid reads."""
    if not isinstance(tasks_list, (list, tuple)):
        raise BadRequestError(f"tasks_list must be a list of tasks, got {type(tasks_list).__name__}")
    if not tasks_list:
        raise BadRequestError("tasks_list is empty: a session needs at least one task")
    tasks: Sequence[Any] = tasks_list
    task_ids = wire.task_ids_for(session_id, len(tasks))
    encoded: list[bytes] = []
    for index, (task, tid) in enumerate(zip(tasks, task_ids, strict=True)):
        sealed = signing_key is not None and is_executor_task(task)
        if sealed:
            task = seal_task(task, tid, signing_key)  # bound to its task id: see codec.check_seal
        try:
            encoded.append(wire.encode_raw(task) if sealed and raw else wire.encode_task(task))
        except PayloadError as exc:
            raise PayloadError(f"task {index} of tasks_list: {exc}") from exc.__cause__
    return task_ids, encoded
