"""Tables and queries of the order service. Money is stored as integer cents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.db import dialect_of
from bus.prepared import Prepared, Row, as_arrays, unnested
from order_svc.domain import OrderStatus, SagaStep

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(64), nullable=False, index=True),
    Column("status", String(20), nullable=False, index=True),
    Column("status_reason", Text),
    Column("currency", String(3), nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("provider", String(20), nullable=False),
    Column("method", String(64), nullable=False),
    Column("payment_id", String(64)),
    Column("correlation_id", String(64), nullable=False),
    Column("traceparent", String(64)),
    Column("saga_step", String(10)),
    Column("step_deadline", DateTime(timezone=True)),
    Column("step_attempts", Integer, nullable=False, default=0),
    Column("refund_requested", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("shipped_at", DateTime(timezone=True)),
    Column("estimated_delivery", DateTime(timezone=True)),
)
Index("orders_step_deadline", orders.c.step_deadline)

order_items = Table(
    "order_items",
    metadata,
    Column("order_id", String(32), ForeignKey("orders.id"), primary_key=True),
    Column("product_id", String(64), primary_key=True),
    Column("quantity", Integer, nullable=False),
    Column("unit_price_cents", BigInteger, nullable=False),
)

order_history = Table(
    "order_history",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("order_id", String(32), ForeignKey("orders.id"), nullable=False, index=True),
    Column("status", String(20), nullable=False),
    Column("reason", Text),
    Column("at", DateTime(timezone=True), nullable=False),
)

# replicas of other services' data, kept from their events
users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("email", String(320)),
    Column("role", String(20)),
    Column("status", String(20), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


async def date_products(connection: AsyncConnection, schema: str | None) -> None:
    """A products table from before events were ordered by their time gets the column,
    every row as of before any event (the next event about it has the last word)."""
    # looked up first: ALTER TABLE locks the table even when it has nothing to add, and
    # this runs at every start of every instance while the others serve
    columns = await connection.run_sync(
        lambda sync: inspect(sync).get_columns("products", schema=schema)
    )
    if any(column["name"] == "updated_at" for column in columns):
        return
    if dialect_of(connection) == "sqlite":
        column = "updated_at DATETIME NOT NULL DEFAULT '1970-01-01 00:00:00'"
        await connection.execute(text(f"ALTER TABLE products ADD COLUMN {column}"))
    else:
        column = "updated_at timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00'"
        table = f'"{schema}".products' if schema else "products"
        await connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column}"))


products = Table(
    "products",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("price_cents", BigInteger, nullable=False),
    # when inventory made what the row says (its event's time): an older event changes nothing
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

IDEMPOTENCY_KEY_LENGTH = 200  # characters of a client's Idempotency-Key, at most
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("key", String(IDEMPOTENCY_KEY_LENGTH), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("order_id", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


def cents(amount: Decimal) -> int:
    """Decimal money to integer cents (money is always two places, so this is exact)."""
    return int(amount.scaleb(2))


def from_cents(value: int) -> Decimal:
    """Integer cents to Decimal money with two places (``6499950`` -> ``64999.50``)."""
    return Decimal(value).scaleb(-2)


@dataclass(frozen=True, slots=True)
class Order:
    """One order row, as the saga reads it."""

    id: str
    user_id: str
    status: OrderStatus
    status_reason: str | None
    currency: str
    total: Decimal
    provider: str
    method: str
    payment_id: str | None
    correlation_id: str
    traceparent: str | None
    saga_step: SagaStep | None
    step_attempts: int
    refund_requested: bool

    @classmethod
    def from_row(cls, row: Row) -> Order:
        """Build from a row of ``orders``."""
        return cls(
            id=row["id"],
            user_id=row["user_id"],
            status=OrderStatus(row["status"]),
            status_reason=row["status_reason"],
            currency=row["currency"],
            total=from_cents(row["total_cents"]),
            provider=row["provider"],
            method=row["method"],
            payment_id=row["payment_id"],
            correlation_id=row["correlation_id"],
            traceparent=row["traceparent"],
            saga_step=SagaStep(row["saga_step"]) if row["saga_step"] else None,
            step_attempts=row["step_attempts"],
            refund_requested=row["refund_requested"],
        )


# The saga's statements, built once and sent by asyncpg on PostgreSQL (bus.prepared).
# Inserts and updates take their columns from the parameters they are given.
_LOCK = Prepared(select(orders).where(orders.c.id == bindparam("order_key")).with_for_update())
_INSERT_ORDER = insert(orders)
_UPDATE_ORDER = update(orders).where(orders.c.id == bindparam("order_key"))
_END_STEP = Prepared(_UPDATE_ORDER.where(orders.c.saga_step == bindparam("step")))
# On PostgreSQL a change of status writes its history entry in the same statement (a
# data-modifying WITH): one round trip instead of two, on every step of every order. The
# entry is inserted from a SELECT of its own parameters, because an INSERT with VALUES
# would also take any other parameter named like one of its columns (the order's ``id``).
_ENTRY = insert(order_history).from_select(
    ["order_id", "status", "reason", "at"],
    select(
        bindparam("order_key", type_=String),
        bindparam("entry_status", type_=String),
        bindparam("entry_reason", type_=Text),
        bindparam("entry_at", type_=DateTime(timezone=True)),
    ),
)
# Lines travel as arrays, one element a line, so an order of any size is one statement.
_ITEMS = insert(order_items).from_select(
    ["order_id", "product_id", "quantity", "unit_price_cents"],
    select(
        bindparam("order_key", type_=String),
        unnested("item_products", String),
        unnested("item_quantities", Integer),
        unnested("item_cents", BigInteger),
    ),
)
_PRICES = select(
    unnested("price_products", String).label("product_id"),
    unnested("price_cents", BigInteger).label("cents"),
).subquery("prices")
_REPRICE = (
    update(order_items)
    .where(
        (order_items.c.order_id == bindparam("order_key", type_=String))
        & (order_items.c.product_id == _PRICES.c.product_id)
    )
    .values(unit_price_cents=_PRICES.c.cents)
)
_UPDATE_WITH_ENTRY = Prepared(_UPDATE_ORDER.add_cte(_ENTRY.cte("entry")))
_REPRICE_WITH_ENTRY = Prepared(_UPDATE_ORDER.add_cte(_ENTRY.cte("entry"), _REPRICE.cte("repriced")))
_INSERT_WITH_ENTRY = Prepared(_INSERT_ORDER.add_cte(_ENTRY.cte("entry"), _ITEMS.cte("items")))
_INSERT_ITEMS = insert(order_items)
_SET_LINE_PRICE = (
    update(order_items)
    .where(
        (order_items.c.order_id == bindparam("order"))
        & (order_items.c.product_id == bindparam("product"))
    )
    .values(unit_price_cents=bindparam("cents"))
)


async def lock_order(session: AsyncConnection, order_id: str) -> Order | None:
    """Read an order and lock it for this transaction (SQLite locks the whole file)."""
    rows = await _LOCK.rows(session, {"order_key": order_id})
    return Order.from_row(rows[0]) if rows else None


Line = tuple[str, int, Decimal]
"""An order line: product id, quantity, unit price."""


async def insert_order(
    session: AsyncConnection, values: dict[str, Any], lines: Sequence[Line]
) -> None:
    """Insert an order, its lines and the first history entry.

    ``values`` name every column, those with defaults too: SQLAlchemy gives an INSERT with
    a WITH, as this is on PostgreSQL, no defaults (a column left out is NULL).
    """
    first = _entry(values["id"], values["status"], None, values["created_at"])
    items = [
        {"order_id": values["id"], "product_id": p, "quantity": q, "unit_price_cents": cents(u)}
        for p, q, u in lines
    ]
    if dialect_of(session) == "postgresql":
        arrays = as_arrays(
            items,
            item_products="product_id",
            item_quantities="quantity",
            item_cents="unit_price_cents",
        )
        await _INSERT_WITH_ENTRY.run(session, values | first | arrays)
        return
    await session.execute(_INSERT_ORDER, values)
    await session.execute(_ENTRY, first)
    if items:
        await session.execute(_INSERT_ITEMS, items)


async def update_order(session: AsyncConnection, order_id: str, **values: Any) -> None:
    """Change columns of one order (and its ``updated_at``)."""
    await session.execute(_UPDATE_ORDER, {"order_key": order_id, "updated_at": now(), **values})


async def end_step(session: AsyncConnection, order_id: str, step: SagaStep) -> None:
    """Stop watching ``step`` if it is the one the order waits on (else change nothing)."""
    ended = {"saga_step": None, "step_deadline": None, "step_attempts": 0, "updated_at": now()}
    await _END_STEP.run(session, {"order_key": order_id, "step": step, **ended})


async def record_status(
    session: AsyncConnection,
    order_id: str,
    status: OrderStatus,
    reason: str | None,
    *,
    prices: Mapping[str, Decimal] | None = None,
    **values: Any,
) -> None:
    """Set a new status with its reason, and append it to the history; with ``prices``,
    replace the lines' provisional unit prices by these (product id: price)."""
    at = now()
    changes = {"order_key": order_id, "status": status, "status_reason": reason, "updated_at": at}
    entry = _entry(order_id, status, reason, at)
    repriced = [
        {"order": order_id, "product": product, "cents": cents(price)}
        for product, price in (prices or {}).items()
    ]
    if dialect_of(session) == "postgresql":
        if repriced:
            arrays = as_arrays(repriced, price_products="product", price_cents="cents")
            await _REPRICE_WITH_ENTRY.run(session, changes | values | entry | arrays)
        else:
            await _UPDATE_WITH_ENTRY.run(session, changes | values | entry)
        return
    await session.execute(_UPDATE_ORDER, changes | values)
    await session.execute(_ENTRY, entry)
    if repriced:
        await session.execute(_SET_LINE_PRICE, repriced)


def _entry(order_id: str, status: OrderStatus, reason: str | None, at: datetime) -> dict[str, Any]:
    return {"order_key": order_id, "entry_status": status, "entry_reason": reason, "entry_at": at}


async def order_lines(session: AsyncConnection, order_id: str) -> list[tuple[str, int]]:
    """``(product_id, quantity)`` of each line."""
    query = select(order_items.c.product_id, order_items.c.quantity).where(
        order_items.c.order_id == order_id
    )
    return [(row.product_id, row.quantity) for row in await session.execute(query)]


async def due_orders(session: AsyncConnection, limit: int, skip_locked: bool) -> list[Order]:
    """Orders whose saga step is overdue, locked for this transaction."""
    query = (
        select(orders)
        .where(orders.c.step_deadline <= now())
        .order_by(orders.c.step_deadline)
        .limit(limit)
        .with_for_update(skip_locked=skip_locked)
    )
    return [Order.from_row(row) for row in (await session.execute(query)).mappings()]


async def orders_in_flight(session: AsyncConnection) -> int:
    """Orders whose saga waits on a reply (every step sets a deadline, an answer clears it)."""
    query = select(func.count()).select_from(orders).where(orders.c.step_deadline.is_not(None))
    return int(await session.scalar(query) or 0)


async def count(session: AsyncConnection, query: Any) -> int:
    """``SELECT count(*)`` of a query."""
    return int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
