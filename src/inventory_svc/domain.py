"""The inventory's rules, free of I/O: stock arithmetic, the reservation life cycle, money.

A product's units are counted three ways: ``stock`` (on the shelf, held or not),
``reserved`` (held for orders, part of stock) and ``sold`` (gone). Every movement is a
:class:`StockDelta`, and none changes ``available + reserved + sold``, except a restock,
which adds exactly what arrived. The store applies these same deltas in SQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum, StrEnum

from inventory_svc.messages import LineItem, ReservedItem, ShortItem

CENT = Decimal("0.01")
# Far beyond any shelf: a line asking for more can never be met, and every count we
# store stays well inside a 64-bit integer.
MAX_UNITS = 10**12
EXPIRY_REASON = "reservation expired"


def money(amount: Decimal) -> Decimal:
    """``amount`` rounded to cents, half up, as every price and total is."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class StockDelta:
    """How one movement changes a product's counters."""

    stock: int = 0
    reserved: int = 0
    sold: int = 0


def reserve_units(quantity: int) -> StockDelta:
    """Hold units for an order: they stay on the shelf but are no longer available."""
    return StockDelta(reserved=quantity)


def commit_units(quantity: int) -> StockDelta:
    """Held units are paid for: they leave the shelf and count as sold."""
    return StockDelta(stock=-quantity, reserved=-quantity, sold=quantity)


def release_reserved_units(quantity: int) -> StockDelta:
    """Held units are let go: available again."""
    return StockDelta(reserved=-quantity)


def return_sold_units(quantity: int) -> StockDelta:
    """Sold units come back (an order cancelled after payment): on the shelf again."""
    return StockDelta(stock=quantity, sold=-quantity)


def restock_units(quantity: int) -> StockDelta:
    """New units arrive."""
    return StockDelta(stock=quantity)


class StockError(ValueError):
    """A movement would leave a product with negative or over-held counts."""


@dataclass(frozen=True, slots=True)
class StockLevel:
    """A product's counters at one moment."""

    stock: int
    reserved: int = 0
    sold: int = 0

    @property
    def available(self) -> int:
        """Units an order can still reserve."""
        return self.stock - self.reserved

    def can_reserve(self, quantity: int) -> bool:
        """True when ``quantity`` units are free (the store's conditional UPDATE guard)."""
        return 0 < quantity <= self.available

    def apply(self, delta: StockDelta) -> StockLevel:
        """The level after ``delta``; a :class:`StockError` if that breaks a counter."""
        after = StockLevel(
            self.stock + delta.stock, self.reserved + delta.reserved, self.sold + delta.sold
        )
        if after.reserved < 0 or after.available < 0 or after.sold < 0:
            raise StockError(f"{delta} cannot apply to {self}")
        return after


class ReservationStatus(StrEnum):
    """Where an order's reservation stands."""

    RESERVED = "reserved"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"
    # the reserve was refused; kept so a repeated request gets the same answer
    REJECTED = "rejected"


class CommitDecision(Enum):
    """What a ``stock.commit`` does to a reservation in a given status."""

    COMMIT = "commit"
    ALREADY_COMMITTED = "already committed"
    TOO_LATE = "too late"
    REFUSE = "refuse"


def decide_commit(status: ReservationStatus) -> CommitDecision:
    """Only held units can be sold; committing twice is answered, not repeated. A hold
    that expired is too late to sell: the order is told again (it refunds the buyer)."""
    if status is ReservationStatus.RESERVED:
        return CommitDecision.COMMIT
    if status is ReservationStatus.COMMITTED:
        return CommitDecision.ALREADY_COMMITTED
    if status is ReservationStatus.EXPIRED:
        return CommitDecision.TOO_LATE
    return CommitDecision.REFUSE


def holds_units(status: ReservationStatus) -> bool:
    """True while the order's units are held or sold, so a release has something to return."""
    return status in (ReservationStatus.RESERVED, ReservationStatus.COMMITTED)


def release_delta(status: ReservationStatus, quantity: int) -> StockDelta:
    """What releasing one line does: held units become free, sold units return to stock."""
    if status is ReservationStatus.RESERVED:
        return release_reserved_units(quantity)
    if status is ReservationStatus.COMMITTED:
        return return_sold_units(quantity)
    raise StockError(f"a {status} reservation holds no units to release")


def merge_lines(items: Iterable[LineItem]) -> list[LineItem]:
    """One line per product, quantities summed, sorted by product id.

    Rows are then always locked in the same order, so two reservations cannot deadlock.
    """
    totals: Counter[str] = Counter()
    for item in items:
        totals[item.product_id] += item.quantity
    return [LineItem(product_id=pid, quantity=totals[pid]) for pid in sorted(totals)]


def reservation_total(items: Iterable[ReservedItem]) -> Decimal:
    """What the held units cost, in cents."""
    return money(sum((item.unit_price * item.quantity for item in items), Decimal(0)))


def shortfalls(failed: Iterable[LineItem], available: Mapping[str, int]) -> list[ShortItem]:
    """The lines that could not be held; a product missing from ``available`` is unknown."""
    return [
        ShortItem(
            product_id=line.product_id,
            requested=line.quantity,
            available=max(available.get(line.product_id, 0), 0),
        )
        for line in failed
    ]


def rejection_reason(short: Iterable[ShortItem], unknown: Collection[str]) -> str:
    """One line saying why nothing was reserved."""
    short = list(short)
    if not short:
        return "no items to reserve"
    parts = []
    if missing := [item.product_id for item in short if item.product_id in unknown]:
        parts.append("unknown product: " + ", ".join(missing))
    if scarce := [item for item in short if item.product_id not in unknown]:
        parts.append(
            "insufficient stock: "
            + ", ".join(
                f"{item.product_id} (requested {item.requested}, available {item.available})"
                for item in scarce
            )
        )
    return "; ".join(parts)
