"""``microshop publish|tail|dlq`` without a broker: what is checked before connecting, and
how every mistake is reported (one line, no traceback)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bus.broker import ATTEMPT_HEADER, BrokerUnavailable, Nacked, dead_letter_from
from bus.envelope import Envelope
from bus.schemas import example_data
from bus.settings import Settings
from microshop.cli import main
from microshop.ops import BadInput, OpsError, events
from microshop.ops.events import describe, envelope_for, read_data
from user_svc.messages import UserCreated

NOWHERE = "amqp://guest:secret@127.0.0.1:1/"  # nothing listens on port 1
USER = json.dumps(example_data(UserCreated))


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., Ran]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``microshop ARGS...`` in this process, on a broker that is not there."""

    def run(*args: str, broker: str = NOWHERE, stdin: str = "") -> Ran:
        monkeypatch.setenv("MICROSHOP_BROKER_URL", broker)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def assert_one_line(result: Ran, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("microshop: ")
    assert message in result.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{", "--data is not JSON: Expecting property name"),
        ("[1, 2]", "--data must be a JSON object, not list"),
        ('{"user_id": "u-1"}', "invalid user.created data: email: Field required (and 3 more)"),
        (USER[:-1] + ', "nick": "x"}', "user.created has no field 'nick'"),
        (USER.replace('"user-1"', "7"), "invalid user.created data: user_id: Input should be"),
        ("@/no/such/file.json", "cannot read /no/such/file.json: No such file or directory"),
    ],
)
def test_bad_data_is_refused_before_connecting(run_cli: Cli, data: str, message: str) -> None:
    assert_one_line(run_cli("publish", "user.created", "--data", data), 2, message)


def test_an_unknown_type_suggests_the_closest_one(run_cli: Cli) -> None:
    result = run_cli("publish", "user.create", "--data", USER)
    assert_one_line(result, 2, "unknown message type 'user.create'; did you mean 'user.created'?")
    other = run_cli("publish", "nothing.like.it", "--data", "{}")
    assert_one_line(other, 2, "unknown message type 'nothing.like.it'; see schemas/")


@pytest.mark.parametrize(
    "args",
    [
        ["publish", "user.created", "--data", USER],
        ["tail", "order.*"],
        ["dlq", "list"],
        ["dlq", "replay", "order", "--all"],
        ["dlq", "purge", "order", "--yes"],
    ],
)
def test_an_unreachable_broker_is_one_line_without_the_password(
    run_cli: Cli, args: list[str]
) -> None:
    result = run_cli(*args)
    assert_one_line(result, 1, "cannot reach RabbitMQ")
    assert "MICROSHOP_BROKER_URL=amqp://guest:***@127.0.0.1:1/" in result.stderr
    assert "secret" not in result.stderr


def test_data_is_read_from_a_file_or_standard_input(run_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "user.json"
    path.write_text(USER)
    # valid data gets as far as the broker
    assert_one_line(run_cli("publish", "user.created", "--data", f"@{path}"), 1, "cannot reach")
    piped = run_cli("publish", "user.created", "--data", "@-", stdin=USER)
    assert_one_line(piped, 1, "cannot reach")


def test_the_in_process_broker_cannot_be_operated_from_outside(run_cli: Cli) -> None:
    result = run_cli("dlq", "list", broker="memory://")
    assert_one_line(result, 1, "this needs RabbitMQ: set MICROSHOP_BROKER_URL=amqp://...")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "replay", "order"], "one of the arguments --id --all is required"),
        (["dlq", "replay", "order", "--id", "x", "--all"], "not allowed with argument --id"),
        (["dlq", "purge"], "the following arguments are required: SERVICE"),
        (["dlq", "peek"], "invalid choice: 'peek'"),
        (["publish", "user.created"], "the following arguments are required: --data"),
    ],
)
def test_bad_usage_of_the_operations_exits_2(run_cli: Cli, args: list[str], message: str) -> None:
    assert_one_line(run_cli(*args), 2, message)


def test_a_real_process_prints_one_line_and_no_traceback() -> None:
    env = {**os.environ, "MICROSHOP_BROKER_URL": NOWHERE}
    result = subprocess.run(
        [sys.executable, "-m", "microshop.cli", "publish", "user.created", "--data", USER],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("microshop: cannot reach RabbitMQ")
    assert result.stderr.count("\n") == 1  # aiormq's own error log is left out


def test_read_data_wants_an_object() -> None:
    assert read_data('{"a": 1}') == {"a": 1}
    with pytest.raises(BadInput, match="not str"):
        read_data('"text"')


def test_the_envelope_carries_the_version_source_and_flow() -> None:
    data = example_data(UserCreated)

    envelope = envelope_for("user.created", data, source="/crm", correlation_id="flow-9")

    assert envelope.type == "user.created"
    assert envelope.dataschema == "urn:microshop:schema:user.created:1.0"
    assert envelope.source == "/crm"
    assert envelope.correlationid == "flow-9"
    assert envelope.data == data
    fresh = envelope_for("user.created", data)
    assert fresh.correlationid == fresh.id != envelope.id  # without one, a new flow starts


def test_what_the_services_would_refuse_is_refused_before_publishing() -> None:
    data = example_data(UserCreated)

    with pytest.raises(BadInput, match=r"would refuse this message: .*source"):
        envelope_for("user.created", data, source="")
    with pytest.raises(BadInput, match=r"would refuse this message: .*id"):
        envelope_for("user.created", data, message_id="x" * 65)


def test_a_message_sent_again_keeps_its_id_so_the_services_take_it_once() -> None:
    data = example_data(UserCreated)

    again = envelope_for("user.created", data, message_id="0123456789abcdef")

    assert again.id == "0123456789abcdef"
    assert again.correlationid == again.id  # its flow is its own, as the first one's was


def test_a_tailed_line_names_time_type_order_user_and_flow() -> None:
    envelope = Envelope(
        id="e-1",
        source="/microshop/order",
        type="order.confirmed",
        time=datetime(2025, 3, 4, 5, 6, 7, 891_000, tzinfo=UTC),
        data={"order_id": "o-1", "user_id": "u-1", "total": "9.99"},
        correlationid="flow-1",
    )
    assert describe(envelope) == (
        "2025-03-04T05:06:07.891Z  order.confirmed         order=o-1  user=u-1  correlation=flow-1"
    )
    heartbeat = envelope.model_copy(update={"type": "service.heartbeat", "data": {}})
    line = describe(heartbeat)
    assert "order=" not in line
    assert "user=" not in line
    assert line.endswith("service.heartbeat       correlation=flow-1")


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        # no confirm: the broker may hold it yet, so it is sent again under its own id
        (BrokerUnavailable("not confirmed: timed out"), "may have been published.*--id {id}"),
        (Nacked("the broker refused 'user.created' (nack)"), "^nothing was published: "),
    ],
)
async def test_a_publish_the_broker_did_not_confirm_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, failure: BrokerUnavailable, said: str
) -> None:
    class Failing:
        async def publish(self, envelope: Envelope) -> None:
            raise failure

    @contextlib.asynccontextmanager
    async def connected(settings: Settings) -> AsyncIterator[Failing]:
        yield Failing()

    monkeypatch.setattr(events, "connected", connected)
    envelope = envelope_for("user.created", example_data(UserCreated))

    with pytest.raises(OpsError, match=said.format(id=envelope.id)):
        await events.publish(Settings(), envelope)


def test_a_dead_letter_with_an_attempt_header_written_badly_is_still_listed() -> None:
    letter = dead_letter_from("orders", b"{}", {ATTEMPT_HEADER: "second"}, "m-1")

    assert (letter.attempts, letter.cause) == (0, "broker")
