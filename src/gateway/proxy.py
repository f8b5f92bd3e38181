"""Forwarding a request to an instance of its service and streaming the answer back.

One client session with pooled keep-alive connections serves every request. Idempotent
requests (GET, HEAD, or carrying an ``Idempotency-Key``) are tried once more on another
instance after a connection failure; a request whose connection could not even be opened
never left, so it is tried elsewhere whatever its method. The whole exchange, up to the
answer's headers, fits in one deadline: past it the client gets a 504.
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import Counter
from yarl import URL

from bus.observability import child, inject_trace, tracer
from bus.problems import HttpProblem
from bus.web import REQUEST_ID
from gateway.balancer import Balancer
from gateway.headers import downstream_headers, upstream_headers
from gateway.protection import REJECTED, compress_if_worthwhile
from gateway.registry import Instance
from gateway.routing import PublicRoutes

log = structlog.get_logger(__name__)

ATTEMPTS = Counter(
    "microshop_gateway_upstream_attempts_total",
    "Requests sent to instances, by service and outcome",
    ["service", "outcome"],
)

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
_UPSTREAM_TROUBLE = frozenset({502, 503, 504})
# answers up to this size are read whole and sent in one write; larger ones are streamed
BUFFER_LIMIT = 256 * 1024
CHUNK = 64 * 1024


CONNECTIONS_PER_INSTANCE = 256  # requests in flight to one instance; more wait their turn


class BodyTooLarge(HttpProblem):
    """The request body is over the limit (413)."""

    status = 413


class Proxy:
    """Sends requests to instances the balancer picks, within a deadline."""

    def __init__(
        self,
        balancer: Balancer,
        *,
        timeout: float,
        connect_timeout: float,
        retries: int,
        max_body: int,
        keyed: PublicRoutes,
        gzip_min_bytes: int = 1024,
    ) -> None:
        """``timeout`` bounds each request up to its answer's headers (and between chunks).

        A request whose connection could not be opened is sent to another instance, whatever
        its method: it never left. One that failed after it was sent is sent again only if
        it is GET, HEAD or OPTIONS, or has an ``Idempotency-Key`` on a ``keyed`` route.
        (Below that, aiohttp sends a PUT or DELETE once more on a fresh connection when a
        kept-alive one turns out closed, as RFC 9112 allows idempotent methods: the
        services' PUT and DELETE have no second effect when repeated.)
        """
        self.balancer = balancer
        self.keyed = keyed
        self.timeout = timeout
        self.retries = retries
        self.max_body = max_body
        self.gzip_min_bytes = gzip_min_bytes
        # sock_connect, not connect: aiohttp's connect timeout also runs while a request
        # waits for a free connection, and a busy instance would read as a refused one
        # (taken out of rotation); the wait is bounded by the request's deadline instead
        self.client_timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> aiohttp.ClientSession:
        """Create the one pooled client session (on the running loop)."""
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=CONNECTIONS_PER_INSTANCE, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.client_timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # the gateway keeps nobody's cookies
        )
        return self.session

    async def close(self) -> None:
        """Close the session and its pooled connections."""
        if self.session is not None:
            await self.session.close()

    def handler(self, service: str) -> Handler:
        """An aiohttp handler forwarding to ``service``."""

        async def forward(request: web.Request) -> web.StreamResponse:
            return await self.forward(request, service)

        return forward

    async def forward(self, request: web.Request, service: str) -> web.StreamResponse:
        """Forward ``request`` to an instance of ``service`` and relay its answer."""
        headers = upstream_headers(request)
        url = request.raw_path
        method = request.method
        retryable = method in _IDEMPOTENT or (
            "Idempotency-Key" in headers and self.keyed.allows(method, request.path)
        )
        try:
            # a request that may be sent again needs its body kept, not streamed once
            body = await self._body(request, whole=retryable)
        except BodyTooLarge as problem:
            response = problem.response(instance=request.path)
            response.force_close()  # rather than read the rest of the body to reuse it
            return response
        deadline = asyncio.get_running_loop().time() + self.timeout
        tried: list[Instance] = []
        while True:
            instance = self.balancer.pick(service, tried)
            if instance is None:
                raise self._unavailable(service, tried)
            tried.append(instance)
            try:
                return await self._exchange(request, instance, url, headers, body, deadline)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                # the connection was never opened, so the request never left: safe anywhere
                self.balancer.refused(instance)
                _log_failure(request, instance, error)
                if len(tried) > self.retries:
                    raise self._unavailable(service, tried) from None
            except TimeoutError as error:  # the deadline, or the socket went quiet too long
                _log_failure(request, instance, error)
                raise HttpProblem(
                    f"the {service} service did not answer within {self.timeout:g}s", status=504
                ) from None
            except aiohttp.ClientError as error:
                _log_failure(request, instance, error)
                if not retryable or len(tried) > self.retries:
                    raise HttpProblem(
                        f"the {service} service failed to answer", status=502
                    ) from None

    async def _body(
        self, request: web.Request, *, whole: bool
    ) -> bytes | aiohttp.StreamReader | None:
        """The request's body, refused past ``max_body`` bytes: read into bytes when
        ``whole`` or when its length is unknown (chunked), else the stream to pass on."""
        length = request.content_length
        if length is not None and length > self.max_body:
            raise self._too_large()
        if not request.body_exists:
            return None
        if length is not None and not whole:
            return request.content
        # Read at most one byte past the limit, never the whole of a huge chunked body.
        body = await request.content.read(self.max_body + 1)
        while len(body) <= self.max_body and not request.content.at_eof():
            more = await request.content.read(self.max_body + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > self.max_body:
            raise self._too_large()
        return body

    def _too_large(self) -> BodyTooLarge:
        child(REJECTED, "too_large").inc()
        limit = self.max_body
        return BodyTooLarge(f"the request body is over the limit of {limit} bytes", max_bytes=limit)

    async def _exchange(
        self,
        request: web.Request,
        instance: Instance,
        path: str,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader | None,
        deadline: float,
    ) -> web.StreamResponse:
        assert self.session is not None, "Proxy.open() was not awaited"
        method = request.method
        span = tracer.start_span(
            f"{method} {instance.service}",
            kind=SpanKind.CLIENT,
            attributes={"server.address": instance.url, "http.request.method": method},
        )
        headers.update(inject_trace({}, trace.set_span_in_context(span)))
        self.balancer.started(instance)
        upstream: aiohttp.ClientResponse | None = None
        ok = False
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await self.session.request(
                    method,
                    URL(instance.url + path, encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                )
                length = upstream.content_length
                small = method == "HEAD" or (length is not None and length <= BUFFER_LIMIT)
                payload = await upstream.read() if small else None
            status = upstream.status
            # a 503 with Retry-After is an instance shedding load on purpose: it is alive,
            # and opening its breaker would turn away the requests it can still take
            shedding = status == 503 and "Retry-After" in upstream.headers
            ok = status not in _UPSTREAM_TROUBLE or shedding
            span.set_attribute("http.response.status_code", status)
            if payload is None:
                return await self._stream(request, upstream)
            return web.Response(
                body=payload or None,
                status=status,
                reason=upstream.reason,
                headers=downstream_headers(upstream),
            )
        except BaseException as error:
            span.set_status(StatusCode.ERROR, type(error).__name__)
            raise
        finally:
            if upstream is not None:
                upstream.release()  # back to the pool when read to the end, else closed
            span.end()
            self.balancer.finished(instance, ok=ok)
            child(ATTEMPTS, instance.service, "ok" if ok else "failed").inc()

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=downstream_headers(upstream)
        )
        compress_if_worthwhile(request, response, self.gzip_min_bytes)
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, TimeoutError) as error:
            # Headers are gone already: all we can do is cut the connection, so the client
            # sees a broken answer rather than a complete-looking short one.
            log.warning(
                "upstream broke off mid-answer",
                request_id=request[REQUEST_ID],
                error=type(error).__name__,
            )
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        return response

    def _unavailable(self, service: str, tried: list[Instance]) -> HttpProblem:
        child(REJECTED, "no_instance").inc()
        detail = f"no healthy instance of the {service} service"
        if tried:
            detail += f" (tried {len(tried)})"
        return HttpProblem(detail, status=503, headers={"Retry-After": "1"}, service=service)


def _log_failure(request: web.Request, instance: Instance, error: BaseException) -> None:
    log.info(
        "upstream attempt failed",
        request_id=request[REQUEST_ID],
        service=instance.service,
        url=instance.url,
        error=type(error).__name__,
    )
