"""The user service's composition root: its settings and ``build``.

Nothing connects here. The start-up work (the signing key, demo users, the first admin)
runs in an aiohttp ``on_startup`` hook, which ``Service.start`` reaches after creating
the tables and before serving the first request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.exc import IntegrityError

import bus.settings
from bus.auth import SigningKey, TokenVerifier
from bus.db import Database
from bus.envelope import MessageRegistry
from bus.service import Service
from bus.transactions import Transactions
from bus.web import TRANSACTIONS, VERIFIER
from user_svc import store
from user_svc.api import THROTTLE, TOKENS, api
from user_svc.domain import (
    DEMO_PASSWORD,
    DEMO_USERS,
    MIN_PASSWORD_LENGTH,
    LoginThrottle,
    Role,
    normalise_email,
)
from user_svc.handlers import (
    HANDLERS,
    TokenIssuer,
    create_user,
    forget_expired_login_attempts,
    hash_password,
    prepare_password_checks,
)

# DEMO_PASSWORD is re-exported: `microshop demo` logs in with it
__all__ = ["DEMO_PASSWORD", "Settings", "build"]

log = structlog.get_logger(__name__)


class Settings(bus.settings.Settings):
    """The user service's knobs, on top of every service's (env ``MICROSHOP_<NAME>``).

    ``MICROSHOP_JWT_PRIVATE_KEY`` is an Ed25519 PKCS8 PEM; without it the first instance
    generates a key and stores it in the database for every instance and restart.
    ``MICROSHOP_DEMO_DATA=1`` loads Alice (admin), Bob (user) and Carol (manager) into an
    empty users table, all with the password ``demo-password-1``; Alice is then the first
    admin, so ``MICROSHOP_ADMIN_EMAIL``/``MICROSHOP_ADMIN_PASSWORD`` create no other.
    """

    # secrets and passwords must not be echoed in validation errors
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    service: str = "user"
    jwt_private_key: SecretStr | None = None
    jwt_ttl_seconds: int = Field(default=3600, gt=0)
    admin_email: str | None = None
    admin_password: SecretStr | None = Field(default=None, validate_default=True)
    demo_data: bool = False
    login_max_attempts: int = Field(default=5, ge=1)
    login_window_seconds: float = Field(default=300.0, gt=0)

    @field_validator("jwt_private_key")
    @classmethod
    def _ed25519_pem(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                SigningKey.from_pem(value.get_secret_value().encode())
            except (ValueError, TypeError):
                raise ValueError("must be an unencrypted Ed25519 private key (PKCS8 PEM)") from None
        return value

    @field_validator("admin_email")
    @classmethod
    def _normalised(cls, value: str | None) -> str | None:
        return normalise_email(value) if value is not None else None

    @field_validator("admin_password")
    @classmethod
    def _with_admin_email(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if "admin_email" not in info.data:
            return value  # the email itself was refused; that error says enough
        if (info.data["admin_email"] is None) != (value is None):
            raise ValueError("MICROSHOP_ADMIN_EMAIL and MICROSHOP_ADMIN_PASSWORD go together")
        if value is not None and len(value.get_secret_value()) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"must be at least {MIN_PASSWORD_LENGTH} characters")
        return value


def build(settings: Settings, **test_overrides: Any) -> Service:
    """The user service, ready to start.

    Tests may pass ``signing_key=`` (a :class:`SigningKey` to sign with), ``verifier=``
    (used as given instead of one built from the signing key) and ``broker=``.
    """
    db = Database.from_settings(settings, metadata=[store.metadata])
    given_key: SigningKey | None = test_overrides.get("signing_key")
    if given_key is None and settings.jwt_private_key is not None:
        given_key = SigningKey.from_pem(settings.jwt_private_key.get_secret_value().encode())
    given_verifier: TokenVerifier | None = test_overrides.get("verifier")
    # Without a configured key, the key is in the database and known only at start-up;
    # until then (no request is served before it) this verifier refuses every token.
    no_keys_yet = TokenVerifier.from_jwks(
        {"keys": []}, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
    service = Service(
        settings,
        db=db,
        broker=test_overrides.get("broker"),
        handlers=HANDLERS,
        registry=MessageRegistry(),
        api=api,
        verifier=given_verifier or no_keys_yet,
    )
    throttle = LoginThrottle(
        max_attempts=settings.login_max_attempts, window_seconds=settings.login_window_seconds
    )
    service.app[THROTTLE] = throttle

    async def prune_login_attempts() -> None:  # off the logins' path, once a minute
        while True:
            await asyncio.sleep(60)
            try:
                await forget_expired_login_attempts(service.transactions, throttle)
            except Exception:  # the next round may succeed; the loop must not die
                log.exception("could not forget expired login attempts")

    service.background.append(prune_login_attempts)

    async def start_up(app: web.Application) -> None:
        transactions = app[TRANSACTIONS]
        key = given_key or await _stored_signing_key(transactions)
        issuer = TokenIssuer(
            key, settings.jwt_issuer, settings.jwt_audience, settings.jwt_ttl_seconds
        )
        app[TOKENS] = issuer
        if given_verifier is None:
            app[VERIFIER] = issuer.verifier()
        await prepare_password_checks()
        if settings.demo_data:
            await _load_demo_users(transactions)
        if settings.admin_email is not None and settings.admin_password is not None:
            await _create_first_admin(transactions, settings.admin_email, settings.admin_password)

    service.app.on_startup.append(start_up)
    return service


async def _stored_signing_key(transactions: Transactions) -> SigningKey:
    candidate = SigningKey.generate().to_pem().decode()
    async with transactions.begin() as unit:
        pem = await store.first_signing_key(unit.session, candidate)
    key = SigningKey.from_pem(pem.encode())
    log.info("signing key loaded from the database", kid=key.kid)
    return key


async def _load_demo_users(transactions: Transactions) -> None:
    log.warning("demo data is on: demo accounts with a published password may exist")
    async with transactions.db.session() as session:
        if await store.has_users(session):
            return
    hashes = await asyncio.gather(*(hash_password(DEMO_PASSWORD) for _ in DEMO_USERS))
    try:
        async with transactions.begin() as unit:
            if await store.has_users(unit.session):
                return
            for (name, email, role), password_hash in zip(DEMO_USERS, hashes, strict=True):
                await create_user(
                    unit, name=name, email=email, role=role, password_hash=password_hash
                )
    except IntegrityError:
        log.info("another instance loaded the demo users first")
        return
    log.warning("demo users created", emails=[email for _, email, _ in DEMO_USERS])


async def _create_first_admin(transactions: Transactions, email: str, password: SecretStr) -> None:
    async with transactions.db.session() as session:
        if await store.admin_exists(session):
            return
    password_hash = await hash_password(password.get_secret_value())
    try:
        async with transactions.begin() as unit:
            if await store.admin_exists(unit.session):
                return
            if await store.find_credentials(unit.session, email) is not None:
                # Promoting it would hand admin to whoever registered that email first.
                log.error("MICROSHOP_ADMIN_EMAIL belongs to a non-admin account; no admin created")
                return
            user = await create_user(
                unit,
                name="Administrator",
                email=email,
                role=Role.ADMIN,
                password_hash=password_hash,
            )
    except IntegrityError:
        log.info("another instance created the first admin")
        return
    log.info("first admin created from settings", user_id=user.id)
