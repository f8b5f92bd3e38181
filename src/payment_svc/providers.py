"""Payment providers behind one interface: the simulated ones we ship, and their health.

:class:`PaymentProvider` is what a real integration (Stripe, PayPal, ...) would
implement; :class:`SimulatedProvider` stands in for all of them without any network.
:class:`PaymentGateway` routes each call to its provider, bounds it with a timeout and
keeps a per-instance, in-memory window of its recent outcomes and latencies.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from prometheus_client import Histogram
from pydantic import BaseModel

from payment_svc.domain import PROVIDERS

APPROVED_METHOD = "tok_visa"
DECLINED_METHOD = "tok_declined"

PROVIDER_SECONDS = Histogram(
    "microshop_payment_provider_seconds",
    "Payment provider calls, by provider, operation and outcome.",
    ["provider", "operation", "outcome"],
)


class ProviderTimeout(Exception):
    """A provider did not answer in time; whether it acted is unknown."""


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """A provider's verdict; ``reason`` says why when it did not approve."""

    approved: bool
    reason: str | None = None


class PaymentProvider(Protocol):
    """One payment provider. ``reference`` is the call's idempotency key: the same on every
    attempt at one charge or refund, so a provider asked again answers what it did."""

    def accepts(self, method: str) -> bool:
        """True when ``method`` is a payment method this provider can charge."""
        ...

    async def charge(
        self, *, reference: str, amount: Decimal, currency: str, method: str
    ) -> ProviderAnswer:
        """Take ``amount`` from ``method``."""
        ...

    async def refund(self, *, reference: str, amount: Decimal, currency: str) -> ProviderAnswer:
        """Give ``amount`` back."""
        ...


class SimulatedProvider:
    """A provider without a network: ``tok_visa`` is approved, ``tok_declined`` declined.

    ``failure_rate`` (0..1) declines that share of charges at random with "provider error",
    and every call waits ``latency_ms``, for demos and chaos runs.
    """

    def __init__(
        self, *, failure_rate: float = 0.0, latency_ms: int = 0, rng: random.Random | None = None
    ) -> None:
        """Both knobs default to a provider that answers at once and never fails by chance."""
        self.failure_rate = failure_rate
        self.latency_ms = latency_ms
        self._rng = rng or random.Random()

    def accepts(self, method: str) -> bool:
        """Only the two test tokens exist in the simulation."""
        return method in (APPROVED_METHOD, DECLINED_METHOD)

    async def charge(
        self, *, reference: str, amount: Decimal, currency: str, method: str
    ) -> ProviderAnswer:
        """Approve ``tok_visa`` (unless a random provider error strikes), decline the rest."""
        await self._network()
        if method != APPROVED_METHOD:
            reason = "card declined" if method == DECLINED_METHOD else "unsupported payment method"
            return ProviderAnswer(approved=False, reason=reason)
        if self._rng.random() < self.failure_rate:
            return ProviderAnswer(approved=False, reason="provider error")
        return ProviderAnswer(approved=True)

    async def refund(self, *, reference: str, amount: Decimal, currency: str) -> ProviderAnswer:
        """Refunds of captured money always go through in the simulation."""
        await self._network()
        return ProviderAnswer(approved=True)

    async def _network(self) -> None:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)


class ProviderHealth(BaseModel):
    """A provider's recent record; the figures are None before its first call."""

    window: int
    attempts: int
    success_rate: float | None
    average_latency_ms: float | None
    p95_latency_ms: float | None


class HealthWindow:
    """The last ``size`` calls to one provider: whether each was approved, and how long it took."""

    def __init__(self, size: int = 100) -> None:
        """Keep at most ``size`` calls; older ones fall out."""
        self.size = size
        self._calls: deque[tuple[bool, float]] = deque(maxlen=size)

    def record(self, approved: bool, latency_ms: float) -> None:
        """Remember one call."""
        self._calls.append((approved, latency_ms))

    def report(self) -> ProviderHealth:
        """Success rate and average and p95 (nearest-rank) latency over the window."""
        if not self._calls:
            return ProviderHealth(
                window=self.size,
                attempts=0,
                success_rate=None,
                average_latency_ms=None,
                p95_latency_ms=None,
            )
        latencies = sorted(latency for _, latency in self._calls)
        count = len(latencies)
        return ProviderHealth(
            window=self.size,
            attempts=count,
            success_rate=round(sum(ok for ok, _ in self._calls) / count, 4),
            average_latency_ms=round(sum(latencies) / count, 3),
            p95_latency_ms=round(latencies[math.ceil(0.95 * count) - 1], 3),
        )


class PaymentGateway:
    """Calls the named provider with a timeout and keeps each provider's recent health."""

    def __init__(
        self, providers: Mapping[str, PaymentProvider], *, timeout: float = 10.0, window: int = 100
    ) -> None:
        """``providers`` by name; a call that outlasts ``timeout`` s raises ProviderTimeout."""
        self._providers = dict(providers)
        self._timeout = timeout
        self._health = {name: HealthWindow(window) for name in self._providers}

    def accepts(self, provider: str, method: str) -> bool:
        """True when ``provider`` exists here and can charge ``method``."""
        known = self._providers.get(provider)
        return known is not None and known.accepts(method)

    async def charge(
        self, provider: str, *, reference: str, amount: Decimal, currency: str, method: str
    ) -> ProviderAnswer:
        """Charge through ``provider``."""
        call = self._providers[provider].charge(
            reference=reference, amount=amount, currency=currency, method=method
        )
        return await self._timed(provider, "charge", call)

    async def refund(
        self, provider: str, *, reference: str, amount: Decimal, currency: str
    ) -> ProviderAnswer:
        """Refund through ``provider``."""
        call = self._providers[provider].refund(
            reference=reference, amount=amount, currency=currency
        )
        return await self._timed(provider, "refund", call)

    def health(self, provider: str) -> ProviderHealth:
        """``provider``'s record over its recent calls."""
        return self._health[provider].report()

    async def _timed(
        self, provider: str, operation: str, call: Awaitable[ProviderAnswer]
    ) -> ProviderAnswer:
        started = time.perf_counter()
        outcome = "error"  # a timeout or an exception counts against the provider
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    answer = await call
            except TimeoutError:
                raise ProviderTimeout(
                    f"provider {provider} did not answer within {self._timeout:g}s"
                ) from None
            outcome = "approved" if answer.approved else "declined"
            return answer
        finally:
            elapsed = time.perf_counter() - started
            self._health[provider].record(outcome == "approved", elapsed * 1000)
            PROVIDER_SECONDS.labels(provider, operation, outcome).observe(elapsed)


def simulated_gateway(
    *, failure_rate: float = 0.0, latency_ms: int = 0, timeout: float = 10.0
) -> PaymentGateway:
    """Every provider of the fee table, simulated with the same knobs."""
    simulated = SimulatedProvider(failure_rate=failure_rate, latency_ms=latency_ms)
    return PaymentGateway(dict.fromkeys(PROVIDERS, simulated), timeout=timeout)
