"""The gateway's knobs: every one an environment variable (``MICROSHOP_<NAME>``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

import bus.settings
from gateway.balancer import Strategy
from gateway.routing import DEFAULT_PUBLIC_ROUTES, KEYED_ROUTES, parse_rule


def _csv(value: object) -> object:
    """``"a, b"`` -> ``("a", "b")``; a tuple given in code stays as it is."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(bus.settings.Settings):
    """The gateway's knobs, on top of every service's (env ``MICROSHOP_<NAME>``).

    ``MICROSHOP_UPSTREAMS`` lists fixed instances (``user=http://user:3010,order=...``),
    for when discovery on the bus is off or cannot see them (Kubernetes Services).
    ``MICROSHOP_PUBLIC_ROUTES`` lists what passes without a token (``GET /products*,...``).
    ``MICROSHOP_INTERNAL_PORT`` opens the operator pages without a token on a second port.
    """

    service: str = "gateway"
    upstreams: Annotated[tuple[tuple[str, str], ...], NoDecode] = ()
    discovery: bool = True  # hear instances' heartbeats on the bus
    balancer: Strategy = "least_in_flight"
    timeout_seconds: float = Field(default=10.0, gt=0)  # until an answer's headers: else 504
    connect_timeout_seconds: float = Field(default=1.0, gt=0)
    retries: int = Field(default=1, ge=0)  # on another instance, idempotent requests only
    health_check_seconds: float = Field(default=2.0, gt=0)
    health_check_timeout_seconds: float = Field(default=1.0, gt=0)
    heartbeat_misses: int = Field(default=3, ge=1)  # heartbeats missed before forgetting one
    breaker_failures: int = Field(default=3, ge=1)  # in a row, to eject an instance
    breaker_reset_seconds: float = Field(default=5.0, ge=0)
    rate_limit_rps: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    login_rate_limit_rps: float = Field(default=0.2, gt=0)  # POST /auth/login: guessing costs
    login_rate_limit_burst: int = Field(default=5, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=0)
    gzip_min_bytes: int = Field(default=1024, ge=0)
    public_routes: Annotated[tuple[str, ...], NoDecode] = DEFAULT_PUBLIC_ROUTES
    # where a request with an Idempotency-Key may be retried like a GET
    keyed_routes: Annotated[tuple[str, ...], NoDecode] = KEYED_ROUTES
    # a second port serving /status and /metrics (and the dashboard's data) with no token:
    # for Prometheus and operators inside the network, never exposed outside (0: none)
    internal_port: int = Field(default=0, ge=0, le=65535)
    # only behind one proxy that appends to X-Forwarded-For: its last hop is the client
    trust_forwarded_for: bool = False
    dashboard_orders: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        # on one port every request would arrive "inside" and pass the operator pages
        if self.internal_port and self.internal_port == self.listen_port:
            raise ValueError("MICROSHOP_INTERNAL_PORT must differ from the gateway's port")
        return self

    @field_validator("upstreams", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        value = _csv(value)
        if not isinstance(value, tuple):
            return value
        pairs = []
        for entry in value:
            if isinstance(entry, str):
                service, _, url = entry.partition("=")
                service, url = service.strip(), url.strip()
                if not service or not url.startswith(("http://", "https://")):
                    raise ValueError(f"{entry!r}: need service=http://host:port")
                entry = (service, url)
            pairs.append(entry)
        return tuple(pairs)

    @field_validator("public_routes", "keyed_routes", mode="before")
    @classmethod
    def _rules(cls, value: object) -> object:
        value = _csv(value)
        if isinstance(value, tuple):
            for rule in value:
                parse_rule(str(rule))
        return value
