"""Typed routes declared once: aiohttp routes, request bodies validated by pydantic, bearer
auth and roles checked in the route, and the OpenAPI 3.1 document built from the same
declarations. Also the collection conventions (``Page``, ``?limit=&offset=``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar, Unpack

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from pydantic_core import to_json

from bus.auth import ROLES, AuthError, KeysUnavailable, Principal, TokenVerifier, parse_bearer
from bus.problems import Forbidden, HttpProblem, Unauthorized, Unprocessable, status_phrase

log = structlog.get_logger("bus.api")

_PATH_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")
_REF = "#/components/schemas/{model}"

VERIFIER = web.AppKey("VERIFIER", TokenVerifier)
PRINCIPAL = web.RequestKey("PRINCIPAL", Principal)

T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def json_response(
    data: BaseModel | dict[str, Any] | list[Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON response; models serialise as ``model_dump(mode="json")`` would (Decimals as strings).

    ``to_json`` does that in one pass, and also for models nested in dicts and lists.
    """
    return web.Response(
        body=to_json(data), status=status, headers=headers, content_type="application/json"
    )


# --- paging ---------------------------------------------------------------------------------


class Page(BaseModel, Generic[T]):
    """One page of a collection, and where it sits in the whole."""

    items: list[T]
    total: int
    limit: int
    offset: int


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # isdigit alone would pass "٣" or a 5000-digit number that overflows the database's OFFSET.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        message = "must be a non-negative integer below 10^9"
        raise Unprocessable(
            f"query.{name}: {message}", errors=[{"loc": f"query.{name}", "msg": message}]
        )
    return int(raw)


def page_params(
    request: web.Request, default_limit: int = 50, max_limit: int = 200
) -> tuple[int, int]:
    """``(limit, offset)`` from ``?limit=&offset=``; bad values are a 422, limit is capped."""
    limit = _query_int(request, "limit", default_limit)
    return min(limit, max_limit), _query_int(request, "offset", 0)


def idempotency_key(request: web.Request, longest: int) -> str | None:
    """The request's ``Idempotency-Key``, if it has one: 1 to ``longest`` printable ASCII
    characters (what the service's table keeps), else a 422."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= longest and key.isascii() and key.isprintable()):
        message = f"must be 1-{longest} printable ASCII characters"
        raise Unprocessable(
            f"header.Idempotency-Key: {message}",
            errors=[{"loc": "header.Idempotency-Key", "msg": message}],
        )
    return key


# --- auth and bodies ------------------------------------------------------------------------


def principal(request: web.Request) -> Principal:
    """The caller a protected route authenticated; a 401 problem when there is none."""
    try:
        return request[PRINCIPAL]
    except KeyError:
        raise Unauthorized("authentication required") from None


async def authenticate(request: web.Request, verifier: TokenVerifier) -> Principal:
    """The caller the request's bearer token names, kept on the request: a 401 problem for
    a bad token, a 503 one (try again) when the keys to check it are out of reach."""
    try:
        found = await verifier.verify(parse_bearer(request.headers.get("Authorization")))
    except KeysUnavailable as exc:
        log.warning("cannot check tokens", error=str(exc))
        raise HttpProblem(
            "cannot check tokens right now: the user service's keys are unavailable",
            status=503,
            headers={"Retry-After": "5"},
        ) from None
    except AuthError as exc:
        raise Unauthorized(str(exc)) from None
    request[PRINCIPAL] = found
    return found


async def _authenticate(request: web.Request, roles: tuple[str, ...]) -> None:
    found = await authenticate(request, request.config_dict[VERIFIER])
    if roles and not found.has_role(*roles):
        raise Forbidden(f"requires one of the roles: {', '.join(roles)}")


async def _parse_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise HttpProblem(
            "the body must be JSON (application/json)",
            status=415,
            headers={"Accept": "application/json"},
        )
    raw = await request.read()  # raises the 413 when over client_max_size
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        # No input values: they may be passwords or card numbers, and we would echo them.
        errors = [
            {"loc": ".".join(str(part) for part in error["loc"]) or "body", "msg": error["msg"]}
            for error in exc.errors(include_url=False, include_input=False)
        ]
        detail = "; ".join(f"{error['loc']}: {error['msg']}" for error in errors)
        raise Unprocessable(detail, errors=errors) from None


# --- typed routes and OpenAPI ---------------------------------------------------------------


class RouteOptions(TypedDict, total=False):
    """What ``Api.route`` accepts besides the method and path."""

    body: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    summary: str | None
    roles: tuple[str, ...]
    auth: bool


@dataclass(frozen=True, slots=True)
class _Operation:
    method: str
    path: str
    handler: Callable[..., Awaitable[web.StreamResponse]]
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    summary: str | None = None
    roles: tuple[str, ...] = ()
    auth: bool = False

    def __post_init__(self) -> None:
        # A misspelt role would lock everyone out without a single error.
        if unknown := set(self.roles) - set(ROLES):
            raise ValueError(f"unknown roles {sorted(unknown)} on {self.method} {self.path}")

    @property
    def protected(self) -> bool:
        return self.auth or bool(self.roles)

    async def endpoint(self, request: web.Request) -> web.StreamResponse:
        if self.protected:
            await _authenticate(request, self.roles)
        if self.body is None:
            return await self.handler(request)
        return await self.handler(request, await _parse_body(request, self.body))

    def describe(self, refs: Mapping[tuple[Any, JsonSchemaMode], Any]) -> dict[str, Any]:
        ok: dict[str, Any] = {"description": status_phrase(self.status)}
        if self.response is not None:
            schema = refs[(self.response, "serialization")]
            ok["content"] = {"application/json": {"schema": schema}}
        problem = {
            "description": "Problem details (RFC 9457)",
            "content": {
                "application/problem+json": {"schema": {"$ref": _REF.format(model="Problem")}}
            },
        }
        codes = (["415", "422"] if self.body else []) + (["401", "403"] if self.protected else [])
        operation: dict[str, Any] = {
            "operationId": self.handler.__name__,
            "responses": {str(self.status): ok} | dict.fromkeys([*codes, "default"], problem),
        }
        summary = self.summary or (self.handler.__doc__ or "").strip().partition("\n")[0]
        if summary:
            operation["summary"] = summary
        if names := _PATH_PARAM.findall(self.path):
            operation["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in names
            ]
        if self.body is not None:
            schema = refs[(self.body, "validation")]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        if self.protected:
            operation["security"] = [{"bearer": []}]
        return operation


_PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details; extension members may follow.",
    "properties": {name: {"type": "string"} for name in ("type", "title", "detail", "instance")}
    | {"status": {"type": "integer"}},
    "required": ["type", "title", "status", "detail"],
}


class Api:
    """A service's typed routes, declared once for both aiohttp and the OpenAPI document.

    A handler with ``body=Model`` receives the validated model as its second argument.
    Routes with ``roles`` (or ``auth=True``) need a valid bearer token; others are public.
    """

    def __init__(self) -> None:
        """Start with no routes."""
        self._operations: list[_Operation] = []

    @property
    def protected(self) -> bool:
        """True when some route needs a token, so the app needs a verifier."""
        return any(operation.protected for operation in self._operations)

    def route(self, method: str, path: str, **options: Unpack[RouteOptions]) -> Callable[[H], H]:
        """Register the decorated handler; it is returned unchanged, so tests can call it."""

        def register(handler: H) -> H:
            self._operations.append(_Operation(method.upper(), path, handler, **options))
            return handler

        return register

    def get(self, path: str, **options: Unpack[RouteOptions]) -> Callable[[H], H]:
        """Register a GET route."""
        return self.route("GET", path, **options)

    def post(self, path: str, **options: Unpack[RouteOptions]) -> Callable[[H], H]:
        """Register a POST route."""
        return self.route("POST", path, **options)

    def put(self, path: str, **options: Unpack[RouteOptions]) -> Callable[[H], H]:
        """Register a PUT route."""
        return self.route("PUT", path, **options)

    def patch(self, path: str, **options: Unpack[RouteOptions]) -> Callable[[H], H]:
        """Register a PATCH route."""
        return self.route("PATCH", path, **options)

    def delete(self, path: str, **options: Unpack[RouteOptions]) -> Callable[[H], H]:
        """Register a DELETE route."""
        return self.route("DELETE", path, **options)

    def add_to(self, app: web.Application) -> None:
        """Add every route to ``app``, each named after its handler (for ``url_for``)."""
        for operation in self._operations:
            app.router.add_route(
                operation.method,
                operation.path,
                operation.endpoint,
                name=operation.handler.__name__,
            )

    def openapi(self, title: str, version: str) -> dict[str, Any]:
        """The OpenAPI 3.1 document describing every route."""
        wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
        for operation in self._operations:
            if operation.body is not None:
                wanted[(operation.body, "validation")] = None
            if operation.response is not None:
                wanted[(operation.response, "serialization")] = None
        # One pass over every model: nested models land once in components, and a model
        # whose input and output schemas differ gets distinct -Input / -Output names.
        refs, schemas = models_json_schema(list(wanted), ref_template=_REF)
        paths: dict[str, dict[str, Any]] = {}
        for operation in self._operations:
            path = _PATH_PARAM.sub(r"{\1}", operation.path)
            paths.setdefault(path, {})[operation.method.lower()] = operation.describe(refs)
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version},
            "paths": paths,
            "components": {
                "schemas": schemas.get("$defs", {}) | {"Problem": _PROBLEM_SCHEMA},
                "securitySchemes": {
                    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
                },
            },
        }
