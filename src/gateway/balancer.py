"""Choosing an instance per request, and feeding what happened back into its breaker."""

from __future__ import annotations

import itertools
from collections.abc import Container
from typing import Literal

import structlog

from bus.resilience import BreakerState
from gateway.registry import Instance, Registry

log = structlog.get_logger(__name__)

Strategy = Literal["least_in_flight", "round_robin"]


class Balancer:
    """Least in-flight (ties broken in turn) or plain round robin over available instances."""

    def __init__(self, registry: Registry, strategy: Strategy = "least_in_flight") -> None:
        """Balance over ``registry``'s instances."""
        self.registry = registry
        self._least_in_flight = strategy == "least_in_flight"
        self._turn = itertools.count()

    def pick(self, service: str, exclude: Container[Instance] = ()) -> Instance | None:
        """An available instance of ``service`` not in ``exclude``, or None."""
        candidates = self.registry.rotation(service)
        count = len(candidates)
        if count == 0:
            return None
        start = next(self._turn) % count
        best: Instance | None = None
        for offset in range(count):
            instance = candidates[(start + offset) % count]
            if instance in exclude or not instance.available:
                continue
            if not self._least_in_flight:
                return instance
            if best is None or instance.in_flight < best.in_flight:
                best = instance
        return best

    @staticmethod
    def started(instance: Instance) -> None:
        """A request is going to ``instance``."""
        instance.in_flight += 1
        instance.requests += 1
        if instance.breaker.state is BreakerState.HALF_OPEN:
            instance.trial = True

    @staticmethod
    def finished(instance: Instance, *, ok: bool) -> None:
        """The request to ``instance`` ended, well or not: its breaker hears which."""
        instance.in_flight -= 1
        instance.trial = False
        if ok:
            instance.breaker.record_success()
            return
        instance.failures += 1
        instance.breaker.record_failure()

    @staticmethod
    def refused(instance: Instance) -> None:
        """``instance`` refused a connection: nothing listens there any more."""
        if instance.healthy:
            # Out of rotation until a health check passes, rather than spending the
            # breaker's threshold on more requests that cannot succeed.
            instance.healthy = False
            log.warning("instance refused a connection", service=instance.service, url=instance.url)
