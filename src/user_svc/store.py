"""The user service's tables and the queries on them.

Emails are stored normalised (lower case) under a unique constraint, which is what makes
duplicate registrations fail, also when two arrive at once. Login attempts are stored
too, so that every instance throttles the same ones and a restart keeps them.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.db import advisory_xact_lock
from bus.prepared import insert_or_skip
from user_svc.domain import Role, Status, User

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("email", String(254), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("role IN ('admin', 'manager', 'user')", name="users_role_known"),
    CheckConstraint("status IN ('active', 'inactive')", name="users_status_known"),
)

# One row: the Ed25519 key every instance signs with, when none is given in the settings.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("private_key_pem", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# One row per login attempt that counts against an email's limit: the email as typed at
# login (trimmed, lower case) and when the attempt started; nothing else.
login_attempts = Table(
    "login_attempts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    # up to 320 characters are typed; lower-casing may lengthen some ("İ" becomes two)
    Column("email", String(1000), nullable=False),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
    Index("login_attempts_by_email", "email", "attempted_at"),
    Index("login_attempts_by_age", "attempted_at"),
)

_USER_COLUMNS = [column for column in users.c if column.name != "password_hash"]


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone-aware columns
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _user(row: Any) -> User:
    return User(
        id=row.id,
        name=row.name,
        email=row.email,
        role=Role(row.role),
        status=Status(row.status),
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
    )


async def add_user(session: AsyncConnection, user: User, password_hash: str) -> None:
    """Insert ``user``; an IntegrityError when its email is taken."""
    await session.execute(
        insert(users).values(
            id=user.id,
            name=user.name,
            email=user.email,
            password_hash=password_hash,
            role=user.role.value,
            status=user.status.value,
            created_at=user.created_at,
            updated_at=user.updated_at,
        )
    )


async def get_user(session: AsyncConnection, user_id: str) -> User | None:
    """The user with ``user_id``."""
    query = select(*_USER_COLUMNS).where(users.c.id == user_id)
    row = (await session.execute(query)).one_or_none()
    return _user(row) if row is not None else None


async def lock_users(session: AsyncConnection, user_ids: Collection[str]) -> dict[str, User]:
    """The users with these ids, by id, each row locked until the transaction ends. Rows
    are locked in id order, so two transactions locking the same pair take turns rather
    than deadlock."""
    query = (
        select(*_USER_COLUMNS)
        .where(users.c.id.in_(set(user_ids)))
        .order_by(users.c.id)
        .with_for_update()
    )
    return {row.id: _user(row) for row in await session.execute(query)}


async def find_credentials(session: AsyncConnection, email: str) -> tuple[User, str] | None:
    """The user with this (normalised) email and their password hash, for logging in."""
    query = select(*_USER_COLUMNS, users.c.password_hash).where(users.c.email == email)
    row = (await session.execute(query)).one_or_none()
    return (_user(row), row.password_hash) if row is not None else None


async def list_users(
    session: AsyncConnection, *, status: Status | None, limit: int, offset: int
) -> tuple[list[User], int]:
    """One page of users, oldest first, and how many there are in all."""
    condition = users.c.status == status.value if status is not None else None
    query = select(*_USER_COLUMNS).order_by(users.c.created_at, users.c.id)
    counting = select(func.count()).select_from(users)
    if condition is not None:
        query, counting = query.where(condition), counting.where(condition)
    rows = (await session.execute(query.limit(limit).offset(offset))).all()
    total = await session.scalar(counting)
    return [_user(row) for row in rows], int(total or 0)


async def save_user(session: AsyncConnection, user: User) -> None:
    """Write the account's fields (not its password); an IntegrityError on a taken email."""
    await session.execute(
        update(users)
        .where(users.c.id == user.id)
        .values(
            name=user.name,
            email=user.email,
            role=user.role.value,
            status=user.status.value,
            updated_at=user.updated_at,
        )
    )


async def set_password_hash(session: AsyncConnection, user_id: str, password_hash: str) -> None:
    """Replace a user's password hash (after a rehash with stronger parameters)."""
    await session.execute(
        update(users).where(users.c.id == user_id).values(password_hash=password_hash)
    )


async def delete_user(session: AsyncConnection, user_id: str) -> None:
    """Delete the user's row."""
    await session.execute(delete(users).where(users.c.id == user_id))


async def admin_exists(session: AsyncConnection) -> bool:
    """True when some account has the admin role."""
    query = select(users.c.id).where(users.c.role == Role.ADMIN.value).limit(1)
    return (await session.scalar(query)) is not None


async def has_users(session: AsyncConnection) -> bool:
    """True when the users table holds any account."""
    return (await session.scalar(select(users.c.id).limit(1))) is not None


async def first_signing_key(session: AsyncConnection, candidate_pem: str) -> str:
    """The stored signing key's PEM; stores ``candidate_pem`` first when there is none.

    Insert-if-absent, then read back: when instances start together, one insert wins
    and every instance reads that one.
    """
    row = {"name": "current", "private_key_pem": candidate_pem, "created_at": datetime.now(UTC)}
    await insert_or_skip(signing_keys).run(session, row)
    query = select(signing_keys.c.private_key_pem).where(signing_keys.c.name == "current")
    return str(await session.scalar(query))


async def lock_login_attempts(session: AsyncConnection, email: str) -> None:
    """Make other transactions wait to count ``email``'s attempts until this one ends, so
    that two instances cannot both see room for one more attempt and both add it."""
    await advisory_xact_lock(session, f"login_attempts:{email}")


async def login_attempt_times(
    session: AsyncConnection, email: str, *, after: datetime, limit: int
) -> list[datetime]:
    """When ``email``'s latest ``limit`` attempts made after ``after`` started."""
    query = (
        select(login_attempts.c.attempted_at)
        .where(login_attempts.c.email == email, login_attempts.c.attempted_at > after)
        .order_by(login_attempts.c.attempted_at.desc())
        .limit(limit)
    )
    return [_utc(moment) for moment in (await session.scalars(query))]


async def add_login_attempt(session: AsyncConnection, email: str, at: datetime) -> None:
    """Count a login attempt for ``email`` that started ``at``."""
    await session.execute(insert(login_attempts).values(email=email, attempted_at=at))


async def forget_login_attempts(session: AsyncConnection, email: str) -> None:
    """Delete every login attempt counted for ``email``."""
    await session.execute(delete(login_attempts).where(login_attempts.c.email == email))


async def prune_login_attempts(session: AsyncConnection, *, until: datetime) -> None:
    """Delete the attempts made at or before ``until``, which count no more."""
    await session.execute(delete(login_attempts).where(login_attempts.c.attempted_at <= until))
