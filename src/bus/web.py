"""HTTP conventions every service shares: the aiohttp app factory and what it installs.

- errors are RFC 9457 ``application/problem+json``, whatever raised them;
- every request carries a request id and a correlation id (logs, headers), a SERVER
  span continuing the caller's trace, and Prometheus metrics labelled by route template;
- ``Api`` declares typed routes once and yields both aiohttp routes and an OpenAPI 3.1
  document; bearer-token auth and role checks live in the route, not in a middleware;
- ``/health``, ``/health/live``, ``/health/ready``, ``/metrics`` and ``/openapi.json``.
"""

from __future__ import annotations

import functools
import re
import time
import uuid

import prometheus_client
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic_core import to_json
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bus.api import (
    PRINCIPAL,
    VERIFIER,
    Api,
    Page,
    idempotency_key,
    json_response,
    page_params,
    principal,
)
from bus.auth import TokenVerifier
from bus.health import HEALTH, Health
from bus.observability import HTTP_REQUESTS, HTTP_SECONDS, extract_trace, tracer
from bus.problems import (
    Conflict,
    Forbidden,
    HttpProblem,
    NotFound,
    Unauthorized,
    Unprocessable,
    problem_response,
)
from bus.resilience import out_of_reach, refused_as_data
from bus.settings import Settings
from bus.transactions import Transactions

# services import their HTTP vocabulary from here
__all__ = [
    "CORRELATION_ID",
    "HEALTH",
    "PRINCIPAL",
    "REQUEST_ID",
    "SETTINGS",
    "TRANSACTIONS",
    "VERIFIER",
    "Api",
    "Conflict",
    "Forbidden",
    "Health",
    "HttpProblem",
    "NotFound",
    "Page",
    "Unauthorized",
    "Unprocessable",
    "create_app",
    "idempotency_key",
    "json_response",
    "page_params",
    "principal",
    "problem_middleware",
    "problem_response",
]

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
CORRELATION_ID_HEADER = "X-Correlation-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Anything else collapses to OTHER, so a client inventing methods cannot mint label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

SETTINGS = web.AppKey("SETTINGS", Settings)
# the service's units of work, for route handlers that change state
TRANSACTIONS = web.AppKey("TRANSACTIONS", Transactions)
REQUEST_ID = web.RequestKey("REQUEST_ID", str)
CORRELATION_ID = web.RequestKey("CORRELATION_ID", str)


async def _health(request: web.Request) -> web.Response:
    settings, health = request.app[SETTINGS], request.app[HEALTH]
    dependencies = await health.check_all()
    up = sum(report["status"] == "up" for report in dependencies.values())
    status = "healthy" if up == len(dependencies) else "unhealthy" if up == 0 else "degraded"
    body = {
        "service": settings.service,
        "status": status,
        "version": settings.version,
        "uptime_seconds": round(health.uptime, 3),
        "dependencies": dependencies,
    }
    return json_response(body, status=200 if status == "healthy" else 503)


async def _live(_: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def _ready(request: web.Request) -> web.Response:
    health = request.app[HEALTH]
    dependencies = await health.check_all()
    down = sorted(name for name, report in dependencies.items() if report["status"] != "up")
    ready = health.ready and not down
    body = {
        "service": request.app[SETTINGS].service,
        "status": "ready" if ready else "not_ready",
        "marked_ready": health.ready,
        "down": down,
    }
    return json_response(body, status=200 if ready else 503)


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(
        body=prometheus_client.generate_latest(),
        headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
    )


# --- middlewares ----------------------------------------------------------------------------


def _sane_id(value: str | None) -> str | None:
    return value if value is not None and _SANE_ID.fullmatch(value) else None


def _route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _method(request: web.Request) -> str:
    return request.method if request.method in _METHODS else "OTHER"


@web.middleware
async def _request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = _sane_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
    correlation_id = _sane_id(request.headers.get(CORRELATION_ID_HEADER)) or request_id
    request[REQUEST_ID] = request_id
    request[CORRELATION_ID] = correlation_id
    with structlog.contextvars.bound_contextvars(
        request_id=request_id, correlation_id=correlation_id
    ):
        return await handler(request)


async def _echo_ids(request: web.Request, response: web.StreamResponse) -> None:
    # Done at prepare time rather than in _request_context, so that streamed responses,
    # whose headers leave before the handler returns, carry the ids too.
    if request_id := request.get(REQUEST_ID):
        response.headers[REQUEST_ID_HEADER] = request_id
        response.headers[CORRELATION_ID_HEADER] = request[CORRELATION_ID]


@web.middleware
async def _tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
    method, route = _method(request), _route_template(request)
    with tracer.start_as_current_span(
        f"{method} {route}",
        context=extract_trace(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route},
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:  # 4xx are the client's errors, not this server's
            span.set_status(Status(StatusCode.ERROR))
        return response


@web.middleware
async def _measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.config_dict[SETTINGS].service
    method, route = _method(request), _route_template(request)
    started = time.perf_counter()
    status = 499  # nginx's "client closed request": only a cancelled handler leaves it unset
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        HTTP_REQUESTS.labels(service, method, route, str(status)).inc()
        HTTP_SECONDS.labels(service, method, route).observe(time.perf_counter() - started)


def _passing_trouble(exc: Exception) -> str | None:
    """What went wrong when ``exc`` says an outage that passes (:func:`out_of_reach`), said
    for the client; None for anything else."""
    if not out_of_reach(exc):
        return None
    if isinstance(exc, PoolTimeout):  # every pooled connection stayed busy past the timeout
        return "the database is busy"
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:  # the pool reconnects
            return "the database connection was lost"
        return "the database cannot be reached"  # restarting, too many connections
    return "a service this one needs cannot be reached"  # a refused connection, a timeout


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer whatever a handler raised as problem+json; never a traceback."""
    try:
        return await handler(request)
    except HttpProblem as problem:
        return problem.response(instance=request.path)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not problems
            return web.Response(status=exc.status, headers=exc.headers, body=exc.body)
        default_text = f"{exc.status}: {exc.reason}"
        detail = exc.text if exc.text and exc.text != default_text else exc.reason
        return problem_response(
            exc.status, exc.reason, detail, instance=request.path, headers=exc.headers
        )
    except Exception as exc:
        if (passing := _passing_trouble(exc)) is not None:
            log.warning(passing, route=_route_template(request))
            return problem_response(
                503,
                "Service Unavailable",
                f"{passing}; try again",
                instance=request.path,
                headers={"Retry-After": "1"},
            )
        if refused_as_data(exc):
            log.info("a value the database cannot store", route=_route_template(request))
            return Unprocessable(
                "a value in this request cannot be stored "
                "(text with a NUL character, or a number out of range)"
            ).response(instance=request.path)
        trace.get_current_span().record_exception(exc)
        log.exception("unhandled error", method=request.method, route=_route_template(request))
        # The exception text stays in the logs: it can hold SQL, paths or other callers' data.
        return problem_response(
            500, "Internal Server Error", "internal error", instance=request.path
        )


# --- the app --------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    *,
    api: Api | None = None,
    health: Health | None = None,
    verifier: TokenVerifier | None = None,
    client_max_size: int = 1 << 20,
) -> web.Application:
    """A service's aiohttp app: middlewares, the service's routes, health, metrics, OpenAPI."""
    api = api if api is not None else Api()
    if api.protected and verifier is None:
        # Fail at startup, not on the first authenticated request.
        raise ValueError("the api has protected routes but no TokenVerifier was given")
    app = web.Application(
        middlewares=[_request_context, _tracing, _measure, problem_middleware],
        client_max_size=client_max_size,
    )
    app[SETTINGS] = settings
    app[HEALTH] = health if health is not None else Health()
    if verifier is not None:
        app[VERIFIER] = verifier
    app.on_response_prepare.append(_echo_ids)
    api.add_to(app)

    @functools.cache
    def openapi_document() -> bytes:
        return to_json(api.openapi(title=f"microshop {settings.service}", version=settings.version))

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=openapi_document(), content_type="application/json")

    app.router.add_get("/health", _health)
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
