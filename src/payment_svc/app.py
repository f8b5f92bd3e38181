"""The payment service's composition root: settings and ``build``. Nothing connects here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import Field

import bus.settings
from bus.auth import TokenVerifier
from bus.db import Database
from bus.envelope import MessageRegistry
from bus.service import Service, token_verifier
from payment_svc import store
from payment_svc.api import GATEWAY, api
from payment_svc.handlers import HANDLERS, bind
from payment_svc.messages import COMMANDS
from payment_svc.providers import PaymentGateway, simulated_gateway

log = structlog.get_logger(__name__)


class Settings(bus.settings.Settings):
    """The kit's settings plus the payment knobs (``MICROSHOP_PAYMENT_*``, ...)."""

    service: str = "payment"
    payment_failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    payment_latency_ms: int = Field(default=0, ge=0)
    payment_timeout_seconds: float = Field(default=10.0, gt=0)
    idempotency_key_hours: float = Field(default=24.0, gt=0)


def build(
    settings: Settings,
    *,
    verifier: TokenVerifier | None = None,
    gateway: PaymentGateway | None = None,
) -> Service:
    """The payment service; tests may pass their own token verifier and provider gateway."""
    db = Database.from_settings(
        settings, metadata=[store.metadata], upgrades=[store.let_payments_have_no_user]
    )
    gateway = gateway or simulated_gateway(
        failure_rate=settings.payment_failure_rate,
        latency_ms=settings.payment_latency_ms,
        timeout=settings.payment_timeout_seconds,
    )
    service = Service(
        settings,
        db=db,
        handlers=bind(HANDLERS, gateway),
        registry=MessageRegistry(COMMANDS),
        api=api,
        verifier=verifier or token_verifier(settings),
        tasks=[key_janitor(db, timedelta(hours=settings.idempotency_key_hours))],
        # a charge or refund calls its provider inside its unit of work, and a group that
        # rolls back runs every unit again: the provider would be called twice
        group_commit=False,
    )
    service.app[GATEWAY] = gateway
    return service


def key_janitor(db: Database, keep: timedelta) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background loop forgetting Idempotency-Keys older than ``keep``, hourly."""

    async def forget_old_idempotency_keys() -> None:
        while True:
            try:
                async with db.session() as session, session.begin():
                    before = datetime.now(UTC) - keep
                    forgotten = await store.forget_idempotency_keys(session, before=before)
                if forgotten:
                    log.info("old idempotency keys forgotten", count=forgotten)
            except Exception:  # the next round may succeed; the loop must not die
                log.exception("could not forget old idempotency keys")
            await asyncio.sleep(3600)

    return forget_old_idempotency_keys
