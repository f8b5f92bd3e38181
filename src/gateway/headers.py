"""Which headers cross the gateway, each way, and what it adds on the way in."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from bus.web import REQUEST_ID

# RFC 9110 section 7.6.1, plus what proxies must not pass on either way
HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
)
_NOT_FORWARDED = (*HOP_BY_HOP, "Host", "Expect", "traceparent", "tracestate")
_NOT_RETURNED = (*HOP_BY_HOP, "Server", "Date", "X-Request-ID", "X-Correlation-ID")


def _stripped(headers: CIMultiDict[str], names: tuple[str, ...]) -> CIMultiDict[str]:
    for name in names:
        headers.popall(name, None)
    return headers


def upstream_headers(request: web.Request) -> CIMultiDict[str]:
    """The request's headers as an instance should see them."""
    headers = CIMultiDict(request.headers)
    for token in headers.get("Connection", "").split(","):
        if token := token.strip():
            headers.popall(token, None)  # headers the client marked hop-by-hop
    _stripped(headers, _NOT_FORWARDED)
    remote = request.remote or "unknown"
    prior = ", ".join(headers.getall("X-Forwarded-For", []))  # every line, as one
    headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers["X-Request-ID"] = request[REQUEST_ID]
    if "Accept-Encoding" not in headers:
        # else aiohttp asks for gzip, and a compressed answer would reach a client that
        # cannot read it (answers pass through undecoded)
        headers["Accept-Encoding"] = "identity"
    return headers


def downstream_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """The instance's answer headers as the client should see them."""
    headers = CIMultiDict(upstream.headers)
    for token in headers.get("Connection", "").split(","):
        if token := token.strip():
            headers.popall(token, None)
    return _stripped(headers, _NOT_RETURNED)
