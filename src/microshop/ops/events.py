"""``microshop publish`` and ``microshop tail``: put one event on the bus, watch them flow."""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bus.broker import BrokerUnavailable, Delivery, Nacked, Unroutable
from bus.envelope import Envelope, InvalidMessage, MessageRegistry
from bus.settings import Settings
from microshop.catalogue import REGISTRY
from microshop.ops import CLI_SOURCE, BadInput, OpsError, connected


def read_data(argument: str) -> dict[str, Any]:
    """``--data``: JSON text, ``@FILE``, or ``@-`` for standard input; a JSON object."""
    text = argument
    if argument.startswith("@"):
        path = argument[1:]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise BadInput(f"cannot read {path}: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInput(f"--data is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadInput(f"--data must be a JSON object, not {type(data).__name__}")
    return data


def envelope_for(
    message_type: str,
    data: dict[str, Any],
    *,
    source: str = CLI_SOURCE,
    correlation_id: str | None = None,
    message_id: str | None = None,
    registry: MessageRegistry = REGISTRY,
) -> Envelope:
    """Validate ``data`` as a ``message_type`` and wrap it in a new CloudEvent (with
    ``message_id``, to send one again that may have gone: the services take it once).

    Stricter than a consumer: a field the model does not have is refused rather than
    ignored, since here it is a typing mistake, not a newer version of the message. The
    whole CloudEvent is then read back as a consumer reads it: what they would
    dead-letter (an empty source, an over-long id) is refused here.
    """
    try:
        model = registry.model(message_type)
    except InvalidMessage:
        raise BadInput(_unknown_type(message_type, registry)) from None
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise BadInput(f"{message_type} has no field {', '.join(map(repr, unknown))}")
    try:
        message = model.model_validate(data)
    except ValidationError as error:
        raise BadInput(f"invalid {message_type} data: {_first_problem(error)}") from None
    envelope = Envelope.wrap(
        message, source=source, correlation_id=correlation_id, message_id=message_id
    )
    try:  # wrap checks nothing of what it is given: the envelope's own rules, as consumers read it
        Envelope.model_validate(envelope.model_dump())
    except ValidationError as error:
        raise BadInput(f"the services would refuse this message: {_first_problem(error)}") from None
    return envelope


def _first_problem(error: ValidationError) -> str:
    """Where and what the first problem is, and how many more there are."""
    problems = error.errors(include_url=False)
    where = ".".join(str(part) for part in problems[0]["loc"])
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {problems[0]['msg']}{more}"


def _unknown_type(message_type: str, registry: MessageRegistry) -> str:
    known = [model.type for model in registry]
    close = difflib.get_close_matches(message_type, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see schemas/ or the gateway's /docs/events"
    return f"unknown message type {message_type!r}; {hint}"


async def publish(settings: Settings, envelope: Envelope) -> None:
    """Publish ``envelope`` with confirms; a type nobody consumes is refused, not lost."""
    async with connected(settings) as broker:
        try:
            await broker.publish(envelope)
        except Unroutable:
            raise OpsError(
                f"nothing was published: no queue on {settings.exchange} is bound to "
                f"{envelope.type!r} (is the service that consumes it running?)"
            ) from None
        except Nacked as error:
            raise OpsError(f"nothing was published: {error}") from None
        except BrokerUnavailable as error:
            # the broker may hold it yet (a confirm late past a memory alarm): a new id
            # would make a second message the inbox cannot tell from the first
            raise OpsError(
                f"{error}; message {envelope.id} may have been published: to be sure, "
                f"publish it again with --id {envelope.id} (the services take it once)"
            ) from None


def describe(envelope: Envelope) -> str:
    """One line for a person: when, what, the order or user it is about, its flow."""
    moment = envelope.time.astimezone(UTC)
    parts = [
        f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z",
        f"{envelope.type:<22}",
        *(
            f"{key.removesuffix('_id')}={envelope.data[key]}"
            for key in ("order_id", "user_id")
            if envelope.data.get(key) is not None
        ),
        f"correlation={envelope.correlationid or '-'}",
    ]
    return "  ".join(parts)


async def tail(settings: Settings, patterns: Sequence[str], *, as_json: bool) -> None:
    """Print every message whose type matches ``patterns`` until SIGINT or SIGTERM.

    The subscription's queue is exclusive to this process: the broker deletes it when we
    disconnect, so a tail leaves nothing behind, and it takes no message from a service.
    """
    stopped = asyncio.Event()

    async def show(delivery: Delivery) -> None:
        envelope = delivery.envelope
        try:
            print(envelope.to_json().decode() if as_json else describe(envelope), flush=True)
        except BrokenPipeError:
            # the reader left (| head): stop, and send what Python flushes at exit nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            stopped.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    try:
        async with connected(settings) as broker:
            subscription = await broker.subscribe(patterns, show, REGISTRY)
            print(
                f"tailing {' '.join(patterns)} on {settings.exchange} (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )
            await stopped.wait()
            await subscription.stop(grace=1.0)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
