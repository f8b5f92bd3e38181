"""The order service's replicas: an HTTP answer fills a gap, an event has the last word."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from bus.db import Database
from order_svc import replicas, store
from user_svc.messages import UserDeactivated


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/order.db", metadata=[store.metadata])
    await database.create_all()
    yield database
    await database.close()


async def test_a_users_answer_read_before_an_event_does_not_undo_the_event(db: Database) -> None:
    answered = {"id": "u-1", "email": "bob@example.com", "role": "user", "status": "active"}
    deactivated = UserDeactivated(
        user_id="u-1", email="bob@example.com", role="user", name="Bob", status="inactive"
    )
    async with db.session() as session, session.begin():
        await replicas.save_user(session, deactivated, UserDeactivated.type, store.now())
    async with db.session() as session, session.begin():
        await replicas.remember_user(session, answered)  # the older answer commits last
        known = await replicas.known_user(session, "u-1")
        assert known == replicas.KnownUser("u-1", "inactive", "user")
        await replicas.remember_user(session, {**answered, "id": "u-2"})  # a gap: filled
        known = await replicas.known_user(session, "u-2")
        assert known == replicas.KnownUser("u-2", "active", "user")


async def test_a_price_answered_before_a_price_change_does_not_undo_the_change(
    db: Database,
) -> None:
    async with db.session() as session, session.begin():
        await replicas.save_product(
            session, replicas.KnownProduct("mouse", "Mouse", Decimal("89.99")), store.now()
        )
        await replicas.remember_product(
            session, replicas.KnownProduct("mouse", "Mouse", Decimal("79.99"))
        )
        known = await replicas.known_products(session, {"mouse"})
    assert known["mouse"].price == Decimal("89.99")


async def test_an_event_made_before_a_users_answer_was_written_still_overwrites_it(
    db: Database,
) -> None:
    answered = {"id": "u-1", "email": "bob@example.com", "role": "user", "status": "active"}
    deactivated = UserDeactivated(
        user_id="u-1", email="bob@example.com", role="user", name="Bob", status="inactive"
    )
    made = store.now()  # deactivated after the answer was read, before it was written
    async with db.session() as session, session.begin():
        await replicas.remember_user(session, answered)
        await replicas.save_user(session, deactivated, UserDeactivated.type, made)
        known = await replicas.known_user(session, "u-1")
    assert known == replicas.KnownUser("u-1", "inactive", "user")
