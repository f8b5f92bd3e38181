"""Self-registration on the real broker and PostgreSQL: answers, refusals and user.created."""

from __future__ import annotations

import json

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

import user_svc.app
from bus.amqp import AmqpBroker
from tests.integration.conftest import ServiceStarter
from tests.integration.test_user_support import EventLog, UserHttp
from user_svc import store

pytestmark = pytest.mark.integration


async def test_registering_answers_201_and_announces_user_created_without_the_password(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app)
    async with UserHttp(service.settings.public_url) as users:
        answer = await users.call(
            "POST",
            "/users",
            json={
                "name": "Dana",
                "email": f"  Dana.{unique}@Example.COM ",
                "password": "s3cret-pw",
            },
        )

    assert answer.status == 201
    account = answer.body
    assert answer.headers["Location"] == f"/users/{account['id']}"
    assert account["email"] == f"dana.{unique}@example.com"
    assert (account["name"], account["role"], account["status"]) == ("Dana", "user", "active")
    assert set(account) == {"id", "name", "email", "role", "status", "created_at", "updated_at"}
    created = await events.wait_for("user.created", account["id"])
    assert created.data == {
        "user_id": account["id"],
        "email": account["email"],
        "role": "user",
        "name": "Dana",
        "status": "active",
    }
    assert "s3cret-pw" not in created.to_json().decode()


async def test_the_password_is_stored_only_as_an_argon2id_hash(
    run_service: ServiceStarter, unique: str
) -> None:
    password = f"s3cret-{unique}"
    service = await run_service(user_svc.app)
    async with UserHttp(service.settings.public_url) as users:
        account = await users.register("Gina", f"gina.{unique}@example.com", password)

    async with service.db.session() as session:
        query = select(store.users).where(store.users.c.id == account["id"])
        row = (await session.execute(query)).one()

    stored = row._mapping
    assert stored["password_hash"].startswith("$argon2id$")
    assert PasswordHasher().verify(stored["password_hash"], password)
    assert not [column for column, value in stored.items() if password in str(value)]


async def test_an_email_registers_once_whatever_its_case(run_service: ServiceStarter) -> None:
    service = await run_service(user_svc.app)
    async with UserHttp(service.settings.public_url) as users:
        await users.register("Eve", "eve@example.com", "password-1")
        again = await users.call(
            "POST",
            "/users",
            json={"name": "Eve 2", "email": "EVE@Example.com", "password": "password-2"},
        )
        second = await users.call(
            "POST", "/auth/login", json={"email": "eve@example.com", "password": "password-2"}
        )

    assert again.status == 409
    assert again.headers["Content-Type"].startswith("application/problem+json")
    assert again.body["detail"] == "an account with this email already exists"
    assert second.status == 401  # the second password was never stored


async def test_a_role_in_the_registration_body_is_refused(run_service: ServiceStarter) -> None:
    service = await run_service(user_svc.app)
    body = {"name": "Mallory", "email": "mallory@example.com", "password": "password-1"}
    async with UserHttp(service.settings.public_url) as users:
        refused = await users.call("POST", "/users", json={**body, "role": "admin"})
        registered = await users.call("POST", "/users", json=body)

    assert refused.status == 422
    assert refused.body["errors"][0]["loc"] == "role"
    assert registered.status == 201  # nothing was created by the refused request
    assert registered.body["role"] == "user"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "not-an-email"),
        ("email", "two@@example.com"),
        ("email", "nodomain@localhost"),
        ("password", "short-7"),
        ("name", "   "),
    ],
)
async def test_invalid_registrations_are_422_and_never_echo_the_password(
    run_service: ServiceStarter, field: str, value: str
) -> None:
    service = await run_service(user_svc.app)
    body = {"name": "Frank", "email": "frank@example.com", "password": "password-1", field: value}
    async with UserHttp(service.settings.public_url) as users:
        answer = await users.call("POST", "/users", json=body)

    assert answer.status == 422
    assert answer.body["errors"][0]["loc"] == field
    assert body["password"] not in json.dumps(answer.body)


async def test_a_value_the_database_cannot_store_is_422_not_500(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app)
    body = {"name": "Fr\u0000ank", "email": "frank@example.com", "password": "password-1"}
    async with UserHttp(service.settings.public_url) as users:
        answer = await users.call("POST", "/users", json=body)
        again = await users.call("POST", "/users", json=body | {"name": "Frank"})

    assert answer.status == 422
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert "cannot be stored" in answer.body["detail"]
    assert again.status == 201  # nothing of the refused one was kept
