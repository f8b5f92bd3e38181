"""The order store's writes and the users replica's, on PostgreSQL and on SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from bus.db import Database
from order_svc import replicas, saga, store
from order_svc.domain import OrderStatus, SagaStep
from user_svc.messages import UserActivated, UserDeactivated

pytestmark = pytest.mark.integration

LINES = [("laptop", 1, Decimal("999.99")), ("mouse", 2, Decimal("29.99"))]


@pytest.fixture(params=["postgresql", "sqlite"])
async def db(
    request: pytest.FixtureRequest, database_url: str, unique: str, tmp_path: Path
) -> AsyncIterator[Database]:
    if request.param == "postgresql":
        database = Database(database_url, schema=unique, metadata=[store.metadata])
    else:
        database = Database(f"sqlite+aiosqlite:///{tmp_path}/order.db", metadata=[store.metadata])
    await database.create_all()
    yield database
    if request.param == "postgresql":
        await database.drop_schema()
    await database.close()


def _order(order_id: str) -> dict[str, Any]:
    at = store.now()
    return {
        "id": order_id,
        "user_id": "u-1",
        "status": OrderStatus.PENDING,
        "currency": "USD",
        "total_cents": 105997,
        "provider": "stripe",
        "method": "card",
        "correlation_id": order_id,
        "created_at": at,
        "updated_at": at,
        "refund_requested": False,
        **saga.awaiting(SagaStep.RESERVE, saga.Policy()),  # as the saga writes it
    }


async def _lines(db: Database, order_id: str) -> dict[str, tuple[int, int]]:
    items = store.order_items
    query = select(items.c.product_id, items.c.quantity, items.c.unit_price_cents).where(
        items.c.order_id == order_id
    )
    async with db.session() as session:
        return {row[0]: (row[1], row[2]) for row in await session.execute(query)}


async def _history(db: Database, order_id: str) -> list[str]:
    history = store.order_history
    query = select(history.c.status).where(history.c.order_id == order_id)
    async with db.session() as session:
        return list((await session.scalars(query.order_by(history.c.id))).all())


async def test_an_order_is_written_with_its_lines_and_first_entry(db: Database) -> None:
    async with db.session() as session, session.begin():
        # SQLAlchemy sends a transaction's first statement (with BEGIN), asyncpg the rest:
        # the inserts go as the saga's do, after its first statement
        assert await store.lock_order(session, "o-1") is None
        await store.insert_order(session, _order("o-1"), LINES)
        await store.insert_order(session, _order("o-2"), [])

    assert await _lines(db, "o-1") == {"laptop": (1, 99999), "mouse": (2, 2999)}
    assert await _lines(db, "o-2") == {}
    assert await _history(db, "o-1") == ["pending"]


async def test_a_status_change_can_reprice_the_lines_of_its_order_only(db: Database) -> None:
    async with db.session() as session, session.begin():
        await store.insert_order(session, _order("o-1"), LINES)
        await store.insert_order(session, _order("o-2"), LINES)
    reserved_at = {"laptop": Decimal("999.99"), "mouse": Decimal("24.99")}

    async with db.session() as session, session.begin():
        assert await store.lock_order(session, "o-1") is not None  # first, as in the saga
        await store.record_status(
            session, "o-1", OrderStatus.PAYMENT_PROCESSING, None, prices=reserved_at
        )
        await store.record_status(session, "o-2", OrderStatus.CANCELLED, "out of stock")

    assert await _lines(db, "o-1") == {"laptop": (1, 99999), "mouse": (2, 2499)}
    assert await _lines(db, "o-2") == {"laptop": (1, 99999), "mouse": (2, 2999)}
    assert await _history(db, "o-1") == ["pending", "payment_processing"]
    async with db.session() as session:
        changed = await store.lock_order(session, "o-2")
    assert changed is not None
    assert (changed.status, changed.status_reason) == (OrderStatus.CANCELLED, "out of stock")


async def test_an_older_user_event_handled_after_a_newer_one_changes_nothing(db: Database) -> None:
    # the users replica's upsert, as the order service sends it
    fields = {"user_id": "u-1", "email": "bob@example.com", "role": "user", "name": "Bob"}
    deactivated = UserDeactivated(**fields, status="inactive")
    activated = UserActivated(**fields, status="active")
    then = store.now()
    async with db.session() as session, session.begin():
        await replicas.save_user(session, activated, UserActivated.type, then)
        # the deactivation before it, retried and handled after it
        await replicas.save_user(session, deactivated, UserDeactivated.type, then - timedelta(1))
        known = await replicas.known_user(session, "u-1")
        assert known == replicas.KnownUser("u-1", "active", "user")
        await replicas.save_user(session, deactivated, UserDeactivated.type, then + timedelta(1))
        known = await replicas.known_user(session, "u-1")
        assert known == replicas.KnownUser("u-1", "inactive", "user")


async def test_an_older_price_handled_after_a_newer_one_changes_nothing(db: Database) -> None:
    def mouse(price: str) -> replicas.KnownProduct:
        return replicas.KnownProduct("mouse", "Mouse", Decimal(price))

    then = store.now()
    async with db.session() as session, session.begin():
        await replicas.save_product(session, mouse("120.00"), then)
        await replicas.save_product(session, mouse("80.00"), then - timedelta(1))  # retried
        await replicas.remember_product(session, mouse("70.00"))  # an HTTP answer: a gap only
        assert (await replicas.known_products(session, {"mouse"}))["mouse"].price == 120
        await replicas.save_product(session, mouse("90.00"), then + timedelta(1))
        assert (await replicas.known_products(session, {"mouse"}))["mouse"].price == 90


async def test_a_products_table_from_before_gets_its_time_column(db: Database) -> None:
    table = f'"{db.schema}".products' if db.schema else "products"
    async with db.engine.begin() as connection:  # as an earlier version made it
        await connection.execute(text(f"DROP TABLE {table}"))
        await connection.execute(
            text(
                f"CREATE TABLE {table} (id VARCHAR(64) PRIMARY KEY,"
                " name VARCHAR(200) NOT NULL, price_cents BIGINT NOT NULL)"
            )
        )
        await connection.execute(text(f"INSERT INTO {table} VALUES ('mouse', 'Mouse', 2999)"))
    upgrades = [store.date_products]
    again = Database(db.url, schema=db.schema, metadata=[store.metadata], upgrades=upgrades)
    try:
        await again.create_all()
        await again.create_all()  # twice: the second finds the column and leaves it
        async with again.session() as session:
            kept = await replicas.known_products(session, {"mouse"})
            stamped = await session.scalar(select(store.products.c.updated_at))
        newer = replicas.KnownProduct("mouse", "Mouse", Decimal("39.99"))
        async with again.session() as session, session.begin():
            await replicas.save_product(session, newer, store.now())  # newer than any before
            known = await replicas.known_products(session, {"mouse"})
    finally:
        await again.close()
    assert kept["mouse"].price == Decimal("29.99")  # the row from before, kept
    assert stamped is not None
    assert stamped.year == 1970  # as of before any event
    assert known["mouse"].price == Decimal("39.99")
