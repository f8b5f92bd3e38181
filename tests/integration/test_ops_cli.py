"""``microshop publish|tail|dlq`` as an operator runs them, against the real RabbitMQ.

Each test gets an exchange of its own (``MICROSHOP_EXCHANGE``), so what one publishes,
tails or dead-letters is seen by nobody else; the CLI runs as a separate process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from bus.amqp import AmqpBroker, dead_letter_queue
from bus.broker import (
    ATTEMPT_HEADER,
    CAUSE_HEADER,
    FAILED_AT_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    Delivery,
    Unroutable,
)
from bus.envelope import CONTENT_TYPE, Envelope, Message
from bus.schemas import example_data
from microshop.catalogue import REGISTRY
from order_svc.messages import OrderCreated
from tests.conftest import RabbitAdmin
from tests.integration.conftest import RETRY_DELAYS_MS, delete_exchanges, delete_queues
from tests.support import eventually
from user_svc.messages import UserCreated, UserUpdated

pytestmark = pytest.mark.integration


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Ops:
    """An isolated exchange, a kit broker on it, and the CLI pointed at it."""

    broker: AmqpBroker
    exchange: str
    prefix: str
    env: dict[str, str]
    queues: set[str] = field(default_factory=set)

    def queue(self, service: str) -> str:
        """A service queue name of this test's own (cleaned up after it)."""
        self.queues.add(f"{self.prefix}-{service}")
        return f"{self.prefix}-{service}"

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        """``microshop ARGS...`` running in the background."""
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "microshop.cli",
            *args,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def cli(self, *args: str, stdin: str = "") -> Result:
        """``microshop ARGS...`` to its end."""
        process = await self.start(*args)
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())

    async def dead_letters(self, queue: str) -> list[dict[str, Any]]:
        """``microshop dlq list QUEUE --json``, parsed."""
        result = await self.cli("dlq", "list", queue, "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    async def bury(self, queue: str, envelope: Envelope, reason: str) -> None:
        """Put ``envelope`` straight into ``queue``'s DLQ, as the kit files a rejected one."""
        channel = await self.broker.connection.channel(publisher_confirms=True)
        headers = {
            REASON_HEADER: reason,
            CAUSE_HEADER: "rejected",
            ATTEMPT_HEADER: 1,
            QUEUE_HEADER: queue,
            ROUTING_KEY_HEADER: envelope.type,
            FAILED_AT_HEADER: datetime.now(UTC).isoformat(),
        }
        message = aio_pika.Message(
            envelope.to_json(),
            content_type=CONTENT_TYPE,
            message_id=envelope.id,
            type=envelope.type,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await channel.default_exchange.publish(message, routing_key=dead_letter_queue(queue))
        await channel.close()


@pytest.fixture
async def ops(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Ops]:
    exchange = f"{unique}.events"
    broker = AmqpBroker(rabbit.url, name=unique, retry_delays_ms=RETRY_DELAYS_MS, exchange=exchange)
    await broker.connect()
    env = {**os.environ, "MICROSHOP_BROKER_URL": rabbit.url, "MICROSHOP_EXCHANGE": exchange}
    tools = Ops(broker, exchange, unique, env)
    yield tools
    await broker.close()
    await delete_queues(rabbit.url, sorted(tools.queues))
    await delete_exchanges(rabbit.url, [exchange, f"{exchange}.dlx"])


def example(model: type[Message], **changes: Any) -> Message:
    return model.model_validate({**example_data(model), **changes})


def user_created(user_id: str = "u-1") -> Envelope:
    return Envelope.wrap(example(UserCreated, user_id=user_id), source="/tests")


async def test_publish_validates_wraps_and_publishes_with_confirms(ops: Ops) -> None:
    seen: list[Delivery] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery)

    await ops.broker.consume(ops.queue("order"), ["user.created"], record, REGISTRY)
    data = example_data(UserCreated)

    result = await ops.cli(
        "publish", "user.created", "--data", json.dumps(data), "--correlation-id", "flow-1"
    )

    assert result.returncode == 0, result.stderr
    await eventually(lambda: len(seen) == 1)
    envelope = seen[0].envelope
    assert result.stdout == f"{envelope.id}\n"
    assert envelope.correlationid == "flow-1"
    assert envelope.source == "/microshop/cli"
    assert envelope.dataschema == "urn:microshop:schema:user.created:1.0"
    assert seen[0].message == UserCreated.model_validate(data)

    nobody = await ops.cli(
        "publish", "order.created", "--data", json.dumps(example_data(OrderCreated))
    )
    assert nobody.returncode == 1
    assert nobody.stdout == ""
    assert nobody.stderr.count("\n") == 1
    assert f"no queue on {ops.exchange} is bound to 'order.created'" in nobody.stderr


async def test_tail_shows_each_message_until_ctrl_c_and_leaves_no_queue(ops: Ops) -> None:
    orders = await ops.start("tail", "order.*")
    everything = await ops.start("tail", "--json")
    for tail in (orders, everything):
        assert tail.stderr is not None
        ready = await asyncio.wait_for(tail.stderr.readline(), 30)
        assert ready.startswith(b"tailing"), ready

    order = Envelope.wrap(example(OrderCreated), source="/tests", correlation_id="flow-2")
    user = user_created()
    await ops.broker.publish(order)
    await ops.broker.publish(user)

    assert orders.stdout is not None
    assert everything.stdout is not None
    line = (await asyncio.wait_for(orders.stdout.readline(), 10)).decode()
    assert "order.created" in line
    assert "order=order-1" in line
    assert "user=user-1" in line
    assert "correlation=flow-2" in line
    raw = [await asyncio.wait_for(everything.stdout.readline(), 10) for _ in range(2)]
    assert [json.loads(one)["id"] for one in raw] == [order.id, user.id]

    for tail in (orders, everything):
        tail.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(tail.wait(), 30) == 0
        assert tail.stderr is not None
        assert await tail.stderr.read() == b""
    assert await orders.stdout.read() == b""  # user.created is not order.*
    with pytest.raises(Unroutable):
        await ops.broker.publish(user)  # both tails' queues are gone with them


async def test_poison_message_is_dead_lettered_listed_replayed_and_processed(ops: Ops) -> None:
    broken = True
    failures: list[int] = []
    handled: list[Delivery] = []
    audited: list[str] = []

    async def replicate_user(delivery: Delivery) -> None:
        if broken:
            failures.append(delivery.attempt)
            raise RuntimeError("the users table is locked")
        handled.append(delivery)

    async def audit(delivery: Delivery) -> None:
        audited.append(delivery.envelope.id)

    queue = ops.queue("order")
    await ops.broker.consume(queue, ["user.*"], replicate_user, REGISTRY)
    await ops.broker.consume(ops.queue("audit"), ["user.*"], audit, REGISTRY)
    sent = user_created()
    await ops.broker.publish(sent)

    async def dead_lettered(times: int) -> bool:
        return len(failures) == times * 3 and len(await ops.dead_letters(queue)) == 1

    await eventually(lambda: dead_lettered(1), within=20)
    (letter,) = await ops.dead_letters(queue)
    assert letter["id"] == sent.id
    assert letter["routing_key"] == "user.created"
    assert letter["attempts"] == 3
    assert letter["cause"] == "exhausted"
    assert "RuntimeError: the users table is locked" in letter["reason"]
    assert json.loads(letter["body"])["data"]["user_id"] == "u-1"
    shown = await ops.cli("dlq", "list", queue)
    assert shown.stdout.splitlines()[0] == f"{queue}.dlq: 1 dead letter"
    assert f"{sent.id}  user.created  attempts=3  cause=exhausted" in shown.stdout

    # replayed while the cause is still there: every retry again, then back, as it was sent
    again = await ops.cli("dlq", "replay", queue, "--id", sent.id)
    assert again.stdout == f"replayed 1 dead letter from {queue}.dlq to {queue}\n", again.stderr
    await eventually(lambda: dead_lettered(2), within=20)
    assert failures == [1, 2, 3, 1, 2, 3]
    (second,) = await ops.dead_letters(queue)
    assert (second["id"], second["routing_key"], second["attempts"]) == (sent.id, "user.created", 3)
    assert second["failed_at"] != letter["failed_at"]

    broken = False
    fixed = await ops.cli("dlq", "replay", queue, "--all")
    assert fixed.stdout == f"replayed 1 dead letter from {queue}.dlq to {queue}\n", fixed.stderr
    await eventually(lambda: len(handled) == 1)
    assert handled[0].envelope == sent
    assert handled[0].attempt == 1
    assert await ops.dead_letters(queue) == []

    # the replays went to the order queue alone: the audit queue saw the message once
    marker = Envelope.wrap(example(UserUpdated), source="/tests")
    await ops.broker.publish(marker)
    await eventually(lambda: marker.id in audited)
    assert audited == [sent.id, marker.id]


async def test_listing_leaves_every_dead_letter_in_place_and_in_order(ops: Ops) -> None:
    queue = ops.queue("order")
    await ops.broker.declare(queue, [])
    # more than 32: quorum queues give back more held messages than that in hash order
    buried = [user_created(f"u-{n}") for n in range(40)]
    for n, envelope in enumerate(buried):
        await ops.bury(queue, envelope, f"reason {n}")

    first = await ops.dead_letters(queue)
    second = await ops.dead_letters(queue)

    assert [letter["id"] for letter in first] == [envelope.id for envelope in buried]
    assert second == first
    assert first[7]["reason"] == "reason 7"


async def test_replay_of_an_unknown_id_moves_nothing(ops: Ops) -> None:
    queue = ops.queue("order")
    await ops.broker.declare(queue, [])
    await ops.bury(queue, user_created(), "rejected")

    result = await ops.cli("dlq", "replay", queue, "--id", "no-such-id")

    assert result.returncode == 1
    assert result.stderr == f"microshop: no dead letter with id 'no-such-id' in {queue}.dlq\n"
    assert len(await ops.dead_letters(queue)) == 1


async def test_replay_all_counts_and_purge_asks_first(ops: Ops) -> None:
    handled: list[str] = []

    async def record(delivery: Delivery) -> None:
        handled.append(delivery.envelope.id)

    queue = ops.queue("order")
    await ops.broker.consume(queue, ["user.*"], record, REGISTRY)
    buried = [user_created(f"u-{n}") for n in range(3)]
    for envelope in buried:
        await ops.bury(queue, envelope, "rejected")

    replayed = await ops.cli("dlq", "replay", queue, "--all")
    assert replayed.stdout == f"replayed 3 dead letters from {queue}.dlq to {queue}\n"
    await eventually(lambda: sorted(handled) == sorted(e.id for e in buried))

    for envelope in buried[:2]:
        await ops.bury(queue, envelope, "rejected")
    declined = await ops.cli("dlq", "purge", queue, stdin="n\n")
    assert declined.returncode == 1
    assert f"delete 2 dead letters from {queue}.dlq for good? [y/N]" in declined.stdout
    assert declined.stderr == "microshop: nothing was purged\n"
    assert len(await ops.dead_letters(queue)) == 2

    unanswered = await ops.cli("dlq", "purge", queue)  # no terminal, no answer: no
    assert unanswered.returncode == 1
    assert len(await ops.dead_letters(queue)) == 2

    confirmed = await ops.cli("dlq", "purge", queue, stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout.endswith(f"purged 2 dead letters from {queue}.dlq\n")
    forced = await ops.cli("dlq", "purge", queue, "--yes")
    assert forced.stdout == f"purged 0 dead letters from {queue}.dlq\n"
    assert await ops.dead_letters(queue) == []

    await ops.bury(queue, buried[0], "rejected")
    racing = await ops.start("dlq", "purge", queue)
    assert racing.stdout is not None
    asked = b""
    while b"for good?" not in asked:
        asked += await asyncio.wait_for(racing.stdout.read(200), 10)
    late = user_created("u-late")
    await ops.bury(queue, late, "rejected")  # while the question waits
    out, _ = await asyncio.wait_for(racing.communicate(b"y\n"), 30)
    assert f"delete 1 dead letter from {queue}.dlq" in asked.decode()
    assert out.decode().endswith(f"purged 1 dead letter from {queue}.dlq\n")
    assert [letter["id"] for letter in await ops.dead_letters(queue)] == [late.id]


async def test_newer_minor_is_processed_and_newer_major_is_dead_lettered_with_reason(
    ops: Ops,
) -> None:
    handled: list[Message] = []

    async def record(delivery: Delivery) -> None:
        handled.append(delivery.message)

    queue = ops.queue("order")
    await ops.broker.consume(queue, ["user.*"], record, REGISTRY)
    data = example_data(UserCreated)

    def written_as(version: str) -> Envelope:
        return Envelope(
            id=f"{version}-{ops.prefix}",
            source="/a-newer-user-service",
            type="user.created",
            dataschema=f"urn:microshop:schema:user.created:{version}",
            data={**data, "nickname": "added in 1.4"},
        )

    await ops.broker.publish(written_as("1.4"))
    await ops.broker.publish(written_as("2.0"))

    await eventually(lambda: len(handled) == 1)
    assert handled == [UserCreated.model_validate(data)]
    letters: list[dict[str, Any]] = []

    async def dead_lettered() -> bool:
        letters[:] = await ops.dead_letters(queue)
        return len(letters) == 1

    await eventually(dead_lettered)
    assert letters[0]["id"] == f"2.0-{ops.prefix}"
    assert letters[0]["cause"] == "invalid"
    assert letters[0]["attempts"] == 1
    assert "schema version 2.0 is incompatible with 1.0" in letters[0]["reason"]


async def test_dlq_of_a_queue_that_does_not_exist_is_one_line(ops: Ops) -> None:
    for args in (["list"], ["replay", "--all"], ["purge", "--yes"]):
        result = await ops.cli("dlq", args[0], f"{ops.prefix}-nobody", *args[1:])
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"microshop: no queue '{ops.prefix}-nobody.dlq'")
