"""The gateway's own answers: what it is, how the system is, the merged API and its docs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import prometheus_client
from aiohttp import web

from bus.api import json_response
from gateway import event_docs
from gateway.openapi import OpenApiDocuments
from gateway.pages import Page
from gateway.registry import Registry
from gateway.routing import ROUTES, SERVICES


def services_status(registry: Registry) -> dict[str, dict[str, Any]]:
    """Each service (every routed one, and any other heard of) with its instances."""
    report: dict[str, dict[str, Any]] = {}
    for service in sorted({*SERVICES, *registry.services()}):
        instances = registry.rotation(service)
        available = sum(instance.available for instance in instances)
        report[service] = {
            "status": "up" if available else "down",
            "available": available,
            "instances": [instance.describe() for instance in instances],
        }
    return report


class Endpoints:
    """``/``, ``/health``, ``/health/live``, ``/health/ready``, ``/status``, ``/openapi.json``,
    ``/docs``, ``/docs/events`` and ``/metrics``."""

    def __init__(
        self,
        *,
        registry: Registry,
        documents: OpenApiDocuments,
        events: Mapping[str, Any],
        about: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
    ) -> None:
        """``events`` is the AsyncAPI document of every message; ``about()`` describes this
        gateway; ``ready()`` says whether it serves yet."""
        self.registry = registry
        self.documents = documents
        self.about = about
        self.ready = ready
        self._docs = Page.load("docs.html")
        self._event_docs = Page.of(event_docs.render(events))

    def add_to(self, app: web.Application) -> None:
        """Add the routes to ``app``."""
        app.router.add_get("/", self.info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.readiness)
        app.router.add_get("/status", self.status)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/docs", self.docs)
        app.router.add_get("/docs/events", self.events)
        app.router.add_get("/metrics", self.metrics)

    async def info(self, _: web.Request) -> web.Response:
        """What this is and where things are."""
        routes: dict[str, str] = {f"/{prefix}": service for prefix, service in ROUTES.items()}
        return json_response(
            {
                **self.about(),
                "routes": routes,
                "links": {
                    name: f"/{name}"
                    for name in (
                        "health",
                        "status",
                        "openapi.json",
                        "docs",
                        "docs/events",
                        "dashboard",
                        "metrics",
                    )
                },
            }
        )

    async def health(self, _: web.Request) -> web.Response:
        """Every service's health: 200 only when each has an available instance."""
        services = {
            name: {key: value for key, value in report.items() if key != "instances"}
            for name, report in services_status(self.registry).items()
            if name in SERVICES
        }
        down = sorted(name for name, report in services.items() if report["status"] != "up")
        body = {"status": "unhealthy" if down else "healthy", "down": down, "services": services}
        return json_response(body, status=503 if down else 200)

    async def live(self, _: web.Request) -> web.Response:
        """The process answers."""
        return json_response({"status": "alive"})

    async def readiness(self, _: web.Request) -> web.Response:
        """The gateway itself is started (whatever the services behind it are doing)."""
        ready = self.ready()
        return json_response(
            {"status": "ready" if ready else "not_ready"}, status=200 if ready else 503
        )

    async def status(self, _: web.Request) -> web.Response:
        """Each service's instances with their state, breaker, in-flight count, last check."""
        return json_response({"gateway": self.about(), "services": services_status(self.registry)})

    async def openapi(self, _: web.Request) -> web.Response:
        """Every service's OpenAPI document, merged."""
        return json_response(await self.documents.merged())

    async def docs(self, _: web.Request) -> web.Response:
        """A page rendering the merged OpenAPI document."""
        return self._docs.response()

    async def events(self, _: web.Request) -> web.Response:
        """Every message type: producer, consumers, fields, JSON Schema and an example."""
        return self._event_docs.response()

    async def metrics(self, _: web.Request) -> web.Response:
        """Prometheus metrics."""
        return web.Response(
            body=prometheus_client.generate_latest(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )
