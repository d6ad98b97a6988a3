"""A connector built from injected parts (``transport=``, ``store=``), and its lifecycle: what a
test or a benchmark relies on instead of reaching into the connector."""

from __future__ import annotations

from typing import Any

import pytest
from connector_fixtures import *  # noqa: F403 - pytest fixtures
from connector_helpers import RecordingGrid, config_for, fast_transport

from htcgrid_executor import wire
from htcgrid_executor.connector import AWSConnector, RedisStore
from htcgrid_executor.connector.client import ConnectorState
from htcgrid_executor.connector.transport import TransportState
from htcgrid_executor.errors import ConfigurationError, ConnectorClosedError


class ClosingStore(RedisStore):
    """A real RedisStore that remembers being closed."""

    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


def test_injected_transport_and_store_carry_every_call_and_are_closed_with_it(
        recording_grid: RecordingGrid, redis_server: Any, redis_db: Any) -> None:
    transport = fast_transport(recording_grid.url, max_attempts=2)
    store = ClosingStore(redis_server.url, password=redis_server.password)
    # the config names a Redis nobody listens on: only the injected store can work
    conn = AWSConnector(config_for(recording_grid.url), transport=transport, store=store)
    recording_grid.store = RedisStore(redis_server.url, password=redis_server.password)  # the grid's own
    assert conn.transport is transport
    answer = conn.send([{"x": 1}, {"x": 2}])
    assert redis_db.exists(wire.payload_key(answer["session_id"]))
    assert all(redis_db.exists(wire.input_key(tid)) for tid in answer["task_ids"])
    stats = conn.stats()
    assert stats["http_requests_by_route"] == {"/submit": 1} and stats["dataplane_calls"] == 1
    conn.close()
    recording_grid.store.close()
    assert store.closed and transport.state is TransportState.CLOSED
    with pytest.raises(ConnectorClosedError, match="closed"):
        conn.send([{}])


def test_one_error_for_a_closed_connector_whichever_layer_notices(
        recording_grid: RecordingGrid, redis_server: Any) -> None:
    conn = AWSConnector(config_for(recording_grid.url, redis_server), transport=fast_transport(recording_grid.url))
    transport = conn.transport
    conn.close()
    with pytest.raises(ConnectorClosedError):
        conn.poll_session(wire.new_session_id())
    with pytest.raises(ConnectorClosedError):  # close() ran while a call was on its way down
        transport.request("GET", "/result", {}, retry=True)
    assert isinstance(ConnectorClosedError("x"), RuntimeError)
    assert recording_grid.calls() == []


def test_lifecycle_states_and_parts_without_a_config(recording_grid: RecordingGrid, redis_server: Any) -> None:
    conn = AWSConnector()
    assert conn._state is ConnectorState.UNCONFIGURED
    with pytest.raises(ConfigurationError, match="init"):
        conn.stats()
    with pytest.raises(TypeError, match="client_config_data"):
        AWSConnector(transport=fast_transport(recording_grid.url))
    conn.init(config_for(recording_grid.url, redis_server))
    assert conn._state is ConnectorState.OPEN
    conn.close()
    assert conn._state is ConnectorState.CLOSED
    conn.init(config_for(recording_grid.url, redis_server))  # init() opens it again, new connections
    assert conn._state is ConnectorState.OPEN and conn.transport.state is TransportState.OPEN
    conn.close()
