"""A one-handler service for the SIGTERM test: ``python -m tests.integration.drain_service``.

Its handler takes a while, records its effect, and publishes a follow-up through the
outbox, so a drain that cut corners would lose the effect, the ack or the follow-up.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import ClassVar

from sqlalchemy import insert

from bus.broker import Delivery
from bus.db import Database
from bus.envelope import Event, MessageRegistry
from bus.service import Service, run_until_signalled
from bus.settings import Settings
from bus.transactions import UnitOfWork
from tests.integration.tables import effects, metadata


class SlowAsked(Event):
    type: ClassVar[str] = "drain.slow.asked"
    name: str


class SlowDone(Event):
    type: ClassVar[str] = "drain.slow.done"
    name: str


async def slow(delivery: Delivery, unit: UnitOfWork) -> None:
    name = delivery.message.name  # type: ignore[attr-defined]
    print(f"started {name}", file=sys.stderr, flush=True)
    await asyncio.sleep(1.0)
    await unit.session.execute(insert(effects).values(name=name))
    unit.publish(SlowDone(name=name))


def main() -> None:
    settings = Settings(service=os.environ["DRAIN_QUEUE"], log_json=True)
    db = Database(
        os.environ["DATABASE_URL"], schema=os.environ["DRAIN_SCHEMA"], metadata=[metadata]
    )
    service = Service(
        settings,
        db=db,
        handlers={SlowAsked.type: slow},
        registry=MessageRegistry([SlowAsked]),
    )
    asyncio.run(run_until_signalled(service))


if __name__ == "__main__":
    main()
