"""Tables for integration tests to record a handler's effects in."""

from sqlalchemy import Column, MetaData, String, Table

from payment_svc.store import Cents

metadata = MetaData()
effects = Table("effects", metadata, Column("name", String(100), primary_key=True))
# a column of the application's own type (Decimal money as integer cents)
prices = Table(
    "prices",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("price", Cents, nullable=False),
)
