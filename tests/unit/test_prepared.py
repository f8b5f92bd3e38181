"""Every statement the services prepare goes to asyncpg on PostgreSQL, none falls back.

A statement ``bus.prepared`` cannot compile for asyncpg (an Enum or JSON result, a default
computed per row, result columns sharing a name) quietly goes through SQLAlchemy: every
other test still passes, and the saga loses the speed. This compiles each one offline.
"""

from __future__ import annotations

import importlib

import pytest
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg

from bus.prepared import Prepared, _compile

MODULES = [
    "bus.inbox",
    "bus.outbox",
    "order_svc.store",
    "order_svc.replicas",
    "inventory_svc.store",
    "payment_svc.store",
]


def _prepared() -> list[tuple[str, Prepared]]:
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, Prepared):
                found.append((f"{name}.{attribute}", value))
    return found


@pytest.mark.parametrize(("name", "prepared"), _prepared(), ids=lambda v: str(v))
def test_the_statement_compiles_for_asyncpg(name: str, prepared: Prepared) -> None:
    dialect = pg_asyncpg.dialect()
    compiler = prepared.statement.compile(  # type: ignore[attr-defined]
        dialect=dialect, schema_translate_map={None: "shop"}, render_schema_translate=True
    )
    required = frozenset(
        bind for bind in compiler.positiontup or () if compiler.binds[bind].required
    )
    compiled = _compile(prepared.statement, compiler, required, dialect)
    assert compiled is not None, f"{name} would go through SQLAlchemy"
    assert "shop." in compiled.sql


def test_the_services_prepare_their_statements() -> None:
    assert len(_prepared()) >= 20  # a module renamed or emptied would leave the test above idle
