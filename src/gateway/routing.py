"""What the gateway routes where, and which requests may pass without a token."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

# first path segment -> the service that owns it
ROUTES: Mapping[str, str] = MappingProxyType(
    {
        "users": "user",
        "auth": "user",
        ".well-known": "user",
        "payments": "payment",
        "transactions": "payment",
        "providers": "payment",
        "refunds": "payment",
        "orders": "order",
        "inventory": "inventory",
        "products": "inventory",
        "reservations": "inventory",
    }
)
SERVICES: tuple[str, ...] = tuple(sorted(set(ROUTES.values())))

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# Login, registration, the catalogue, the keys to check tokens with, health, the docs, and
# the dashboard's page (its data needs a token; the page asks the person to sign in).
DEFAULT_PUBLIC_ROUTES = (
    "POST /auth/login",
    "POST /users",
    "GET /products*",
    "GET /providers",
    "GET /.well-known/*",
    "GET /",
    "GET /health*",
    "GET /openapi.json",
    "GET /docs*",
    "GET /dashboard",
)

# The gateway's own operator pages: instances and their URLs, metrics, every user's latest
# orders. Admins and managers only; without a token on the internal port (for Prometheus
# and probes inside the network), unless an operator makes them public.
OPERATOR_ROUTES = ("GET /status", "GET /metrics", "GET /dashboard/*")

# Routes whose service honours Idempotency-Key (the same key never acts twice): a keyed
# request there may be sent to another instance after a connection failure. Elsewhere a
# key is only passed on, and a write is never sent twice.
KEYED_ROUTES = ("POST /orders", "POST /payments/process")


def service_for(path: str) -> str | None:
    """The service owning ``path`` (by its first segment), or None."""
    first = path[1:].partition("/")[0]
    return ROUTES.get(first)


def parse_rule(rule: str) -> tuple[str, str]:
    """``"GET /products*"`` -> ``("GET", "/products*")``; a ValueError says what is wrong."""
    method, _, path = rule.strip().partition(" ")
    method, path = method.upper(), path.strip()
    if method != "*" and method not in METHODS:
        raise ValueError(f"public route {rule!r}: unknown method {method!r}")
    if not path.startswith("/") or "*" in path[:-1]:
        raise ValueError(f"public route {rule!r}: need a path like /products or /products*")
    return method, path


class PublicRoutes:
    """Requests that need no token: ``"METHOD /path"``; ``*`` ends a prefix; HEAD is GET.

    Looked up on every request, so the rules are compiled into a set of exact paths and a
    tuple of prefixes per method.
    """

    def __init__(self, rules: Iterable[str]) -> None:
        """Compile ``rules``; a malformed rule is a ValueError."""
        exact: dict[str, set[str]] = {method: set() for method in METHODS}
        prefixes: dict[str, list[str]] = {method: [] for method in METHODS}
        for rule in rules:
            method, path = parse_rule(rule)
            for each in METHODS if method == "*" else (method,):
                if path.endswith("*"):
                    prefixes[each].append(path[:-1])
                else:
                    exact[each].add(path)
        exact["HEAD"] |= exact["GET"]
        prefixes["HEAD"] += prefixes["GET"]
        self._exact = {method: frozenset(paths) for method, paths in exact.items()}
        self._prefixes = {method: tuple(paths) for method, paths in prefixes.items()}

    def allows(self, method: str, path: str) -> bool:
        """True when ``method path`` may pass the edge without a token."""
        exact = self._exact.get(method)
        if exact is None:
            return False
        return path in exact or path.startswith(self._prefixes[method])
