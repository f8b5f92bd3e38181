"""Admission control: the ceiling on orders in flight, between two counts."""

from __future__ import annotations

import pytest

from order_svc.admission import Admission


def test_orders_come_in_up_to_the_ceiling_counting_those_placed_since_the_last_count() -> None:
    admission = Admission(limit=3)
    admission.recount(1, 1.0)

    room = []
    for _ in range(3):
        room.append(admission.has_room())
        if room[-1]:
            admission.took_one()

    assert room == [True, True, False]
    assert admission.in_flight == 3


def test_a_recount_replaces_the_estimate() -> None:
    admission = Admission(limit=3)
    admission.recount(0, 1.0)
    for _ in range(3):
        admission.took_one()
    assert not admission.has_room()

    admission.recount(1, 1.0)  # two finished meanwhile

    assert admission.in_flight == 1
    assert admission.has_room()


def test_no_ceiling_has_room_for_everything() -> None:
    admission = Admission(limit=0)
    admission.recount(10_000, 1.0)
    assert admission.has_room()


def test_the_ceiling_rises_to_the_orders_the_saga_finishes_in_the_seconds_in_hand() -> None:
    admission = Admission(limit=100, seconds_in_hand=4)
    admission.recount(100, 1.0)
    assert admission.ceiling == 100  # no pace measured yet: the configured ceiling

    for _ in range(30):  # a steady 60 orders a second come in and finish
        for _ in range(60):
            admission.took_one()
        admission.recount(100, 1.0)

    assert admission.pace == pytest.approx(60, rel=0.01)
    assert admission.ceiling == pytest.approx(240, rel=0.01)
    assert admission.has_room()

    for _ in range(30):  # the saga stalls: nothing finishes
        admission.recount(100, 1.0)
    assert admission.ceiling == 100


def test_a_burst_of_finished_orders_raises_the_ceiling_four_times_at_most() -> None:
    admission = Admission(limit=200, seconds_in_hand=4)
    admission.recount(5000, 1.0)  # a backlog drains, or a mass cancel
    admission.recount(0, 1.0)
    assert admission.ceiling == 800
