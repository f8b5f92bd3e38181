"""Admission control: the ceiling on orders in flight, between two counts."""

from __future__ import annotations

from order_svc.admission import Admission


def test_orders_are_admitted_up_to_the_ceiling_counting_those_since_the_last_count() -> None:
    admission = Admission(limit=3)
    admission.recount(1)

    assert [admission.admit() for _ in range(3)] == [True, True, False]
    assert admission.in_flight == 3


def test_a_recount_replaces_the_estimate() -> None:
    admission = Admission(limit=3)
    admission.recount(0)
    assert all(admission.admit() for _ in range(3))

    admission.recount(1)  # two finished meanwhile

    assert admission.in_flight == 1
    assert admission.admit()


def test_no_ceiling_admits_everything() -> None:
    admission = Admission(limit=0)
    admission.recount(10_000)
    assert admission.admit()
