"""The README's "Publishing from any AMQP client" example, run as written, with pika, and
the order service reacting to it on the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

import order_svc.app
from order_svc import replicas
from tests.conftest import RabbitAdmin
from tests.integration.conftest import ServiceStarter
from tests.support import eventually

pytestmark = pytest.mark.integration

README = Path(__file__).parents[2] / "README.md"
HEADING = "### Publishing from any AMQP client"


def readme_example() -> str:
    """The one Python block of the README's section on publishing with any client."""
    text = README.read_text(encoding="utf-8")
    section = text.split(HEADING, 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.M)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_the_readme_example_publishes_with_pika_and_confirms() -> None:
    code = readme_example()
    assert "import pika" in code
    assert "aio_pika" not in code
    assert "from bus" not in code
    assert "confirm_delivery()" in code
    assert "mandatory=True" in code


async def test_the_order_service_reacts_to_the_readme_example(
    rabbit: RabbitAdmin, run_service: ServiceStarter, unique: str
) -> None:
    exchange = f"{unique}.events"
    order = await run_service(order_svc.app, settings={"exchange": exchange})
    env = {**os.environ, "MICROSHOP_BROKER_URL": rabbit.url, "MICROSHOP_EXCHANGE": exchange}

    example = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        readme_example(),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(example.communicate(), 60)

    assert example.returncode == 0, err.decode()
    assert re.fullmatch(r"[0-9a-f]{32}\n", out.decode())

    async def user_replicated() -> bool:
        async with order.db.session() as session:
            user = await replicas.known_user(session, "u-42")
        return user == replicas.KnownUser("u-42", "active", "user")

    await eventually(user_replicated, within=15)
