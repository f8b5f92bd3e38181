"""A person using the system over HTTP (the system itself is ``microshop.local``)."""

from __future__ import annotations

from typing import Any

import aiohttp

from microshop.local import LocalSystem
from tests.support import eventually

DEMO_PASSWORD = "demo-password-1"


class Client:
    """A user of the system over HTTP, logged in as one of the demo users."""

    def __init__(self, system: LocalSystem, http: aiohttp.ClientSession) -> None:
        self.system = system
        self.http = http
        self.tokens: dict[str, str] = {}

    async def login(self, email: str, password: str = DEMO_PASSWORD) -> str:
        async with self.http.post(
            f"{self.system.url('user')}/auth/login", json={"email": email, "password": password}
        ) as response:
            assert response.status == 200, await response.text()
            token: str = (await response.json())["access_token"]
        self.tokens[email] = token
        return token

    async def call(
        self,
        method: str,
        service: str,
        path: str,
        *,
        as_user: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        token = self.tokens.get(as_user) or await self.login(as_user)
        async with self.http.request(
            method,
            f"{self.system.url(service)}{path}",
            json=json,
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
        ) as response:
            body = await response.json(content_type=None)
            return response.status, body

    async def wait_for_status(
        self, order_id: str, statuses: set[str], as_user: str, within: float = 30
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def reached() -> bool:
            status, body = await self.call("GET", "order", f"/orders/{order_id}", as_user=as_user)
            seen.update(body)
            return status == 200 and body["status"] in statuses

        await eventually(reached, within=within, every=0.1)
        return seen
