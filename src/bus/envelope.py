"""The CloudEvents 1.0 envelope and the registry of message types.

Every message on the wire is a structured-mode CloudEvent (``application/cloudevents+json``)
whose ``data`` is one registered, frozen pydantic model. Anyone may publish with any AMQP
client: the envelope is plain JSON and the schemas are exported to ``schemas/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTENT_TYPE = "application/cloudevents+json"
MESSAGE_ID_LENGTH = 64  # what the inbox and the outbox keep of a message id
SCHEMA_URN = "urn:microshop:schema:"


class InvalidMessage(ValueError):
    """A message that can never be handled: not JSON, not a CloudEvent, unknown type, bad data.

    It is dead-lettered at once with ``str(error)`` as the reason; retrying cannot help.
    """


class Message(BaseModel):
    """Base of every command and event: a frozen model that ignores unknown fields.

    Ignoring extra fields is what makes a newer minor version of a message readable by an
    older consumer (forward compatibility); a new major version is a new contract.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: ClassVar[str]
    schema_version: ClassVar[str] = "1.0"
    kind: ClassVar[Literal["event", "command"]]

    @classmethod
    def schema_urn(cls) -> str:
        """The ``dataschema`` this model writes: ``urn:microshop:schema:<type>:<version>``."""
        return f"{SCHEMA_URN}{cls.type}:{cls.schema_version}"


class Event(Message):
    """Something that happened, named in the past tense (``order.created``)."""

    kind: ClassVar[Literal["event", "command"]] = "event"


class Command(Message):
    """A request to one owner, named in the imperative (``stock.reserve``)."""

    kind: ClassVar[Literal["event", "command"]] = "command"


def _new_id() -> str:
    # 128 random bits as 32 hex digits: uuid4's randomness without building a UUID (5x cheaper)
    return os.urandom(16).hex()


def _now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """A CloudEvents 1.0 event in structured JSON, with microshop's extensions.

    ``correlationid`` ties every message of one business flow (an order) together,
    ``causationid`` names the message that caused this one, and ``traceparent`` carries
    the W3C trace context so one trace spans every hop.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    specversion: Literal["1.0"] = "1.0"
    # required even though we always set it: the inbox deduplicates by it
    id: str = Field(min_length=1, max_length=MESSAGE_ID_LENGTH)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    time: datetime = Field(default_factory=_now)
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None
    data: dict[str, Any]
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None

    @classmethod
    def wrap(
        cls,
        message: Message,
        *,
        source: str,
        causation: Envelope | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        message_id: str | None = None,
    ) -> Envelope:
        """Wrap ``message`` for publishing, under a new id or ``message_id`` (a message
        sent again: consumers take one id once).

        The correlation id is, in order: the one given, the causing message's, or this
        message's own id (it starts a new flow).
        """
        message_id = message_id or _new_id()
        correlation = correlation_id or (causation.correlationid if causation else None)
        # every field is built here from a validated message: skip validating it again
        return cls.model_construct(
            id=message_id,
            source=source,
            type=message.type,
            dataschema=message.schema_urn(),
            data=message.model_dump(mode="json"),
            correlationid=correlation or message_id,
            causationid=causation.id if causation else None,
            traceparent=traceparent,
            tracestate=tracestate,
            time=_now(),
        )

    def to_json(self) -> bytes:
        """The wire form: compact JSON, ``None`` attributes left out as CloudEvents asks."""
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)

    @classmethod
    def from_json(cls, body: bytes | str) -> Envelope:
        """Parse the wire form, raising :class:`InvalidMessage` with a one-line reason."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as error:
            raise InvalidMessage(f"not a CloudEvent: {_explain(error)}") from None


def _explain(error: ValidationError) -> str:
    parts = []
    for issue in error.errors(include_url=False):
        where = ".".join(str(part) for part in issue["loc"]) or "body"
        parts.append(f"{where}: {issue['msg']}")
    return "; ".join(parts[:5])


class MessageRegistry:
    """Maps a message type (the routing key) to its model, and validates incoming data."""

    def __init__(self, models: Iterable[type[Message]] = ()) -> None:
        self._models: dict[str, type[Message]] = {}
        self.register(*models)

    def register(self, *models: type[Message]) -> None:
        """Add models; registering one type twice with different models is a mistake."""
        for model in models:
            known = self._models.get(model.type)
            if known is not None and known is not model:
                raise ValueError(f"message type {model.type!r} is registered twice")
            self._models[model.type] = model

    def __contains__(self, message_type: object) -> bool:
        return message_type in self._models

    def __iter__(self) -> Iterator[type[Message]]:
        return iter(sorted(self._models.values(), key=lambda model: model.type))

    def __len__(self) -> int:
        return len(self._models)

    def model(self, message_type: str) -> type[Message]:
        """The model for ``message_type``, or :class:`InvalidMessage` when unknown."""
        try:
            return self._models[message_type]
        except KeyError:
            raise InvalidMessage(f"unknown message type {message_type!r}") from None

    def decode(self, envelope: Envelope) -> Message:
        """Validate ``envelope.data`` against its model.

        A message written against another major version of the schema is refused; a newer
        minor version is read, its unknown fields ignored.
        """
        model = self.model(envelope.type)
        if envelope.dataschema and envelope.dataschema.startswith(SCHEMA_URN):
            _, _, version = envelope.dataschema.rpartition(":")
            if version.split(".")[0] != model.schema_version.split(".")[0]:
                raise InvalidMessage(
                    f"{envelope.type} schema version {version} is incompatible with "
                    f"{model.schema_version} (major versions differ)"
                )
        try:
            return model.model_validate(envelope.data)
        except ValidationError as error:
            raise InvalidMessage(f"invalid {envelope.type} data: {_explain(error)}") from None

    def parse(self, body: bytes | str) -> tuple[Envelope, Message]:
        """Parse and validate a wire body into its envelope and message."""
        envelope = Envelope.from_json(body)
        return envelope, self.decode(envelope)
