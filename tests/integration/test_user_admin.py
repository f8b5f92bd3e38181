"""Accounts and roles on the real broker and PostgreSQL: bootstrap, demo data, who may do what."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text

import user_svc.app
from bus.amqp import AmqpBroker
from tests.integration.conftest import ServiceStarter
from tests.integration.test_user_support import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    ADMIN_SETTINGS,
    EventLog,
    UserHttp,
)
from tests.support import eventually
from user_svc import store
from user_svc.domain import DEMO_PASSWORD

pytestmark = pytest.mark.integration
WAITING_FOR_LOCKS = text("SELECT count(*) FROM pg_locks WHERE NOT granted")
DEMO = {"demo_data": True}


@contextlib.asynccontextmanager
async def alice_and_bob(run_service: ServiceStarter) -> AsyncIterator[tuple[UserHttp, str, str]]:
    """The demo user service: a client, Alice's (admin) token, and Bob's id."""
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        alice = await users.login("alice@example.com", DEMO_PASSWORD)
        _, bob_id = await users.sign_in("bob@example.com", DEMO_PASSWORD)
        yield users, alice, bob_id


async def test_the_first_admin_is_created_from_settings_once_and_announced(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app, settings=ADMIN_SETTINGS)
    async with UserHttp(service.settings.public_url) as users:
        me = await users.call(
            "GET", "/auth/me", token=await users.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        )
    await service.stop()
    again = await run_service(user_svc.app, settings=ADMIN_SETTINGS)
    async with UserHttp(again.settings.public_url) as users:
        token = await users.login(ADMIN_EMAIL.lower(), ADMIN_PASSWORD)
        listing = await users.call("GET", "/users", token=token)

    assert me.body["email"] == ADMIN_EMAIL.lower()
    assert me.body["role"] == "admin"
    created = await events.wait_for("user.created", me.body["id"])
    assert created.data["role"] == "admin"
    assert created.source == "/microshop/user"
    assert listing.body["total"] == 1  # the restart found its admin and made no other


async def test_demo_data_loads_alice_bob_and_carol_once_and_announces_them(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        roles = {}
        for email in ("alice@example.com", "bob@example.com", "carol@example.com"):
            token = await users.login(email, DEMO_PASSWORD)
            me = (await users.call("GET", "/auth/me", token=token)).body
            roles[me["name"]] = me["role"]
            await events.wait_for("user.created", me["id"])
    await service.stop()
    again = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(again.settings.public_url) as users:
        token = await users.login("alice@example.com", DEMO_PASSWORD)
        listing = await users.call("GET", "/users", token=token)

    assert roles == {"Alice": "admin", "Bob": "user", "Carol": "manager"}
    assert listing.body["total"] == 3


async def test_users_cannot_list_users_but_managers_can(run_service: ServiceStarter) -> None:
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        bob = await users.login("bob@example.com", DEMO_PASSWORD)
        carol = await users.login("carol@example.com", DEMO_PASSWORD)
        by_bob = await users.call("GET", "/users", token=bob)
        by_carol = await users.call("GET", "/users?limit=2", token=carol)
        inactive = await users.call("GET", "/users?status=inactive", token=carol)
        bad_status = await users.call("GET", "/users?status=asleep", token=carol)
        anonymous = await users.call("GET", "/users")

    assert by_bob.status == 403
    assert by_carol.status == 200
    assert [user["name"] for user in by_carol.body["items"]] == ["Alice", "Bob"]
    assert (by_carol.body["total"], by_carol.body["limit"], by_carol.body["offset"]) == (3, 2, 0)
    assert (inactive.body["items"], inactive.body["total"]) == ([], 0)
    assert bad_status.status == 422
    assert anonymous.status == 401


async def test_users_read_and_update_themselves_but_not_others(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        bob, bob_id = await users.sign_in("bob@example.com", DEMO_PASSWORD)
        carol, carol_id = await users.sign_in("carol@example.com", DEMO_PASSWORD)

        renamed = await users.call("PUT", f"/users/{bob_id}", token=bob, json={"name": "Robert"})
        promoted = await users.call("PUT", f"/users/{bob_id}", token=bob, json={"role": "admin"})
        bob_reads_carol = await users.call("GET", f"/users/{carol_id}", token=bob)
        bob_edits_carol = await users.call(
            "PUT", f"/users/{carol_id}", token=bob, json={"name": "x"}
        )
        carol_reads_bob = await users.call("GET", f"/users/{bob_id}", token=carol)
        carol_edits_bob = await users.call(
            "PUT", f"/users/{bob_id}", token=carol, json={"name": "x"}
        )
        unknown = await users.call("GET", "/users/no-such-id", token=carol)

    assert (renamed.status, renamed.body["name"]) == (200, "Robert")
    assert promoted.status == 403  # only admins change roles
    assert bob_reads_carol.status == bob_edits_carol.status == 404  # as if she did not exist
    assert bob_reads_carol.body["detail"] == unknown.body["detail"].replace("no-such-id", carol_id)
    assert (carol_reads_bob.status, carol_reads_bob.body["name"]) == (200, "Robert")
    assert carol_edits_bob.status == 403  # managers read everyone, but edit only themselves
    updated = await events.wait_for("user.updated", bob_id)
    assert (updated.data["changed"], updated.data["name"]) == (["name"], "Robert")
    assert len(events.about(bob_id, "user.updated")) == 1  # the refused requests changed nothing


async def test_an_admin_changes_a_role_and_user_updated_names_only_the_role(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        alice, alice_id = await users.sign_in("alice@example.com", DEMO_PASSWORD)
        bob, bob_id = await users.sign_in("bob@example.com", DEMO_PASSWORD)

        changed = await users.call(
            "PUT", f"/users/{bob_id}", token=alice, json={"name": "Bob", "role": "manager"}
        )
        listing_with_old_token = await users.call("GET", "/users", token=bob)
        new_token = await users.login("bob@example.com", DEMO_PASSWORD)
        listing_with_new_token = await users.call("GET", "/users", token=new_token)
        self_demotion = await users.call(
            "PUT", f"/users/{alice_id}", token=alice, json={"role": "user"}
        )
        taken = await users.call(
            "PUT", f"/users/{bob_id}", token=alice, json={"email": "CAROL@example.com"}
        )

    assert (changed.status, changed.body["role"]) == (200, "manager")
    updated = await events.wait_for("user.updated", bob_id)
    assert updated.data["changed"] == ["role"]  # the unchanged name is not listed
    assert updated.data["role"] == "manager"
    assert listing_with_old_token.status == 403  # the token still says "user"
    assert listing_with_new_token.status == 200
    assert self_demotion.status == 403  # an admin cannot drop their own admin role
    assert taken.status == 409


async def test_a_demoted_admin_loses_admin_rights_before_their_token_expires(
    run_service: ServiceStarter,
) -> None:
    async with alice_and_bob(run_service) as (users, alice, bob_id):
        await users.call("PUT", f"/users/{bob_id}", token=alice, json={"role": "admin"})
        bob_as_admin = await users.login("bob@example.com", DEMO_PASSWORD)
        listed_as_admin = await users.call("GET", "/users", token=bob_as_admin)
        await users.call("PUT", f"/users/{bob_id}", token=alice, json={"role": "user"})
        listed_after_demotion = await users.call("GET", "/users", token=bob_as_admin)

    assert listed_as_admin.status == 200
    assert listed_after_demotion.status == 403  # the token still says admin; the account not


async def test_an_admin_deletes_a_user_with_204_and_user_deleted(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        alice, alice_id = await users.sign_in("alice@example.com", DEMO_PASSWORD)
        bob, bob_id = await users.sign_in("bob@example.com", DEMO_PASSWORD)
        carol = await users.login("carol@example.com", DEMO_PASSWORD)

        by_manager = await users.call("DELETE", f"/users/{bob_id}", token=carol)
        deleted = await users.call("DELETE", f"/users/{bob_id}", token=alice)
        read_after = await users.call("GET", f"/users/{bob_id}", token=alice)
        deleted_again = await users.call("DELETE", f"/users/{bob_id}", token=alice)
        bobs_token = await users.call("GET", "/auth/me", token=bob)
        bobs_login = await users.call(
            "POST", "/auth/login", json={"email": "bob@example.com", "password": DEMO_PASSWORD}
        )
        self_delete = await users.call("DELETE", f"/users/{alice_id}", token=alice)

    assert by_manager.status == 403
    assert deleted.status == 204
    assert read_after.status == deleted_again.status == 404
    assert bobs_token.status == bobs_login.status == 401
    assert self_delete.status == 403
    gone = await events.wait_for("user.deleted", bob_id)
    assert (gone.data["email"], gone.data["role"]) == ("bob@example.com", "user")
    assert len(events.about(bob_id, "user.deleted")) == 1


async def test_a_deactivated_user_is_listed_as_inactive_and_no_longer_as_active(
    run_service: ServiceStarter,
) -> None:
    async with alice_and_bob(run_service) as (users, alice, bob_id):
        deactivated = await users.call("POST", f"/users/{bob_id}/deactivate", token=alice)
        inactive = await users.call("GET", "/users?status=inactive", token=alice)
        active = await users.call("GET", "/users?status=active", token=alice)

    assert (deactivated.status, deactivated.body["status"]) == (200, "inactive")
    assert [(u["id"], u["status"]) for u in inactive.body["items"]] == [(bob_id, "inactive")]
    assert inactive.body["total"] == 1
    assert [u["name"] for u in active.body["items"]] == ["Alice", "Carol"]
    assert active.body["total"] == 2


async def test_a_manager_can_neither_activate_nor_deactivate_a_user(
    run_service: ServiceStarter,
) -> None:
    async with alice_and_bob(run_service) as (users, alice, bob_id):
        carol = await users.login("carol@example.com", DEMO_PASSWORD)
        await users.call("POST", f"/users/{bob_id}/deactivate", token=alice)

        refused = [
            await users.call("POST", f"/users/{bob_id}/{action}", token=carol)
            for action in ("activate", "deactivate")
        ]
        after = await users.call("GET", f"/users/{bob_id}", token=alice)

    for answer in refused:
        assert answer.status == 403
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert answer.body["detail"] == "requires one of the roles: admin"
    assert after.body["status"] == "inactive"  # the refused activation changed nothing


async def test_an_admin_changes_another_users_email_and_user_updated_says_so(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    new_email = f"robert.{unique}@example.com"
    async with alice_and_bob(run_service) as (users, alice, bob_id):
        changed = await users.call(
            "PUT", f"/users/{bob_id}", token=alice, json={"email": new_email.upper()}
        )
        old_login = await users.call(
            "POST", "/auth/login", json={"email": "bob@example.com", "password": DEMO_PASSWORD}
        )
        await users.login(new_email, DEMO_PASSWORD)

    assert (changed.status, changed.body["email"]) == (200, new_email)
    assert old_login.status == 401
    updated = await events.wait_for("user.updated", bob_id)
    assert (updated.data["changed"], updated.data["email"]) == (["email"], new_email)
    assert (updated.data["name"], updated.data["role"]) == ("Bob", "user")


async def test_two_admins_demoting_each_other_at_once_leave_one_admin(
    run_service: ServiceStarter,
) -> None:
    service = await run_service(user_svc.app, settings=DEMO)
    async with UserHttp(service.settings.public_url) as users:
        alice, alice_id = await users.sign_in("alice@example.com", DEMO_PASSWORD)
        _, bob_id = await users.sign_in("bob@example.com", DEMO_PASSWORD)
        await users.call("PUT", f"/users/{bob_id}", token=alice, json={"role": "admin"})
        bob = await users.login("bob@example.com", DEMO_PASSWORD)

        # a slow transaction holds both rows while both requests come in
        async with service.db.session() as held, held.begin():
            both = store.users.c.id.in_([alice_id, bob_id])
            await held.execute(select(store.users.c.id).where(both).with_for_update())
            alice_demotes_bob = asyncio.create_task(
                users.call("PUT", f"/users/{bob_id}", token=alice, json={"role": "user"})
            )
            bob_demotes_alice = asyncio.create_task(
                users.call("PUT", f"/users/{alice_id}", token=bob, json={"role": "user"})
            )

            async def both_wait() -> bool:  # each has read what it could, and waits on a row
                async with service.db.session() as session:
                    waiting = await session.scalar(WAITING_FOR_LOCKS)
                return (waiting or 0) >= 2

            await eventually(both_wait)
        answers = await asyncio.gather(alice_demotes_bob, bob_demotes_alice)
        roles = [
            (await users.call("GET", f"/users/{user_id}", token=token)).body.get("role")
            for user_id, token in ((alice_id, alice), (bob_id, bob))
        ]

    # the second finds it is no admin any more: the other account is hidden from it
    assert sorted(answer.status for answer in answers) == [200, 404]
    assert sorted(str(role) for role in roles) == ["admin", "user"]
