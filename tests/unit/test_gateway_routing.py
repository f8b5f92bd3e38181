"""Where paths go, which requests need no token, and how the gateway reads its settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.routing import DEFAULT_PUBLIC_ROUTES, SERVICES, PublicRoutes, service_for
from gateway.settings import Settings


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/users", "user"),
        ("/users/42", "user"),
        ("/auth/login", "user"),
        ("/.well-known/jwks.json", "user"),
        ("/transactions/t-1", "payment"),
        ("/providers", "payment"),
        ("/refunds", "payment"),
        ("/orders/o-1/cancel", "order"),
        ("/inventory/laptop/restock", "inventory"),
        ("/reservations/o-1", "inventory"),
        ("/productsx", None),
        ("/", None),
        ("/health", None),
    ],
)
def test_each_prefix_belongs_to_one_service(path: str, service: str | None) -> None:
    assert service_for(path) == service


def test_the_routed_services_are_the_four() -> None:
    assert SERVICES == ("inventory", "order", "payment", "user")


def test_default_public_routes_let_in_login_registration_catalogue_docs_and_health_only() -> None:
    public = PublicRoutes(DEFAULT_PUBLIC_ROUTES)
    for method, path in [
        ("POST", "/auth/login"),
        ("POST", "/users"),
        ("GET", "/products"),
        ("GET", "/products/laptop"),
        ("HEAD", "/products/laptop"),
        ("GET", "/.well-known/jwks.json"),
        ("GET", "/health"),
        ("GET", "/health/ready"),
        ("GET", "/docs"),
        ("GET", "/dashboard"),
        ("GET", "/"),
    ]:
        assert public.allows(method, path), (method, path)
    for method, path in [
        ("GET", "/users"),
        ("POST", "/products"),
        ("PUT", "/products/laptop"),
        ("GET", "/orders"),
        ("GET", "/auth/me"),
        ("GET", "/inventory"),
        ("POST", "/refunds"),
        ("GET", "/payments/p-1"),
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("GET", "/dashboard/state"),
        ("GET", "/dashboard/events"),
        ("BREW", "/"),
    ]:
        assert not public.allows(method, path), (method, path)


def test_a_star_method_opens_every_method() -> None:
    public = PublicRoutes(["* /open*"])
    assert public.allows("DELETE", "/open/thing")
    assert not public.allows("DELETE", "/closed")


@pytest.mark.parametrize("rule", ["GET products", "FETCH /x", "GET /a*b", "GET"])
def test_malformed_public_routes_are_refused(rule: str) -> None:
    with pytest.raises(ValueError, match="public route"):
        PublicRoutes([rule])


def test_settings_read_upstreams_and_public_routes_as_comma_separated_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MICROSHOP_UPSTREAMS", "user=http://user:3010, order=http://order:3012")
    monkeypatch.setenv("MICROSHOP_PUBLIC_ROUTES", "GET /products*,POST /auth/login")
    monkeypatch.setenv("MICROSHOP_KEYED_ROUTES", "POST /orders")
    monkeypatch.setenv("MICROSHOP_RATE_LIMIT_RPS", "5")
    settings = Settings()
    assert settings.service == "gateway"
    assert settings.listen_port == 3000
    assert settings.upstreams == (("user", "http://user:3010"), ("order", "http://order:3012"))
    assert settings.public_routes == ("GET /products*", "POST /auth/login")
    assert settings.keyed_routes == ("POST /orders",)
    assert settings.rate_limit_rps == 5
    assert settings.max_body_bytes == 1 << 20


@pytest.mark.parametrize(
    ("name", "value"),
    [("upstreams", "user"), ("upstreams", "user=ftp://x"), ("public_routes", "GET nowhere")],
)
def test_bad_gateway_settings_say_what_is_wrong(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings.model_validate({name: value})


def test_the_internal_port_must_not_be_the_gateways_own() -> None:
    with pytest.raises(ValueError, match="must differ"):
        Settings(internal_port=3000)
    assert Settings(port=3000, internal_port=3100).internal_port == 3100
