"""The user service's pure rules: roles, email normalisation, changed fields, login throttling."""

from __future__ import annotations

from datetime import UTC, datetime

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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_refuses_the_attempt_after_the_limit_until_the_window_passes() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_attempts=3, window_seconds=60, clock=clock)

    allowed = [throttle.begin("e") for _ in range(3)]
    clock.now += 10
    refused = throttle.begin("e")
    clock.now += 50  # the first attempt is now a full window old
    after_window = throttle.begin("e")

    assert allowed == [None, None, None]
    assert refused == 50
    assert after_window is None


def test_throttle_counts_each_email_apart_and_forgets_after_a_success() -> None:
    throttle = LoginThrottle(max_attempts=2, window_seconds=60, clock=Clock())
    for _ in range(2):
        throttle.begin("a")

    assert throttle.begin("a") is not None
    assert throttle.begin("b") is None
    throttle.succeeded("a")
    assert throttle.begin("a") is None


def test_throttle_remembers_a_bounded_number_of_emails() -> None:
    throttle = LoginThrottle(max_attempts=1, window_seconds=60, max_tracked=2, clock=Clock())
    throttle.begin("first")
    throttle.begin("second")
    throttle.begin("third")  # pushes out the least recently tried

    assert throttle.begin("first") is None
    assert throttle.begin("third") is not None
