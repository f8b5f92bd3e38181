"""Settings: every knob is an environment variable with the ``MICROSHOP_`` prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def redacted(url: str) -> str:
    """``url`` with its password masked, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


DEFAULT_PORTS = {"gateway": 3000, "user": 3010, "payment": 3011, "order": 3012, "inventory": 3013}


class Settings(BaseSettings):
    """What every service reads from its environment.

    A service subclasses this to add its own knobs; tests build one directly with
    keyword arguments, which win over the environment.
    """

    model_config = SettingsConfigDict(env_prefix="MICROSHOP_", extra="ignore", frozen=True)

    service: str = "microshop"
    version: str = "0.1.0"
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    advertise_url: str | None = None

    broker_url: str = "memory://"
    exchange: str = "microshop.events"
    queue: str | None = None  # default: the service's name
    database_url: str | None = None
    db_schema: str | None = None  # PostgreSQL schema; default: the service's name
    data_dir: Path = Path("var")
    # connections each process keeps to PostgreSQL; work beyond them waits its turn
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0)  # waiting for one of them

    prefetch: int = Field(default=64, ge=1)
    # units of work arriving together (messages handled, orders placed) that may share one
    # transaction: group commit, up to this many (1: each has its own)
    group_commit_size: int = Field(default=32, ge=1)
    # NoDecode: read "200,1000,5000" as text, not as JSON (a JSON list works too)
    retry_delays_ms: Annotated[tuple[int, ...], NoDecode] = (200, 1_000, 5_000)
    delivery_limit: int = Field(default=20, ge=1)
    outbox_batch_size: int = Field(default=200, ge=1)
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    outbox_max_attempts: int = Field(default=12, ge=1)
    drain_seconds: float = Field(default=10.0, ge=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)

    log_level: str = "INFO"
    log_json: bool = True

    jwt_issuer: str = "microshop-user"
    jwt_audience: str = "microshop"
    jwks_url: str = "http://127.0.0.1:3010/.well-known/jwks.json"

    @field_validator("retry_delays_ms", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return tuple(json.loads(text))
            return tuple(int(part) for part in text.split(",") if part.strip())
        return value

    @property
    def listen_port(self) -> int:
        """The port to serve on: the explicit one, else the service's default."""
        return self.port or DEFAULT_PORTS.get(self.service, 0)

    @property
    def public_url(self) -> str:
        """The URL other processes should use to reach this service."""
        return self.advertise_url or f"http://127.0.0.1:{self.listen_port}"

    @property
    def schema_name(self) -> str:
        """The PostgreSQL schema for this service's tables."""
        return self.db_schema or self.service

    @property
    def db_url(self) -> str:
        """The database URL: the configured one, else a SQLite file per service."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir}/{self.service}.db"
