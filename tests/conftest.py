"""Fixtures shared by every test layer.

Integration tests run on the real RabbitMQ and PostgreSQL named by ``RABBITMQ_URL`` and
``DATABASE_URL`` (CI sets both); without them, testcontainers starts throwaway ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_SPANS))
trace.set_tracer_provider(_provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test, in memory."""
    _SPANS.clear()
    yield _SPANS
    _SPANS.clear()


@pytest.fixture
def unique() -> str:
    """A short random name, so tests never share queues or schemas."""
    return f"t{uuid.uuid4().hex[:10]}"


class RabbitAdmin:
    """Operator actions on the test broker: what ``rabbitmqctl`` does."""

    def __init__(self, url: str, container: object | None = None) -> None:
        self.url = url
        self._container = container

    def close_all_connections(self) -> None:
        """Close every client connection, as an operator or a broker restart would."""
        command = ["rabbitmqctl", "close_all_connections", "closed by a test"]
        if self._container is not None:
            self._container.exec(command)  # type: ignore[attr-defined]
            return
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl is not on this machine")
        subprocess.run(command, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitAdmin]:
    """The real broker: ``RABBITMQ_URL`` or a testcontainer."""
    url = os.environ.get("RABBITMQ_URL")
    if url:
        yield RabbitAdmin(url)
        return
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        yield RabbitAdmin(f"amqp://guest:guest@{host}:{port}/", container)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The real PostgreSQL: ``DATABASE_URL`` or a testcontainer (asyncpg driver)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver="asyncpg") as container:
        yield container.get_connection_url()
