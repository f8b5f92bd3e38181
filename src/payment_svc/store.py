"""The payment service's tables and the queries on them (SQLAlchemy Core, async)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    MetaData,
    Select,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeDecorator

from bus.prepared import Prepared, Row, insert_or_skip
from payment_svc.domain import (
    Payment,
    Record,
    Refund,
    Transaction,
    TransactionStatus,
    TransactionType,
    money,
)
from payment_svc.messages import Fees

R = TypeVar("R", bound=Record)

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that reads back in UTC on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Naive (SQLite) values were written in UTC."""
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


class Cents(TypeDecorator[Decimal]):
    """Money: integer cents in the database (exact on SQLite too), two-place Decimal here."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> int | None:
        """Decimal to cents."""
        return None if value is None else int(money(value) * 100)

    def process_result_value(self, value: int | None, dialect: Dialect) -> Decimal | None:
        """Cents to Decimal."""
        return None if value is None else money(Decimal(value) / 100)


payments = Table(
    "payments",
    metadata,
    Column("id", String(40), primary_key=True),
    # the "one charge per order" rule; payments without an order (NULL) never clash
    Column("order_id", String(100), unique=True),
    Column("user_id", String(100)),  # None: charged by a command that named no user
    Column("transaction_id", String(40), nullable=False),
    Column("amount", Cents, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("provider", String(20), nullable=False),
    Column("payment_method", String(100), nullable=False),
    Column("status", String(20), nullable=False),
    Column("fee_processing", Cents, nullable=False),
    Column("fee_net", Cents, nullable=False),
    Column("refunded_amount", Cents, nullable=False),
    Column("failure_reason", String(200)),
    Column("created_at", UtcDateTime, nullable=False),
    Column("processed_at", UtcDateTime),
)
Index("payments_by_user", payments.c.user_id, payments.c.created_at)

transactions = Table(
    "transactions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("payment_id", ForeignKey("payments.id"), nullable=False, index=True),
    Column("user_id", String(100)),
    Column("type", String(10), nullable=False),
    Column("status", String(20), nullable=False),
    Column("amount", Cents, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("provider", String(20), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)
Index("transactions_by_user", transactions.c.user_id, transactions.c.created_at)


async def let_payments_have_no_user(connection: AsyncConnection, schema: str | None) -> None:
    """Tables made before ``payment.charge`` could name no user require one: drop that.

    PostgreSQL only; a SQLite file from then keeps requiring one until it is made anew.
    """
    if schema is None:
        return
    required = text(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = :schema"
        " AND table_name IN ('payments', 'transactions') AND column_name = 'user_id'"
        " AND is_nullable = 'NO'"
    )
    for table in (await connection.execute(required, {"schema": schema})).scalars():
        await connection.execute(
            text(f'ALTER TABLE "{schema}"."{table}" ALTER COLUMN user_id DROP NOT NULL')
        )


refunds = Table(
    "refunds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("payment_id", ForeignKey("payments.id"), nullable=False, index=True),
    Column("transaction_id", String(40), nullable=False),
    Column("amount", Cents, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("requested_by", String(100), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

IDEMPOTENCY_KEY_LENGTH = 255  # characters of a client's Idempotency-Key, at most
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user_id", String(100), primary_key=True),
    Column("key", String(IDEMPOTENCY_KEY_LENGTH), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("payment_id", String(40), nullable=False),
    Column("created_at", UtcDateTime, nullable=False, index=True),
)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's key for one request, and a fingerprint of that request."""

    user_id: str
    key: str
    request_hash: str


# Inserts unless a unique key clashes (then 0). On PostgreSQL a clash with an uncommitted
# row waits for that transaction, so of two concurrent claims exactly one wins and the
# other then sees the winner's row.
_CLAIM_KEY = insert_or_skip(idempotency_keys)
_CLAIM_PAYMENT = insert_or_skip(payments)


async def claim_idempotency_key(
    session: AsyncConnection, key: IdempotencyKey, payment_id: str, now: datetime
) -> tuple[str, str] | None:
    """Bind ``key`` to ``payment_id``; if it was bound before, its (request hash, payment id)."""
    row = {
        "user_id": key.user_id,
        "key": key.key,
        "request_hash": key.request_hash,
        "payment_id": payment_id,
        "created_at": now,
    }
    if await _CLAIM_KEY.run(session, row):
        return None
    query = select(idempotency_keys.c.request_hash, idempotency_keys.c.payment_id).where(
        idempotency_keys.c.user_id == key.user_id, idempotency_keys.c.key == key.key
    )
    seen = (await session.execute(query)).one()
    return seen.request_hash, seen.payment_id


async def forget_idempotency_keys(session: AsyncConnection, *, before: datetime) -> int:
    """Delete keys bound before ``before`` (a retry with one then makes a new payment)."""
    result = await session.execute(
        delete(idempotency_keys).where(idempotency_keys.c.created_at < before)
    )
    return int(result.rowcount)


_UPDATE_PAYMENT = update(payments).where(payments.c.id == bindparam("payment_key"))
# a charge's statements, built once and sent by asyncpg on PostgreSQL (bus.prepared)
_SETTLE_PAYMENT = Prepared(_UPDATE_PAYMENT.returning(*payments.c))
_INSERT_TRANSACTION = Prepared(insert(transactions))
_BY_ID = select(payments).where(payments.c.id == bindparam("key"))
_OF_ORDER = select(payments).where(payments.c.order_id == bindparam("key"))
_PAYMENT = Prepared(_BY_ID)
_PAYMENT_LOCKED = Prepared(_BY_ID.with_for_update())
_ORDER_PAYMENT = Prepared(_OF_ORDER)
_ORDER_PAYMENT_LOCKED = Prepared(_OF_ORDER.with_for_update())


async def claim_payment(session: AsyncConnection, values: dict[str, Any]) -> bool:
    """Insert a payment row; False when its order already has one."""
    return bool(await _CLAIM_PAYMENT.run(session, values))


async def update_payment(session: AsyncConnection, payment_id: str, **values: Any) -> None:
    """Change a payment's columns: its refunded total and status, say."""
    await session.execute(_UPDATE_PAYMENT, {"payment_key": payment_id, **values})


async def settle_payment(session: AsyncConnection, payment_id: str, **values: Any) -> Payment:
    """Write the provider's verdict; the payment as it now stands (one round trip)."""
    (row,) = await _SETTLE_PAYMENT.rows(session, {"payment_key": payment_id, **values})
    return _payment(row)


async def add_transaction(
    session: AsyncConnection,
    payment: Payment,
    *,
    transaction_id: str,
    kind: TransactionType,
    status: TransactionStatus,
    amount: Decimal,
    at: datetime,
) -> None:
    """Record one provider call on ``payment``: a charge attempt or a refund."""
    row = {
        "id": transaction_id,
        "payment_id": payment.id,
        "user_id": payment.user_id,
        "type": kind,
        "status": status,
        "amount": amount,
        "currency": payment.currency,
        "provider": payment.provider,
        "created_at": at,
    }
    await _INSERT_TRANSACTION.run(session, row)


async def add_refund(session: AsyncConnection, **values: Any) -> None:
    """Record a refund (its payment's totals are updated separately)."""
    await session.execute(insert(refunds).values(**values))


def _payment(row: Row) -> Payment:
    values = dict(row)
    values["fees"] = Fees(processing=values.pop("fee_processing"), net=values.pop("fee_net"))
    return Payment.model_validate(values)


async def get_payment(
    session: AsyncConnection, payment_id: str, *, for_update: bool = False
) -> Payment | None:
    """The payment, locked against concurrent refunds when ``for_update``."""
    query = _PAYMENT_LOCKED if for_update else _PAYMENT
    return await _one_payment(session, query, payment_id)


async def payment_for_order(
    session: AsyncConnection, order_id: str, *, for_update: bool = False
) -> Payment | None:
    """The order's payment (there is at most one)."""
    query = _ORDER_PAYMENT_LOCKED if for_update else _ORDER_PAYMENT
    return await _one_payment(session, query, order_id)


async def _one_payment(session: AsyncConnection, query: Prepared, key: str) -> Payment | None:
    rows = await query.rows(session, {"key": key})
    return _payment(rows[0]) if rows else None


async def get_transaction(
    session: AsyncConnection, transaction_id: str, *, owner: str | None
) -> Transaction | None:
    """The transaction, if it exists and belongs to ``owner`` (None: anyone's)."""
    query = select(transactions).where(transactions.c.id == transaction_id)
    if owner is not None:
        query = query.where(transactions.c.user_id == owner)
    row = (await session.execute(query)).one_or_none()
    return None if row is None else Transaction.model_validate(row)


_REFUNDS = select(
    refunds.c.id,
    refunds.c.payment_id,
    payments.c.order_id,
    refunds.c.transaction_id,
    refunds.c.amount,
    payments.c.currency,
    refunds.c.reason,
    payments.c.status.label("payment_status"),
    refunds.c.created_at,
).join(payments, payments.c.id == refunds.c.payment_id)


async def get_refund(session: AsyncConnection, refund_id: str) -> Refund | None:
    """The refund, with its payment's order, currency and current status."""
    row = (await session.execute(_REFUNDS.where(refunds.c.id == refund_id))).one_or_none()
    return None if row is None else Refund.model_validate(row)


async def latest_refund(session: AsyncConnection, payment_id: str) -> Refund | None:
    """The payment's most recent refund."""
    query = _REFUNDS.where(refunds.c.payment_id == payment_id)
    query = query.order_by(refunds.c.created_at.desc(), refunds.c.id.desc()).limit(1)
    row = (await session.execute(query)).one_or_none()
    return None if row is None else Refund.model_validate(row)


async def list_payments(
    session: AsyncConnection, *, user_id: str | None, limit: int, offset: int
) -> tuple[list[Payment], int]:
    """One page of payments, newest first, only ``user_id``'s unless None; and the total."""
    return await _page(session, payments, user_id, _payment, limit, offset)


async def list_transactions(
    session: AsyncConnection, *, user_id: str | None, limit: int, offset: int
) -> tuple[list[Transaction], int]:
    """One page of transactions, newest first, only ``user_id``'s unless None; and the total."""
    return await _page(session, transactions, user_id, Transaction.model_validate, limit, offset)


async def _page(
    session: AsyncConnection,
    table: Table,
    user_id: str | None,
    to_record: Callable[[Any], R],
    limit: int,
    offset: int,
) -> tuple[list[R], int]:
    owned: Sequence[Any] = () if user_id is None else (table.c.user_id == user_id,)
    total = await session.scalar(select(func.count()).select_from(table).where(*owned))
    query: Select[Any] = select(table).where(*owned)
    query = query.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit).offset(offset)
    rows = (await session.execute(query)).mappings().all()
    return [to_record(row) for row in rows], int(total or 0)
