"""Every message type in the system, with its producer and consumers.

The single list the schema export, the AsyncAPI document and the CLI read. A service's
``messages.py`` is its published language; its contracts are listed here.
"""

from __future__ import annotations

from bus.envelope import MessageRegistry
from bus.messages import ServiceHeartbeat, ServiceStopped
from bus.schemas import Contract
from inventory_svc import messages as inventory
from order_svc import messages as order
from payment_svc import messages as payment
from user_svc import messages as user

SERVICES = ("user", "payment", "order", "inventory")

CONTRACTS: tuple[Contract, ...] = (
    Contract(ServiceHeartbeat, producer="every-service", consumers=("gateway",)),
    Contract(ServiceStopped, producer="every-service", consumers=("gateway",)),
    # users: the order service keeps a replica
    *(
        Contract(model, producer="user", consumers=("order",))
        for model in (
            user.UserCreated,
            user.UserUpdated,
            user.UserDeleted,
            user.UserActivated,
            user.UserDeactivated,
        )
    ),
    # inventory: commands from the order saga, and its replies
    Contract(inventory.StockReserve, producer="order", consumers=("inventory",)),
    Contract(inventory.StockCommit, producer="order", consumers=("inventory",)),
    Contract(inventory.StockRelease, producer="order", consumers=("inventory",)),
    *(
        Contract(model, producer="inventory", consumers=("order",))
        for model in (
            inventory.StockReserved,
            inventory.StockRejected,
            inventory.StockCommitted,
            inventory.StockReleased,
            inventory.StockExpired,
            inventory.ProductCreated,
            inventory.ProductUpdated,
        )
    ),
    Contract(inventory.StockRestocked, producer="inventory"),
    # payment: commands from the order saga, and its replies
    Contract(payment.PaymentCharge, producer="order", consumers=("payment",)),
    Contract(payment.PaymentRefund, producer="order", consumers=("payment",)),
    *(
        Contract(model, producer="payment", consumers=("order",))
        for model in (
            payment.PaymentSucceeded,
            payment.PaymentFailed,
            payment.PaymentRefunded,
            payment.PaymentRefundFailed,
        )
    ),
    # orders: for whoever shows or audits them
    *(
        Contract(model, producer="order")
        for model in (
            order.OrderCreated,
            order.OrderConfirmed,
            order.OrderCancelled,
            order.OrderStatusChanged,
        )
    ),
)

REGISTRY = MessageRegistry(contract.model for contract in CONTRACTS)
