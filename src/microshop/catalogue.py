"""Every message type in the system, with its producer and consumers.

The single list the schema export, the AsyncAPI document and the CLI read. A service's
``messages.py`` is its published language; add its contracts here.
"""

from __future__ import annotations

from bus.envelope import MessageRegistry
from bus.messages import ServiceHeartbeat, ServiceStopped
from bus.schemas import Contract

SERVICES = ("user", "payment", "order", "inventory")

CONTRACTS: tuple[Contract, ...] = (
    Contract(ServiceHeartbeat, producer="every-service", consumers=("gateway",)),
    Contract(ServiceStopped, producer="every-service", consumers=("gateway",)),
)

REGISTRY = MessageRegistry(contract.model for contract in CONTRACTS)
