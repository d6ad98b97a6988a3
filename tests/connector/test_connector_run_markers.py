"""The run-marker handshake of a deployment's cancel (issue 10): a client that cancels a call
creates its run marker as "cancelled" unless a worker's handler created it first, and a handler
runs a call only once it created the marker itself. Whatever the order, a call is either
reported started to the client (its future is kept running, and gets its result) or never run.
On Redis (a real redis-server) and on S3 (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from connector_fixtures import *  # noqa: F403 - pytest fixtures
from connector_helpers import config_for

from htcgrid_executor.connector import AWSConnector
from htcgrid_executor.connector.config import ClientConfig
from htcgrid_executor.worker_guard import REDIS_PASSWORD_ENV, _marks_for, guard_location

BUCKET = "htc-markers"


@pytest.fixture(params=["REDIS", "S3"])
def stores(request: pytest.FixtureRequest, redis_server: Any, redis_db: Any,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AWSConnector, Any]]:
    """A client connector and the worker-side markers on the same data plane."""
    if request.param == "S3":
        request.getfixturevalue("aws")
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        config = config_for("http://127.0.0.1:1", grid_storage_service="S3", s3_bucket=BUCKET,
                            region="eu-west-1")
    else:
        monkeypatch.setenv(REDIS_PASSWORD_ENV, redis_server.password)
        config = config_for("http://127.0.0.1:1", redis_server)
    marks = _marks_for(guard_location(ClientConfig.from_dict(config)))
    with AWSConnector(config) as conn:
        yield conn, marks


def test_a_call_marked_before_it_begins_never_runs(stores: tuple[AWSConnector, Any]) -> None:
    conn, marks = stores
    assert conn.mark_cancelled_unless_started(["s1_0", "s1_1"]) == set()
    assert marks.begin("s1_0", "owner", 30.0, 3)[0] == "cancelled"
    assert marks.begin("s1_1", "owner", 30.0, 3)[0] == "cancelled"


def test_a_call_begun_before_the_mark_is_reported_started(stores: tuple[AWSConnector, Any]) -> None:
    conn, marks = stores
    assert marks.begin("s2_0", "owner", 30.0, 3)[0] == "run"
    assert marks.begin("s2_1", "owner", 30.0, 3)[0] == "run"
    marks.finish("s2_1", "owner", '{"ok": true}')
    assert conn.mark_cancelled_unless_started(["s2_0", "s2_1", "s2_2"]) == {"s2_0", "s2_1"}
    assert marks.begin("s2_2", "owner", 30.0, 3)[0] == "cancelled"


def test_a_cancel_right_after_the_worker_took_the_marker_keeps_the_call_running(
        stores: tuple[AWSConnector, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # the client's cancel lands the moment after the worker's marker write (on S3, between that
    # write and anything the worker reads after it): the client is told the call began, and the
    # worker runs it, so the kept future gets its result (before, on S3, both sides saw the
    # other and the call was skipped under a future kept running: CancelledError)
    conn, marks = stores
    seen: list[set[str]] = []
    if hasattr(marks, "_put"):  # S3: the worker's conditional write is a step of its own
        real_put = marks._put

        def put_then_client_cancels(key: str, doc: dict[str, Any], etag: str | None) -> bool:
            done = real_put(key, doc, etag)
            if done and doc.get("state") == "running" and not seen:
                seen.append(conn.mark_cancelled_unless_started(["s3_0"]))
            return done

        monkeypatch.setattr(marks, "_put", put_then_client_cancels)
        assert marks.begin("s3_0", "owner", 30.0, 3)[0] == "run"
    else:  # Redis: the worker's check and write are one script; the cancel comes after it
        assert marks.begin("s3_0", "owner", 30.0, 3)[0] == "run"
        seen.append(conn.mark_cancelled_unless_started(["s3_0"]))
    assert seen == [{"s3_0"}]
    marks.finish("s3_0", "owner", '{"ok": true}')
    # a later delivery of the same task answers the first run's result, and runs nothing
    assert marks.begin("s3_0", "other", 30.0, 3)[0] == "done"


@pytest.mark.parametrize("stores", ["S3"], indirect=True)
def test_a_cancel_between_the_workers_read_and_its_write_stops_the_call_on_s3(
        stores: tuple[AWSConnector, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # the worker found no marker and is about to create one; the client's cancel creates it first:
    # the worker's conditional write fails, it reads the marker again and skips the call, and the
    # client was told the call never runs
    conn, marks = stores
    seen: list[set[str]] = []
    real_put = marks._put

    def client_cancels_then_put(key: str, doc: dict[str, Any], etag: str | None) -> bool:
        if doc.get("state") == "running" and not seen:
            seen.append(conn.mark_cancelled_unless_started(["s4_0"]))
        return real_put(key, doc, etag)

    monkeypatch.setattr(marks, "_put", client_cancels_then_put)
    assert marks.begin("s4_0", "owner", 30.0, 3)[0] == "cancelled"
    assert seen == [set()]
    assert marks.begin("s4_0", "other", 30.0, 3)[0] == "cancelled"


def test_a_second_cancel_of_a_cancelled_call_says_it_never_runs(stores: tuple[AWSConnector, Any]) -> None:
    conn, marks = stores
    assert conn.mark_cancelled_unless_started(["s5_0"]) == set()
    assert conn.mark_cancelled_unless_started(["s5_0"]) == set()
    assert marks.begin("s5_0", "owner", 30.0, 3)[0] == "cancelled"
