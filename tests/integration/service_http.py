"""A service over HTTP, as another process sees it: one client for the tests' helpers."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
from multidict import CIMultiDictProxy


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, body (parsed when JSON, else text; None when empty),
    headers, and the bytes as they came."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]
    raw: bytes


class ServiceHttp:
    """Calls one base URL; use as ``async with``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = aiohttp.ClientSession()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Send one request; ``json`` is sent as JSON, ``data`` as it is."""
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, f"{self.base_url}{path}", json=json, data=data, headers=sent
        ) as response:
            raw = await response.read()
            body: Any = None
            if raw:
                json_body = "json" in response.content_type
                body = await response.json(content_type=None) if json_body else raw.decode()
            return Answer(response.status, body, response.headers, raw)
