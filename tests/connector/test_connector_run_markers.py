"""The cancel-mark / run-marker handshake of a deployment (issue 10): a client that cancels a
call marks it, then reads its run marker; a worker's handler writes the marker, and skips a
marked call. Whatever the order, a call is either reported started to the client (its future is
kept running) or never run. On Redis (a real redis-server) and on S3 (moto)."""

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


@pytest.mark.parametrize("stores", ["S3"], indirect=True)
def test_a_mark_between_the_marker_and_the_check_stops_the_call_on_s3(
        stores: tuple[AWSConnector, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # (Redis checks the mark and writes the marker in one script.)
    # S3 has no script: the handler writes its marker, then reads the mark. A client that marks in
    # between sees the marker (and keeps the future); the handler then sees the mark and skips
    conn, marks = stores
    seen: list[set[str]] = []
    real_put = marks._put

    def put_then_client_cancels(key: str, doc: dict[str, Any], etag: str | None) -> bool:
        done = real_put(key, doc, etag)
        if done and doc.get("state") == "running" and not seen:
            seen.append(conn.mark_cancelled_unless_started(["s3_0"]))
        return done

    monkeypatch.setattr(marks, "_put", put_then_client_cancels)
    assert marks.begin("s3_0", "owner", 30.0, 3)[0] == "cancelled"
    assert seen == [{"s3_0"}]
    # a later delivery of the same task does not run it either
    assert marks.begin("s3_0", "other", 30.0, 3)[0] == "cancelled"
