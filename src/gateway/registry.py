"""The instances the gateway may send requests to, heard on the bus or listed statically.

An instance is an address: a service that restarts on the same URL under a new instance id
replaces its old entry instead of doubling it. Instances heard on the bus expire when their
heartbeats stop; static ones (``MICROSHOP_UPSTREAMS``, e.g. Kubernetes Service names) stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from bus.messages import ServiceHeartbeat, ServiceStopped
from bus.resilience import BreakerState, CircuitBreaker

log = structlog.get_logger(__name__)

Source = Literal["bus", "static"]


@dataclass(eq=False, slots=True)
class Instance:
    """One address of one service, with what the gateway knows of its health."""

    service: str
    url: str
    source: Source
    breaker: CircuitBreaker
    instance_id: str = ""
    version: str = ""
    status: str = "ready"  # as its heartbeat said: starting, ready or draining
    healthy: bool = True  # as its last /health/ready check said
    expires_at: float | None = None  # monotonic; None for static instances
    last_seen: datetime | None = None
    last_check: datetime | None = None
    last_error: str | None = None
    in_flight: int = 0
    trial: bool = False  # a half-open breaker's one trial request is under way
    requests: int = 0
    failures: int = 0

    @property
    def available(self) -> bool:
        """May take a request now: ready, passing checks, breaker closed (or a free trial)."""
        if self.status != "ready" or not self.healthy:
            return False
        state = self.breaker.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self.trial)

    @property
    def state(self) -> str:
        """One word for people: healthy, unhealthy, ejected, draining or starting."""
        if self.status != "ready":
            return self.status
        if self.breaker.state is not BreakerState.CLOSED:
            return "ejected"
        return "healthy" if self.healthy else "unhealthy"

    def describe(self) -> dict[str, Any]:
        """What ``/status`` and the dashboard show of this instance."""
        return {
            "instance_id": self.instance_id or None,
            "url": self.url,
            "source": self.source,
            "version": self.version or None,
            "state": self.state,
            "healthy": self.healthy,
            "ejected": self.breaker.state is not BreakerState.CLOSED,
            "breaker": self.breaker.state.value,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "last_seen": _iso(self.last_seen),
            "last_check": _iso(self.last_check),
            "last_error": self.last_error,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class Registry:
    """Every known instance by service; the balancer reads :meth:`rotation` per request."""

    def __init__(
        self,
        *,
        breaker_failures: int = 3,
        breaker_reset_seconds: float = 5.0,
        heartbeat_misses: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_new: Callable[[Instance], None] | None = None,
    ) -> None:
        """Empty; ``on_new`` is told of each instance added (to check it at once)."""
        self._breaker_failures = breaker_failures
        self._breaker_reset = breaker_reset_seconds
        self._misses = heartbeat_misses
        self._clock = clock
        self._on_new = on_new
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._rotation: dict[str, tuple[Instance, ...]] = {}

    def rotation(self, service: str) -> tuple[Instance, ...]:
        """The instances of ``service``, available or not (the balancer filters)."""
        return self._rotation.get(service, ())

    def services(self) -> list[str]:
        """Every service with at least one instance, sorted."""
        return sorted(name for name, instances in self._rotation.items() if instances)

    def __iter__(self) -> Iterator[Instance]:
        for instances in self._rotation.values():
            yield from instances

    def add_static(self, service: str, url: str) -> Instance:
        """An instance from the static list: never expires, checked like any other."""
        return self._upsert(service, url.rstrip("/"), "static")

    def heard(self, heartbeat: ServiceHeartbeat) -> Instance:
        """Record a heartbeat: add the instance, or renew it and its status."""
        instance = self._upsert(heartbeat.service, heartbeat.url.rstrip("/"), "bus")
        # Not at a static address: several processes may share it (a Kubernetes Service),
        # each heartbeat naming another, and its checks alone decide its health.
        if instance.source == "bus":
            if instance.instance_id != heartbeat.instance_id:
                # a new process at this address: its word counts until a check says otherwise
                instance.healthy = True
            ttl = max(heartbeat.interval_seconds * self._misses, 1.0)
            instance.expires_at = self._clock() + ttl
        instance.instance_id = heartbeat.instance_id
        instance.version = heartbeat.version
        instance.status = heartbeat.status
        instance.last_seen = datetime.now(UTC)
        return instance

    def goodbye(self, stopped: ServiceStopped) -> None:
        """An instance is leaving: out of rotation now. Not a static address: other pods may
        share it (a Kubernetes Service routes around the one leaving), and its checks say
        within a beat whether anything still answers there."""
        instance = self._by_service.get(stopped.service, {}).get(stopped.url.rstrip("/"))
        if (
            instance is not None
            and instance.source == "bus"
            and instance.instance_id == stopped.instance_id  # not a newer one at this address
        ):
            self._remove(instance, "said goodbye")

    def expire(self) -> list[Instance]:
        """Forget bus instances whose heartbeats stopped; returns them."""
        now = self._clock()
        gone = [i for i in self if i.expires_at is not None and i.expires_at < now]
        for instance in gone:
            self._remove(instance, "heartbeats stopped")
        return gone

    def _upsert(self, service: str, url: str, source: Source) -> Instance:
        instances = self._by_service.setdefault(service, {})
        instance = instances.get(url)
        if instance is not None:
            return instance
        breaker = CircuitBreaker(
            f"gateway {service} {url}",
            failure_threshold=self._breaker_failures,
            reset_timeout=self._breaker_reset,
            call_timeout=None,
        )
        instance = Instance(service=service, url=url, source=source, breaker=breaker)
        instances[url] = instance
        self._rotation[service] = tuple(instances.values())
        log.info("instance added", service=service, url=url, source=source)
        if self._on_new is not None:
            self._on_new(instance)
        return instance

    def _remove(self, instance: Instance, why: str) -> None:
        instances = self._by_service.get(instance.service, {})
        if instances.get(instance.url) is not instance:
            return
        del instances[instance.url]
        self._rotation[instance.service] = tuple(instances.values())
        # instance addresses come and go: keep the breaker's series from growing without end
        instance.breaker.forget_metrics()
        log.info("instance removed", service=instance.service, url=instance.url, why=why)
