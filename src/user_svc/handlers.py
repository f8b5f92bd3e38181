"""The steps that change accounts, and the credentials they rest on.

The user service consumes no commands, so ``HANDLERS`` is empty. Its routes and its
start-up work call the steps below instead: each changes the users table and publishes
its event through ``unit.publish``, so the change and the event commit together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bus.auth import SigningKey, TokenVerifier
from bus.inbox import UnitHandler
from bus.transactions import Transactions, UnitOfWork
from user_svc import store
from user_svc.domain import LoginThrottle, Role, Status, User
from user_svc.messages import (
    UserActivated,
    UserCreated,
    UserDeactivated,
    UserDeleted,
    UserUpdated,
)

log = structlog.get_logger(__name__)

_hasher = PasswordHasher()


# --- credentials ----------------------------------------------------------------------------


async def hash_password(password: str) -> str:
    """An argon2id hash of ``password``, computed off the event loop (it takes ~0.1 s)."""
    return await asyncio.to_thread(_hasher.hash, password)


@cache
def _dummy_hash() -> str:
    return _hasher.hash(uuid.uuid4().hex)


async def prepare_password_checks() -> None:
    """Make the throwaway hash now, so the first login for an unknown email is not slower."""
    await asyncio.to_thread(_dummy_hash)


def _verify(password_hash: str | None, password: str) -> bool:
    # An unknown email is checked against a throwaway hash, so that it takes as long as a
    # known one and the timing does not tell which emails have accounts.
    try:
        matches = _hasher.verify(password_hash or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False
    return matches and password_hash is not None


async def authenticate(transactions: Transactions, email: str, password: str) -> User | None:
    """The active account that ``email`` and ``password`` open, else None.

    Takes as long for an unknown email as for a known one. A hash made with weaker
    parameters than today's is replaced while the password is at hand.
    """
    async with transactions.db.session() as session:
        user, password_hash = await store.find_credentials(session, email) or (None, None)
    verified = await asyncio.to_thread(_verify, password_hash, password)
    if not verified or user is None or password_hash is None or user.status is not Status.ACTIVE:
        log.info("login refused", user_id=user.id if user else None, password_matched=verified)
        return None
    if _hasher.check_needs_rehash(password_hash):
        new_hash = await hash_password(password)
        async with transactions.begin() as unit:
            await store.set_password_hash(unit.session, user.id, new_hash)
    log.info("user logged in", user_id=user.id)
    return user


async def begin_login_attempt(
    transactions: Transactions, throttle: LoginThrottle, email: str
) -> int | None:
    """Count a login attempt for ``email``; or, when ``throttle`` is full, the seconds to wait.

    The count is in the database and taken under a lock on the email, so every instance
    keeps to one limit, also when attempts arrive at several at once, and a restart
    forgets nothing.
    """
    now = datetime.now(UTC)
    async with transactions.begin() as unit:
        await store.lock_login_attempts(unit.session, email)
        counted = await store.login_attempt_times(
            unit.session, email, after=throttle.window_start(now), limit=throttle.max_attempts
        )
        wait = throttle.wait_seconds(counted, now)
        if wait is None:
            await store.add_login_attempt(unit.session, email, now)
    return wait


async def forget_expired_login_attempts(
    transactions: Transactions, throttle: LoginThrottle
) -> None:
    """Delete the attempts that have left ``throttle``'s window: they count no more."""
    async with transactions.begin() as unit:
        until = throttle.window_start(datetime.now(UTC))
        await store.prune_login_attempts(unit.session, until=until)


async def forget_login_attempts(transactions: Transactions, email: str) -> None:
    """Stop counting ``email``'s attempts: the right password was given."""
    async with transactions.begin() as unit:
        await store.forget_login_attempts(unit.session, email)


@dataclasses.dataclass(frozen=True, slots=True)
class TokenIssuer:
    """Mints this service's bearer tokens, and verifies them."""

    key: SigningKey
    issuer: str
    audience: str
    ttl_seconds: int

    def mint(self, user: User) -> str:
        """A token saying who ``user`` is and what role they have, for ``ttl_seconds``."""
        return self.key.mint(
            subject=user.id,
            role=user.role.value,
            email=user.email,
            issuer=self.issuer,
            audience=self.audience,
            ttl=self.ttl_seconds,
        )

    def verifier(self) -> TokenVerifier:
        """A verifier for the tokens this issuer mints."""
        return TokenVerifier.from_jwks(self.key.jwks(), issuer=self.issuer, audience=self.audience)


# --- account changes ------------------------------------------------------------------------


def _facts(user: User) -> dict[str, Any]:
    return {
        "user_id": user.id,
        "email": user.email,
        "role": user.role.value,
        "name": user.name,
        "status": user.status.value,
    }


async def create_user(
    unit: UnitOfWork, *, name: str, email: str, role: Role, password_hash: str
) -> User:
    """Add an active account and publish ``user.created``; IntegrityError if the email is taken."""
    now = datetime.now(UTC)
    user = User(uuid.uuid4().hex, name, email, role, Status.ACTIVE, now, now)
    await store.add_user(unit.session, user, password_hash)
    unit.publish(UserCreated(**_facts(user)))
    log.info("user created", user_id=user.id, role=user.role.value)
    return user


async def update_user(unit: UnitOfWork, user: User, changed: dict[str, Any]) -> User:
    """Apply ``changed`` (name, email, role) and publish ``user.updated`` naming them."""
    if not changed:
        return user
    updated = dataclasses.replace(user, **changed, updated_at=datetime.now(UTC))
    await store.save_user(unit.session, updated)
    unit.publish(UserUpdated(**_facts(updated), changed=list(changed)))
    log.info("user updated", user_id=user.id, changed=list(changed))
    return updated


async def set_status(unit: UnitOfWork, user: User, status: Status) -> User:
    """Activate or deactivate ``user``; a no-op, with no event, when already so."""
    if user.status is status:
        return user
    updated = dataclasses.replace(user, status=status, updated_at=datetime.now(UTC))
    await store.save_user(unit.session, updated)
    event = UserActivated if status is Status.ACTIVE else UserDeactivated
    unit.publish(event(**_facts(updated)))
    log.info("user status changed", user_id=user.id, status=status.value)
    return updated


async def delete_user(unit: UnitOfWork, user: User) -> None:
    """Delete ``user`` and publish ``user.deleted`` with their last state."""
    await store.delete_user(unit.session, user.id)
    unit.publish(UserDeleted(**_facts(user)))
    log.info("user deleted", user_id=user.id)


HANDLERS: dict[str, UnitHandler] = {}
