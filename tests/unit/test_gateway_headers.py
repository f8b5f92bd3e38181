"""Which headers cross the gateway, what it adds, and what it keeps to itself."""

from __future__ import annotations

from unittest.mock import Mock

import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from bus.web import REQUEST_ID
from gateway.app import Gateway, Settings, build
from gateway.headers import downstream_headers, upstream_headers
from tests.support import Tokens


def request_with(headers: dict[str, str]) -> object:
    transport = Mock()
    transport.get_extra_info.return_value = ("198.51.100.7", 52000)
    request = make_mocked_request("GET", "/orders", headers=headers, transport=transport)
    request[REQUEST_ID] = "req-1"
    return request


def test_hop_by_hop_and_connection_listed_headers_stay_behind() -> None:
    sent = upstream_headers(
        request_with(  # type: ignore[arg-type]
            {
                "Host": "shop.example",
                "Connection": "keep-alive, X-Private",
                "X-Private": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Upgrade": "h2c",
                "Proxy-Authorization": "Basic x",
                "traceparent": "00-forged-01",
                "Authorization": "Bearer t",
                "Accept-Encoding": "gzip",
            }
        )
    )
    for name in (
        "Host", "Connection", "X-Private", "Keep-Alive", "TE", "Upgrade",
        "Proxy-Authorization", "traceparent",
    ):  # fmt: skip
        assert name not in sent, name
    assert sent["Authorization"] == "Bearer t"
    assert sent["Accept-Encoding"] == "gzip"


def test_forwarding_headers_name_the_client_the_scheme_the_host_and_the_request() -> None:
    sent = upstream_headers(
        request_with({"Host": "shop.example", "X-Forwarded-For": "203.0.113.1"})  # type: ignore[arg-type]
    )
    assert sent["X-Forwarded-For"] == "203.0.113.1, 198.51.100.7"
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"] == "shop.example"
    assert sent["X-Request-ID"] == "req-1"
    assert sent["Accept-Encoding"] == "identity"  # the client asked for no compression


def test_answers_lose_hop_by_hop_headers_and_the_services_identity() -> None:
    upstream = Mock()
    upstream.headers = CIMultiDictProxy(
        CIMultiDict(
            {
                "Content-Type": "application/json",
                "Content-Length": "2",
                "Connection": "keep-alive",
                "Transfer-Encoding": "chunked",
                "Server": "Python/3.11 aiohttp/3",
                "X-Request-ID": "from-the-service",
                "Location": "/orders/1",
            }
        )
    )
    returned = downstream_headers(upstream)
    assert dict(returned) == {
        "Content-Type": "application/json",
        "Content-Length": "2",
        "Location": "/orders/1",
    }


@pytest.fixture
def gateway() -> Gateway:
    """A gateway whose app the tests serve in-process: no bus, no instances, never started."""
    return build(Settings(discovery=False), verifier=Tokens().verifier)


async def test_an_unexpected_error_in_the_gateway_is_a_500_problem_without_the_trace(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_pick(*_: object) -> None:
        raise RuntimeError("balancer state corrupt at /srv/gateway/balancer.py")

    monkeypatch.setattr(gateway.balancer, "pick", broken_pick)
    async with TestClient(TestServer(gateway.app)) as client:
        response = await client.get("/products")  # public, so it reaches the proxy
        text = await response.text()
    assert response.status == 500
    assert response.headers["Content-Type"] == "application/problem+json"
    assert len(response.headers["X-Request-ID"]) == 32
    assert (await response.json())["detail"] == "internal error"
    for leak in ("Traceback", "RuntimeError", "corrupt", "/srv/", ".py"):
        assert leak not in text, leak
