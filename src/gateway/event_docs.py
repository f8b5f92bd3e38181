"""``/docs/events``: the AsyncAPI document of every message, as one page people can read.

Rendered once, on the server, from the document :func:`bus.schemas.asyncapi` generates
(the one committed as ``schemas/asyncapi.json``): each message type with its producer,
its consumers, its fields, its JSON Schema and an example. Every value is escaped; the
page has no script and loads nothing from anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from html import escape
from itertools import groupby
from pathlib import Path
from string import Template
from typing import Any

_LITERAL = re.compile(r"``(.+?)``")
_PAGE = Template((Path(__file__).parent / "event_docs.html").read_text(encoding="utf-8"))


def render(document: Mapping[str, Any]) -> str:
    """The whole page for an AsyncAPI 3.0 document as :func:`bus.schemas.asyncapi` makes it."""
    messages: Mapping[str, Any] = document["components"]["messages"]
    names = sorted(messages)
    families = groupby(names, key=lambda name: name.split(".")[0])
    nav = "\n".join(
        f"<p><b>{escape(family)}</b> "
        + " ".join(f'<a href="#{escape(name)}">{escape(name)}</a>' for name in members)
        + "</p>"
        for family, members in families
    )
    sections = "\n".join(
        _message(name, messages[name], _exchange(document, name)) for name in names
    )
    return _PAGE.substitute(
        count=len(names),
        asyncapi=escape(str(document.get("asyncapi", ""))),
        version=escape(str(document.get("info", {}).get("version", ""))),
        description=escape(str(document.get("info", {}).get("description", ""))),
        exchange=escape(_exchange(document, names[0]) if names else ""),
        content_type=escape(str(document.get("defaultContentType", ""))),
        nav=nav,
        sections=sections,
    )


def _exchange(document: Mapping[str, Any], channel: str) -> str:
    binding = document["channels"][channel]["bindings"]["amqp"]
    return str(binding["exchange"]["name"])


def _message(name: str, message: Mapping[str, Any], exchange: str) -> str:
    data = message["payload"]["allOf"][1]["properties"]["data"]
    kind = str(message.get("x-microshop-kind", "event"))
    consumers = message.get("x-microshop-consumers") or []
    who = (
        escape(", ".join(consumers))
        if consumers
        else '<span class="none">no service consumes it: it is there for whoever watches</span>'
    )
    examples = "".join(
        f"<details open><summary>Example</summary><pre>{_json(example['payload'])}</pre></details>"
        for example in message.get("examples", [])
    )
    tables = _fields(data, caption=None) + "".join(
        _fields(schema, caption=f"{definition}:")
        for definition, schema in sorted(data.get("$defs", {}).items())
    )
    badge = f'<span class="kind {escape(kind)}">{escape(kind)}</span>'
    return f"""<section class="message" id="{escape(name)}">
<h3><a href="#{escape(name)}">{escape(name)}</a>{badge}</h3>
<p>{_prose(str(data.get("description") or message.get("summary", "")))}</p>
<dl>
<dt>producer</dt><dd>{escape(str(message.get("x-microshop-producer", "")))}</dd>
<dt>consumers</dt><dd>{who}</dd>
<dt>routing key</dt><dd><code>{escape(name)}</code> on <code>{escape(exchange)}</code></dd>
<dt>dataschema</dt><dd><code>{escape(str(data.get("$id", "")))}</code></dd>
</dl>
{tables}
<details><summary>JSON Schema of <code>data</code></summary><pre>{_json(data)}</pre></details>
{examples}
</section>"""


def _fields(schema: Mapping[str, Any], *, caption: str | None) -> str:
    required = set(schema.get("required", []))
    rows = "\n".join(
        f"<tr><td><code>{escape(field)}</code></td><td>{escape(_type(spec))}</td>"
        f"<td>{escape(_presence(field in required, spec))}</td>"
        f"<td>{escape(str(spec.get('description', '')))}</td></tr>"
        for field, spec in schema.get("properties", {}).items()
    )
    head = f"<caption>{escape(caption)}</caption>" if caption else ""
    titles = "<tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>"
    return f"<table>{head}{titles}\n{rows}</table>"


def _presence(required: bool, spec: Mapping[str, Any]) -> str:
    return "yes" if required else f"no (default {json.dumps(spec.get('default'))})"


def _type(spec: Mapping[str, Any]) -> str:
    """A JSON Schema type in words: ``string or null``, ``array of LineItem``."""
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in spec:
        return " or ".join(_type(option) for option in spec["anyOf"])
    if "const" in spec:
        return json.dumps(spec["const"])
    if "enum" in spec:
        return "one of " + ", ".join(json.dumps(value) for value in spec["enum"])
    kind = str(spec.get("type", "any"))
    if kind == "array":
        return f"array of {_type(spec.get('items', {}))}"
    return f"{kind} ({spec['format']})" if "format" in spec else kind


def _prose(text: str) -> str:
    """A docstring as HTML: escaped, its ````code```` shown as code."""
    return _LITERAL.sub(r"<code>\1</code>", escape(text))


def _json(value: Any) -> str:
    return escape(json.dumps(value, indent=2, ensure_ascii=False))
