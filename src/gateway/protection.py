"""The edge's protections: rate limits, tokens, security headers and compression.

Every proxied request pays for these, so each is a dictionary lookup or two: token buckets
keyed by client address, verified tokens cached by the kit's TokenVerifier, and response
headers set in one hook.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_response import ContentCoding
from prometheus_client import Counter

from bus.api import authenticate
from bus.auth import TokenVerifier
from bus.observability import child
from bus.problems import Forbidden, HttpProblem, Unauthorized
from bus.web import CORRELATION_ID, REQUEST_ID
from gateway.routing import PublicRoutes

log = structlog.get_logger(__name__)

REJECTED = Counter(
    "microshop_gateway_rejected_total",
    "Requests the gateway answered itself instead of forwarding, by reason",
    ["reason"],
)

LOGIN_PATH = "/auth/login"


class RateLimiter:
    """A token bucket per client: ``rate`` requests a second, up to ``burst`` at once."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        """Buckets fill at ``rate`` per second up to ``burst``; at most ``max_clients`` kept."""
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}  # client -> [tokens, when counted]

    def wait_time(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when it may go, else the seconds until it may."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._max_clients:
                self.prune()
            self._buckets[client] = [self.burst - 1.0, now]
            return 0.0
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def prune(self) -> int:
        """Forget clients whose buckets have filled up again (they lose nothing by it)."""
        now, full_after = self._clock(), self.burst / self.rate
        idle = [key for key, (_, when) in self._buckets.items() if now - when >= full_after]
        for key in idle:
            del self._buckets[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self._buckets)


def client_address(request: web.Request, trust_forwarded_for: bool) -> str:
    """Who is calling: the peer, or, behind a trusted proxy, the X-Forwarded-For hop that
    proxy appended (the last: what comes before it, the client wrote, and could make up
    to slip past its rate limit)."""
    # the last line: a proxy may add a line of its own after the client's
    if trust_forwarded_for and (lines := request.headers.getall("X-Forwarded-For", [])):
        return lines[-1].rpartition(",")[2].strip()
    return request.remote or "unknown"


def too_many_requests(wait: float) -> HttpProblem:
    """A 429 problem telling the client when to come back."""
    REJECTED.labels("rate_limited").inc()
    seconds = max(1, math.ceil(wait))
    return HttpProblem(
        f"too many requests; retry in {seconds}s", status=429, headers={"Retry-After": str(seconds)}
    )


def guard(
    *,
    limiter: RateLimiter,
    login_limiter: RateLimiter,
    public: PublicRoutes,
    verifier: TokenVerifier,
    operator: PublicRoutes,
    internal_port: int,
    trust_forwarded_for: bool = False,
    gzip_min_bytes: int = 1024,
) -> Middleware:
    """Rate limits, then a valid token on every route that is not public; gzip on the way out.

    ``operator`` routes (status, metrics, the dashboard's data) also need the token to be an
    admin's or a manager's, except on ``internal_port``, where they need none.
    """
    unauthenticated = child(REJECTED, "unauthenticated")

    @web.middleware
    async def guard_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        client = client_address(request, trust_forwarded_for)
        path = request.path
        buckets = login_limiter if path == LOGIN_PATH else limiter
        if wait := buckets.wait_time(client):
            raise too_many_requests(wait)
        # Unknown routes fall through to their 404, which tells nothing GET / does not.
        if request.match_info.http_exception is None and not public.allows(request.method, path):
            for_operators = operator.allows(request.method, path)
            if not (for_operators and internal_port and arrived_on(request) == internal_port):
                try:
                    principal = await authenticate(request, verifier)
                except Unauthorized:
                    unauthenticated.inc()
                    raise
                if for_operators and not principal.is_staff:
                    raise Forbidden("the gateway's status, metrics and dashboard are for staff")
        response = await handler(request)
        if not response.prepared:  # streamed answers decided for themselves
            compress_if_worthwhile(request, response, gzip_min_bytes)
        return response

    return guard_request


def arrived_on(request: web.Request) -> int | None:
    """The local port the request came in on."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return sockname[1] if isinstance(sockname, tuple) else None


_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Server": "microshop-gateway",  # not aiohttp's version string
}
API_CSP = "default-src 'none'; frame-ancestors 'none'"
_COMPRESSIBLE = (
    "application/json",
    "application/problem+json",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
    "text/html",
    "text/plain",
    "text/css",
    "text/csv",
)
_NO_BODY_STATUSES = frozenset({204, 304})


def compress_if_worthwhile(
    request: web.Request, response: web.StreamResponse, min_bytes: int
) -> None:
    """Gzip ``response`` when its type compresses, it is big enough and the client accepts it.

    Must run before the response is prepared: aiohttp settles the encoding then.
    """
    headers = response.headers
    if "Content-Encoding" in headers or response.content_type not in _COMPRESSIBLE:
        return
    length = response.content_length
    # An answer of unknown length may be a live stream: gzip would hold its parts back.
    if length is None or length < min_bytes:
        return
    headers.setdefault("Vary", "Accept-Encoding")
    if (
        "gzip" in request.headers.get("Accept-Encoding", "")
        and request.method != "HEAD"
        and response.status not in _NO_BODY_STATUSES
    ):
        response.enable_compression(ContentCoding.gzip)


async def secure(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: the request's ids and the security headers."""
    headers = response.headers
    headers.update(_SECURITY_HEADERS)
    headers.setdefault("Content-Security-Policy", API_CSP)
    headers.setdefault("Cache-Control", "no-store")
    if request_id := request.get(REQUEST_ID):
        headers["X-Request-ID"] = request_id
        headers["X-Correlation-ID"] = request[CORRELATION_ID]
