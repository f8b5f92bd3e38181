"""A service's life: start, ready, and a graceful drain on SIGTERM.

:class:`Service` owns what every service has: the broker, the database with its outbox
relay, one queue of incoming messages dispatched by type to idempotent handlers, the
HTTP front, and the heartbeat that lets the gateway find it. A service's ``app.build``
assembles one; nothing connects until :meth:`Service.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from aiormq.exceptions import AMQPError

from bus.amqp import AmqpBroker
from bus.auth import TokenVerifier
from bus.broker import Broker, BrokerUnavailable, Consumer, Delivery, Reject, Unroutable
from bus.db import Database
from bus.envelope import Envelope, Message, MessageRegistry
from bus.inbox import UnitHandler, idempotent, prune
from bus.memory import MemoryBroker
from bus.messages import ServiceHeartbeat, ServiceStopped
from bus.observability import configure_logging, configure_tracing
from bus.outbox import OutboxRelay
from bus.resilience import retry_call
from bus.settings import Settings
from bus.transactions import Transactions, UnitOfWork
from bus.web import TRANSACTIONS, Api, Health, create_app

log = structlog.get_logger("bus.service")
T = TypeVar("T")


_MEMORY_BROKERS: dict[str, MemoryBroker] = {}


def broker_from_settings(settings: Settings) -> Broker:
    """The broker ``MICROSHOP_BROKER_URL`` names: ``amqp://…`` or ``memory://``.

    Every service of one process that names the same ``memory://`` URL gets the same
    in-process broker, which is how ``microshop demo`` wires them together.
    """
    if settings.broker_url.startswith("memory:"):
        return _MEMORY_BROKERS.setdefault(
            settings.broker_url,
            MemoryBroker(prefetch=settings.prefetch, retry_delays_ms=settings.retry_delays_ms),
        )
    if settings.broker_url.startswith(("amqp://", "amqps://")):
        return AmqpBroker(
            settings.broker_url,
            name=f"microshop-{settings.service}",
            prefetch=settings.prefetch,
            retry_delays_ms=settings.retry_delays_ms,
            delivery_limit=settings.delivery_limit,
            exchange=settings.exchange,
        )
    raise ValueError(
        f"MICROSHOP_BROKER_URL must be amqp://... or memory://, not {settings.broker_url!r}"
    )


class Service:
    """One running service. Build it, ``await start()``, ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        broker: Broker | None = None,
        handlers: Mapping[str, UnitHandler] | None = None,
        registry: MessageRegistry | None = None,
        api: Api | None = None,
        verifier: TokenVerifier | None = None,
        tasks: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
        group_commit: bool = True,
    ) -> None:
        """``group_commit=False`` for a service whose units of work must not run twice
        (see :meth:`Transactions.together`): each then has a transaction of its own."""
        self.settings = settings
        self.name = settings.service
        self.instance_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        self.db = db
        self.broker = broker or broker_from_settings(settings)
        self.handlers = dict(handlers or {})
        self.registry = registry or MessageRegistry()
        self.health = Health()
        # build() may add to the app (cleanup contexts, extra routes) before start()
        self.app = create_app(settings, api=api, health=self.health, verifier=verifier)
        self.relay = OutboxRelay(
            db,
            self.broker,
            service=self.name,
            batch_size=settings.outbox_batch_size,
            poll_seconds=settings.outbox_poll_seconds,
            max_attempts=settings.outbox_max_attempts,
        )
        self.transactions = Transactions(
            db,
            f"/microshop/{self.name}",
            self.relay.committed,
            group_size=settings.group_commit_size if group_commit else 1,
        )
        self.app[TRANSACTIONS] = self.transactions
        self.background = list(tasks)
        self.started_at = datetime.now(UTC)
        self._consumer: Consumer | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = False
        self.health.add("broker", self._broker_up)
        self.health.add("database", self.db.ping)

    async def _broker_up(self) -> bool:
        return self.broker.is_connected

    async def start(self) -> None:
        """Connect, create tables, start relaying, consuming and serving; then be ready."""
        configure_tracing(self.name, self.settings.version)
        await self.broker.connect()
        await self.db.create_all()
        self.relay.start()
        if self.handlers:
            dispatch = idempotent(self.transactions, self.name, self._dispatch)
            # a connection closed under us while declaring (a broker restart, an operator's
            # close_all_connections) is worth a few more tries before giving up the start
            self._consumer = await retry_call(
                self.broker.consume,
                settings_queue(self.settings),
                sorted(self.handlers),
                dispatch,
                self.registry,
                attempts=5,
                initial=0.5,
                maximum=3.0,
                retry_on=(BrokerUnavailable, ConnectionError, RuntimeError, AMQPError),
            )
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.listen_port)
        await site.start()
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name=f"{self.name} heartbeat"),
            asyncio.create_task(self._housekeeping(), name=f"{self.name} housekeeping"),
            *(asyncio.create_task(_logged(task)) for task in self.background),
        ]
        self.health.mark_ready()
        log.info("service ready", url=self.settings.public_url, instance=self.instance_id)

    async def _dispatch(self, delivery: Delivery, unit: UnitOfWork) -> None:
        handler = self.handlers.get(delivery.envelope.type)
        if handler is None:
            raise Reject(f"{self.name} has no handler for {delivery.envelope.type}")
        await handler(delivery, unit)

    async def publish_now(self, message: Message) -> None:
        """Publish a message that changes no state (a heartbeat) straight to the broker."""
        await self.broker.publish(Envelope.wrap(message, source=f"/microshop/{self.name}"))

    async def stop(self) -> None:
        """Drain: stop being ready, finish in-flight handlers, flush the outbox, close.

        Safe to call twice; the second call does nothing.
        """
        if self.stopped:
            return
        self.stopped = True
        grace = self.settings.drain_seconds
        self.health.mark_not_ready()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._announce(
            ServiceStopped(
                instance_id=self.instance_id, service=self.name, url=self.settings.public_url
            )
        )
        loop = asyncio.get_running_loop()
        handled_by = loop.time() + grace  # handlers and the groups they joined share it
        if self._consumer is not None:
            await self._consumer.stop(grace=grace)
        # units whose callers were cancelled above may still be committing as a group
        await self.transactions.settle(max(0.0, handled_by - loop.time()))
        await self.relay.stop(grace)
        with contextlib.suppress(Exception):
            flushed = await self.relay.flush(grace)
            log.info("outbox flushed", messages=flushed)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.broker.close()
        await self.db.close()
        log.info("service stopped", instance=self.instance_id)

    async def _announce(self, message: Message) -> None:
        try:
            await self.publish_now(message)
        except Unroutable:
            log.debug("no one listens to announcements yet", type=message.type)
        except BrokerUnavailable as error:
            log.warning("could not announce", type=message.type, error=str(error))

    async def _heartbeat(self) -> None:
        while True:
            await self._announce(
                ServiceHeartbeat(
                    instance_id=self.instance_id,
                    service=self.name,
                    url=self.settings.public_url,
                    version=self.settings.version,
                    status="ready",
                    started_at=self.started_at,
                    interval_seconds=self.settings.heartbeat_seconds,
                )
            )
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                async with self.db.session() as session, session.begin():
                    await prune(session, timedelta(days=7))
                await self.relay.prune()
            except Exception:
                log.exception("housekeeping failed")


async def _logged(task: Callable[[], Coroutine[Any, Any, None]]) -> None:
    # a background loop that dies must say so; the service keeps serving meanwhile
    try:
        await task()
    except Exception:
        log.exception("background task failed", task=getattr(task, "__name__", repr(task)))


def settings_queue(settings: Settings) -> str:
    """The queue a service consumes: ``MICROSHOP_QUEUE``, else the service's name."""
    return settings.queue or settings.service


def token_verifier(settings: Settings, *, fetch_timeout: float = 5.0) -> TokenVerifier:
    """A verifier for tokens minted by the user service, keys from its JWKS endpoint."""
    return TokenVerifier(
        jwks_url=settings.jwks_url,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        fetch_timeout=fetch_timeout,
    )


class Runnable(Protocol):
    """What ``microshop run`` needs of a service (the gateway is one without a database)."""

    name: str
    settings: Settings

    async def start(self) -> None:
        """Connect, serve, be ready."""
        ...

    async def stop(self) -> None:
        """Drain and close."""
        ...


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop where it is installed (Linux and macOS).

    A service's time goes to socket I/O (broker, database, HTTP); uvloop's loop does that
    in C. Measured on the saga benchmark: 12-15% less CPU per order in every service.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows: the standard loop
        return asyncio.run(main)
    return uvloop.run(main)


# tracked objects allocated, less those freed, between two collections of the youngest
# generation (Python's default is 700)
YOUNG_COLLECTION_EVERY = 10_000


def quiet_collector() -> None:
    """Hide what a started process holds for good from the garbage collector, and collect
    the young generation less often. Only for a process that is one service (``microshop
    run``): in a test process, objects come and go.

    What exists once a service has started (modules, models, compiled statements, the app)
    lives as long as the process; frozen, it no longer makes each full collection a pause
    on the hot path (the gateway's p99 at 32 connections fell from 54 ms to 6 ms,
    ``benchmarks/gateway.py``). An order leaves some hundreds of objects alive for a moment:
    collected every 700 allocations they are traversed again and again, every 10,000 most
    are gone first. Timing each collection over a saga benchmark run, the order service
    spent 872 ms collecting, 486 ms of it in seven full collections; frozen and at 10,000,
    128 ms.
    """
    gc.collect()  # what startup left in cycles goes now, not frozen for good
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])


async def run_until_signalled(service: Runnable) -> None:
    """Start ``service`` and serve until SIGTERM or SIGINT, then drain and stop."""
    configure_logging(
        service.name, level=service.settings.log_level, json=service.settings.log_json
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    quiet_collector()
    try:
        await stop.wait()
        log.info("signal received; draining")
    finally:
        await service.stop()
