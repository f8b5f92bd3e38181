"""The inventory's pure rules: stock arithmetic, the reservation life cycle, money."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inventory_svc import domain
from inventory_svc.domain import (
    CommitDecision,
    ReservationStatus,
    StockDelta,
    StockError,
    StockLevel,
)
from inventory_svc.messages import LineItem, ReservedItem, ShortItem


def test_money_rounds_half_up_to_cents() -> None:
    assert domain.money(Decimal("2.675")) == Decimal("2.68")
    assert domain.money(Decimal("0.005")) == Decimal("0.01")
    assert domain.money(Decimal("10")) == Decimal("10.00")


def test_merge_lines_sums_repeated_products_and_sorts_by_id() -> None:
    items = [
        LineItem(product_id="phone", quantity=1),
        LineItem(product_id="laptop", quantity=2),
        LineItem(product_id="phone", quantity=3),
    ]

    assert domain.merge_lines(items) == [
        LineItem(product_id="laptop", quantity=2),
        LineItem(product_id="phone", quantity=4),
    ]


def test_reservation_total_is_price_times_quantity_in_cents() -> None:
    items = [
        ReservedItem(product_id="laptop", quantity=2, unit_price=Decimal("1299.99")),
        ReservedItem(product_id="mouse", quantity=3, unit_price=Decimal("79.99")),
    ]

    assert domain.reservation_total(items) == Decimal("2839.95")
    assert domain.reservation_total([]) == Decimal("0.00")


def test_only_a_held_reservation_can_be_committed_and_a_second_commit_is_a_repeat() -> None:
    assert domain.decide_commit(ReservationStatus.RESERVED) is CommitDecision.COMMIT
    assert domain.decide_commit(ReservationStatus.COMMITTED) is CommitDecision.ALREADY_COMMITTED
    assert domain.decide_commit(ReservationStatus.EXPIRED) is CommitDecision.TOO_LATE
    for status in (ReservationStatus.RELEASED, ReservationStatus.REJECTED):
        assert domain.decide_commit(status) is CommitDecision.REFUSE


def test_releasing_returns_held_units_to_available_and_sold_units_to_stock() -> None:
    level = StockLevel(stock=10, reserved=3, sold=2)

    held = level.apply(domain.release_delta(ReservationStatus.RESERVED, 3))
    sold = level.apply(domain.release_delta(ReservationStatus.COMMITTED, 2))

    assert held == StockLevel(stock=10, reserved=0, sold=2)
    assert sold == StockLevel(stock=12, reserved=3, sold=0)


def test_a_reservation_that_holds_nothing_has_nothing_to_release() -> None:
    for status in (
        ReservationStatus.RELEASED,
        ReservationStatus.EXPIRED,
        ReservationStatus.REJECTED,
    ):
        assert not domain.holds_units(status)
        with pytest.raises(StockError):
            domain.release_delta(status, 1)


def test_stock_level_refuses_to_hold_or_sell_more_than_it_has() -> None:
    level = StockLevel(stock=2, reserved=1)

    assert level.can_reserve(1)
    assert not level.can_reserve(2)
    with pytest.raises(StockError):
        level.apply(domain.reserve_units(2))
    with pytest.raises(StockError):
        level.apply(domain.commit_units(2))


def test_rejection_reason_names_unknown_products_and_shortfalls() -> None:
    short = domain.shortfalls(
        [LineItem(product_id="laptop", quantity=3), LineItem(product_id="ghost", quantity=1)],
        {"laptop": 1},
    )

    assert short == [
        ShortItem(product_id="laptop", requested=3, available=1),
        ShortItem(product_id="ghost", requested=1, available=0),
    ]
    assert domain.rejection_reason(short, unknown={"ghost"}) == (
        "unknown product: ghost; insufficient stock: laptop (requested 3, available 1)"
    )
    assert domain.rejection_reason([], unknown=set()) == "no items to reserve"


# --- the invariant under any mix of commands, each possibly delivered twice ------------------

PRODUCTS = ("a", "b", "c")
ORDERS = ("o1", "o2", "o3", "o4")


@dataclass
class Ledger:
    """The handlers' decisions, in memory: each command applied through the domain rules."""

    levels: dict[str, StockLevel]
    received: dict[str, int]
    orders: dict[str, tuple[ReservationStatus, list[LineItem]]] = field(default_factory=dict)

    def reserve(self, order_id: str, items: list[LineItem]) -> None:
        if order_id in self.orders:  # a repeated request changes nothing
            return
        lines = domain.merge_lines(items)
        after = dict(self.levels)
        for line in lines:
            level = after[line.product_id]
            if not level.can_reserve(line.quantity):  # all or nothing
                self.orders[order_id] = (ReservationStatus.REJECTED, [])
                return
            after[line.product_id] = level.apply(domain.reserve_units(line.quantity))
        self.levels = after
        self.orders[order_id] = (ReservationStatus.RESERVED, lines)

    def commit(self, order_id: str) -> None:
        status, lines = self.orders.get(order_id, (ReservationStatus.REJECTED, []))
        if domain.decide_commit(status) is CommitDecision.COMMIT:
            self._move(lines, domain.commit_units)
            self.orders[order_id] = (ReservationStatus.COMMITTED, lines)

    def release(self, order_id: str, to: ReservationStatus) -> None:
        status, lines = self.orders.get(order_id, (ReservationStatus.RELEASED, []))
        if domain.holds_units(status):
            self._move(lines, lambda quantity: domain.release_delta(status, quantity))
            self.orders[order_id] = (to, lines)
        else:
            self.orders.setdefault(order_id, (status, lines))

    def restock(self, product_id: str, quantity: int) -> None:
        self.levels[product_id] = self.levels[product_id].apply(domain.restock_units(quantity))
        self.received[product_id] += quantity

    def _move(self, lines: list[LineItem], delta: Callable[[int], StockDelta]) -> None:
        for line in lines:
            self.levels[line.product_id] = self.levels[line.product_id].apply(delta(line.quantity))


line_items = st.lists(
    st.builds(LineItem, product_id=st.sampled_from(PRODUCTS), quantity=st.integers(1, 4)),
    min_size=1,
    max_size=4,
)
commands = st.one_of(
    st.tuples(st.just("reserve"), st.sampled_from(ORDERS), line_items),
    st.tuples(st.just("commit"), st.sampled_from(ORDERS)),
    st.tuples(st.just("release"), st.sampled_from(ORDERS)),
    st.tuples(st.just("expire"), st.sampled_from(ORDERS)),
    st.tuples(st.just("restock"), st.sampled_from(PRODUCTS), st.integers(1, 5)),
)


@given(
    initial=st.tuples(*(st.integers(0, 6) for _ in PRODUCTS)),
    script=st.lists(st.tuples(commands, st.booleans()), max_size=40),
)
def test_available_reserved_and_sold_always_add_up_to_what_arrived(
    initial: tuple[int, ...], script: list[tuple[tuple[object, ...], bool]]
) -> None:
    ledger = Ledger(
        levels={pid: StockLevel(stock=n) for pid, n in zip(PRODUCTS, initial, strict=True)},
        received=dict(zip(PRODUCTS, initial, strict=True)),
    )
    for command, delivered_twice in script:
        for _ in range(2 if delivered_twice else 1):
            match command:
                case ("reserve", str(order_id), list(items)):
                    ledger.reserve(order_id, items)
                case ("commit", str(order_id)):
                    ledger.commit(order_id)
                case ("release", str(order_id)):
                    ledger.release(order_id, ReservationStatus.RELEASED)
                case ("expire", str(order_id)):
                    ledger.release(order_id, ReservationStatus.EXPIRED)
                case ("restock", str(product_id), int(quantity)):
                    ledger.restock(product_id, quantity)
        for pid, level in ledger.levels.items():
            assert level.available + level.reserved + level.sold == ledger.received[pid]
            assert min(level.available, level.reserved, level.sold) >= 0
        held = dict.fromkeys(PRODUCTS, 0)
        sold = dict.fromkeys(PRODUCTS, 0)
        for status, lines in ledger.orders.values():
            for line in lines:
                if status is ReservationStatus.RESERVED:
                    held[line.product_id] += line.quantity
                elif status is ReservationStatus.COMMITTED:
                    sold[line.product_id] += line.quantity
        # each order's units are counted once, however often its commands arrived
        assert held == {pid: level.reserved for pid, level in ledger.levels.items()}
        assert sold == {pid: level.sold for pid, level in ledger.levels.items()}
