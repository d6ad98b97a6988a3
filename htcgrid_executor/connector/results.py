"""What a poll brings back: the ``/result`` answer as the grid sent it (:class:`Answer`), and the
records the connector hands its callers (:class:`ResultBatch`, :class:`SessionStatus`, the seed's
``get_results`` dict).

::

    GET /result body ──Answer.parse──▶ Answer ──terminal()──▶ (task id, state, reason) …
                                                   └──+ outputs inlined in the answer
                                                        (decode_inline), the others read
                                                        from the data plane
                                                      ──▶ build_batch() ─▶ ResultBatch
                                                      ──▶ seed_results() ─▶ get_results' dict
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..errors import ControlPlaneError, PayloadError

__all__ = ["ResultBatch", "SessionStatus", "Answer", "marker_state", "build_batch", "seed_results",
           "decode_inline", "NO_OUTPUT"]

#: reason given for a task the grid reports finished whose output is not in the data plane
NO_OUTPUT = "the task finished but its output is missing from the data plane (evicted or deleted)"


@dataclass
class ResultBatch:
    """What one poll learned.

    ``finished`` maps task id to the decoded output text (read from the data plane in one batched
    read); ``failed`` maps task id to the grid's reason (``""`` when the grid gives none);
    ``processing`` lists tasks that started (only where the grid reports it); ``cursor`` is to be
    passed back as ``after`` (None against a plain deployment); ``extensions`` is False when the
    server is a plain deployment and the connector fell back to plain polling.
    """

    cursor: str | None = None
    finished: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    processing: list[str] = field(default_factory=list)
    extensions: bool = True

    def __bool__(self) -> bool:
        """True when the batch reports anything."""
        return bool(self.finished or self.failed or self.cancelled or self.processing)


@dataclass(frozen=True)
class SessionStatus:
    """How many tasks of a session are in each state (:meth:`AWSConnector.session_status`).

    On the local grid (``exact``) every count comes from the grid's own counters. On a plain
    deployment, whose API lists only terminal tasks: ``finished``/``failed``/``cancelled`` are
    the grid's; ``count`` comes from the submission payload in the data plane (None once the
    session's data was deleted, e.g. after an executor collected it); ``processing`` counts the
    non-terminal tasks whose worker-guard run marker says a run is under way, ``pending`` the
    others (both None without the count). A task whose call raised is ``finished`` on the grid,
    as on any HTC-Grid (its output holds the exception).
    """

    session_id: str
    count: int | None
    pending: int | None
    processing: int | None
    finished: int
    failed: int
    cancelled: int
    exact: bool


@dataclass
class Answer:
    """A ``/result`` answer, checked: the ids per state, in the server's order."""

    finished: list[str]
    failed: list[str]
    failed_reason: list[str]
    cancelled: list[str]
    processing: list[str]
    cursor: str | None
    counts: dict[str, int] | None = None
    #: task id -> its stored output as the local grid inlined it (``inline_outputs``), unchecked
    #: (:func:`decode_inline` checks each); empty when the grid inlined none
    inline_outputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Any) -> Answer:
        if not isinstance(body, dict):
            raise ControlPlaneError("GET /result: the grid's answer is not a JSON object")

        def ids(name: str) -> list[str]:
            value = body.get(name) or []
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ControlPlaneError(f"GET /result: {name!r} in the grid's answer is not a list of ids")
            return value

        failed = ids("failed")
        reasons = body.get("failed_reason")
        if not isinstance(reasons, list) or len(reasons) != len(failed):
            reasons = [""] * len(failed)  # a plain deployment gives no reasons
        cursor = body.get("cursor")
        counts = body.get("counts")
        if counts is not None and not (isinstance(counts, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in counts.values())):
            raise ControlPlaneError("GET /result: 'counts' in the grid's answer is not a map of counts")
        inline = body.get("inline_outputs", {})
        if not isinstance(inline, dict):
            raise ControlPlaneError("GET /result: 'inline_outputs' in the grid's answer is not a map")
        return cls(
            finished=ids("finished"),
            failed=failed,
            failed_reason=[r if isinstance(r, str) else str(r) for r in reasons],
            cancelled=ids("cancelled"),
            processing=ids("processing"),
            cursor=None if cursor is None else str(cursor),
            counts=counts,
            inline_outputs=inline,
        )

    @property
    def has_cursor(self) -> bool:
        return self.cursor is not None

    def terminal(self) -> Iterable[tuple[str, str, str]]:
        """(task id, state, reason) of every terminal task in the answer."""
        for tid in self.finished:
            yield tid, "finished", ""
        for tid, reason in zip(self.failed, self.failed_reason, strict=True):
            yield tid, "failed", reason
        for tid in self.cancelled:
            yield tid, "cancelled", ""


def marker_state(marker: bytes | None) -> str | None:
    """The ``state`` of a worker-guard run marker (see worker_guard), None if absent or unreadable."""
    if marker is None:
        return None
    try:
        doc = json.loads(marker)
    except ValueError:
        return None
    return doc.get("state") if isinstance(doc, dict) else None


def decode_inline(task_ids: list[str], inline: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The outputs of those of ``task_ids`` that ``inline`` (an answer's ``inline_outputs``: task
    id -> standard base64 of the stored ``<task_id>-output``) carries: (task id -> decoded text,
    task id -> reason for those whose inlined value is unreadable: not base64, or not an output;
    they are reported failed, as an unreadable data-plane output is). Tasks it does not carry
    are in neither: their outputs are for the data-plane read."""
    outputs: dict[str, str] = {}
    broken: dict[str, str] = {}
    for tid in task_ids:
        if tid not in inline:
            continue
        value = inline[tid]
        try:
            if not isinstance(value, str):
                raise PayloadError(f"a {type(value).__name__}, not a base64 string")
            try:
                stored = base64.b64decode(value, validate=True)
            except ValueError as exc:  # binascii.Error, or a non-ASCII string
                raise PayloadError(f"not base64: {exc}") from None
            outputs[tid] = wire.decode_output_text(stored)
        except PayloadError as exc:
            broken[tid] = f"the task's output inlined in the grid's answer is unreadable: {exc}"
    return outputs, broken


def build_batch(terminal: list[tuple[str, str, str]], processing: list[str], cursor: str | None,
                extensions: bool, outputs: dict[str, str], broken: dict[str, str]) -> ResultBatch:
    """A :class:`ResultBatch` of ``terminal`` (task id, state, reason) items, given the outputs
    read for the finished ones (a finished task without one is reported failed, with its
    ``broken`` reason)."""
    batch = ResultBatch(cursor=cursor, extensions=extensions, processing=list(processing))
    for tid, state, reason in terminal:
        if state == "finished":
            if tid in outputs:
                batch.finished[tid] = outputs[tid]
            else:
                batch.failed[tid] = broken[tid]
        elif state == "failed":
            batch.failed[tid] = reason
        else:
            batch.cancelled.append(tid)
    return batch


def seed_results(ranked: list[str], states: dict[str, tuple[str, str]], outputs: dict[str, str],
                 broken: dict[str, str]) -> dict[str, Any]:
    """``get_results``' answer in the seed's shape, listing ``ranked`` task ids in that order
    (``states``: task id -> (state, reason); a finished task without output is failed)."""
    result: dict[str, Any] = {name: [] for name in (
        "finished", "finished_OUTPUT", "failed", "failed_OUTPUT", "failed_reason",
        "cancelled", "cancelled_OUTPUT")}
    for tid in ranked:
        state, reason = states[tid]
        if state == "finished" and tid in outputs:
            result["finished"].append(tid)
            result["finished_OUTPUT"].append(outputs[tid])
        elif state in ("finished", "failed"):
            result["failed"].append(tid)
            result["failed_OUTPUT"].append(wire.OUTPUT_PLACEHOLDER)
            result["failed_reason"].append(broken.get(tid, reason))
        else:
            result["cancelled"].append(tid)
            result["cancelled_OUTPUT"].append(wire.OUTPUT_PLACEHOLDER)
    result["metadata"] = {"tasks_in_response": len(ranked)}
    return result
