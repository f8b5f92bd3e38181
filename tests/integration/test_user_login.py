"""Logging in on the real broker and PostgreSQL: tokens, the JWKS, refusals, throttling."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

import user_svc.app
from bus.amqp import AmqpBroker
from bus.auth import SigningKey, TokenVerifier
from tests.integration.conftest import ServiceStarter
from tests.integration.test_user_support import (
    ADMIN_PASSWORD,
    ADMIN_SETTINGS,
    EventLog,
    UserHttp,
)
from tests.support import AUDIENCE, ISSUER
from user_svc import store
from user_svc.api import THROTTLE
from user_svc.handlers import forget_expired_login_attempts

pytestmark = pytest.mark.integration


async def test_a_login_token_opens_auth_me_and_verifies_with_the_published_jwks(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app)
    async with UserHttp(service.settings.public_url) as users:
        account = await users.register("Gina", "gina@example.com", "password-1")
        login = await users.call(
            "POST", "/auth/login", json={"email": "GINA@example.com", "password": "password-1"}
        )
        me = await users.call("GET", "/auth/me", token=login.body["access_token"])
        jwks = await users.call("GET", "/.well-known/jwks.json")

    assert login.status == 200
    assert login.body["token_type"] == "bearer"
    assert login.body["expires_in"] == 3600
    assert me.status == 200
    assert me.body == account
    # what any other service does: verify with nothing but the published key set
    verifier = TokenVerifier.from_jwks(jwks.body, issuer=ISSUER, audience=AUDIENCE)
    caller = await verifier.verify(login.body["access_token"])
    assert (caller.user_id, caller.role, caller.email) == (account["id"], "user", account["email"])


async def test_wrong_password_and_unknown_email_get_the_same_401(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app)
    async with UserHttp(service.settings.public_url) as users:
        await users.register("Hank", "hank@example.com", "password-1")
        wrong_password = await users.call(
            "POST", "/auth/login", json={"email": "hank@example.com", "password": "password-2"}
        )
        unknown_email = await users.call(
            "POST", "/auth/login", json={"email": "nobody@example.com", "password": "password-1"}
        )

    assert wrong_password.status == unknown_email.status == 401
    assert wrong_password.body == unknown_email.body
    assert wrong_password.body["detail"] == "invalid email or password"


async def test_the_longest_email_still_gets_its_401_when_lower_case_makes_it_longer(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app)
    email = "İ" * 300 + "@example.com"  # 312 typed; each İ is two characters in lower case
    async with UserHttp(service.settings.public_url) as users:
        answer = await users.call(
            "POST", "/auth/login", json={"email": email, "password": "password-1"}
        )
    assert answer.status == 401
    assert answer.body["detail"] == "invalid email or password"


async def test_repeated_failures_for_an_email_are_throttled_with_429(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app)
    async with UserHttp(service.settings.public_url) as users:
        await users.register("Ivy", "ivy@example.com", "password-1")
        await users.register("Jack", "jack@example.com", "password-1")
        wrong = {"email": "ivy@example.com", "password": "guess-guess"}
        failures = [(await users.call("POST", "/auth/login", json=wrong)).status for _ in range(5)]
        throttled = await users.call(
            "POST", "/auth/login", json={"email": "IVY@example.com", "password": "password-1"}
        )
        other_email = await users.call(
            "POST", "/auth/login", json={"email": "jack@example.com", "password": "password-1"}
        )

    assert failures == [401] * 5
    assert throttled.status == 429  # even with the right password: the email is locked
    assert throttled.headers["Content-Type"].startswith("application/problem+json")
    assert 0 < int(throttled.headers["Retry-After"]) <= 300
    assert other_email.status == 200


async def test_failures_spread_over_two_instances_are_throttled_at_one_instances_limit(
    run_service: ServiceStarter,
) -> None:
    # the same module twice: two instances on one schema, as two replicas are
    one, other = await asyncio.gather(run_service(user_svc.app), run_service(user_svc.app))
    wrong = {"email": "nora@example.com", "password": "guess-guess"}
    right = {"email": "nora@example.com", "password": "password-1"}
    async with (
        UserHttp(one.settings.public_url) as on_one,
        UserHttp(other.settings.public_url) as on_other,
    ):
        await on_one.register("Nora", "nora@example.com", "password-1")
        failures = [
            (await instance.call("POST", "/auth/login", json=wrong)).status
            for instance in (on_one, on_other, on_one, on_other, on_one)
        ]
        throttled = [
            await instance.call("POST", "/auth/login", json=right)
            for instance in (on_other, on_one)
        ]

    assert failures == [401] * 5
    assert [answer.status for answer in throttled] == [429, 429]
    assert all(0 < int(answer.headers["Retry-After"]) <= 300 for answer in throttled)


async def test_parallel_failures_on_two_instances_get_past_the_limit_no_more_often_than_it_allows(
    run_service: ServiceStarter,
) -> None:
    one, other = await asyncio.gather(run_service(user_svc.app), run_service(user_svc.app))
    wrong = {"email": "omar@example.com", "password": "guess-guess"}
    async with (
        UserHttp(one.settings.public_url) as on_one,
        UserHttp(other.settings.public_url) as on_other,
    ):
        await on_one.register("Omar", "omar@example.com", "password-1")
        answers = await asyncio.gather(
            *(
                instance.call("POST", "/auth/login", json=wrong)
                for instance in [on_one, on_other] * 6
            )
        )

    statuses = sorted(answer.status for answer in answers)
    assert statuses == [401] * 5 + [429] * 7


async def test_a_throttle_outlives_a_restart_of_the_service(run_service: ServiceStarter) -> None:
    first = await run_service(user_svc.app)
    wrong = {"email": "pia@example.com", "password": "guess-guess"}
    right = {"email": "pia@example.com", "password": "password-1"}
    async with UserHttp(first.settings.public_url) as users:
        await users.register("Pia", "pia@example.com", "password-1")
        failures = [(await users.call("POST", "/auth/login", json=wrong)).status for _ in range(5)]
    await first.stop()

    second = await run_service(user_svc.app)
    async with UserHttp(second.settings.public_url) as users:
        throttled = await users.call("POST", "/auth/login", json=right)

    assert failures == [401] * 5
    assert throttled.status == 429
    assert throttled.headers["Content-Type"].startswith("application/problem+json")
    assert throttled.body["detail"] == "too many failed logins for this email; try again later"


async def test_attempts_that_have_left_the_window_are_forgotten_and_the_rest_kept(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app)
    long_ago = datetime.now(UTC) - timedelta(seconds=301)
    async with service.transactions.begin() as unit:
        for number in range(3):
            await store.add_login_attempt(unit.session, f"old-{number}@example.com", long_ago)
    async with UserHttp(service.settings.public_url) as users:
        wrong = {"email": "quinn@example.com", "password": "guess-guess"}
        failed = await users.call("POST", "/auth/login", json=wrong)

    # what the service's background loop does once a minute
    await forget_expired_login_attempts(service.transactions, service.app[THROTTLE])

    async with service.db.session() as session:
        left = (await session.execute(select(store.login_attempts.c.email))).scalars().all()
    assert failed.status == 401
    assert left == ["quinn@example.com"]


async def test_a_deactivated_user_cannot_log_in_or_use_their_token_until_activated(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app, settings=ADMIN_SETTINGS)
    async with UserHttp(service.settings.public_url) as users:
        admin = await users.login(ADMIN_SETTINGS["admin_email"], ADMIN_PASSWORD)
        kim = await users.register("Kim", "kim@example.com", "password-1")
        token = await users.login("kim@example.com", "password-1")

        deactivated = await users.call("POST", f"/users/{kim['id']}/deactivate", token=admin)
        login = await users.call(
            "POST", "/auth/login", json={"email": "kim@example.com", "password": "password-1"}
        )
        me = await users.call("GET", "/auth/me", token=token)
        activated = await users.call("POST", f"/users/{kim['id']}/activate", token=admin)
        await users.login("kim@example.com", "password-1")

    assert deactivated.status == 200
    assert deactivated.body["status"] == "inactive"
    assert login.status == 401
    assert login.body["detail"] == "invalid email or password"  # as for a wrong password
    assert me.status == 401
    assert activated.body["status"] == "active"
    assert (await events.wait_for("user.deactivated", kim["id"])).data["status"] == "inactive"
    assert (await events.wait_for("user.activated", kim["id"])).data["status"] == "active"


async def test_the_service_signs_with_the_configured_key_and_refuses_tokens_of_unknown_users(
    run_service: ServiceStarter,
) -> None:
    key = SigningKey.generate()
    settings = {"jwt_private_key": key.to_pem().decode()}
    service = await run_service(user_svc.app, settings=settings)
    stranger = key.mint(subject="no-such-user", role="admin", issuer=ISSUER, audience=AUDIENCE)
    async with UserHttp(service.settings.public_url) as users:
        jwks = await users.call("GET", "/.well-known/jwks.json")
        me = await users.call("GET", "/auth/me", token=stranger)
        listing = await users.call("GET", "/users", token=stranger)

    assert jwks.body == key.jwks()
    assert jwks.headers["Cache-Control"] == "public, max-age=300"
    assert me.status == 401  # well signed, but no such account
    assert listing.status == 401
