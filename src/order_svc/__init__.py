"""The order service: orders, and the saga that carries each one to confirmed or cancelled."""
