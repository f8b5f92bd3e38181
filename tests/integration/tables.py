"""A table for integration tests to record a handler's effects in."""

from sqlalchemy import Column, MetaData, String, Table

metadata = MetaData()
effects = Table("effects", metadata, Column("name", String(100), primary_key=True))
