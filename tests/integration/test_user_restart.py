"""The signing key and the accounts outlive a restart, and every instance signs with one key."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

import user_svc.app
from bus.auth import SigningKey, TokenVerifier
from bus.db import Database
from tests.integration.conftest import ServiceStarter
from tests.integration.test_user_support import UserHttp
from tests.support import AUDIENCE, ISSUER
from user_svc import store

pytestmark = pytest.mark.integration


async def test_a_restart_keeps_the_users_and_the_signing_key(run_service: ServiceStarter) -> None:
    first = await run_service(user_svc.app)
    async with UserHttp(first.settings.public_url) as users:
        account = await users.register("Liam", "liam@example.com", "password-1")
        token = await users.login("liam@example.com", "password-1")
        jwks_before = (await users.call("GET", "/.well-known/jwks.json")).body
    await first.stop()

    second = await run_service(user_svc.app)
    async with UserHttp(second.settings.public_url) as users:
        me = await users.call("GET", "/auth/me", token=token)
        jwks_after = (await users.call("GET", "/.well-known/jwks.json")).body
        await users.login("liam@example.com", "password-1")

    assert me.status == 200  # minted before the restart, verified after it
    assert me.body == account
    assert jwks_after == jwks_before


async def test_two_instances_starting_at_once_sign_with_one_stored_key(
    run_service: ServiceStarter,
) -> None:
    # the same module twice: two instances on one schema, racing to create it and the key
    one, other = await asyncio.gather(run_service(user_svc.app), run_service(user_svc.app))
    async with UserHttp(one.settings.public_url) as users:
        await users.register("Mia", "mia@example.com", "password-1")
        token = await users.login("mia@example.com", "password-1")
    async with UserHttp(other.settings.public_url) as users:
        me = await users.call("GET", "/auth/me", token=token)
        jwks = (await users.call("GET", "/.well-known/jwks.json")).body

    assert me.status == 200
    verifier = TokenVerifier.from_jwks(jwks, issuer=ISSUER, audience=AUDIENCE)
    assert (await verifier.verify(token)).email == "mia@example.com"


async def test_when_instances_race_to_store_a_key_one_key_wins(
    database_url: str, unique: str
) -> None:
    db = Database(database_url, schema=unique, metadata=[store.metadata])
    await db.create_all()
    candidates = [SigningKey.generate().to_pem().decode() for _ in range(4)]

    async def store_first(candidate: str) -> str:
        session: AsyncConnection
        async with db.session() as session, session.begin():
            return await store.first_signing_key(session, candidate)

    try:
        winners = await asyncio.gather(*(store_first(candidate) for candidate in candidates))
        later = await store_first(SigningKey.generate().to_pem().decode())
    finally:
        await db.drop_schema()
        await db.close()

    assert len(set(winners)) == 1
    assert winners[0] in candidates
    assert later == winners[0]
