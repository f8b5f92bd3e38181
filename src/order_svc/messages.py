"""What the order service publishes. The commands it sends belong to their owners
(``inventory_svc.messages``, ``payment_svc.messages``)."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from bus.envelope import Event
from inventory_svc.messages import ProductId

MOST_OF_ONE_PRODUCT = 10_000  # an order line's quantity at most


class OrderLine(BaseModel):
    """A product and how many of it."""

    model_config = ConfigDict(frozen=True)

    product_id: ProductId
    quantity: int = Field(ge=1, le=MOST_OF_ONE_PRODUCT)


class OrderCreated(Event):
    """An order was placed and its saga started."""

    type: ClassVar[str] = "order.created"

    order_id: str
    user_id: str
    items: list[OrderLine]
    total: Decimal
    currency: str


class OrderConfirmed(Event):
    """Stock is reserved and payment taken."""

    type: ClassVar[str] = "order.confirmed"

    order_id: str
    user_id: str
    total: Decimal
    payment_id: str


class OrderCancelled(Event):
    """The order will not be fulfilled; ``refunded`` says whether money went back."""

    type: ClassVar[str] = "order.cancelled"

    order_id: str
    user_id: str
    reason: str
    refunded: bool = False


class OrderStatusChanged(Event):
    """Any change of an order's status, for whoever shows or audits orders."""

    type: ClassVar[str] = "order.status_changed"

    order_id: str
    user_id: str
    previous_status: str
    new_status: str
    reason: str | None = None
