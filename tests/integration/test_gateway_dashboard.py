"""The dashboard and the API docs in a real browser: headless Chromium, driven over CDP.

Skipped, saying why, where Debian's ``chromium`` package is not installed, except on CI
(``CI`` set), where a missing browser is a failure: .ci/run installs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import user_svc.app
from tests.conftest import RabbitAdmin
from tests.integration.conftest import ServiceStarter
from tests.integration.test_gateway_support import (
    ALICE,
    BOB,
    Caller,
    Gateways,
    place_order,
    start_system,
)
from tests.support import eventually

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"),
        reason="needs headless Chromium: apt-get install chromium",
    ),
]


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.process: asyncio.subprocess.Process | None = None
        self.http = aiohttp.ClientSession()
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def open(self, url: str) -> None:
        """Start Chromium on ``url`` and attach to its page."""
        self.process = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            *(
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "--window-size=1280,900",
                url,
            ),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        await eventually(port_file.exists, within=30)
        port = port_file.read_text().split()[0]
        pages: list[dict[str, Any]] = []

        async def page_listed() -> bool:
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages[:] = [t for t in await response.json() if t["type"] == "page"]
            return bool(pages)

        await eventually(page_listed, within=30)
        self.socket = await self.http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result."""
        assert self.socket is not None
        command_id = next(self._ids)
        await self.socket.send_json({"id": command_id, "method": method, "params": params})
        async with asyncio.timeout(30):
            while True:
                reply = json.loads((await self.socket.receive()).data)
                if reply.get("id") == command_id:
                    result: dict[str, Any] = reply.get("result", {})
                    return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def sign_in(self, email: str) -> None:
        """Fill in the page's sign-in form and send it."""
        fields = json.dumps({"email": email, "password": user_svc.app.DEMO_PASSWORD})
        await self.evaluate(
            "(() => { const form = document.getElementById('signin-form');"
            f" const fields = {fields};"
            " form.email.value = fields.email; form.password.value = fields.password;"
            " form.requestSubmit(); })()"
        )

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        await self.http.close()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    page = Browser(tmp_path / "chromium")
    yield page
    await page.close()


@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


SERVICE_CARDS = (
    "Object.fromEntries([...document.querySelectorAll('#services [data-service]')]"
    ".map(card => [card.dataset.service, card.dataset.status]))"
)


async def test_the_dashboard_shows_every_service_and_an_order_as_its_saga_runs(
    gateways: Gateways, run_service: ServiceStarter, unique: str, browser: Browser, tmp_path: Path
) -> None:
    system = await start_system(run_service, gateways, unique)
    await browser.open(f"{system.url}/dashboard")
    signin_shown = "!document.getElementById('signin').hidden"
    await eventually(lambda: browser.evaluate(signin_shown), within=20)
    error = "document.getElementById('signin-error').textContent"

    await browser.sign_in(BOB)  # a customer may not see everyone's orders
    await eventually(lambda: browser.evaluate(f"{error}.includes('staff')"), within=20)
    assert await browser.evaluate("document.getElementById('board').hidden")

    await browser.sign_in(ALICE)
    cards: dict[str, str] = {}

    async def every_service_up() -> bool:
        cards.update(await browser.evaluate(SERVICE_CARDS) or {})
        return cards == dict.fromkeys(("inventory", "order", "payment", "user"), "up")

    await eventually(every_service_up, within=20)
    assert await browser.evaluate("document.getElementById('live').textContent.trim()") == "live"

    async with Caller(system.url) as caller:
        order_id = await place_order(caller, BOB)
    row = f"document.querySelector('[data-order-id=\"{order_id}\"]')"

    async def confirmed_on_the_page() -> bool:
        status = await browser.evaluate(f"{row}?.dataset.status")
        return bool(status == "confirmed")

    # the page is not reloaded: the order arrives over server-sent events
    await eventually(confirmed_on_the_page, within=30, every=0.2)
    steps = await browser.evaluate(f"{row}.querySelector('.steps').textContent")
    for step in ("placed", "stock reserved", "paid", "confirmed"):
        assert step in steps
    rates = await browser.evaluate("document.getElementById('rates').textContent")
    assert "order.created" in rates
    shot = await browser.send("Page.captureScreenshot", format="png")
    (tmp_path / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))


async def test_the_docs_page_renders_every_services_api(
    gateways: Gateways, run_service: ServiceStarter, unique: str, browser: Browser
) -> None:
    system = await start_system(run_service, gateways, unique)
    await browser.open(f"{system.url}/docs")
    sections = "[...document.querySelectorAll('section[data-service]')].map(s => s.dataset.service)"

    async def rendered() -> bool:
        found = await browser.evaluate(sections)
        return bool(found == ["inventory", "order", "payment", "user"])

    await eventually(rendered, within=20)
    operations = await browser.evaluate(
        "[...document.querySelectorAll('[data-operation]')].map(o => o.dataset.operation)"
    )
    assert {"POST /orders", "GET /products", "POST /auth/login", "POST /refunds"} <= set(operations)
    with contextlib.suppress(Exception):
        await browser.send("Page.navigate", url="about:blank")
