"""The order service's lookups in the user and inventory services, against a stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bus.resilience import BreakerState
from order_svc.replicas import Directory, Refused, UpstreamUnavailable


@pytest.fixture
async def directory() -> AsyncIterator[tuple[Directory, list[str]]]:
    """A directory whose user and inventory service answer by the path asked for."""
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(request.raw_path)
        if "deactivated" in request.raw_path:
            return web.json_response({"detail": "account deactivated"}, status=401)
        if "broken" in request.raw_path:
            return web.json_response({"detail": "oops"}, status=500)
        return web.json_response({"id": "x", "name": "X", "price": "1.00", "status": "active"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    async with TestServer(app, host="127.0.0.1", port=0) as server, aiohttp.ClientSession() as http:
        url = str(server.make_url(""))
        yield Directory(http, url, url), asked


async def test_a_refusal_is_said_at_once_and_never_opens_the_breaker(
    directory: tuple[Directory, list[str]],
) -> None:
    lookups, asked = directory

    for _ in range(10):  # twice the breaker's threshold
        with pytest.raises(Refused):
            await lookups.user("u-deactivated", "Bearer token")

    assert len(asked) == 10  # asked once each: a refusal is not retried
    assert lookups.users.state is BreakerState.CLOSED
    assert await lookups.user("u-fine", "Bearer token") is not None


async def test_a_failing_service_is_retried_then_unavailable(
    directory: tuple[Directory, list[str]],
) -> None:
    lookups, asked = directory

    with pytest.raises(UpstreamUnavailable):
        await lookups.product("broken")

    assert len(asked) == 3


async def test_ids_go_into_the_path_escaped(directory: tuple[Directory, list[str]]) -> None:
    lookups, asked = directory

    await lookups.product("../metrics")
    await lookups.user("u/../../admin", "Bearer token")

    assert asked == ["/products/..%2Fmetrics", "/users/u%2F..%2F..%2Fadmin"]
