"""The order service's composition root: ``build(settings) -> Service``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from pydantic import Field

from bus.db import Database
from bus.envelope import MessageRegistry
from bus.observability import extract_trace, tracer
from bus.service import Service, token_verifier
from bus.settings import Settings as BaseSettings
from order_svc import saga, store
from order_svc.admission import IN_HAND_OF_STEP_TIMEOUT, Admission, keep_counting
from order_svc.api import ADMISSION, CURRENCY, DIRECTORY, POLICY, api
from order_svc.handlers import CONSUMED, handlers
from order_svc.replicas import Directory
from order_svc.saga import Policy

log = structlog.get_logger(__name__)


class Settings(BaseSettings):
    """The order service's knobs (``MICROSHOP_*``)."""

    service: str = "order"
    saga_step_timeout: float = 10.0
    saga_step_attempts: int = 3
    saga_sweep_seconds: float = 1.0
    # orders the saga may have in hand before new ones are turned away (0: no limit); the
    # ceiling rises above it with the saga's pace (order_svc.admission)
    max_orders_in_flight: int = Field(default=200, ge=0)
    currency: str = "USD"
    user_url: str = "http://127.0.0.1:3010"
    inventory_url: str = "http://127.0.0.1:3013"


def build(settings: Settings, **overrides: Any) -> Service:
    """Assemble the order service; nothing connects until ``start()``."""
    policy = Policy(settings.saga_step_timeout, settings.saga_step_attempts)
    db = Database.from_settings(settings, metadata=[store.metadata], upgrades=[store.date_products])
    service = Service(
        settings,
        db=db,
        handlers=handlers(policy),
        registry=MessageRegistry(CONSUMED),
        api=api,
        verifier=overrides.get("verifier") or token_verifier(settings),
    )
    service.background.append(
        lambda: sweep_overdue_steps(service, policy, settings.saga_sweep_seconds)
    )
    in_hand = settings.saga_step_timeout * IN_HAND_OF_STEP_TIMEOUT
    admission = Admission(settings.max_orders_in_flight, seconds_in_hand=in_hand)
    service.background.append(lambda: keep_counting(admission, db, settings.saga_sweep_seconds))
    service.app[ADMISSION] = admission
    service.app[POLICY] = policy
    service.app[CURRENCY] = settings.currency

    async def directory(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            app[DIRECTORY] = Directory(session, settings.user_url, settings.inventory_url)
            yield

    service.app.cleanup_ctx.append(directory)
    return service


async def sweep_overdue_steps(service: Service, policy: Policy, interval: float) -> None:
    """Every second or so, send again (or compensate) saga steps nobody answered.

    It reads deadlines from the database, so orders left waiting by a crash are found
    after the restart. Rows are claimed with SKIP LOCKED: instances share the work.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            while await _sweep_once(service, policy) == 50:
                pass
        except Exception:
            log.exception("saga sweep failed")


async def _sweep_once(service: Service, policy: Policy) -> int:
    async with service.transactions.begin() as unit:
        overdue = await store.due_orders(unit.session, 50, skip_locked=service.db.is_postgres)
        for order in overdue:
            # continue the order's own trace, not a trace of the sweep
            parent = extract_trace({"traceparent": order.traceparent or ""})
            with tracer.start_as_current_span("order saga step overdue", context=parent):
                await saga.step_overdue(unit, order, policy)
    return len(overdue)
