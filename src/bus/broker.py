"""What every broker offers, and the one place that decides a delivery's fate.

A delivery is parsed and validated, handed to the handler, and then acked, sent to a
delayed retry, or dead-lettered with a reason. :func:`process` makes that decision for
both brokers, so :class:`~bus.amqp.AmqpBroker` and :class:`~bus.memory.MemoryBroker`
differ only in how they carry it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal, Protocol, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from bus.envelope import Envelope, InvalidMessage, Message, MessageRegistry
from bus.observability import (
    HANDLER_SECONDS,
    MESSAGES_CONSUMED,
    MESSAGES_DEAD_LETTERED,
    MESSAGES_RETRIED,
    child,
    extract_trace,
    inject_trace,
    new_trace_context,
    spans_recorded,
    tracer,
)
from bus.resilience import out_of_reach, refused_as_data

EXCHANGE = "microshop.events"
DEAD_LETTER_EXCHANGE = "microshop.dlx"
ATTEMPT_HEADER = "x-microshop-attempt"
REASON_HEADER = "x-microshop-reason"
CAUSE_HEADER = "x-microshop-cause"
QUEUE_HEADER = "x-microshop-queue"
ROUTING_KEY_HEADER = "x-microshop-routing-key"
FAILED_AT_HEADER = "x-microshop-failed-at"

log = structlog.get_logger("bus.broker")

# Retries a message gets past its delays while what its handler needs is out of reach,
# each after the last delay: ten minutes at the default 5 s, time for a database to fail
# over or restart, still bounded for a fault that only looks like one.
OUTAGE_RETRIES = 120


def being_cancelled() -> bool:
    """Whether the running task has been asked to stop (a CancelledError it catches is its
    own), rather than handed a CancelledError by something it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Unroutable(Exception):
    """The broker returned a published message: no queue is bound to its routing key."""


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not confirm a publish in time."""


class Nacked(BrokerUnavailable):
    """The broker refused the message (a nack): it holds nothing of it."""


M = TypeVar("M", bound=Message)


class Reject(Exception):
    """Raise from a handler to dead-letter the message at once: retrying cannot help."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as a handler sees it: validated, with how many times it was tried."""

    envelope: Envelope
    message: Message
    queue: str
    attempt: int

    def expect(self, model: type[M]) -> M:
        """The message as ``model``; a message of another type is rejected (dead-lettered)."""
        if not isinstance(self.message, model):
            raise Reject(f"expected {model.type}, got {self.envelope.type}")
        return self.message


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in a dead-letter queue, with why it is there."""

    queue: str
    routing_key: str
    message_id: str | None
    reason: str
    cause: str
    attempts: int
    failed_at: str | None
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with a delivery once it has been processed."""

    action: Literal["ack", "retry", "dead_letter"]
    headers: dict[str, Any] = field(default_factory=dict)
    delay_ms: int = 0


class Consumer(Protocol):
    """A running subscription."""

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking new messages and wait up to ``grace`` s for in-flight handlers."""
        ...


class Broker(Protocol):
    """The interface both brokers implement; services depend only on this."""

    @property
    def is_connected(self) -> bool:
        """True while the broker can publish and consume."""
        ...

    async def connect(self) -> None:
        """Connect and declare the exchanges."""
        ...

    async def close(self) -> None:
        """Stop every consumer and disconnect."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Publish persistently and wait for the broker's confirm.

        Raises :class:`Unroutable` when no queue takes it and :class:`BrokerUnavailable`
        when it is not confirmed.
        """
        ...

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Publish with confirms pipelined; one result per envelope (``None`` = confirmed)."""
        ...

    async def declare(self, queue: str, patterns: Sequence[str]) -> None:
        """Declare ``queue``, its retry and dead-letter queues, and its bindings."""
        ...

    async def consume(
        self, queue: str, patterns: Sequence[str], handler: Handler, registry: MessageRegistry
    ) -> Consumer:
        """Declare ``queue`` bound to ``patterns`` and hand each delivery to ``handler``."""
        ...

    async def subscribe(
        self, patterns: Sequence[str], handler: Handler, registry: MessageRegistry
    ) -> Consumer:
        """Watch messages on a private queue that lives as long as the subscription.

        For observers that need every message rather than a share of them (a gateway's
        service registry, a dashboard, ``microshop tail``): no retries and no dead
        letters; a message its handler fails on is logged and dropped. One that falls
        far behind loses its oldest messages (on RabbitMQ, past ``OBSERVER_BACKLOG``).
        """
        ...

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Look at (without removing) up to ``limit`` messages in ``queue``'s dead-letter queue."""
        ...


async def process(
    body: bytes,
    headers: Mapping[str, Any],
    *,
    queue: str,
    routing_key: str,
    handler: Handler,
    registry: MessageRegistry,
    retry_delays_ms: Sequence[int],
    observer: bool = False,
) -> Outcome:
    """Parse, validate and handle one delivery, and decide what the broker does next.

    Invalid messages and :class:`Reject` go to the dead-letter queue at once; any other
    handler failure is retried after ``retry_delays_ms[attempt - 1]`` until the delays run
    out, then dead-lettered; an outage (the database or the broker out of reach:
    :func:`~bus.resilience.out_of_reach`) is retried ``OUTAGE_RETRIES`` times more, at the
    last delay. An ``observer`` (see :meth:`Broker.subscribe`) neither retries nor
    dead-letters: what it cannot handle is logged and dropped. Cancellation propagates:
    the message is left unacked, so the broker delivers it again.
    """
    attempt = counted(headers, ATTEMPT_HEADER) + 1
    # a retried message comes back through the default exchange: keep its first routing key
    routing_key = str(headers.get(ROUTING_KEY_HEADER) or routing_key)
    try:
        envelope, message = registry.parse(body)
    except InvalidMessage as error:
        if observer:
            log.warning("invalid message ignored", queue=queue, reason=str(error))
            return Outcome("ack")
        log.warning("invalid message dead-lettered", queue=queue, reason=str(error))
        return _dead_letter(queue, routing_key, "unknown", str(error), "invalid", attempt)

    parent = extract_trace(headers) if "traceparent" in headers else _envelope_context(envelope)
    # bind/reset rather than bound_contextvars(): cheaper, and this runs per message
    log_context = structlog.contextvars.bind_contextvars(
        correlation_id=envelope.correlationid, message_id=envelope.id, message_type=envelope.type
    )
    started = time.perf_counter()
    try:
        with _processing(envelope, queue, parent):
            await handler(Delivery(envelope, message, queue, attempt))
    except Reject as error:
        log.warning("message rejected", queue=queue, reason=str(error))
        if observer:
            return Outcome("ack")
        return _dead_letter(queue, routing_key, envelope.type, str(error), "rejected", attempt)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        if observer:
            log.error("observer failed on a message; dropped", exc_info=error)
            return Outcome("ack")
        if refused_as_data(error):  # sent again, it would be refused again
            log.warning("message refused by the database", queue=queue, reason=reason)
            return _dead_letter(queue, routing_key, envelope.type, reason, "invalid", attempt)
        # an outage retries at the last delay while it lasts, within bounds: dead-lettered,
        # messages the saga does not send again (user events, say) would wait for a person
        outage = isinstance(error, BrokerUnavailable) or out_of_reach(error)
        retries = len(retry_delays_ms) + (OUTAGE_RETRIES if outage and retry_delays_ms else 0)
        if attempt <= retries:
            log.warning("handler failed, will retry", attempt=attempt, error=reason)
            child(MESSAGES_RETRIED, queue, envelope.type).inc()
            return Outcome(
                "retry",
                {
                    ATTEMPT_HEADER: attempt,
                    REASON_HEADER: reason[:1000],
                    ROUTING_KEY_HEADER: routing_key,
                },
                retry_delays_ms[min(attempt, len(retry_delays_ms)) - 1],
            )
        log.error("handler failed, giving up", attempt=attempt, exc_info=error)
        detail = f"failed {attempt} times; last error {reason}\n{_last_frame(error)}"
        return _dead_letter(queue, routing_key, envelope.type, detail, "exhausted", attempt)
    finally:
        child(HANDLER_SECONDS, queue, envelope.type).observe(time.perf_counter() - started)
        structlog.contextvars.reset_contextvars(**log_context)
    child(MESSAGES_CONSUMED, queue, envelope.type).inc()
    return Outcome("ack")


def counted(headers: Mapping[str, Any], name: str) -> int:
    """A header that counts something (attempts, deliveries); one missing, or that some
    other client wrote badly, counts 0 (the kit writes its own anew)."""
    try:
        return max(0, int(headers.get(name, 0)))
    except (TypeError, ValueError):
        return 0


def _dead_letter(
    queue: str, routing_key: str, message_type: str, reason: str, cause: str, attempt: int
) -> Outcome:
    child(MESSAGES_DEAD_LETTERED, queue, message_type, cause).inc()
    return Outcome(
        "dead_letter",
        {
            REASON_HEADER: reason[:2000],
            CAUSE_HEADER: cause,
            ATTEMPT_HEADER: attempt,
            QUEUE_HEADER: queue,
            ROUTING_KEY_HEADER: routing_key,
            FAILED_AT_HEADER: datetime.now(UTC).isoformat(),
        },
    )


def dead_letter_from(
    queue: str, body: bytes, headers: Mapping[str, Any], message_id: str | None
) -> DeadLetter:
    """Build a :class:`DeadLetter` from a dead-lettered message's headers."""
    return DeadLetter(
        queue=queue,
        routing_key=str(headers.get(ROUTING_KEY_HEADER, "")),
        message_id=message_id,
        reason=str(headers.get(REASON_HEADER, "dead-lettered by the broker (delivery limit)")),
        cause=str(headers.get(CAUSE_HEADER, "broker")),
        attempts=counted(headers, ATTEMPT_HEADER),
        failed_at=str(headers[FAILED_AT_HEADER]) if FAILED_AT_HEADER in headers else None,
        body=body,
    )


def _last_frame(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


def _envelope_context(envelope: Envelope) -> Any:
    if not envelope.traceparent:
        return None
    return extract_trace(_trace_headers(envelope))


@contextlib.contextmanager
def _processing(envelope: Envelope, queue: str, parent: Any) -> Iterator[None]:
    """The handler's trace context: a CONSUMER span, or the message's context as it came
    (a new trace id when it came without one, so the flow it starts has one of its own)."""
    if spans_recorded():
        with tracer.start_as_current_span(
            f"{envelope.type} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=_span_attributes(envelope, queue),
        ):
            yield
        return
    token = otel_context.attach(parent if parent is not None else new_trace_context())
    try:
        yield
    finally:
        otel_context.detach(token)


def _trace_headers(envelope: Envelope) -> dict[str, Any]:
    carrier = {"traceparent": envelope.traceparent}
    if envelope.tracestate:
        carrier["tracestate"] = envelope.tracestate
    return carrier


def _span_attributes(envelope: Envelope, queue: str) -> dict[str, str]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": queue,
        "messaging.message.id": envelope.id,
        "messaging.message.conversation_id": envelope.correlationid or "",
        "cloudevents.event_type": envelope.type,
    }


@contextlib.contextmanager
def publish_span(envelope: Envelope) -> Iterator[dict[str, Any]]:
    """A PRODUCER span around publishing ``envelope``; yields the headers to send.

    The span's parent is the context the envelope was written in (its ``traceparent``),
    else the current one: the outbox relay publishes long after the request that wrote
    the message, and this keeps the hop inside that request's trace. The span is not
    made current, which spares a context switch per message on the hot path.
    """
    if not spans_recorded():
        # the envelope's own context goes on as the message's (else the current one, if
        # any): no span, nothing to end
        if envelope.traceparent:
            yield _trace_headers(envelope)
        elif trace.get_current_span().get_span_context().is_valid:
            yield inject_trace({})
        else:
            yield {}
        return
    parent = _envelope_context(envelope) if envelope.traceparent else None
    span = tracer.start_span(
        f"{envelope.type} publish",
        context=parent,
        kind=trace.SpanKind.PRODUCER,
        attributes={"messaging.system": "rabbitmq", "messaging.message.id": envelope.id},
    )
    try:
        yield inject_trace({}, trace.set_span_in_context(span))
    except BaseException as error:
        span.record_exception(error)
        span.set_status(trace.StatusCode.ERROR, str(error))
        raise
    finally:
        span.end()


@cache
def _compile(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Match a routing key against a binding pattern exactly as RabbitMQ's topic exchange.

    Words are separated by dots; ``*`` stands for exactly one word and ``#`` for zero or
    more words.
    """
    words = routing_key.split(".")
    parts = _compile(pattern)

    @cache
    def match(p: int, w: int) -> bool:
        if p == len(parts):
            return w == len(words)
        if parts[p] == "#":
            return any(match(p + 1, k) for k in range(w, len(words) + 1))
        if w == len(words):
            return False
        return (parts[p] == "*" or parts[p] == words[w]) and match(p + 1, w + 1)

    return match(0, 0)
