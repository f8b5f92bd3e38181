"""The order as HTTP shows it, read in three queries whatever the page size."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from order_svc import store
from order_svc.domain import OrderStatus


class OrderLineView(BaseModel):
    """One line of an order."""

    product_id: str
    quantity: int
    unit_price: Decimal


class HistoryEntry(BaseModel):
    """A status the order had, since when, and why."""

    status: OrderStatus
    at: datetime
    reason: str | None


class OrderView(BaseModel):
    """An order with its lines and the history of its statuses."""

    id: str
    user_id: str
    items: list[OrderLineView]
    total: Decimal
    currency: str
    status: OrderStatus
    status_reason: str | None
    payment_id: str | None
    created_at: datetime
    updated_at: datetime
    shipped_at: datetime | None
    estimated_delivery: datetime | None
    history: list[HistoryEntry]


async def order_views(
    session: AsyncConnection,
    *,
    user_id: str | None = None,
    status: OrderStatus | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[OrderView], int]:
    """A page of orders (newest first) and how many match in all."""
    query = select(store.orders)
    if user_id is not None:
        query = query.where(store.orders.c.user_id == user_id)
    if status is not None:
        query = query.where(store.orders.c.status == status)
    total = await store.count(session, query)
    page = query.order_by(store.orders.c.created_at.desc(), store.orders.c.id).limit(limit)
    rows = (await session.execute(page.offset(offset))).all()
    return await _views_of(session, rows), total


async def order_view(session: AsyncConnection, order_id: str) -> OrderView | None:
    """One order, or None."""
    rows = (await session.execute(select(store.orders).where(store.orders.c.id == order_id))).all()
    views = await _views_of(session, rows)
    return views[0] if views else None


async def _views_of(session: AsyncConnection, rows: Sequence[Any]) -> list[OrderView]:
    """These orders' rows with their lines and history."""
    order_ids = [row.id for row in rows]
    if not order_ids:
        return []
    lines: defaultdict[str, list[OrderLineView]] = defaultdict(list)
    items = select(store.order_items).where(store.order_items.c.order_id.in_(order_ids))
    for item in await session.execute(items.order_by(store.order_items.c.product_id)):
        lines[item.order_id].append(
            OrderLineView(
                product_id=item.product_id,
                quantity=item.quantity,
                unit_price=store.from_cents(item.unit_price_cents),
            )
        )
    history: defaultdict[str, list[HistoryEntry]] = defaultdict(list)
    entries = select(store.order_history).where(store.order_history.c.order_id.in_(order_ids))
    for entry in await session.execute(entries.order_by(store.order_history.c.id)):
        history[entry.order_id].append(
            HistoryEntry(status=entry.status, at=entry.at, reason=entry.reason)
        )
    return [_view(row._mapping, lines[row.id], history[row.id]) for row in rows]


def new_order_view(values: Mapping[str, Any], lines: Sequence[store.Line]) -> OrderView:
    """The order just placed, from what was written (no need to read it back)."""
    items = [OrderLineView(product_id=p, quantity=q, unit_price=u) for p, q, u in sorted(lines)]
    first = HistoryEntry(status=values["status"], at=values["created_at"], reason=None)
    return _view(values, items, [first])


def _view(
    row: Mapping[Any, Any], lines: list[OrderLineView], history: list[HistoryEntry]
) -> OrderView:
    return OrderView(
        id=row["id"],
        user_id=row["user_id"],
        items=lines,
        total=store.from_cents(row["total_cents"]),
        currency=row["currency"],
        status=row["status"],
        status_reason=row.get("status_reason"),
        payment_id=row.get("payment_id"),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        shipped_at=row.get("shipped_at"),
        estimated_delivery=row.get("estimated_delivery"),
        history=history,
    )
