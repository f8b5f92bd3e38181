"""The simulated providers, the gateway's timeout, and the per-provider health window."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import pytest

from payment_svc.providers import (
    HealthWindow,
    PaymentGateway,
    ProviderAnswer,
    ProviderTimeout,
    SimulatedProvider,
    simulated_gateway,
)


async def charge(provider: SimulatedProvider, method: str) -> ProviderAnswer:
    return await provider.charge(
        reference="pay_1", amount=Decimal("10.00"), currency="USD", method=method
    )


async def test_test_tokens_are_approved_or_declined() -> None:
    provider = SimulatedProvider()

    assert await charge(provider, "tok_visa") == ProviderAnswer(approved=True)
    assert await charge(provider, "tok_declined") == ProviderAnswer(False, "card declined")


def test_only_the_test_tokens_are_supported() -> None:
    provider = SimulatedProvider()

    assert provider.accepts("tok_visa")
    assert provider.accepts("tok_declined")
    assert not provider.accepts("4242424242424242")


async def test_failure_rate_declines_that_share_with_provider_error() -> None:
    provider = SimulatedProvider(failure_rate=0.3, rng=random.Random(7))

    answers = [await charge(provider, "tok_visa") for _ in range(1000)]

    failed = [answer for answer in answers if not answer.approved]
    assert {answer.reason for answer in failed} == {"provider error"}
    assert 250 < len(failed) < 350


async def test_failure_rate_one_declines_everything_and_zero_nothing() -> None:
    always, never = SimulatedProvider(failure_rate=1.0), SimulatedProvider(failure_rate=0.0)

    assert not (await charge(always, "tok_visa")).approved
    assert all([(await charge(never, "tok_visa")).approved for _ in range(100)])


async def test_latency_is_awaited() -> None:
    provider = SimulatedProvider(latency_ms=30)
    loop = asyncio.get_running_loop()

    started = loop.time()
    await charge(provider, "tok_visa")

    assert loop.time() - started >= 0.03


def test_health_window_reports_rate_average_and_p95_of_the_last_calls() -> None:
    window = HealthWindow(size=100)
    for latency in range(1, 121):  # the first 20 fall out of the window
        window.record(approved=latency % 4 != 0, latency_ms=float(latency))

    report = window.report()

    assert report.attempts == 100
    assert report.success_rate == 0.75
    assert report.average_latency_ms == 70.5  # mean of 21..120
    assert report.p95_latency_ms == 115.0  # nearest rank: the 95th of 100


def test_health_window_without_calls_reports_nothing_yet() -> None:
    report = HealthWindow().report()

    assert (report.attempts, report.success_rate, report.p95_latency_ms) == (0, None, None)


async def test_gateway_counts_declines_against_the_providers_health() -> None:
    gateway = simulated_gateway()
    for method in ("tok_visa", "tok_visa", "tok_visa", "tok_declined"):
        await gateway.charge(
            "paypal", reference="pay_1", amount=Decimal("5.00"), currency="USD", method=method
        )

    assert gateway.health("paypal").success_rate == 0.75
    assert gateway.health("stripe").attempts == 0


async def test_gateway_gives_up_on_a_slow_provider_and_counts_it_as_a_failure() -> None:
    gateway = PaymentGateway({"stripe": SimulatedProvider(latency_ms=500)}, timeout=0.02)

    with pytest.raises(ProviderTimeout, match=r"stripe did not answer within 0\.02s"):
        await gateway.charge(
            "stripe", reference="pay_1", amount=Decimal("5.00"), currency="USD", method="tok_visa"
        )

    health = gateway.health("stripe")
    assert (health.attempts, health.success_rate) == (1, 0.0)
