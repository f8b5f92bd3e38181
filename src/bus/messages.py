"""The kit's own messages: every service announces itself on the bus (discovery)."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from bus.envelope import Event, MessageRegistry


class ServiceHeartbeat(Event):
    """An instance is up at ``url``; sent at start and then every few seconds."""

    type: ClassVar[str] = "service.heartbeat"

    instance_id: str
    service: str
    url: str
    version: str
    status: Literal["starting", "ready", "draining"]
    started_at: datetime
    interval_seconds: float


class ServiceStopped(Event):
    """An instance is leaving: take it out of rotation now rather than at expiry."""

    type: ClassVar[str] = "service.stopped"

    instance_id: str
    service: str
    url: str


BUS_MESSAGES = MessageRegistry([ServiceHeartbeat, ServiceStopped])
