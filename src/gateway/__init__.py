"""The API gateway: one front door for every service.

It routes each path prefix to the service that owns it, finds instances through their
heartbeats on the bus (or a static list), balances across the healthy ones with a breaker
per instance, checks tokens and rate limits at the edge, and shows the system on a page.
"""
