"""Data plane stores: Redis (real redis-server), S3 (moto), S3+REDIS; error translation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from connector_fixtures import *  # noqa: F403 - pytest fixtures
from connector_helpers import RecordingGrid, config_for

from htcgrid_executor import wire
from htcgrid_executor.connector import AWSConnector, LayeredStore, RedisStore, S3Store, make_store
from htcgrid_executor.connector.config import ClientConfig
from htcgrid_executor.errors import GridUnavailableError, StorageError

BUCKET = "htc-data-plane"


def exercise(store: Any) -> None:
    """The behaviour every store shares."""
    items = {f"key-{i}": f"value-{i}".encode() * (i % 3 + 1) for i in range(40)}
    store.put_many(items)
    keys = list(items) + ["absent"]
    assert store.get_many(keys) == list(items.values()) + [None]
    store.delete_many(["key-0", "key-1", "never-there"])
    assert store.get_many(["key-0", "key-1", "key-2"]) == [None, None, items["key-2"]]
    assert store.get_many([]) == []
    store.put_many({})
    store.delete_many([])
    # create_many: only keys nobody wrote yet, each decided once; the others keep their value
    assert store.create_many({"key-2": b"new", "fresh-a": b"a", "fresh-b": b"b"}) == {"fresh-a", "fresh-b"}
    assert store.get_many(["key-2", "fresh-a", "fresh-b"]) == [items["key-2"], b"a", b"b"]
    assert store.create_many({"fresh-a": b"again"}) == set()
    assert store.get_many(["fresh-a"]) == [b"a"]
    assert store.create_many({}) == set()


@pytest.fixture
def s3(aws: None) -> Any:
    client = boto3.client("s3", region_name="eu-west-1")
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    return client


@pytest.fixture
def redis_store(redis_server: Any, redis_db: Any) -> Iterator[RedisStore]:
    store = RedisStore(redis_server.url, password=redis_server.password)
    yield store
    store.close()


def test_redis_store(redis_store: RedisStore) -> None:
    exercise(redis_store)


def test_redis_store_batches_into_few_commands(redis_store: RedisStore, redis_db: Any) -> None:
    redis_db.config_resetstat()
    items = {f"k{i}": b"v" for i in range(1200)}
    redis_store.put_many(items)
    assert redis_store.get_many(list(items)) == [b"v"] * 1200
    stats = redis_db.info("commandstats")
    # chunks of 500 keys per command (in one pipeline), never one command per key
    assert stats["cmdstat_mset"]["calls"] == 3
    assert stats["cmdstat_mget"]["calls"] == 3
    assert "cmdstat_set" not in stats and "cmdstat_get" not in stats


def test_redis_store_over_unix_socket(redis_server: Any, redis_db: Any) -> None:
    with RedisStore(f"unix://{redis_server.unix_socket}", password=redis_server.password) as store:
        store.put_many({"via-socket": b"1"})
    assert redis_db.get("via-socket") == b"1"


def test_redis_wrong_password_is_a_storage_error(redis_server: Any) -> None:
    with RedisStore(redis_server.url, password="wrong") as store, \
            pytest.raises(StorageError, match="refused the credentials") as info:
        store.get_many(["k"])
    assert info.value.__cause__ is not None


def test_unreachable_redis_is_grid_unavailable() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with RedisStore(f"redis://127.0.0.1:{port}/0", connect_timeout=1) as store, \
            pytest.raises(GridUnavailableError, match="unreachable") as info:
        store.put_many({"k": b"v"})
    assert info.value.__cause__ is not None


def test_s3_store(s3: Any) -> None:
    store = S3Store(BUCKET, region="eu-west-1", max_workers=4)
    try:
        exercise(store)
        store.put_many({"same-name": b"raw bytes"})
        assert s3.get_object(Bucket=BUCKET, Key="same-name")["Body"].read() == b"raw bytes"
        assert any(t.name.startswith("htcgrid-s3") for t in threading.enumerate())
    finally:
        store.close()
    assert not any(t.name.startswith("htcgrid-s3") for t in threading.enumerate())
    store.close()  # repeatable


def test_s3_missing_bucket_is_a_storage_error(aws: None) -> None:
    with S3Store("no-such-bucket", region="eu-west-1") as store:
        with pytest.raises(StorageError, match="no-such-bucket") as info:
            store.put_many({"a": b"1", "b": b"2"})
        assert "NoSuchBucket" in str(info.value.__cause__)
        with pytest.raises(StorageError):
            store.get_many(["a"])


def test_layered_store_writes_both_and_reads_redis_first(s3: Any, redis_store: RedisStore, redis_db: Any) -> None:
    with LayeredStore(redis_store, S3Store(BUCKET, region="eu-west-1")) as store:
        exercise(store)
        store.put_many({"k": b"original"})
        assert redis_db.get("k") == b"original"
        assert s3.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"original"
        s3.put_object(Bucket=BUCKET, Key="k", Body=b"changed in S3 only")
        assert store.get_many(["k"]) == [b"original"]  # Redis first
        redis_db.delete("k")  # evicted from Redis
        assert store.get_many(["k", "nowhere"]) == [b"changed in S3 only", None]  # S3 fallback
        store.delete_many(["k"])
        assert store.get_many(["k"]) == [None]


def test_make_store_follows_grid_storage_service(s3: Any, redis_server: Any) -> None:
    base = config_for("http://127.0.0.1:1", redis_server, s3_bucket=BUCKET, region="eu-west-1")
    kinds = {"REDIS": RedisStore, "S3": S3Store, "S3+REDIS": LayeredStore}
    for service, kind in kinds.items():
        store = make_store(ClientConfig.from_dict(dict(base, grid_storage_service=service)))
        try:
            assert type(store) is kind
        finally:
            store.close()


def test_connector_on_s3_plus_redis(s3: Any, recording_grid: RecordingGrid, redis_server: Any,
                                    redis_db: Any) -> None:
    config = config_for(recording_grid.url, redis_server, grid_storage_service="S3+REDIS", s3_bucket=BUCKET,
                        region="eu-west-1")
    with AWSConnector(config) as conn:
        recording_grid.store = conn.store
        answer = conn.send([{"n": 1}, {"n": 2}])
        sid = answer["session_id"]
        keys = [wire.input_key(t) for t in answer["task_ids"]] + [wire.payload_key(sid)]
        for key in keys:  # written to both stores, same names and encodings
            assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == redis_db.get(key)
        assert wire.decode_task(redis_db.get(keys[1])) == {"n": 2}
        conn.delete_session_data(answer)
        assert redis_db.dbsize() == 0
        assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    assert not any(t.name.startswith("htcgrid-s3") for t in threading.enumerate())


def test_layered_store_reads_s3_when_redis_is_down(s3: Any) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s3.put_object(Bucket=BUCKET, Key="k", Body=b"from S3")
    cache = RedisStore(f"redis://127.0.0.1:{port}/0", connect_timeout=1)
    with LayeredStore(cache, S3Store(BUCKET, region="eu-west-1")) as store:
        assert store.get_many(["k", "absent"]) == [b"from S3", None]
        with pytest.raises(GridUnavailableError):  # writes need both
            store.put_many({"k2": b"v"})


def test_layered_store_does_not_hide_a_refused_redis_password(s3: Any, redis_server: Any) -> None:
    cache = RedisStore(redis_server.url, password="wrong")
    with LayeredStore(cache, S3Store(BUCKET, region="eu-west-1")) as store, pytest.raises(StorageError):
        store.get_many(["k"])


def test_a_silent_s3_answers_the_caller_by_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor spends ``broken_after_sec`` as one budget: an S3 that accepts connections and
    never answers must not hold it for botocore's own timeouts and retries (minutes)."""
    import socket
    import time

    from htcgrid_executor.backoff import spend_until

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
    store = S3Store(BUCKET, region="eu-west-1", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        for keys in (["one"], ["one", "two", "three"]):
            started = time.monotonic()
            with spend_until(started + 1.0), pytest.raises(GridUnavailableError, match="budget"):
                store.get_many(keys)
            assert time.monotonic() - started < 2.0
    finally:
        silent.close()  # the abandoned calls then fail at once, and their threads end
        store.close()
    deadline = time.monotonic() + 20
    while any(t.name.startswith("htcgrid-s3") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "S3 threads left"
        time.sleep(0.05)
