"""Readiness and liveness: named dependency checks and the ready flag."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)


class Health:
    """Named dependency checks plus the ready flag the service lifecycle flips."""

    def __init__(self, *, timeout: float = 1.0) -> None:
        """No checks yet, not ready; each check gets ``timeout`` seconds."""
        self._checks: dict[str, Callable[[], Awaitable[bool]]] = {}
        self.timeout = timeout
        self.ready = False
        self.started = time.monotonic()

    def add(self, name: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Add (or replace) the check for dependency ``name``."""
        self._checks[name] = check

    def mark_ready(self) -> None:
        """Accept traffic: startup finished."""
        self.ready = True

    def mark_not_ready(self) -> None:
        """Refuse new traffic, e.g. while draining before shutdown."""
        self.ready = False

    @property
    def uptime(self) -> float:
        """Seconds since this Health was created."""
        return time.monotonic() - self.started

    async def check_all(self) -> dict[str, dict[str, Any]]:
        """Every dependency's ``{"status": "up"|"down", "latency_ms": ...}``, run concurrently."""
        results = await asyncio.gather(*(self._probe(n, c) for n, c in self._checks.items()))
        return dict(zip(self._checks, results, strict=True))

    async def _probe(self, name: str, check: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
        started = time.perf_counter()
        report: dict[str, Any] = {"status": "down"}
        try:
            async with asyncio.timeout(self.timeout):
                if await check():
                    report["status"] = "up"
        except Exception as exc:  # a broken check means a broken dependency, not a broken probe
            report["error"] = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning("health check failed", check=name, error=report["error"])
        report["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return report


HEALTH = web.AppKey("HEALTH", Health)
