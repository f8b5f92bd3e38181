"""One OpenAPI document for the whole system, merged from every service's own.

Each service's paths that the gateway routes to it are kept, tagged with the service.
Schemas keep their names unless two services use one name for different schemas; then the
later one is renamed ``<service>.<name>`` and its references follow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog

from gateway.balancer import Balancer
from gateway.routing import SERVICES, service_for

log = structlog.get_logger(__name__)

_REF_PREFIX = "#/components/schemas/"


def _renamed(node: Any, names: Mapping[str, str]) -> Any:
    """``node`` with every ``$ref`` to a renamed schema pointing at its new name."""
    if isinstance(node, dict):
        out = {key: _renamed(value, names) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
            name = ref.removeprefix(_REF_PREFIX)
            out["$ref"] = _REF_PREFIX + names.get(name, name)
        return out
    if isinstance(node, list):
        return [_renamed(item, names) for item in node]
    return node


def merge(documents: Mapping[str, Mapping[str, Any]], *, version: str) -> dict[str, Any]:
    """The documents of several services (by service name) as one document."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    security: dict[str, Any] = {}
    for service, document in sorted(documents.items()):
        components = document.get("components", {})
        names: dict[str, str] = {}
        for name, schema in components.get("schemas", {}).items():
            if name in schemas and schemas[name] != schema:
                names[name] = f"{service}.{name}"
        for name, schema in components.get("schemas", {}).items():
            schemas[names.get(name, name)] = _renamed(schema, names)
        security.update(components.get("securitySchemes", {}))
        for path, operations in document.get("paths", {}).items():
            if service_for(path) != service:
                continue  # the service's own /health and the like are not routed here
            merged = paths.setdefault(path, {})
            for method, operation in _renamed(operations, names).items():
                merged[method] = {**operation, "tags": [service]}
    missing = sorted(set(SERVICES) - set(documents))
    merged_document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "microshop", "version": version},
        "servers": [{"url": "/"}],
        "tags": [{"name": service} for service in sorted(documents)],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas, "securitySchemes": security},
    }
    if missing:
        merged_document["x-unavailable"] = missing
    return merged_document


class OpenApiDocuments:
    """Fetches each service's document from an available instance, cached for a while."""

    def __init__(
        self, balancer: Balancer, *, version: str, timeout: float, max_age: float = 30.0
    ) -> None:
        """Keep each document ``max_age`` seconds; the last good one outlives its service.

        Fetching a document takes at most ``timeout`` seconds.
        """
        self.balancer = balancer
        self.version = version
        self.max_age = max_age
        self.session: aiohttp.ClientSession | None = None
        self._documents: dict[str, tuple[float, dict[str, Any]]] = {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def merged(self) -> dict[str, Any]:
        """The merged document of every service whose document is known."""
        await asyncio.gather(*(self._refresh(service) for service in SERVICES))
        documents = {service: doc for service, (_, doc) in self._documents.items()}
        return merge(documents, version=self.version)

    async def _refresh(self, service: str) -> None:
        known = self._documents.get(service)
        if known is not None and time.monotonic() - known[0] < self.max_age:
            return
        instance = self.balancer.pick(service)
        if instance is None or self.session is None:
            return
        try:
            url = f"{instance.url}/openapi.json"
            async with self.session.get(url, timeout=self._timeout) as response:
                response.raise_for_status()
                document = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.warning("no OpenAPI document", service=service, error=type(error).__name__)
            return
        if isinstance(document, dict):
            self._documents[service] = (time.monotonic(), document)
