"""The one retry policy (htcgrid_executor.backoff.Backoff) every retry loop uses."""

from __future__ import annotations

import threading
import time

import pytest

from htcgrid_executor import GridUnavailableError
from htcgrid_executor.backoff import Backoff, spend_until, time_left
from htcgrid_executor.connector.auth import ApiKeyAuth
from htcgrid_executor.connector.transport import HTTPTransport


def test_delays_double_up_to_the_cap_and_the_retries_run_out():
    backoff = Backoff(0.1, 0.5, max_retries=5)
    delays = []
    while not backoff.exhausted:
        delays.append(backoff.next_delay())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    backoff.reset()
    assert not backoff.exhausted and backoff.next_delay() == pytest.approx(0.1)


def test_jitter_keeps_each_delay_between_half_and_all_of_it():
    delays = [Backoff(1.0, 1.0, jitter=True).next_delay() for _ in range(200)]
    assert all(0.5 <= delay < 1.0 for delay in delays)
    assert len(set(delays)) > 100  # clients retrying together do not stay in step


def test_a_deadline_exhausts_the_policy_and_no_delay_outlasts_it():
    backoff = Backoff(10.0, 10.0, deadline_sec=0.2)
    assert not backoff.exhausted
    assert backoff.next_delay() <= 0.2
    time.sleep(0.25)
    assert backoff.exhausted and backoff.next_delay() == 0.0


def test_sleep_returns_early_and_false_once_stop_is_set():
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    assert Backoff(5.0, 5.0).sleep(stop) is False
    assert time.monotonic() - started < 1
    assert Backoff(0.0, 0.0).sleep(threading.Event()) is True


@pytest.mark.parametrize("args, kwargs", [((-1, 1), {}), ((2, 1), {}), ((0.1, 1), {"max_retries": -1})])
def test_a_bad_policy_is_a_value_error(args, kwargs):
    with pytest.raises(ValueError):
        Backoff(*args, **kwargs)


def test_a_callers_budget_stops_every_backoff_under_it_and_nests_to_the_earlier_end():
    assert time_left() is None
    with spend_until(time.monotonic() + 0.2):
        backoff = Backoff(1.0, 5.0)  # no limit of its own
        assert not backoff.exhausted and backoff.next_delay() <= 0.2  # never waits past the budget
        with spend_until(time.monotonic() + 60):  # a later end does not extend it
            assert time_left() <= 0.2
        time.sleep(0.25)
        assert time_left() == 0.0 and backoff.exhausted
    assert time_left() is None and not Backoff(1.0, 5.0).exhausted
    seen = []
    with spend_until(time.monotonic() + 5):
        worker = threading.Thread(target=lambda: seen.append(time_left()))  # a budget is per thread
        worker.start()
        worker.join()
    assert seen == [None]


def test_an_http_call_spends_the_callers_budget_not_its_own_retries():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        transport = HTTPTransport(f"http://127.0.0.1:{silent.getsockname()[1]}", ApiKeyAuth("k"))
        started = time.monotonic()
        with spend_until(started + 0.5), pytest.raises(GridUnavailableError):
            transport.request("GET", "/result", {}, retry=True, extra_read_timeout_sec=5)
        assert time.monotonic() - started < 1.5  # not six tries of a 45 s read timeout
        round_trips = transport.counters()["round_trips"]
        with spend_until(time.monotonic()), pytest.raises(GridUnavailableError, match="deadline has passed"):
            transport.request("GET", "/result", {}, retry=True)
        assert transport.counters()["round_trips"] == round_trips  # a spent budget sends nothing
        transport.close()
