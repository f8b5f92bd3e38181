"""Active health checks: every instance's ``/health/ready``, every few seconds.

Passive ejection (the breakers) notices an instance failing requests; these checks notice
one that gets no requests, and bring an ejected or restarted one back.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import structlog

from gateway.registry import Instance, Registry

log = structlog.get_logger(__name__)


class HealthChecks:
    """Probes instances over connections of their own (not queued behind requests)."""

    def __init__(self, registry: Registry, *, interval: float, timeout: float) -> None:
        """Check every ``interval`` seconds; a probe slower than ``timeout`` fails."""
        self.registry = registry
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def check(self, instance: Instance) -> None:
        """Probe one instance and record what it said."""
        if self.session is None:
            return
        error: str | None = None
        try:
            url = f"{instance.url}/health/ready"
            async with self.session.get(url, timeout=self._timeout) as response:
                if response.status != 200:
                    error = f"/health/ready answered {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = type(exc).__name__
        if (error is None) != instance.healthy:
            healthy = error is None
            log.info("instance health changed", url=instance.url, healthy=healthy, error=error)
        instance.healthy = error is None
        instance.last_error = error
        instance.last_check = datetime.now(UTC)

    async def check_all(self) -> None:
        """Forget expired instances, then probe the rest concurrently."""
        self.registry.expire()
        await asyncio.gather(*(self.check(instance) for instance in self.registry))

    def check_soon(self, instance: Instance) -> None:
        """Probe a new instance now rather than at the next round (no-op before start)."""
        if self.session is None:
            return
        task = asyncio.get_running_loop().create_task(self.check(instance))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()
