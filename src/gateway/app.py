"""The gateway's composition root: its settings, :class:`Gateway` and ``build``.

The gateway has no database, so it is not a :class:`bus.service.Service`, but it lives the
same way: ``build`` connects nothing; ``start`` subscribes to the bus, serves and is ready;
``stop`` drains. ``microshop run gateway`` runs it on :3000.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from aiohttp import web

import bus.settings
from bus.auth import TokenVerifier
from bus.broker import Broker, Consumer, Delivery
from bus.messages import BUS_MESSAGES, ServiceHeartbeat, ServiceStopped
from bus.observability import configure_tracing
from bus.schemas import asyncapi
from bus.service import broker_from_settings, token_verifier
from bus.web import problem_middleware
from gateway.balancer import Balancer
from gateway.checks import HealthChecks
from gateway.dashboard import Activity, Dashboard
from gateway.edge import edge
from gateway.endpoints import Endpoints, services_status
from gateway.openapi import OpenApiDocuments
from gateway.protection import RateLimiter, guard, secure
from gateway.proxy import Proxy
from gateway.registry import Registry
from gateway.routing import OPERATOR_ROUTES, ROUTES, PublicRoutes
from gateway.settings import Settings
from microshop.catalogue import CONTRACTS
from microshop.catalogue import REGISTRY as CATALOGUE

__all__ = ["Gateway", "Settings", "build"]

log = structlog.get_logger(__name__)

# every event of the system, for the dashboard; commands stay unwatched (see dashboard.py)
WATCHED_EVENTS = sorted(
    model.type for model in CATALOGUE if model.kind == "event" and model.type not in BUS_MESSAGES
)


_ROUTED = frozenset(ROUTES.values())  # the services requests are routed to


class Gateway:
    """The running gateway: ``await start()``, ``await stop()``."""

    def __init__(
        self, settings: Settings, *, verifier: TokenVerifier, broker: Broker | None = None
    ) -> None:
        """Assemble everything; nothing connects until :meth:`start`."""
        # typed as the kit's base, as bus.service.Runnable asks (its attribute is invariant);
        # the gateway's own knobs are read from ``settings`` here, in the constructor
        self.settings: bus.settings.Settings = settings
        self.name = settings.service
        self.instance_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        self.started_at = datetime.now(UTC)
        self.broker = broker or (broker_from_settings(settings) if settings.discovery else None)
        self.registry = Registry(
            breaker_failures=settings.breaker_failures,
            breaker_reset_seconds=settings.breaker_reset_seconds,
            heartbeat_misses=settings.heartbeat_misses,
            on_new=lambda instance: self.checks.check_soon(instance),
        )
        self.checks = HealthChecks(
            self.registry,
            interval=settings.health_check_seconds,
            timeout=settings.health_check_timeout_seconds,
        )
        for service, url in settings.upstreams:
            self.registry.add_static(service, url)
        self.balancer = Balancer(self.registry, settings.balancer)
        self.proxy = Proxy(
            self.balancer,
            timeout=settings.timeout_seconds,
            connect_timeout=settings.connect_timeout_seconds,
            retries=settings.retries,
            max_body=settings.max_body_bytes,
            gzip_min_bytes=settings.gzip_min_bytes,
            keyed=PublicRoutes(settings.keyed_routes),
        )
        self.documents = OpenApiDocuments(
            self.balancer, version=settings.version, timeout=min(3.0, settings.timeout_seconds)
        )
        self.dashboard = Dashboard(Activity(max_orders=settings.dashboard_orders), self._overview)
        self.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        self.login_limiter = RateLimiter(
            settings.login_rate_limit_rps, settings.login_rate_limit_burst
        )
        self.app = self._web_app(settings, verifier)
        self._internal_port = settings.internal_port
        self._ready_by: float | None = None  # the loop's time readiness waits for, at most
        self.stopped = False
        self._subscriptions: list[Consumer] = []
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _web_app(self, settings: Settings, verifier: TokenVerifier) -> web.Application:
        protect = guard(
            limiter=self.limiter,
            login_limiter=self.login_limiter,
            public=PublicRoutes(settings.public_routes),
            verifier=verifier,
            operator=PublicRoutes(OPERATOR_ROUTES),
            internal_port=settings.internal_port,
            trust_forwarded_for=settings.trust_forwarded_for,
            gzip_min_bytes=settings.gzip_min_bytes,
        )
        # the kit's problem_middleware: whatever a handler raised becomes problem+json
        app = web.Application(middlewares=[edge(self.name), problem_middleware, protect])
        app.on_response_prepare.append(secure)
        app.cleanup_ctx.append(self._client_session)
        Endpoints(
            registry=self.registry,
            documents=self.documents,
            events=asyncapi(CONTRACTS, version=settings.version),
            about=self.about,
            ready=lambda: self.ready,
        ).add_to(app)
        self.dashboard.add_to(app)
        for prefix, service in ROUTES.items():
            forward = self.proxy.handler(service)
            app.router.add_route("*", f"/{prefix}", forward)
            app.router.add_route("*", f"/{prefix}/{{tail:.*}}", forward)
        return app

    async def _client_session(self, _: web.Application) -> AsyncIterator[None]:
        self.documents.session = await self.proxy.open()
        # the checks have connections of their own: queued behind a busy instance's
        # requests, a check would time out and take a healthy instance out of rotation
        connector = aiohttp.TCPConnector(limit_per_host=2)
        async with aiohttp.ClientSession(connector=connector) as checks:
            self.checks.session = checks
            yield
        await self.proxy.close()

    def about(self) -> dict[str, Any]:
        """This gateway instance, for ``/`` and ``/status``."""
        return {
            "name": "microshop gateway",
            "instance_id": self.instance_id,
            "version": self.settings.version,
            "started_at": self.started_at.isoformat(),
            "discovery": "off"
            if self.broker is None
            else "up"
            if self.broker.is_connected
            else "down",
        }

    def _overview(self) -> dict[str, Any]:
        return {"gateway": self.about(), "services": services_status(self.registry)}

    async def start(self) -> None:
        """Subscribe to announcements, open the pool, check every instance, serve."""
        configure_tracing(self.name, self.settings.version)
        if self.broker is not None:
            await self.broker.connect()
            self._subscriptions += [
                await self.broker.subscribe(["service.*"], self._on_announcement, BUS_MESSAGES),
                await self.broker.subscribe(WATCHED_EVENTS, self._on_event, CATALOGUE),
            ]
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.settings.drain_seconds,
        )
        await self._runner.setup()
        await self.checks.check_all()
        await web.TCPSite(self._runner, self.settings.host, self.settings.listen_port).start()
        if self._internal_port:
            await web.TCPSite(self._runner, self.settings.host, self._internal_port).start()
        self._tasks = [
            asyncio.create_task(_logged(self.checks.run()), name="gateway health checks"),
            asyncio.create_task(_logged(self._prune_buckets()), name="gateway rate limits"),
        ]
        waited = self.settings.heartbeat_seconds if self.broker is not None else 0.0
        self._ready_by = asyncio.get_running_loop().time() + waited
        log.info("gateway serving", url=self.settings.public_url, instance=self.instance_id)

    @property
    def ready(self) -> bool:
        """Started, not stopping, and discovery has caught up: every routed service has an
        instance, or a heartbeat interval has passed since subscribing (a service that is
        down must not keep the gateway out). Ready at once, a new gateway would answer
        every request 503 "no instance" until the services' next heartbeats: on every
        scale-up and rollout."""
        if self.stopped or self._ready_by is None:
            return False
        caught_up = asyncio.get_running_loop().time() >= self._ready_by
        return caught_up or all(map(self.registry.rotation, _ROUTED))

    async def stop(self) -> None:
        """Stop being ready, let in-flight requests finish, close. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        self.dashboard.closing.set()
        for subscription in self._subscriptions:
            await subscription.stop(grace=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.broker is not None:
            await self.broker.close()
        log.info("gateway stopped", instance=self.instance_id)

    async def _on_announcement(self, delivery: Delivery) -> None:
        message = delivery.message
        if isinstance(message, ServiceHeartbeat) and message.service != self.name:
            self.registry.heard(message)
        elif isinstance(message, ServiceStopped):
            self.registry.goodbye(message)
        self.dashboard.activity.record(delivery.envelope.type, {}, delivery.envelope.time)

    async def _on_event(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        self.dashboard.activity.record(envelope.type, envelope.data, envelope.time)

    async def _prune_buckets(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.limiter.prune()
            self.login_limiter.prune()


async def _logged(loop: Coroutine[Any, Any, None]) -> None:
    # a background loop that dies must say so; the gateway keeps serving meanwhile
    try:
        await loop
    except Exception:
        log.exception("gateway background loop failed")


def build(settings: Settings, **test_overrides: Any) -> Gateway:
    """The gateway, ready to start; tests may pass ``verifier=`` and ``broker=``."""
    # fetching the keys is part of a request's wait, so it keeps to the request timeout too
    fetch_timeout = min(5.0, settings.timeout_seconds)
    verifier = test_overrides.get("verifier") or token_verifier(
        settings, fetch_timeout=fetch_timeout
    )
    return Gateway(settings, verifier=verifier, broker=test_overrides.get("broker"))
