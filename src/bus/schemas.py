"""Message contracts as files: a JSON Schema per message type and an AsyncAPI 3.0 document.

Generated from the registry, committed under ``schemas/``, and checked in CI so the
published contracts never drift from the code.
"""

from __future__ import annotations

import inspect
import json
import types
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from bus.broker import EXCHANGE
from bus.envelope import CONTENT_TYPE, SCHEMA_URN, Envelope, Message

# fixed, so the generated files only change when a contract does
EXAMPLE_TIME = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Contract:
    """A message type with who publishes it and who consumes it."""

    model: type[Message]
    producer: str
    consumers: tuple[str, ...] = ()


def _dump(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def message_schema(model: type[Message]) -> dict[str, Any]:
    """The JSON Schema (2020-12) of one message type's ``data``."""
    schema = model.model_json_schema(mode="serialization")
    schema.update(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{SCHEMA_URN}{model.type}:{model.schema_version}",
            "title": model.type,
            "description": inspect.cleandoc(model.__doc__ or model.type),
            "x-microshop-kind": model.kind,
            "x-microshop-version": model.schema_version,
        }
    )
    return schema


def example_data(model: type[BaseModel]) -> dict[str, Any]:
    """A valid ``data`` for ``model``, made from its fields' types, for documentation.

    A field with a default other than None shows it; every other field gets a plain
    value of its type. The result is validated by ``model``, so it is always accepted.
    """
    values = {name: _field_example(name, field) for name, field in model.model_fields.items()}
    return model.model_validate(values).model_dump(mode="json")


def example_envelope(contract: Contract) -> dict[str, Any]:
    """A whole CloudEvent of ``contract``'s type as its producer would publish it."""
    model = contract.model
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, model.schema_urn()).hex
    envelope = Envelope(
        id=event_id,
        source=f"/microshop/{contract.producer}",
        type=model.type,
        time=EXAMPLE_TIME,
        dataschema=model.schema_urn(),
        data=example_data(model),
        correlationid=event_id,
    )
    example: dict[str, Any] = json.loads(envelope.to_json())
    return example


def _field_example(name: str, field: FieldInfo) -> Any:
    if not field.is_required() and field.default is not None:
        return field.default
    return _example(name, field.annotation)


def _example(name: str, annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return args[0]
    if origin in (Union, types.UnionType):
        return _example(name, next(arg for arg in args if arg is not type(None)))
    if origin in (list, tuple, set, frozenset):
        return [_example(name, args[0])]
    if origin is dict:
        return {}
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return example_data(annotation)
        if issubclass(annotation, Enum):
            return next(iter(annotation)).value
        scalars: dict[type, Any] = {
            bool: True,
            int: 1,
            float: 1.5,
            Decimal: "9.99",
            datetime: EXAMPLE_TIME.isoformat(),
            str: _example_text(name),
        }
        if annotation in scalars:
            return scalars[annotation]
    raise TypeError(f"no example for field {name!r} of type {annotation!r}")


def _example_text(name: str) -> str:
    if name == "id" or name.endswith("_id"):
        return f"{name.removesuffix('_id')}-1"
    if "email" in name:
        return "someone@example.com"
    if "url" in name:
        return "http://127.0.0.1:8080"
    return name.replace("_", " ")


def asyncapi(contracts: Iterable[Contract], *, version: str) -> dict[str, Any]:
    """An AsyncAPI 3.0 document: a channel per routing key on the topic exchange."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for contract in sorted(contracts, key=lambda c: c.model.type):
        model, name = contract.model, contract.model.type
        messages[name] = {
            "name": name,
            "title": model.__name__,
            "summary": inspect.cleandoc(model.__doc__ or name).splitlines()[0],
            "contentType": CONTENT_TYPE,
            "payload": {
                "allOf": [
                    {"$ref": "#/components/schemas/CloudEvent"},
                    {"properties": {"type": {"const": name}, "data": message_schema(model)}},
                ]
            },
            "examples": [{"name": name, "payload": example_envelope(contract)}],
            "x-microshop-kind": model.kind,
            "x-microshop-producer": contract.producer,
            "x-microshop-consumers": list(contract.consumers),
        }
        channels[name] = {
            "address": name,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": EXCHANGE, "type": "topic", "durable": True, "vhost": "/"},
                    "bindingVersion": "0.3.0",
                }
            },
        }
        ref = {"$ref": f"#/channels/{name}"}
        operations[f"{contract.producer}.send.{name}"] = {"action": "send", "channel": ref}
        for consumer in contract.consumers:
            operations[f"{consumer}.receive.{name}"] = {"action": "receive", "channel": ref}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "microshop events",
            "version": version,
            "description": "Every message is a CloudEvents 1.0 structured JSON event on the "
            f"topic exchange {EXCHANGE}; the routing key is the event type.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {"rabbitmq": {"host": "localhost:5672", "protocol": "amqp"}},
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": {"CloudEvent": Envelope.model_json_schema(mode="serialization")},
        },
    }


def render(contracts: Iterable[Contract], *, version: str) -> dict[str, str]:
    """Every file under ``schemas/``: relative path -> content."""
    contracts = list(contracts)
    files = {f"messages/{c.model.type}.json": _dump(message_schema(c.model)) for c in contracts}
    files["asyncapi.json"] = _dump(asyncapi(contracts, version=version))
    return files


def export(contracts: Iterable[Contract], directory: Path, *, version: str) -> list[str]:
    """Write the files, removing stale message schemas; return the paths written."""
    files = render(contracts, version=version)
    for stale in set(_existing(directory)) - set(files):
        (directory / stale).unlink()
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return sorted(files)


def check(contracts: Iterable[Contract], directory: Path, *, version: str) -> list[str]:
    """The differences between ``directory`` and what the code generates (empty: up to date)."""
    files = render(contracts, version=version)
    existing = set(_existing(directory))
    problems = [f"missing: {p}" for p in sorted(set(files) - existing)]
    problems += [f"not generated by the code: {p}" for p in sorted(existing - set(files))]
    problems += [
        f"stale: {p}"
        for p in sorted(existing & set(files))
        if (directory / p).read_text(encoding="utf-8") != files[p]
    ]
    return problems


def _existing(directory: Path) -> list[str]:
    generated = [directory / "asyncapi.json", *sorted((directory / "messages").glob("*.json"))]
    return [str(p.relative_to(directory)) for p in generated if p.exists()]
