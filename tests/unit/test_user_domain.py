"""The user service's pure rules: roles, email normalisation, changed fields, login throttling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from user_svc.domain import (
    DEMO_USERS,
    Access,
    Actor,
    LoginThrottle,
    Role,
    Status,
    User,
    changed_fields,
    may_list_users,
    may_manage,
    may_read,
    may_update,
    normalise_email,
)

ADMIN = Actor("a", Role.ADMIN)
MANAGER = Actor("m", Role.MANAGER)
USER = Actor("u", Role.USER)
OTHER = "someone-else"

ALLOWED, FORBIDDEN, HIDDEN = Access.ALLOWED, Access.FORBIDDEN, Access.HIDDEN


@pytest.mark.parametrize(("actor", "allowed"), [(ADMIN, True), (MANAGER, True), (USER, False)])
def test_only_staff_may_list_users(actor: Actor, allowed: bool) -> None:
    assert may_list_users(actor) is allowed


@pytest.mark.parametrize(
    ("actor", "target", "expected"),
    [
        (USER, "u", ALLOWED),
        (USER, OTHER, HIDDEN),
        (MANAGER, "m", ALLOWED),
        (MANAGER, OTHER, ALLOWED),
        (ADMIN, OTHER, ALLOWED),
    ],
)
def test_everyone_reads_themselves_staff_read_everyone_others_are_hidden(
    actor: Actor, target: str, expected: Access
) -> None:
    assert may_read(actor, target) is expected


@pytest.mark.parametrize(
    ("actor", "target", "new_role", "expected"),
    [
        (USER, "u", None, ALLOWED),  # own name and email
        (USER, "u", Role.ADMIN, FORBIDDEN),  # no self-promotion
        (USER, "u", Role.USER, FORBIDDEN),  # sending a role at all is an admin's business
        (USER, OTHER, None, HIDDEN),  # cannot even see them
        (USER, OTHER, Role.USER, HIDDEN),
        (MANAGER, "m", None, ALLOWED),
        (MANAGER, "m", Role.ADMIN, FORBIDDEN),
        (MANAGER, OTHER, None, FORBIDDEN),  # sees them, may not edit them
        (ADMIN, OTHER, None, ALLOWED),
        (ADMIN, OTHER, Role.MANAGER, ALLOWED),
        (ADMIN, OTHER, Role.ADMIN, ALLOWED),
        (ADMIN, "a", None, ALLOWED),
        (ADMIN, "a", Role.ADMIN, ALLOWED),
        (ADMIN, "a", Role.USER, FORBIDDEN),  # never loses the last admin
    ],
)
def test_who_may_update_whom_and_who_may_change_a_role(
    actor: Actor, target: str, new_role: Role | None, expected: Access
) -> None:
    assert may_update(actor, target, new_role) is expected


@pytest.mark.parametrize(
    ("actor", "target", "expected"),
    [
        (ADMIN, OTHER, ALLOWED),
        (ADMIN, "a", FORBIDDEN),  # not their own account
        (MANAGER, OTHER, FORBIDDEN),
        (MANAGER, "m", FORBIDDEN),
        (USER, "u", FORBIDDEN),
        (USER, OTHER, HIDDEN),
    ],
)
def test_only_admins_delete_or_deactivate_and_never_themselves(
    actor: Actor, target: str, expected: Access
) -> None:
    assert may_manage(actor, target) is expected


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Alice@Example.COM", "alice@example.com"),
        ("  bob@example.com\n", "bob@example.com"),
        ("first.last+tag@mail.example.co.uk", "first.last+tag@mail.example.co.uk"),
    ],
)
def test_emails_are_trimmed_and_lower_cased(raw: str, normalised: str) -> None:
    assert normalise_email(raw) == normalised


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "plain",
        "@example.com",
        "a@",
        "a@@example.com",
        "a b@example.com",
        "a@localhost",
        "a@-example.com",
        "a@example..com",
        "a@exa_mple.com",
        f"{'x' * 250}@example.com",
    ],
)
def test_what_is_not_an_email_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="not a valid email address"):
        normalise_email(raw)


def test_changed_fields_names_only_what_differs_in_field_order() -> None:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    user = User("u", "Bob", "bob@example.com", Role.USER, Status.ACTIVE, moment, moment)

    wanted = {"role": Role.MANAGER, "name": "Bob", "email": "robert@example.com"}

    assert changed_fields(user, wanted) == ["email", "role"]
    assert changed_fields(user, {"name": "Bob"}) == []


def test_demo_data_is_alice_admin_bob_user_carol_manager() -> None:
    assert [(name, role) for name, _, role in DEMO_USERS] == [
        ("Alice", Role.ADMIN),
        ("Bob", Role.USER),
        ("Carol", Role.MANAGER),
    ]


T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_throttle_refuses_the_attempt_after_the_limit_until_the_window_passes() -> None:
    throttle = LoginThrottle(max_attempts=3, window_seconds=60)
    counted = [at(0), at(0), at(0)]

    assert throttle.wait_seconds(counted[:2], at(10)) is None
    assert throttle.wait_seconds(counted, at(10)) == 50
    assert throttle.wait_seconds(counted, at(59.5)) == 1  # rounded up, never 0
    assert throttle.wait_seconds(counted, at(60)) is None  # a full window old: not counted


def test_throttle_window_slides_one_attempt_at_a_time() -> None:
    throttle = LoginThrottle(max_attempts=3, window_seconds=60)
    counted = [at(0), at(20), at(40)]

    assert throttle.wait_seconds(counted, at(50)) == 10  # until the first leaves
    assert throttle.wait_seconds(counted, at(60)) is None  # room for one more, not three
    assert throttle.wait_seconds([*counted[1:], at(60)], at(61)) == 19


def test_throttle_waits_for_enough_attempts_to_leave_after_the_limit_is_lowered() -> None:
    throttle = LoginThrottle(max_attempts=2, window_seconds=60)
    counted = [at(40), at(0), at(20), at(30)]  # counted under a higher limit, in any order

    assert throttle.wait_seconds(counted, at(45)) == 45  # until at(30) leaves: one is left


def test_throttle_defaults_to_five_attempts_in_five_minutes() -> None:
    throttle = LoginThrottle()

    assert throttle.wait_seconds([at(0)] * 4, at(1)) is None
    assert throttle.wait_seconds([at(0)] * 5, at(1)) == 299
    assert throttle.window_start(at(300)) == at(0)
