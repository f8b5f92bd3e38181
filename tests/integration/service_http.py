"""A service over HTTP, as another process sees it: one client for the tests' helpers."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
from multidict import CIMultiDictProxy


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, parsed JSON body (None when empty), headers."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]


class ServiceHttp:
    """Calls one base URL; use as ``async with``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = aiohttp.ClientSession()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Send one request; the body is sent as JSON when given."""
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        async with self._http.request(
            method, f"{self.base_url}{path}", json=json, headers=sent
        ) as response:
            text = await response.text()
            body = await response.json(content_type=None) if text else None
            return Answer(response.status, body, response.headers)
