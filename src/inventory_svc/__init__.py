"""The inventory service: products, stock levels and order reservations (port 3013)."""
