"""The shapes that cross HTTP: the bodies the user service accepts and the answers it gives.

Bodies refuse unknown fields where a silently ignored one would surprise the caller (a
``role`` in a registration), and no answer has a place for a password.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from user_svc.domain import MIN_PASSWORD_LENGTH, Role, Status, User, normalise_email

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
EmailAddress = Annotated[
    str,
    Field(max_length=320, json_schema_extra={"format": "email"}),
    AfterValidator(normalise_email),
]
# The cap keeps a megabyte "password" from costing a megabyte of argon2 work.
Password = Annotated[str, Field(min_length=MIN_PASSWORD_LENGTH, max_length=1024)]


class Registration(BaseModel):
    """A new account; its role is always ``user``, so a ``role`` field is refused."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    email: EmailAddress
    password: Password


class UserChanges(BaseModel):
    """Fields to change; only admins may send ``role``."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    email: EmailAddress | None = None
    role: Role | None = None


class Credentials(BaseModel):
    """An email and password to log in with."""

    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class UserView(BaseModel):
    """An account as answered over HTTP: never its password."""

    id: str
    name: str
    email: str
    role: Role
    status: Status
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, user: User) -> UserView:
        """The view of ``user``."""
        return cls(**{name: getattr(user, name) for name in cls.model_fields})


class AccessToken(BaseModel):
    """A bearer token and how many seconds it lives."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class Jwks(BaseModel):
    """The public keys that verify this service's tokens (RFC 7517)."""

    keys: list[dict[str, str]]
