"""What the order service knows of users and products: replicas kept from their events,
filled in over HTTP (through a circuit breaker) for ones it has not heard of yet."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.prepared import Prepared, insert_or_skip, where_among
from bus.resilience import CircuitBreaker, retry_call
from order_svc import store

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class KnownUser:
    """A user as the order service needs to know one."""

    id: str
    status: str  # active, inactive or deleted
    role: str | None = None  # admin, manager or user (None: not said)


@dataclass(frozen=True, slots=True)
class KnownProduct:
    """A product that can be ordered, with its current price."""

    id: str
    name: str
    price: Decimal


def _upsert(table: Table, *, as_of: str | None = None) -> Prepared:
    """Insert a row of ``table``, or overwrite the one with its id (SQLite compiles this
    PostgreSQL INSERT too); with ``as_of``, the name of a time column, only a row as new
    as the one kept overwrites it."""
    statement = postgresql.insert(table)
    changes = {
        column.key: statement.excluded[column.key] for column in table.c if column.key != "id"
    }
    newer = None if as_of is None else table.c[as_of] <= statement.excluded[as_of]
    return Prepared(
        statement.on_conflict_do_update(index_elements=["id"], set_=changes, where=newer)
    )


# built once: what every replica event and HTTP answer writes. Events about a user or a
# product can arrive out of order (a retried one after the next): each carries when its
# service made the change, and an older one changes nothing, or a deactivation handled
# late would undo the activation after it for good (an old price, the new one).
_SAVE_USER = _upsert(store.users, as_of="updated_at")
_SAVE_PRODUCT = _upsert(store.products, as_of="updated_at")
_REMEMBER_USER = insert_or_skip(store.users)
_REMEMBER_PRODUCT = insert_or_skip(store.products)


# Events overwrite what the replicas hold; what was learnt over HTTP only fills a gap. An
# answer read before an event committed is older than it, and must not undo it (a user
# deactivated meanwhile, a price changed meanwhile).


def _user_row(
    user_id: str, email: str | None, role: str | None, status: str, at: datetime
) -> dict[str, Any]:
    return {
        "id": user_id,
        "email": email,
        "role": role,
        "status": status,
        "updated_at": at.astimezone(UTC),
    }


def _product_row(product: KnownProduct, at: datetime) -> dict[str, Any]:
    return {
        "id": product.id,
        "name": product.name,
        "price_cents": store.cents(product.price),
        "updated_at": at.astimezone(UTC),
    }


async def save_user(session: AsyncConnection, event: Any, event_type: str, at: datetime) -> None:
    """Record what a ``user.*`` event says of a user, made ``at`` (the event's time),
    unless the replica holds what a later event said."""
    status = "deleted" if event_type == "user.deleted" else event.status
    row = _user_row(event.user_id, event.email, event.role, status, at)
    await _SAVE_USER.run(session, row)


# what was learnt over HTTP is as of before any event: an event made after the answer was
# read (between the read and this write, or by a clock behind ours) still overwrites it
_BEFORE_ANY_EVENT = datetime(1970, 1, 1, tzinfo=UTC)


async def remember_user(session: AsyncConnection, user: dict[str, Any]) -> None:
    """Record a user as the user service described it over HTTP (``GET /users/{id}``),
    unless an event about the user got here first."""
    status = user.get("status", "active")
    row = _user_row(user["id"], user.get("email"), user.get("role"), status, _BEFORE_ANY_EVENT)
    await _REMEMBER_USER.run(session, row)


async def save_product(session: AsyncConnection, product: KnownProduct, at: datetime) -> None:
    """Record a product's name and price from one of its events, made ``at``, unless the
    replica holds what a later event said."""
    await _SAVE_PRODUCT.run(session, _product_row(product, at))


async def remember_product(session: AsyncConnection, product: KnownProduct) -> None:
    """Record a product as inventory answered over HTTP, unless an event got here first."""
    await _REMEMBER_PRODUCT.run(session, _product_row(product, _BEFORE_ANY_EVENT))


# built once: two lookups of every order placed
_USER = Prepared(select(store.users).where(store.users.c.id == bindparam("user_id")))
_PRODUCTS = where_among(select(store.products), store.products.c.id, "ids")


async def known_user(session: AsyncConnection, user_id: str) -> KnownUser | None:
    """The replica's copy of a user, if it has one."""
    rows = await _USER.rows(session, {"user_id": user_id})
    return KnownUser(rows[0]["id"], rows[0]["status"], rows[0]["role"]) if rows else None


async def known_products(session: AsyncConnection, ids: set[str]) -> dict[str, KnownProduct]:
    """The replica's copies of these products."""
    return {
        row["id"]: KnownProduct(row["id"], row["name"], store.from_cents(row["price_cents"]))
        for row in await _PRODUCTS.rows(session, {"ids": list(ids)})
    }


class UpstreamUnavailable(Exception):
    """The user or inventory service could not be asked (down, slow, or breaker open)."""


class Refused(Exception):
    """The user or inventory service answered, and said no (4xx): it works, and a lookup
    it turns away neither counts against its breaker nor is asked again."""


# answers that say no to this request (a 408 or 429 says "not now", like a 5xx)
_REFUSALS = frozenset({400, 401, 403, 410, 422})


def _failing(error: BaseException) -> bool:
    return not isinstance(error, Refused)


class Directory:
    """Asks the user and inventory services about what the replicas have not seen yet."""

    def __init__(self, session: aiohttp.ClientSession, user_url: str, inventory_url: str) -> None:
        self.session = session
        self.user_url = user_url.rstrip("/")
        self.inventory_url = inventory_url.rstrip("/")
        self.users = CircuitBreaker(
            "order->user", failure_threshold=5, reset_timeout=10, is_failure=_failing
        )
        self.inventory = CircuitBreaker(
            "order->inventory", failure_threshold=5, reset_timeout=10, is_failure=_failing
        )

    async def user(self, user_id: str, authorization: str) -> dict[str, Any] | None:
        """``GET /users/{id}`` with the caller's own token (a user may read itself).

        Raises :class:`Refused` when the user service turns the caller away: its account
        is deactivated or deleted.
        """
        url = f"{self.user_url}/users/{quote(user_id, safe='')}"
        return await self._get(self.users, url, {"Authorization": authorization})

    async def product(self, product_id: str) -> dict[str, Any] | None:
        """``GET /products/{id}`` (public)."""
        url = f"{self.inventory_url}/products/{quote(product_id, safe='')}"
        return await self._get(self.inventory, url, {})

    async def _get(
        self, breaker: CircuitBreaker, url: str, headers: dict[str, str]
    ) -> dict[str, Any] | None:
        service = breaker.name.partition("->")[2]  # no internal address in what clients see

        async def fetch() -> dict[str, Any] | None:
            async with self.session.get(url, headers=headers) as response:
                if response.status == 404:
                    return None
                if response.status in _REFUSALS:
                    raise Refused(f"{service} answered {response.status}")
                response.raise_for_status()
                body: dict[str, Any] = await response.json()
                return body

        try:
            return await retry_call(
                breaker.call,
                fetch,
                attempts=3,
                initial=0.05,
                maximum=0.5,
                retry_on=(aiohttp.ClientError, TimeoutError),
            )
        except Refused:
            raise
        except Exception as error:
            log.warning("upstream lookup failed", url=url, error=repr(error))
            raise UpstreamUnavailable(f"the {service} service is unavailable") from error
