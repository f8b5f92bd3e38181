"""The inventory's tables and the queries on them; every function runs in the caller's session.

Stock changes are single UPDATEs that add a :class:`~inventory_svc.domain.StockDelta`, so
concurrent transactions never overwrite each other's counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.db import dialect_of
from bus.prepared import Prepared, as_arrays, insert_or_skip, unnested
from inventory_svc.domain import ReservationStatus, StockDelta

metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("price", Numeric(12, 2), nullable=False),
    Column("stock", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False, default=0),
    Column("sold", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # the last line of defence for the counting rules in domain.py
    CheckConstraint("price > 0", name="price_positive"),
    CheckConstraint("reserved >= 0 AND reserved <= stock", name="reserved_within_stock"),
    CheckConstraint("sold >= 0", name="sold_not_negative"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_id", String, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("total", Numeric(14, 2)),
    Column("reason", Text),
    # the order's flow: the expiry sweep's stock.expired joins it
    Column("correlation_id", String(128)),
    # the reservation expires reservation_ttl after this (a setting, so not stored)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
_holding = reservations.c.status == ReservationStatus.RESERVED.value
Index(
    "reservations_due",
    reservations.c.created_at,
    postgresql_where=_holding,
    sqlite_where=_holding,
)

# held lines (with their price) or, for a rejected order, the lines that fell short
reservation_lines = Table(
    "reservation_lines",
    metadata,
    Column(
        "order_id",
        String,
        ForeignKey("reservations.order_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("product_id", String, primary_key=True),
    Column("quantity", BigInteger, nullable=False),
    Column("unit_price", Numeric(12, 2)),
    Column("available", BigInteger),
)


@dataclass(frozen=True, slots=True)
class Product:
    """A product with its stock counters."""

    id: str
    name: str
    price: Decimal
    stock: int
    reserved: int
    sold: int

    @property
    def available(self) -> int:
        """Units an order can still reserve."""
        return self.stock - self.reserved


@dataclass(frozen=True, slots=True)
class Line:
    """One product of a reservation."""

    product_id: str
    quantity: int
    unit_price: Decimal | None = None
    available: int | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """An order's reservation and its lines, sorted by product id."""

    order_id: str
    status: ReservationStatus
    total: Decimal | None
    reason: str | None
    correlation_id: str | None
    created_at: datetime
    updated_at: datetime
    lines: tuple[Line, ...]


_PRODUCT = (
    products.c.id,
    products.c.name,
    products.c.price,
    products.c.stock,
    products.c.reserved,
    products.c.sold,
)


def utc_now() -> datetime:
    """The time now, in UTC: every timestamp the inventory stores."""
    return datetime.now(UTC)


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time (SQLite hands timestamps back naive)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- products -------------------------------------------------------------------------------


_ADD_PRODUCT = insert_or_skip(products, *_PRODUCT)


async def add_product(
    session: AsyncConnection, product_id: str, name: str, price: Decimal, stock: int, now: datetime
) -> Product | None:
    """Insert a product; ``None`` when the id is taken."""
    values = {"id": product_id, "name": name, "price": price, "stock": stock}
    values |= {"reserved": 0, "sold": 0, "created_at": now, "updated_at": now}
    rows = await _ADD_PRODUCT.rows(session, values)
    return Product(**rows[0]) if rows else None


async def get_product(
    session: AsyncConnection, product_id: str, *, lock: bool = False
) -> Product | None:
    """One product, optionally locked until the transaction ends."""
    query = select(*_PRODUCT).where(products.c.id == product_id)
    if lock:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return Product(**row._mapping) if row is not None else None


async def list_products(
    session: AsyncConnection, limit: int, offset: int
) -> tuple[list[Product], int]:
    """A page of products by id, and how many there are."""
    query = select(*_PRODUCT).order_by(products.c.id).limit(limit).offset(offset)
    rows = (await session.execute(query)).all()
    total = await session.scalar(select(func.count()).select_from(products))
    return [Product(**row._mapping) for row in rows], int(total or 0)


async def has_products(session: AsyncConnection) -> bool:
    """True when the catalogue holds at least one product."""
    return await session.scalar(select(products.c.id).limit(1)) is not None


async def rename_or_reprice(
    session: AsyncConnection, product_id: str, changes: dict[str, Any], now: datetime
) -> Product | None:
    """Set ``name`` and/or ``price``; ``None`` when there is no such product."""
    statement = (
        update(products)
        .where(products.c.id == product_id)
        .values(**changes, updated_at=now)
        .returning(*_PRODUCT)
    )
    row = (await session.execute(statement)).first()
    return Product(**row._mapping) if row is not None else None


# What every reservation runs, built once and sent by asyncpg on PostgreSQL
# (bus.prepared). Each takes its values as parameters.
_MOVE_STOCK = Prepared(
    update(products)
    .where(products.c.id == bindparam("product_key"))
    .values(
        stock=products.c.stock + bindparam("stock_delta"),
        reserved=products.c.reserved + bindparam("reserved_delta"),
        sold=products.c.sold + bindparam("sold_delta"),
        updated_at=bindparam("now"),
    )
    .returning(*_PRODUCT)
)
_HOLD_UNITS = Prepared(
    update(products)
    .where(
        products.c.id == bindparam("product_key"),
        products.c.stock - products.c.reserved >= bindparam("quantity"),
    )
    .values(reserved=products.c.reserved + bindparam("quantity"))
    .returning(products.c.price)
)
_UPDATE_BY_ORDER = update(reservations).where(reservations.c.order_id == bindparam("order_key"))
_UPDATE_RESERVATION = Prepared(_UPDATE_BY_ORDER)
_INSERT_LINES = insert(reservation_lines)
# on PostgreSQL the lines go in with the update, as arrays: one statement for any number
_NEW_LINES = insert(reservation_lines).from_select(
    ["order_id", "product_id", "quantity", "unit_price", "available"],
    select(
        bindparam("order_key", type_=String),
        unnested("line_products", String),
        unnested("line_quantities", BigInteger),
        unnested("line_prices", Numeric(12, 2)),
        unnested("line_available", BigInteger),
    ),
)
_UPDATE_WITH_LINES = Prepared(_UPDATE_BY_ORDER.add_cte(_NEW_LINES.cte("lines")))
_CLAIM_RESERVATION = insert_or_skip(reservations)
# a reservation with its lines, one row per line (one row with empty line columns when it
# has none): one round trip; FOR UPDATE locks the reservation, not its lines
_WITH_LINES = (
    select(
        reservations,
        reservation_lines.c.product_id,
        reservation_lines.c.quantity,
        reservation_lines.c.unit_price,
        reservation_lines.c.available,
    )
    .select_from(reservations.outerjoin(reservation_lines))
    .order_by(reservation_lines.c.product_id)
)
_RESERVATION = _WITH_LINES.where(reservations.c.order_id == bindparam("order_key"))
_RESERVATION_UNLOCKED = Prepared(_RESERVATION)
_RESERVATION_LOCKED = Prepared(_RESERVATION.with_for_update(of=reservations))
_DUE_LOCKED = Prepared(
    _WITH_LINES.where(
        reservations.c.order_id == bindparam("order_key"),
        _holding,
        reservations.c.created_at <= bindparam("cutoff"),
    ).with_for_update(of=reservations, skip_locked=True)
)


async def move_stock(
    session: AsyncConnection, product_id: str, delta: StockDelta, now: datetime
) -> Product | None:
    """Add ``delta`` to a product's counters; ``None`` when there is no such product."""
    changes = {
        "product_key": product_id,
        "stock_delta": delta.stock,
        "reserved_delta": delta.reserved,
        "sold_delta": delta.sold,
        "now": now,
    }
    rows = await _MOVE_STOCK.rows(session, changes)
    return Product(**rows[0]) if rows else None


async def hold_units(session: AsyncConnection, product_id: str, quantity: int) -> Decimal | None:
    """Reserve ``quantity`` units if that many are free; the unit price, or ``None``.

    The guard sits in the UPDATE itself: on PostgreSQL a concurrent reservation of the
    same row waits for ours to commit and then re-checks it, so the last unit goes once.
    """
    rows = await _HOLD_UNITS.rows(session, {"product_key": product_id, "quantity": quantity})
    price: Decimal | None = rows[0]["price"] if rows else None
    return price


async def available_units(session: AsyncConnection, product_ids: Iterable[str]) -> dict[str, int]:
    """Free units per known product among ``product_ids``."""
    query = select(products.c.id, products.c.stock - products.c.reserved).where(
        products.c.id.in_(list(product_ids))
    )
    return {product_id: int(free) for product_id, free in (await session.execute(query)).all()}


# --- reservations ---------------------------------------------------------------------------


async def claim_reservation(
    session: AsyncConnection,
    order_id: str,
    status: ReservationStatus,
    now: datetime,
    *,
    correlation_id: str | None = None,
    reason: str | None = None,
) -> bool:
    """Create the order's reservation; False when it already has one (a repeated request)."""
    row = {
        "order_id": order_id,
        "status": status.value,
        "reason": reason,
        "correlation_id": correlation_id,
        "created_at": now,
        "updated_at": now,
    }
    return bool(await _CLAIM_RESERVATION.run(session, row))


async def update_reservation(
    session: AsyncConnection,
    order_id: str,
    status: ReservationStatus,
    now: datetime,
    *,
    total: Decimal | None = None,
    reason: str | None = None,
    lines: Sequence[Line] = (),
) -> None:
    """Move a reservation to ``status``, with its total, reason and lines where given."""
    values: dict[str, Any] = {"status": status.value, "updated_at": now}
    if total is not None:
        values["total"] = total
    if reason is not None:
        values["reason"] = reason
    changes = {"order_key": order_id, **values}
    rows = [{"order_id": order_id, **asdict(line)} for line in lines]
    if rows and dialect_of(session) == "postgresql":
        arrays = as_arrays(
            rows,
            line_products="product_id",
            line_quantities="quantity",
            line_prices="unit_price",
            line_available="available",
        )
        await _UPDATE_WITH_LINES.run(session, changes | arrays)
        return
    await _UPDATE_RESERVATION.run(session, changes)
    if rows:
        await session.execute(_INSERT_LINES, rows)


async def get_reservation(
    session: AsyncConnection, order_id: str, *, lock: bool = False
) -> Reservation | None:
    """An order's reservation with its lines, optionally locked until the transaction ends."""
    query = _RESERVATION_LOCKED if lock else _RESERVATION_UNLOCKED
    return await _load(session, query, {"order_key": order_id})


async def due_for_expiry(session: AsyncConnection, cutoff: datetime, limit: int) -> list[str]:
    """Orders still holding units reserved at or before ``cutoff``, oldest first."""
    query = (
        select(reservations.c.order_id)
        .where(_holding, reservations.c.created_at <= cutoff)
        .order_by(reservations.c.created_at)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


async def lock_if_due(
    session: AsyncConnection, order_id: str, cutoff: datetime
) -> Reservation | None:
    """The reservation, locked, if it is still due; ``None`` if done or another sweep has it.

    ``SKIP LOCKED`` (PostgreSQL) lets two instances sweep side by side without waiting on,
    or releasing twice, the same reservation.
    """
    return await _load(session, _DUE_LOCKED, {"order_key": order_id, "cutoff": cutoff})


async def _load(
    session: AsyncConnection, query: Prepared, parameters: dict[str, Any]
) -> Reservation | None:
    rows = await query.rows(session, parameters)
    if not rows:
        return None
    row = rows[0]
    return Reservation(
        order_id=row["order_id"],
        status=ReservationStatus(row["status"]),
        total=row["total"],
        reason=row["reason"],
        correlation_id=row["correlation_id"],
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
        lines=tuple(
            Line(line["product_id"], line["quantity"], line["unit_price"], line["available"])
            for line in rows
            if line["product_id"] is not None
        ),
    )
