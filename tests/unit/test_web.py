"""Tests for bus.web: problem details, request ids, tracing, metrics, auth, health, OpenAPI."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import prometheus_client
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bus.auth import SigningKey, TokenVerifier
from bus.settings import Settings
from bus.web import (
    CORRELATION_ID,
    HEALTH,
    SETTINGS,
    Api,
    Conflict,
    Health,
    HttpProblem,
    NotFound,
    Page,
    create_app,
    json_response,
    page_params,
    principal,
    problem_response,
)

ISS = "microshop-user"
AUD = "microshop"
PROBLEM = "application/problem+json"

Client = TestClient[web.Request, web.Application]


class Address(BaseModel):
    city: str


class NewUser(BaseModel):
    email: str
    age: int = Field(ge=0)
    address: Address


class UserView(BaseModel):
    user_id: str
    balance: Decimal


def build_api() -> Api:
    api = Api()

    @api.post("/users", body=NewUser, response=UserView, status=201, summary="Register a user")
    async def register(request: web.Request, body: NewUser) -> web.StreamResponse:
        return json_response(UserView(user_id=body.email, balance=Decimal("1.50")), status=201)

    @api.get("/users", response=Page[UserView])
    async def list_users(request: web.Request) -> web.StreamResponse:
        limit, offset = page_params(request)
        page = Page[UserView](items=[], total=0, limit=limit, offset=offset)
        return json_response(page)

    @api.get("/users/{user_id}", response=UserView, roles=("admin", "manager", "user"))
    async def get_user(request: web.Request) -> web.StreamResponse:
        """Read one user."""
        caller = principal(request)
        return json_response(UserView(user_id=caller.user_id, balance=Decimal("0.10")))

    @api.delete("/users/{user_id}", roles=("admin",))
    async def delete_user(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    @api.get("/whoami")
    async def whoami(request: web.Request) -> web.StreamResponse:
        return json_response({"user_id": principal(request).user_id})

    @api.get("/boom")
    async def boom(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("password=hunter2 at db.internal:5432")

    @api.get("/db-gone")
    async def db_gone(request: web.Request) -> web.StreamResponse:
        gone = ConnectionResetError("connection was closed in the middle of operation")
        raise DBAPIError("SELECT 1", None, gone, connection_invalidated=True)

    @api.get("/db-refused")
    async def db_refused(request: web.Request) -> web.StreamResponse:
        raise DBAPIError("INSERT INTO t", None, ValueError("secret=hunter2 violates a check"))

    @api.get("/db-down")
    async def db_down(request: web.Request) -> web.StreamResponse:
        raise ConnectionRefusedError("connect call failed ('127.0.0.1', 5432)")

    @api.get("/db-busy")
    async def db_busy(request: web.Request) -> web.StreamResponse:
        raise PoolTimeout("QueuePool limit of size 10 overflow 0 reached")

    @api.get("/orders/{order_id}")
    async def get_order(request: web.Request) -> web.StreamResponse:
        raise NotFound(f"order {request.match_info['order_id']} not found")

    @api.post("/stock")
    async def take_stock(request: web.Request) -> web.StreamResponse:
        raise Conflict("only 2 left", sku="SKU-1", available=2)

    @api.get("/old")
    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/users")

    @api.get("/context")
    async def context(request: web.Request) -> web.StreamResponse:
        bound = structlog.contextvars.get_contextvars()
        return json_response({"bound": bound, "stored": request[CORRELATION_ID]})

    return api


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def health() -> Health:
    return Health(timeout=0.05)


@pytest.fixture
async def client(key: SigningKey, health: Health) -> AsyncIterator[Client]:
    verifier = TokenVerifier.from_jwks(key.jwks(), issuer=ISS, audience=AUD)
    settings = Settings(service="user", version="1.2.3")
    app = create_app(
        settings, api=build_api(), health=health, verifier=verifier, client_max_size=4096
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def bearer(key: SigningKey, role: str = "user", **kwargs: Any) -> dict[str, str]:
    token = key.mint(subject="u1", role=role, issuer=ISS, audience=AUD, **kwargs)
    return {"Authorization": f"Bearer {token}"}


async def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == PROBLEM
    body: dict[str, Any] = await response.json(content_type=PROBLEM)
    assert body["status"] == status
    return body


# --- problem details ------------------------------------------------------------------------


async def test_unmatched_route_is_a_404_problem(client: Client) -> None:
    body = await problem(await client.get("/nowhere"), 404)
    assert body["title"] == "Not Found"
    assert body["type"] == "about:blank"
    assert body["instance"] == "/nowhere"


async def test_wrong_method_is_a_405_problem_keeping_allow(client: Client) -> None:
    response = await client.put("/users/u1")
    await problem(response, 405)
    assert "GET" in response.headers["Allow"]


async def test_invalid_body_is_a_422_listing_each_field(client: Client) -> None:
    payload = {"email": "a@example.com", "age": -1, "address": {}}
    body = await problem(await client.post("/users", json=payload), 422)
    locs = {error["loc"] for error in body["errors"]}
    assert locs == {"age", "address.city"}
    assert "age: Input should be greater than or equal to 0" in body["detail"]
    assert "address.city: Field required" in body["detail"]


async def test_malformed_json_is_a_422(client: Client) -> None:
    response = await client.post(
        "/users", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    body = await problem(response, 422)
    assert body["errors"][0]["loc"] == "body"


async def test_validation_errors_never_echo_the_input(client: Client) -> None:
    payload = {"email": "a@example.com", "age": "s3cret-value", "address": {"city": "x"}}
    response = await client.post("/users", json=payload)
    await problem(response, 422)
    assert "s3cret-value" not in await response.text()


async def test_non_json_body_is_a_415(client: Client) -> None:
    response = await client.post("/users", data=b"email=a", headers={"Content-Type": "text/plain"})
    await problem(response, 415)
    assert response.headers["Accept"] == "application/json"


async def test_body_over_client_max_size_is_a_413_problem(client: Client) -> None:
    payload = {"email": "x" * 5000, "age": 1, "address": {"city": "x"}}
    await problem(await client.post("/users", json=payload), 413)


async def test_valid_body_reaches_the_handler_as_a_model(client: Client) -> None:
    payload = {"email": "a@example.com", "age": 30, "address": {"city": "Lyon"}}
    response = await client.post("/users", json=payload)
    assert response.status == 201
    assert await response.json() == {"user_id": "a@example.com", "balance": "1.50"}


@pytest.mark.parametrize("path", ["/boom", "/db-refused"])  # any error, a database's too
async def test_unhandled_exception_is_a_500_that_hides_the_text(client: Client, path: str) -> None:
    with structlog.testing.capture_logs() as logs:
        response = await client.get(path)
    body = await problem(response, 500)
    assert body["detail"] == "internal error"
    text = await response.text()
    assert "hunter2" not in text
    assert "Traceback" not in text
    assert any(event["event"] == "unhandled error" and event["exc_info"] for event in logs)


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/db-gone", "the database connection was lost; try again"),
        ("/db-busy", "the database is busy; try again"),  # the pool, past its timeout
        ("/db-down", "a service this one needs cannot be reached; try again"),
    ],
)
async def test_database_trouble_worth_retrying_is_a_503_to_try_again(
    client: Client, path: str, detail: str
) -> None:
    response = await client.get(path)
    body = await problem(response, 503)
    assert body["detail"] == detail
    assert response.headers["Retry-After"] == "1"


async def test_http_problem_subclasses_set_status_title_and_extras(client: Client) -> None:
    body = await problem(await client.get("/orders/42"), 404)
    assert body["detail"] == "order 42 not found"
    body = await problem(await client.post("/stock"), 409)
    assert body["title"] == "Conflict"
    assert body["sku"] == "SKU-1"
    assert body["available"] == 2


async def test_redirect_exceptions_pass_through_unchanged(client: Client) -> None:
    response = await client.get("/old", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/users"


def test_problem_extras_cannot_override_the_standard_members() -> None:
    response = problem_response(400, "Bad Request", "nope", status_text="x", title_extra=1)
    body = json.loads(response.body)  # type: ignore[arg-type]
    assert body["status"] == 400
    assert response.status == 400
    extras = HttpProblem("nope", status=418, detail_hint="tea").extra
    assert extras == {"detail_hint": "tea"}


def test_json_response_writes_decimals_as_strings() -> None:
    response = json_response({"user": UserView(user_id="u1", balance=Decimal("9.90"))})
    assert json.loads(response.body) == {"user": {"user_id": "u1", "balance": "9.90"}}  # type: ignore[arg-type]
    assert response.content_type == "application/json"


# --- request and correlation ids ------------------------------------------------------------


async def test_request_id_is_generated_when_absent(client: Client) -> None:
    response = await client.get("/health/live")
    request_id = response.headers["X-Request-ID"]
    assert len(request_id) == 32
    int(request_id, 16)
    assert response.headers["X-Correlation-ID"] == request_id


async def test_request_and_correlation_ids_are_echoed_also_on_errors(client: Client) -> None:
    headers = {"X-Request-ID": "req-1.a_B", "X-Correlation-ID": "order-77"}
    for path in ("/health/live", "/nowhere", "/boom"):
        response = await client.get(path, headers=headers)
        assert response.headers["X-Request-ID"] == "req-1.a_B"
        assert response.headers["X-Correlation-ID"] == "order-77"


@pytest.mark.parametrize("bad", ["has space", "semi;colon", "x" * 129, ""])
async def test_insane_request_ids_are_replaced(client: Client, bad: str) -> None:
    response = await client.get("/health/live", headers={"X-Request-ID": bad})
    assert response.headers["X-Request-ID"] != bad
    assert len(response.headers["X-Request-ID"]) == 32


async def test_ids_are_bound_to_logs_and_stored_on_the_request(client: Client) -> None:
    response = await client.get("/context", headers={"X-Correlation-ID": "saga-9"})
    body = await response.json()
    assert body["stored"] == "saga-9"
    assert body["bound"]["correlation_id"] == "saga-9"
    assert body["bound"]["request_id"] == response.headers["X-Request-ID"]


# --- auth -----------------------------------------------------------------------------------


async def test_protected_route_without_token_is_401_with_challenge(client: Client) -> None:
    response = await client.get("/users/u1")
    body = await problem(response, 401)
    assert body["detail"] == "missing bearer token"
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_expired_token_is_401(client: Client, key: SigningKey) -> None:
    headers = bearer(key, ttl=60, now=int(time.time()) - 3600)
    body = await problem(await client.get("/users/u1", headers=headers), 401)
    assert body["detail"] == "token expired"


async def test_tampered_token_is_401(client: Client, key: SigningKey) -> None:
    header, _, signature = bearer(key)["Authorization"].removeprefix("Bearer ").split(".")
    claims = {"sub": "u1", "role": "admin", "iss": ISS, "aud": AUD, "iat": 0, "exp": 2**40}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    auth = {"Authorization": f"Bearer {header}.{forged}.{signature}"}
    body = await problem(await client.delete("/users/u1", headers=auth), 401)
    assert body["detail"] == "bad signature"


async def test_wrong_role_is_403(client: Client, key: SigningKey) -> None:
    response = await client.delete("/users/u1", headers=bearer(key, role="user"))
    body = await problem(response, 403)
    assert "admin" in body["detail"]


async def test_allowed_role_gets_200_with_the_principal(client: Client, key: SigningKey) -> None:
    response = await client.get("/users/u1", headers=bearer(key, role="manager"))
    assert response.status == 200
    assert await response.json() == {"user_id": "u1", "balance": "0.10"}
    response = await client.delete("/users/u1", headers=bearer(key, role="admin"))
    assert response.status == 204


async def test_a_token_that_cannot_be_checked_for_want_of_keys_is_a_503_not_a_401(
    key: SigningKey,
) -> None:
    # nothing listens on port 1: the keys cannot be fetched, the token may well be good
    verifier = TokenVerifier(
        jwks_url="http://127.0.0.1:1/.well-known/jwks.json", issuer=ISS, audience=AUD
    )
    app = create_app(Settings(service="user"), api=build_api(), verifier=verifier)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/users/u1", headers=bearer(key))
        body = await problem(response, 503)
    assert "keys are unavailable" in body["detail"]
    assert response.headers["Retry-After"] == "5"


async def test_principal_on_a_public_route_is_401(client: Client, key: SigningKey) -> None:
    # Public routes never verify the token, so a handler asking for the caller gets a 401.
    await problem(await client.get("/whoami", headers=bearer(key)), 401)


def test_protected_api_without_verifier_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="TokenVerifier"):
        create_app(Settings(service="user"), api=build_api())


def test_unknown_role_fails_at_registration() -> None:
    api = Api()
    with pytest.raises(ValueError, match="admn"):

        @api.get("/x", roles=("admn",))
        async def handler(request: web.Request) -> web.StreamResponse:
            raise AssertionError


# --- paging ---------------------------------------------------------------------------------


async def test_page_params_default_and_cap(client: Client) -> None:
    response = await client.get("/users")
    assert await response.json() == {"items": [], "total": 0, "limit": 50, "offset": 0}
    response = await client.get("/users", params={"limit": "500", "offset": "20"})
    assert await response.json() == {"items": [], "total": 0, "limit": 200, "offset": 20}


@pytest.mark.parametrize(
    "query", [{"limit": "abc"}, {"limit": "-1"}, {"offset": "-5"}, {"offset": "1.5"}]
)
async def test_page_params_reject_non_integers_and_negatives(
    client: Client, query: dict[str, str]
) -> None:
    body = await problem(await client.get("/users", params=query), 422)
    (name,) = query
    assert body["errors"][0]["loc"] == f"query.{name}"


# --- health ---------------------------------------------------------------------------------


async def up() -> bool:
    return True


async def down() -> bool:
    return False


async def hangs() -> bool:
    await asyncio.sleep(10)
    return True


async def explodes() -> bool:
    raise ConnectionError("refused")


async def test_health_is_200_when_every_dependency_is_up(client: Client, health: Health) -> None:
    health.add("broker", up)
    health.add("database", up)
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body["service"] == "user"
    assert body["version"] == "1.2.3"
    assert body["status"] == "healthy"
    assert body["uptime_seconds"] >= 0
    assert body["dependencies"]["broker"]["status"] == "up"
    assert body["dependencies"]["database"]["status"] == "up"


@pytest.mark.parametrize(("check", "error"), [(down, None), (hangs, "timeout")])
async def test_health_is_503_when_a_check_fails_or_times_out(
    client: Client, health: Health, check: Any, error: str | None
) -> None:
    health.add("broker", up)
    health.add("database", check)
    response = await client.get("/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "degraded"
    assert body["dependencies"]["database"]["status"] == "down"
    assert body["dependencies"]["database"].get("error") == error


async def test_health_is_unhealthy_when_every_check_fails(client: Client, health: Health) -> None:
    health.add("broker", explodes)
    response = await client.get("/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unhealthy"
    assert body["dependencies"]["broker"] == {
        "status": "down",
        "error": "ConnectionError",
        "latency_ms": body["dependencies"]["broker"]["latency_ms"],
    }


async def test_live_is_200_regardless_of_dependencies(client: Client, health: Health) -> None:
    health.add("broker", down)
    response = await client.get("/health/live")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}


async def test_ready_follows_the_flag_and_the_checks(client: Client, health: Health) -> None:
    health.add("database", up)
    assert (await client.get("/health/ready")).status == 503
    health.mark_ready()
    response = await client.get("/health/ready")
    assert response.status == 200
    assert (await response.json())["status"] == "ready"
    health.add("broker", hangs)
    response = await client.get("/health/ready")
    assert response.status == 503
    assert (await response.json())["down"] == ["broker"]
    health.add("broker", up)
    health.mark_not_ready()
    response = await client.get("/health/ready")
    assert response.status == 503
    assert (await response.json())["marked_ready"] is False


async def test_app_keys_hold_settings_and_health(client: Client, health: Health) -> None:
    assert client.app[HEALTH] is health
    assert client.app[SETTINGS].service == "user"


# --- metrics, tracing, OpenAPI --------------------------------------------------------------


async def test_metrics_label_the_route_template_not_the_path(
    client: Client, key: SigningKey
) -> None:
    await client.get("/users/raw-id-123", headers=bearer(key))
    await client.get("/no/such/raw-path")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    text = await response.text()
    labels = [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "microshop_http_requests_total"
    ]
    assert {"service": "user", "method": "GET", "route": "/users/{user_id}", "status": "200"} in (
        labels
    )
    assert {"service": "user", "method": "GET", "route": "unmatched", "status": "404"} in labels
    assert "raw-id-123" not in text
    assert "raw-path" not in text


async def test_request_span_continues_the_incoming_trace(
    client: Client, key: SigningKey, spans: InMemorySpanExporter
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", **bearer(key)}
    response = await client.get("/users/u7", headers=headers)
    assert response.status == 200
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.name == "GET /users/{user_id}"
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == parent_id
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/users/{user_id}"
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["http.response.status_code"] == 200


async def test_openapi_describes_paths_bodies_and_security(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    doc = await response.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"] == {"title": "microshop user", "version": "1.2.3"}
    register = doc["paths"]["/users"]["post"]
    assert register["operationId"] == "register"
    assert register["summary"] == "Register a user"
    body_schema = register["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/NewUser"}
    assert register["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UserView"
    }
    assert "application/problem+json" in register["responses"]["422"]["content"]
    assert "security" not in register
    get_user = doc["paths"]["/users/{user_id}"]["get"]
    assert get_user["security"] == [{"bearer": []}]
    assert get_user["summary"] == "Read one user."
    assert get_user["parameters"][0]["name"] == "user_id"
    schemas = doc["components"]["schemas"]
    assert {"NewUser", "Address", "UserView", "Problem"} <= set(schemas)
    assert schemas["NewUser"]["properties"]["address"] == {"$ref": "#/components/schemas/Address"}
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
