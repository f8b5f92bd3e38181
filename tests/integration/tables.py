"""Tables for integration tests to record a handler's effects in."""

from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Column, MetaData, String, Table
from sqlalchemy.types import TypeDecorator

metadata = MetaData()
effects = Table("effects", metadata, Column("name", String(100), primary_key=True))


class Cents(TypeDecorator[Decimal]):
    """Money as integer cents in the database, Decimal in Python."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Any) -> int | None:
        return None if value is None else int(value * 100)

    def process_result_value(self, value: int | None, dialect: Any) -> Decimal | None:
        return None if value is None else Decimal(value) / 100


prices = Table(
    "prices",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("price", Cents, nullable=False),
)
