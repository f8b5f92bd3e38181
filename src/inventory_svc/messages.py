"""The inventory service's published language: the commands it owns and the events it emits.

Other services import these models; changing a field is changing a contract.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from bus.envelope import Command, Event

# What a product's id may be, wherever one is named: it goes into URLs as it is
ProductId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", examples=["laptop"])]


class LineItem(BaseModel):
    """Units of one product, as an order asks for them or a release returns them."""

    model_config = ConfigDict(frozen=True)

    product_id: ProductId
    quantity: int = Field(ge=1)


class ReservedItem(BaseModel):
    """Units held for an order, at the price they were held at."""

    model_config = ConfigDict(frozen=True)

    product_id: str
    quantity: int
    unit_price: Decimal


class ShortItem(BaseModel):
    """A line that could not be reserved; an unknown product has ``available`` 0."""

    model_config = ConfigDict(frozen=True)

    product_id: str
    requested: int
    available: int


# --- commands (inventory owns them) ---------------------------------------------------------


class StockReserve(Command):
    """Hold every line of an order, or none of them."""

    type: ClassVar[str] = "stock.reserve"

    order_id: str
    items: list[LineItem]


class StockCommit(Command):
    """The order is paid: its held units become sold."""

    type: ClassVar[str] = "stock.commit"

    order_id: str


class StockRelease(Command):
    """Give an order's units back: held units become available, sold units return to stock."""

    type: ClassVar[str] = "stock.release"

    order_id: str
    reason: str | None = None


# --- events ---------------------------------------------------------------------------------


class StockReserved(Event):
    """Every line of the order is held until it is committed, released or expires."""

    type: ClassVar[str] = "stock.reserved"

    order_id: str
    items: list[ReservedItem]
    total: Decimal


class StockRejected(Event):
    """Nothing was held for the order; ``items`` names the lines that fell short."""

    type: ClassVar[str] = "stock.rejected"

    order_id: str
    reason: str
    items: list[ShortItem]


class StockCommitted(Event):
    """The order's held units are sold."""

    type: ClassVar[str] = "stock.committed"

    order_id: str


class StockReleased(Event):
    """The order's units were given back, as asked (``items`` is empty when it held none)."""

    type: ClassVar[str] = "stock.released"

    order_id: str
    items: list[LineItem]
    reason: str | None = None


class StockExpired(Event):
    """The order's units went back on sale unasked: its reservation was held past its time
    to live. An order still counting on them cannot be sold as it stands."""

    type: ClassVar[str] = "stock.expired"

    order_id: str
    items: list[LineItem]


class ProductCreated(Event):
    """A product joined the catalogue."""

    type: ClassVar[str] = "product.created"

    product_id: str
    name: str
    price: Decimal
    stock: int


class ProductUpdated(Event):
    """A product's name or price changed; ``changed`` lists which."""

    type: ClassVar[str] = "product.updated"

    product_id: str
    name: str
    price: Decimal
    changed: list[str]


class StockRestocked(Event):
    """Units arrived for a product."""

    type: ClassVar[str] = "stock.restocked"

    product_id: str
    quantity: int
    stock: int
    available: int


COMMANDS: tuple[type[Command], ...] = (StockReserve, StockCommit, StockRelease)
EVENTS: tuple[type[Event], ...] = (
    StockReserved,
    StockRejected,
    StockCommitted,
    StockReleased,
    StockExpired,
    ProductCreated,
    ProductUpdated,
    StockRestocked,
)
