"""The whole system as local processes: ``microshop run NAME`` for each service.

Each service gets its own port, queue and database schema, and the system an exchange of
its own, so several systems (tests, benchmarks) can share one RabbitMQ and PostgreSQL
without hearing each other. Processes can be killed (SIGKILL) and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp

from bus.amqp import dead_letter_queue, retry_queue
from bus.db import Database

SERVICES = ("user", "inventory", "payment", "order")
RETRY_DELAYS_MS = (100, 500)


def exchange_of(system: str) -> str:
    """The exchange of a system of its own on a shared broker."""
    return f"{system}.events"


def queue_of(system: str, service: str) -> str:
    """``service``'s queue in a system of its own on a shared broker."""
    return f"{system}-{service}"


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now, and not one handed out before.

    Ports come from below the kernel's ephemeral range (32768 and up), so an outgoing
    connection cannot take the port between this probe and the server binding it, and
    never twice from one process, so two servers of one test never share a port.
    """
    while True:
        port = random.randrange(20_000, 32_000)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


@dataclass
class LocalSystem:
    """The four services as processes sharing one exchange; logs go to ``logs/NAME.log``."""

    rabbit_url: str
    database_url: str
    name: str
    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {service: free_port() for service in SERVICES}
        self.logs.mkdir(parents=True, exist_ok=True)

    def url(self, service: str) -> str:
        """Where ``service`` serves HTTP."""
        return f"http://127.0.0.1:{self.ports[service]}"

    def env(self, service: str) -> dict[str, str]:
        """The environment ``service`` runs with."""
        return {
            **os.environ,
            "MICROSHOP_BROKER_URL": self.rabbit_url,
            "MICROSHOP_EXCHANGE": exchange_of(self.name),
            "MICROSHOP_QUEUE": queue_of(self.name, service),
            "MICROSHOP_DATABASE_URL": self.database_url,
            "MICROSHOP_DB_SCHEMA": f"{self.name}_{service}",
            "MICROSHOP_PORT": str(self.ports[service]),
            "MICROSHOP_DEMO_DATA": "1",
            "MICROSHOP_JWKS_URL": f"{self.url('user')}/.well-known/jwks.json",
            "MICROSHOP_USER_URL": self.url("user"),
            "MICROSHOP_INVENTORY_URL": self.url("inventory"),
            "MICROSHOP_RETRY_DELAYS_MS": ",".join(map(str, RETRY_DELAYS_MS)),
            "MICROSHOP_HEARTBEAT_SECONDS": "30",
            **self.extra_env,
        }

    async def start(self, *services: str, within: float = 60) -> None:
        """Start services (all by default) and wait until each answers ``/health/ready``."""
        names = services or SERVICES
        for service in names:
            log = (self.logs / f"{service}.log").open("ab")
            self.processes[service] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "microshop.cli",
                "run",
                service,
                env=self.env(service),
                stdout=log,
                stderr=log,
            )
        async with aiohttp.ClientSession() as http, asyncio.timeout(within):
            for service in names:
                while not await self._ready(http, service):  # noqa: ASYNC110 (polling HTTP)
                    await asyncio.sleep(0.2)

    async def _ready(self, http: aiohttp.ClientSession, service: str) -> bool:
        process = self.processes[service]
        if process.returncode is not None:
            raise RuntimeError(f"{service} exited {process.returncode}:\n{self.log(service)}")
        try:
            async with http.get(f"{self.url(service)}/health/ready") as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            return False
        if body.get("service") != service:
            raise RuntimeError(f"{self.url(service)} is answered by {body.get('service')!r}")
        return response.status == 200

    def log(self, service: str) -> str:
        """The end of ``service``'s log."""
        return (self.logs / f"{service}.log").read_text()[-3000:]

    async def kill(self, service: str) -> None:
        """``kill -9``: no drain, no goodbye."""
        process = self.processes.pop(service)
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop(self, *, clean: bool = True) -> None:
        """SIGTERM every process; then delete the queues, exchanges and schemas."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
        self.processes.clear()
        if clean:
            await self.clean()

    async def clean(self) -> None:
        """Delete what the system left on the broker and in the database."""
        await remove_from_broker(self.rabbit_url, self.name, RETRY_DELAYS_MS)
        for service in SERVICES:
            db = Database(self.database_url, schema=f"{self.name}_{service}")
            await db.drop_schema()
            await db.close()


async def remove_from_broker(rabbit_url: str, name: str, retry_delays_ms: Sequence[int]) -> None:
    """Delete a system's queues (``NAME-SERVICE``, their retry and dead-letter queues) and
    exchanges (``NAME.events`` and its dead-letter exchange) from RabbitMQ."""
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        for service in SERVICES:
            queue = queue_of(name, service)
            for doomed in (
                queue,
                dead_letter_queue(queue),
                *(retry_queue(queue, delay) for delay in retry_delays_ms),
            ):
                await channel.queue_delete(doomed)
        for exchange in (exchange_of(name), f"{exchange_of(name)}.dlx"):
            await channel.exchange_delete(exchange)
