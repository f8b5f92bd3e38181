"""Operating a running system: publish and watch events, inspect and replay dead letters.

Every operation works on the RabbitMQ named by ``MICROSHOP_BROKER_URL``, on the exchange
``MICROSHOP_EXCHANGE``, through the kit's :class:`~bus.amqp.AmqpBroker`. Whatever goes
wrong is an :class:`OpsError` whose text is the one line the command line shows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aiormq

from bus.amqp import AmqpBroker
from bus.broker import BrokerUnavailable
from bus.observability import configure_logging
from bus.service import broker_from_settings
from bus.settings import Settings, redacted

# the CloudEvents ``source`` of what an operator publishes
CLI_SOURCE = "/microshop/cli"


class OpsError(Exception):
    """An operation could not be done; ``str(error)`` says why in one line."""

    exit_code = 1


class BadInput(OpsError):
    """What the user typed cannot be used: an unknown type, not JSON, invalid data."""

    exit_code = 2


def quiet_logging() -> None:
    """The kit's warnings as JSON lines on stderr; stdout is the command's output.

    aiormq logs every failed connection attempt as an error; the command says the same
    in its own one line, so those are left out.
    """
    configure_logging("microshop-cli", level="WARNING", json=True)
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)


def amqp_broker(settings: Settings) -> AmqpBroker:
    """The broker ``settings`` name; the in-process one cannot be reached from outside."""
    if not settings.broker_url.startswith(("amqp://", "amqps://")):
        raise OpsError(
            "this needs RabbitMQ: set MICROSHOP_BROKER_URL=amqp://... "
            f"(it is {redacted(settings.broker_url)!r})"
        )
    broker = broker_from_settings(settings.model_copy(update={"service": "cli"}))
    assert isinstance(broker, AmqpBroker)  # the URL said amqp
    return broker


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[AmqpBroker]:
    """A connected broker, closed after; a broker that fails us becomes an :class:`OpsError`."""
    broker = amqp_broker(settings)
    where = f"MICROSHOP_BROKER_URL={redacted(settings.broker_url)}"
    try:
        await broker.connect()
        yield broker
    except BrokerUnavailable as error:
        raise OpsError(f"{error} ({where})") from None
    except (aiormq.exceptions.AMQPConnectionError, ConnectionError) as error:
        raise OpsError(f"lost the connection to RabbitMQ: {error!r} ({where})") from None
    finally:
        # closing a connection that broke under us must not hide why it broke
        with contextlib.suppress(Exception):
            await broker.close()
