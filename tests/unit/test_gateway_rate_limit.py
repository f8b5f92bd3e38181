"""Token buckets per client: a burst, then the steady rate, then 429 with the wait."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.protection import RateLimiter, client_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_gets_its_burst_then_waits_for_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.wait_time("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_time("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.wait_time("a") == 0.0
    assert limiter.wait_time("a") > 0


def test_clients_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    assert limiter.wait_time("a") == 0.0
    assert limiter.wait_time("a") > 0
    assert limiter.wait_time("b") == 0.0


def test_an_idle_bucket_refills_to_the_burst_and_no_further() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=2, clock=clock)
    limiter.wait_time("a")
    limiter.wait_time("a")
    clock.now += 3600
    assert [limiter.wait_time("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_pruning_forgets_only_clients_whose_buckets_are_full_again() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=5, clock=clock)
    limiter.wait_time("idle")
    clock.now += 10
    limiter.wait_time("busy")
    assert limiter.prune() == 1
    assert len(limiter) == 1


def test_too_many_clients_make_room_by_pruning() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock, max_clients=2)
    limiter.wait_time("a")
    limiter.wait_time("b")
    clock.now += 5
    limiter.wait_time("c")
    assert len(limiter) == 1


@pytest.mark.parametrize(
    ("forwarded", "trusted", "client"),
    [
        ("203.0.113.9", True, "203.0.113.9"),
        # the client wrote the first hop, the trusted proxy appended the last
        ("1.2.3.4, 203.0.113.9", True, "203.0.113.9"),
        ("1.2.3.4, 203.0.113.9", False, "127.0.0.1"),  # no proxy to trust: the peer
        (None, True, "127.0.0.1"),
    ],
)
def test_the_client_is_the_hop_the_trusted_proxy_appended(
    forwarded: str | None, trusted: bool, client: str
) -> None:
    headers = CIMultiDict({"X-Forwarded-For": forwarded} if forwarded else {})
    request = make_mocked_request("GET", "/orders", headers=headers)
    request._transport_peername = ("127.0.0.1", 50000)  # type: ignore[attr-defined]

    assert client_address(request, trusted) == client


def test_a_line_of_its_own_a_proxy_added_is_the_one_read() -> None:
    headers = CIMultiDict([("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "203.0.113.9")])
    request = make_mocked_request("GET", "/orders", headers=headers)

    assert client_address(request, True) == "203.0.113.9"
