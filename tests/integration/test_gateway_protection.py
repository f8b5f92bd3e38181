"""The edge's protections, against a small upstream that shows what reached it.

The upstream stands in for a service only where a real one could not show the point: the
headers it received, an answer that is slow, large or streamed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import gateway.proxy
from gateway.app import Gateway
from tests.conftest import RabbitAdmin
from tests.integration.service_http import Answer
from tests.integration.test_gateway_support import Caller, Gateways
from tests.support import Tokens, eventually, free_port

pytestmark = pytest.mark.integration

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
BIG = [{"id": f"item-{n}", "name": "a product with a long enough name", "n": n} for n in range(200)]


@dataclass
class Cutoffs:
    """Shared by stand-in instances: how many of the next requests to ``/orders/flaky``,
    whichever instance they reach, lose their connection; and what each instance did."""

    left: int = 0
    log: list[tuple[str, str]] = field(default_factory=list)  # (instance url, what it did)


class Upstream:
    """An HTTP server standing in for the order service: it records what it was sent."""

    def __init__(self, cutoffs: Cutoffs | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.cutoffs = cutoffs or Cutoffs()
        self.release_stream = asyncio.Event()
        self.url = ""
        app = web.Application()
        app.router.add_get("/health/ready", self.ready)
        app.router.add_route("*", "/orders/echo", self.echo)
        app.router.add_get("/orders/big", self.big)
        app.router.add_get("/orders/slow", self.slow)
        app.router.add_get("/orders/unhurried", self.unhurried)
        app.router.add_get("/orders/stream", self.stream)
        app.router.add_get("/orders/busy", self.busy)
        app.router.add_get("/orders/broken", self.broken)
        app.router.add_route("*", "/orders/flaky", self.flaky)
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def ready(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append({"headers": dict(request.headers), "body_bytes": len(body)})
        return web.json_response({"headers": dict(request.headers)})

    async def big(self, _: web.Request) -> web.Response:
        return web.json_response(BIG)

    async def slow(self, _: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"late": True})

    async def unhurried(self, _: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({"done": True})

    async def busy(self, _: web.Request) -> web.Response:
        return web.json_response({"busy": True}, status=503, headers={"Retry-After": "1"})

    async def broken(self, _: web.Request) -> web.Response:
        return web.json_response({"broken": True}, status=503)

    async def flaky(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.cutoffs.left > 0:
            # the request arrived whole, then the connection is reset before any answer
            self.cutoffs.left -= 1
            self.cutoffs.log.append((self.url, "cut"))
            assert request.transport is not None
            request.transport.abort()
            return web.Response()  # never sent: the connection is gone
        self.cutoffs.log.append((self.url, "answered"))
        return web.json_response({"body": body.decode()}, status=201)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first;")
        await self.release_stream.wait()  # only once the client has the first part
        await response.write(b"second")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    server.release_stream.set()
    await server.runner.cleanup()


@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


TOKENS = Tokens()
VERIFIER = TOKENS.verifier
TOKEN = TOKENS.mint("u-1")


async def gateway_before(upstream: Upstream, gateways: Gateways, **settings: Any) -> Gateway:
    gateway = await gateways.start(
        verifier=VERIFIER, upstreams=(("order", upstream.url),), **settings
    )
    await eventually(lambda: gateway.balancer.pick("order") is not None)
    return gateway


async def test_security_headers_and_request_ids_on_every_answer(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways)
    async with Caller(gateway.settings.public_url) as caller:
        answers = {
            "proxied": await caller.call("GET", "/orders/echo", token=TOKEN),
            "own": await caller.call("GET", "/"),
            "unauthenticated": await caller.call("GET", "/orders/echo"),
            "unknown": await caller.call("GET", "/nowhere"),
            "no instance": await caller.call("GET", "/providers"),
        }
        given = await caller.call(
            "GET", "/orders/echo", token=TOKEN, headers={"X-Request-ID": "req-42"}
        )
    assert [a.status for a in answers.values()] == [200, 200, 401, 404, 503]
    for what, answer in answers.items():
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers.get(name) == value, (what, name)
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"], what
        assert len(answer.headers["X-Request-ID"]) == 32, what
        assert answer.headers["Server"] == "microshop-gateway", what
    generated = answers["proxied"].headers["X-Request-ID"]
    assert upstream.received[0]["headers"]["X-Request-ID"] == generated
    assert given.headers["X-Request-ID"] == "req-42"
    assert upstream.received[1]["headers"]["X-Request-ID"] == "req-42"


async def test_forwarded_headers_are_set_and_hop_by_hop_ones_dropped(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways)
    async with Caller(gateway.settings.public_url) as caller:
        answer = await caller.call(
            "GET",
            "/orders/echo",
            token=TOKEN,
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "for the gateway only",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "X-Kept": "yes",
            },
        )
    assert answer.status == 200
    seen = upstream.received[0]["headers"]
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{gateway.settings.listen_port}"
    assert seen["Authorization"] == f"Bearer {TOKEN}"  # services check tokens too
    assert seen["X-Kept"] == "yes"
    assert "X-Secret" not in seen
    assert "Proxy-Authorization" not in seen
    assert seen["traceparent"].startswith("00-")


async def test_large_answers_are_gzipped_for_clients_that_accept_it(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways)
    url = f"{gateway.settings.public_url}/orders/big"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(url, headers={**auth, "Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Vary"] == "Accept-Encoding"
            packed = await response.read()
        async with http.get(url, headers={**auth, "Accept-Encoding": "identity"}) as response:
            assert "Content-Encoding" not in response.headers
            plain = await response.read()
        small = f"{gateway.settings.public_url}/orders/echo"
        async with http.get(small, headers={**auth, "Accept-Encoding": "gzip"}) as response:
            assert "Content-Encoding" not in response.headers  # too small to be worth it
    assert gzip.decompress(packed) == plain
    assert len(packed) < len(plain) / 4


async def test_bodies_over_the_limit_get_413_and_never_reach_the_service(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways, max_body_bytes=1024)
    url = f"{gateway.settings.public_url}/orders/echo"
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(4096):  # 256 MiB, if anyone read it all
            sent += 65536
            yield b"x" * 65536

    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=b"x" * 1024, headers=auth) as response:
            assert response.status == 200  # at the limit is fine
        async with http.post(url, data=b"x" * 1025, headers=auth) as response:
            assert response.status == 413
            assert response.headers["Content-Type"] == "application/problem+json"
            assert (await response.json())["max_bytes"] == 1024
        try:
            async with http.post(url, data=endless(), headers=auth) as response:
                assert response.status == 413  # chunked: refused past the limit
        except aiohttp.ClientError:
            pass  # or the gateway closed the connection while we were still sending
    assert [r["body_bytes"] for r in upstream.received] == [1024]
    assert sent < 64 * 2**20


async def test_too_many_requests_get_429_with_retry_after(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(
        upstream, gateways, rate_limit_rps=0.5, rate_limit_burst=3, login_rate_limit_burst=2
    )
    async with Caller(gateway.settings.public_url) as caller:
        statuses = [
            (await caller.call("GET", "/orders/echo", token=TOKEN)).status for _ in range(4)
        ]
        limited = await caller.call("GET", "/orders/echo", token=TOKEN)
        logins = [
            (await caller.call("POST", "/auth/login", json={"email": "a", "password": "b"})).status
            for _ in range(3)
        ]
    assert statuses == [200, 200, 200, 429]
    assert limited.status == 429
    assert limited.headers["Content-Type"] == "application/problem+json"
    assert int(limited.headers["Retry-After"]) >= 1
    # logins have their own, stricter bucket (no user service here: 503 until limited)
    assert logins == [503, 503, 429]


async def test_a_slow_service_is_cut_at_the_timeout_with_504(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways, timeout_seconds=0.5)
    async with Caller(gateway.settings.public_url) as caller:
        started = time.monotonic()
        answer = await caller.call("GET", "/orders/slow", token=TOKEN)
        waited = time.monotonic() - started
    assert answer.status == 504
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert 0.5 <= waited < 1.5


async def test_requests_waiting_for_a_busy_instance_do_not_take_it_out_of_rotation(
    upstream: Upstream, gateways: Gateways, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.proxy, "CONNECTIONS_PER_INSTANCE", 2)  # busy at 2 in flight
    started = await gateway_before(upstream, gateways, connect_timeout_seconds=0.2)
    async with Caller(started.settings.public_url) as caller:
        # 6 at once: 4 wait their turn for a connection, far past the connect timeout
        answers = await asyncio.gather(
            *(caller.call("GET", "/orders/unhurried", token=TOKEN) for _ in range(6))
        )
        after = await caller.call("GET", "/orders/echo", token=TOKEN)
    assert [answer.status for answer in answers] == [200] * 6
    assert after.status == 200  # still in rotation


async def test_answers_are_streamed_not_buffered(upstream: Upstream, gateways: Gateways) -> None:
    gateway = await gateway_before(upstream, gateways)
    url = f"{gateway.settings.public_url}/orders/stream"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=auth) as response:
        async with asyncio.timeout(5):
            first = await response.content.readexactly(len(b"first;"))
        upstream.release_stream.set()
        rest = await response.content.read()
    assert first + rest == b"first;second"


async def test_a_service_with_no_instance_answers_503_at_once(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways)
    async with Caller(gateway.settings.public_url) as caller:
        started = time.monotonic()
        answer = await caller.call("GET", "/providers")
        waited = time.monotonic() - started
        health = await caller.call("GET", "/health")
    assert answer.status == 503
    assert answer.body["detail"] == "no healthy instance of the payment service"
    assert answer.headers["Retry-After"] == "1"
    assert waited < 0.2
    assert health.status == 503
    assert health.body["down"] == ["inventory", "payment", "user"]


async def test_a_service_shedding_load_keeps_its_instance_a_broken_one_loses_it(
    upstream: Upstream, gateways: Gateways
) -> None:
    gateway = await gateway_before(upstream, gateways, breaker_failures=2)
    async with Caller(gateway.settings.public_url) as caller:
        for _ in range(4):  # 503 with Retry-After: busy on purpose, passed on as it is
            busy = await caller.call("GET", "/orders/busy", token=TOKEN)
            assert (busy.status, busy.headers["Retry-After"]) == (503, "1")
        assert (await caller.call("GET", "/orders/echo", token=TOKEN)).status == 200

        for _ in range(2):  # a bare 503 counts against the instance
            assert (await caller.call("GET", "/orders/broken", token=TOKEN)).status == 503
        answer = await caller.call("GET", "/orders/echo", token=TOKEN)
    assert answer.status == 503
    assert len(upstream.received) == 1, "the breaker kept the last request from the instance"


async def test_a_keyed_post_is_retried_on_another_instance_after_a_reset_a_bare_one_is_not(
    gateways: Gateways,
) -> None:
    """On a route whose service honours Idempotency-Key; elsewhere a key changes nothing."""
    cutoffs = Cutoffs()
    instances = [Upstream(cutoffs), Upstream(cutoffs)]
    try:
        urls = {await instance.start() for instance in instances}
        gateway = await gateways.start(
            verifier=VERIFIER,
            upstreams=tuple(("order", url) for url in sorted(urls)),
            keyed_routes=("POST /orders/flaky",),
        )
        await eventually(lambda: sum(i.available for i in gateway.registry.rotation("order")) == 2)
        order = {"items": [{"product_id": "mouse", "quantity": 1}]}
        async with Caller(gateway.settings.public_url) as caller:

            async def send(method: str, key: str | None = None) -> tuple[Answer, list[Any]]:
                """One request whose first connection is cut; the answer and each try."""
                cutoffs.log.clear()
                cutoffs.left = 1  # whichever instance the gateway tries first
                headers = {"Idempotency-Key": key} if key else {}
                answer = await caller.call(
                    method, "/orders/flaky", token=TOKEN, json=order, headers=headers
                )
                return answer, list(cutoffs.log)

            keyed, keyed_attempts = await send("POST", "order-form-7")
            bare, bare_attempts = await send("POST")
            elsewhere, elsewhere_attempts = await send("PUT", "not-honoured-here")
    finally:
        for instance in instances:
            await instance.runner.cleanup()

    assert keyed.status == 201, keyed.body
    assert json.loads(keyed.body["body"]) == order  # the same body, sent a second time
    (cut, _), (answered, what) = keyed_attempts
    assert (what, {cut, answered}) == ("answered", urls)  # tried once more, elsewhere

    assert bare.status == 502, bare.body
    assert bare.headers["Content-Type"] == "application/problem+json"
    assert bare.body["detail"] == "the order service failed to answer"
    assert [what for _, what in bare_attempts] == ["cut"]  # never sent a second time
    assert elsewhere.status == 502  # a key on a route that ignores keys: not sent again
    assert [what for _, what in elsewhere_attempts] == ["cut"]
