"""The user service's published language: the events it tells the rest of the shop.

Every event carries the account as it stands after the change, so a consumer (the order
service keeps a replica of users) can upsert from any one of them without asking back.
Role and status are plain strings rather than enums, so a role added later does not
break consumers that were built before it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from bus.envelope import Event


class UserEvent(Event):
    """What every user event says about the account."""

    user_id: str
    email: str = Field(description="lower-case, as stored")
    role: str = Field(description="admin, manager or user")
    name: str
    status: str = Field(description="active or inactive")


class UserCreated(UserEvent):
    """An account was registered, bootstrapped from settings, or loaded as demo data."""

    type: ClassVar[str] = "user.created"


class UserUpdated(UserEvent):
    """An account's name, email or role changed; ``changed`` names which."""

    type: ClassVar[str] = "user.updated"

    changed: list[str]


class UserDeleted(UserEvent):
    """An account was deleted; the fields are its last state."""

    type: ClassVar[str] = "user.deleted"


class UserActivated(UserEvent):
    """An inactive account may log in again."""

    type: ClassVar[str] = "user.activated"


class UserDeactivated(UserEvent):
    """An account may no longer log in, and its tokens are refused by this service."""

    type: ClassVar[str] = "user.deactivated"


USER_EVENTS: tuple[type[UserEvent], ...] = (
    UserCreated,
    UserUpdated,
    UserDeleted,
    UserActivated,
    UserDeactivated,
)
