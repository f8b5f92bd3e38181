"""The user service's HTTP routes: accounts, login, and the public signing key.

Authorisation uses the caller's account as the database holds it now, not the role in
their token: a deleted or deactivated account's token stops working here at once, and a
demoted admin loses admin rights before their token expires.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog
from aiohttp import web
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.transactions import UnitOfWork
from bus.web import (
    TRANSACTIONS,
    Api,
    Conflict,
    Forbidden,
    HttpProblem,
    NotFound,
    Page,
    Unauthorized,
    Unprocessable,
    json_response,
    page_params,
    principal,
)
from user_svc import handlers, store
from user_svc.domain import (
    Access,
    Actor,
    LoginThrottle,
    Role,
    Status,
    User,
    changed_fields,
    may_list_users,
    may_manage,
    may_read,
    may_update,
)
from user_svc.views import AccessToken, Credentials, Jwks, Registration, UserChanges, UserView

log = structlog.get_logger(__name__)

api = Api()
TOKENS = web.AppKey("TOKENS", handlers.TokenIssuer)
THROTTLE = web.AppKey("THROTTLE", LoginThrottle)

TAKEN = "an account with this email already exists"


def _session(request: web.Request) -> AsyncConnection:
    return request.app[TRANSACTIONS].db.session()


@asynccontextmanager
async def _begin(request: web.Request) -> AsyncIterator[UnitOfWork]:
    try:
        async with request.app[TRANSACTIONS].begin() as unit:
            yield unit
    except IntegrityError:
        # The unique email constraint is the only one a request can break.
        raise Conflict(TAKEN) from None


async def _caller(session: AsyncConnection, request: web.Request) -> User:
    return _active(await store.get_user(session, principal(request).user_id))


def _active(caller: User | None) -> User:
    if caller is None or caller.status is not Status.ACTIVE:
        raise Unauthorized("the account is deleted or deactivated")
    return caller


async def _actor(session: AsyncConnection, request: web.Request) -> Actor:
    caller = await _caller(session, request)
    return Actor(caller.id, caller.role)


def _permitted(access: Access, user: User | None, user_id: str, refusal: str = "") -> User:
    if access is Access.HIDDEN or user is None:
        raise NotFound(f"user {user_id} not found")
    if access is Access.FORBIDDEN:
        raise Forbidden(refusal)
    return user


async def _target(
    unit: UnitOfWork, request: web.Request, rule: Callable[[Actor, str], Access], refusal: str
) -> User:
    """The addressed account, locked for the change, once ``rule`` lets the caller make it.

    The caller's row is locked too: two admins demoting or deleting each other at once
    take turns, and the second finds it is no admin any more (read unlocked, both passed,
    and no admin was left).
    """
    user_id, caller_id = request.match_info["user_id"], principal(request).user_id
    locked = await store.lock_users(unit.session, {user_id, caller_id})
    caller = _active(locked.get(caller_id))
    actor = Actor(caller.id, caller.role)
    return _permitted(rule(actor, user_id), locked.get(user_id), user_id, refusal)


@api.post("/users", body=Registration, response=UserView, status=201)
async def register_user(request: web.Request, body: Registration) -> web.Response:
    """Register an account with the user role (public)."""
    password_hash = await handlers.hash_password(body.password)
    async with _begin(request) as unit:
        user = await handlers.create_user(
            unit, name=body.name, email=body.email, role=Role.USER, password_hash=password_hash
        )
    headers = {"Location": f"/users/{user.id}"}
    return json_response(UserView.of(user), status=201, headers=headers)


@api.get("/users", response=Page[UserView], roles=("admin", "manager"))
async def list_users(request: web.Request) -> web.Response:
    """List accounts, oldest first; ``?status=active|inactive`` filters (admins, managers)."""
    raw_status = request.query.get("status")
    if raw_status is not None and raw_status not in set(Status):
        raise Unprocessable("query.status: must be active or inactive")
    status = Status(raw_status) if raw_status is not None else None
    limit, offset = page_params(request)
    async with _session(request) as session:
        if not may_list_users(await _actor(session, request)):
            raise Forbidden("only admins and managers may list users")
        found, total = await store.list_users(session, status=status, limit=limit, offset=offset)
    items = [UserView.of(user) for user in found]
    return json_response(Page[UserView](items=items, total=total, limit=limit, offset=offset))


@api.get("/users/{user_id}", response=UserView, auth=True)
async def get_user(request: web.Request) -> web.Response:
    """Read an account: your own, or any as an admin or manager."""
    user_id = request.match_info["user_id"]
    async with _session(request) as session:
        actor = await _actor(session, request)
        user = await store.get_user(session, user_id)
    return json_response(UserView.of(_permitted(may_read(actor, user_id), user, user_id)))


@api.put("/users/{user_id}", body=UserChanges, response=UserView, auth=True)
async def update_user(request: web.Request, body: UserChanges) -> web.Response:
    """Change your own name or email; admins change anyone's, and roles."""
    refusal = "only admins may change roles or other accounts, and not their own role"
    async with _begin(request) as unit:
        rule = functools.partial(may_update, new_role=body.role)
        user = await _target(unit, request, rule, refusal)
        wanted = body.model_dump(exclude_none=True)
        changes = {name: wanted[name] for name in changed_fields(user, wanted)}
        user = await handlers.update_user(unit, user, changes)
    return json_response(UserView.of(user))


@api.delete("/users/{user_id}", status=204, roles=("admin",))
async def delete_user(request: web.Request) -> web.Response:
    """Delete an account (admins; not their own)."""
    async with _begin(request) as unit:
        user = await _target(unit, request, may_manage, "admins cannot delete their own account")
        await handlers.delete_user(unit, user)
    return web.Response(status=204)


async def _set_status(request: web.Request, status: Status) -> web.Response:
    refusal = "admins cannot change their own account's status"
    async with _begin(request) as unit:
        user = await _target(unit, request, may_manage, refusal)
        user = await handlers.set_status(unit, user, status)
    return json_response(UserView.of(user))


@api.post("/users/{user_id}/activate", response=UserView, roles=("admin",))
async def activate_user(request: web.Request) -> web.Response:
    """Let an account log in again (admins)."""
    return await _set_status(request, Status.ACTIVE)


@api.post("/users/{user_id}/deactivate", response=UserView, roles=("admin",))
async def deactivate_user(request: web.Request) -> web.Response:
    """Stop an account from logging in and refuse its tokens here (admins; not their own)."""
    return await _set_status(request, Status.INACTIVE)


@api.post("/auth/login", body=Credentials, response=AccessToken)
async def login(request: web.Request, body: Credentials) -> web.Response:
    """Exchange an email and password for a bearer token.

    Every refusal gets the same answer, whether the email is unknown, the password wrong
    or the account inactive, so the answer does not tell which emails have accounts.
    """
    email = body.email.strip().lower()
    transactions = request.app[TRANSACTIONS]
    wait = await handlers.begin_login_attempt(transactions, request.app[THROTTLE], email)
    if wait is not None:
        log.warning("login throttled", retry_after=wait)
        raise HttpProblem(
            "too many failed logins for this email; try again later",
            status=429,
            headers={"Retry-After": str(wait)},
        )
    user = await handlers.authenticate(transactions, email, body.password)
    if user is None:
        raise Unauthorized("invalid email or password")
    await handlers.forget_login_attempts(transactions, email)
    tokens = request.app[TOKENS]
    return json_response(AccessToken(access_token=tokens.mint(user), expires_in=tokens.ttl_seconds))


@api.get("/auth/me", response=UserView, auth=True)
async def me(request: web.Request) -> web.Response:
    """The caller's own account; 401 once it is deleted or deactivated."""
    async with _session(request) as session:
        return json_response(UserView.of(await _caller(session, request)))


@api.get("/.well-known/jwks.json", response=Jwks)
async def jwks(request: web.Request) -> web.Response:
    """The public key set that verifies this service's tokens (public)."""
    document = request.app[TOKENS].key.jwks()
    return json_response(document, headers={"Cache-Control": "public, max-age=300"})
