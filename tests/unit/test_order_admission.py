"""Admission control: the ceiling on orders in flight, between two counts."""

from __future__ import annotations

from order_svc.admission import Admission


def test_orders_come_in_up_to_the_ceiling_counting_those_placed_since_the_last_count() -> None:
    admission = Admission(limit=3)
    admission.recount(1)

    room = []
    for _ in range(3):
        room.append(admission.has_room())
        if room[-1]:
            admission.took_one()

    assert room == [True, True, False]
    assert admission.in_flight == 3


def test_a_recount_replaces_the_estimate() -> None:
    admission = Admission(limit=3)
    admission.recount(0)
    for _ in range(3):
        admission.took_one()
    assert not admission.has_room()

    admission.recount(1)  # two finished meanwhile

    assert admission.in_flight == 1
    assert admission.has_room()


def test_no_ceiling_has_room_for_everything() -> None:
    admission = Admission(limit=0)
    admission.recount(10_000)
    assert admission.has_room()
