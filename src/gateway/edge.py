"""Each request's context: its ids, a SERVER span continuing the caller's trace, metrics.

The kit's middlewares (``bus.web``) do this for services in four layers; the gateway fuses
them into one, since every proxied request pays for each layer, and does the error
translation with the kit's own middleware after it. Request ids are not bound to the log
context (that cost 5% of a proxied request); log lines carry the trace id, and the few
logged in a request name its id themselves.
"""

from __future__ import annotations

import random
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from bus.observability import HTTP_REQUESTS, HTTP_SECONDS, child, extract_trace, tracer
from bus.web import CORRELATION_ID, REQUEST_ID

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR = Status(StatusCode.ERROR)


def new_request_id() -> str:
    """A fresh request id: 128 random bits in hex (an id, not a secret)."""
    return f"{random.getrandbits(128):032x}"


def edge(service: str) -> Middleware:
    """The outermost middleware of the gateway, labelling metrics with ``service``."""

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        headers = request.headers
        request_id = headers.get("X-Request-ID")
        if request_id is None or not _SANE_ID.fullmatch(request_id):
            request_id = new_request_id()
        correlation_id = headers.get("X-Correlation-ID")
        if correlation_id is None or not _SANE_ID.fullmatch(correlation_id):
            correlation_id = request_id
        request[REQUEST_ID] = request_id
        request[CORRELATION_ID] = correlation_id
        method = request.method if request.method in _METHODS else "OTHER"
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        parent = extract_trace(headers) if "traceparent" in headers else None
        span = tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )
        span_token = otel_context.attach(trace.set_span_in_context(span))
        status = 499  # the client went away before an answer: nginx's code for it
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(_ERROR)
            span.end()
            otel_context.detach(span_token)
            child(HTTP_REQUESTS, service, method, route, str(status)).inc()
            child(HTTP_SECONDS, service, method, route).observe(time.perf_counter() - started)

    return request_context
