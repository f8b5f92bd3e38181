"""The user service's rules: who may do what to whom, what an email is, login throttling.

Pure values and functions with no I/O; the routes ask these rules and turn the answers
into HTTP statuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum, StrEnum


class Role(StrEnum):
    """What an account may do: admins manage accounts, managers may read them."""

    ADMIN = "admin"
    MANAGER = "manager"
    USER = "user"


class Status(StrEnum):
    """Only active accounts may log in or use their tokens here."""

    ACTIVE = "active"
    INACTIVE = "inactive"


@dataclass(frozen=True, slots=True)
class User:
    """An account as the service shows it; the password hash never leaves the store."""

    id: str
    name: str
    email: str
    role: Role
    status: Status
    created_at: datetime
    updated_at: datetime


# --- who may do what to whom ----------------------------------------------------------------


class Access(Enum):
    """A rule's answer. HIDDEN means answer as if the account did not exist (404), so that
    callers cannot probe which ids exist; FORBIDDEN (403) is for callers who may see it."""

    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"
    HIDDEN = "hidden"


@dataclass(frozen=True, slots=True)
class Actor:
    """The caller, with the role the database holds now (a token's role may be stale)."""

    user_id: str
    role: Role

    @property
    def is_staff(self) -> bool:
        """Admins and managers may see every account."""
        return self.role in (Role.ADMIN, Role.MANAGER)


def may_list_users(actor: Actor) -> bool:
    """Only staff may list accounts."""
    return actor.is_staff


def may_read(actor: Actor, user_id: str) -> Access:
    """Everyone may read their own account; staff may read any."""
    return Access.ALLOWED if actor.user_id == user_id or actor.is_staff else Access.HIDDEN


def may_update(actor: Actor, user_id: str, new_role: Role | None) -> Access:
    """Users change their own name and email; admins change anyone's, and roles.

    An admin may not take away their own admin role: with this rule and :func:`may_manage`,
    whoever removes an admin stays one, so the service never loses its last admin.
    """
    if may_read(actor, user_id) is Access.HIDDEN:
        return Access.HIDDEN
    is_self = actor.user_id == user_id
    if actor.role is not Role.ADMIN:
        return Access.ALLOWED if is_self and new_role is None else Access.FORBIDDEN
    if is_self and new_role not in (None, Role.ADMIN):
        return Access.FORBIDDEN
    return Access.ALLOWED


def may_manage(actor: Actor, user_id: str) -> Access:
    """Only admins delete, deactivate or activate accounts, and never their own."""
    if may_read(actor, user_id) is Access.HIDDEN:
        return Access.HIDDEN
    if actor.role is not Role.ADMIN or actor.user_id == user_id:
        return Access.FORBIDDEN
    return Access.ALLOWED


def changed_fields(user: User, wanted: Mapping[str, object]) -> list[str]:
    """Names of the fields in ``wanted`` whose value differs from ``user``'s, in field order."""
    return [
        name
        for name in ("name", "email", "role")
        if name in wanted and wanted[name] != getattr(user, name)
    ]


# --- emails and passwords -------------------------------------------------------------------

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
# The HTML standard's "valid email address", with at least one dot in the domain. ASCII
# only: internationalised addresses would need the email-validator package.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)


def normalise_email(raw: str) -> str:
    """The address trimmed and in lower case, so that uniqueness ignores case.

    Raises ValueError when it is not an email address.
    """
    email = raw.strip().lower()
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(email):
        raise ValueError("not a valid email address")
    return email


# Documented on purpose: anyone who turns on MICROSHOP_DEMO_DATA gets these logins.
DEMO_PASSWORD = "demo-password-1"
DEMO_USERS: tuple[tuple[str, str, Role], ...] = (
    ("Alice", "alice@example.com", Role.ADMIN),
    ("Bob", "bob@example.com", Role.USER),
    ("Carol", "carol@example.com", Role.MANAGER),
)


# --- login throttling -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoginThrottle:
    """Allows ``max_attempts`` unsuccessful logins per email in a sliding window.

    An attempt is counted when it starts and forgotten when it succeeds, so parallel
    guesses cannot slip past the limit while their password checks are running. This is
    the rule only: the attempts are kept in the service's database, so that every
    instance counts the same ones and a restart forgets none.
    """

    max_attempts: int = 5
    window_seconds: float = 300.0

    def window_start(self, now: datetime) -> datetime:
        """Attempts made at or before this moment no longer count."""
        return now - timedelta(seconds=self.window_seconds)

    def wait_seconds(self, attempts: Iterable[datetime], now: datetime) -> int | None:
        """None when another attempt may start now, given the email's counted attempts;
        else the whole seconds until enough of them have left the window."""
        counted = sorted(moment for moment in attempts if moment > self.window_start(now))
        if len(counted) < self.max_attempts:
            return None
        # wait until all but max_attempts - 1 have left the window (given more than
        # max_attempts, as after the limit was lowered, not just the oldest)
        must_leave = counted[len(counted) - self.max_attempts]
        remaining = (must_leave - self.window_start(now)).total_seconds()
        return max(1, math.ceil(remaining))
