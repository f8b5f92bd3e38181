"""The user service's settings and composition root, on SQLite and the in-process broker."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from bus.memory import MemoryBroker
from tests.support import free_port
from user_svc.api import TOKENS
from user_svc.app import Settings, build
from user_svc.domain import DEMO_PASSWORD


def test_the_admin_email_is_normalised() -> None:
    settings = Settings(admin_email=" Root@Example.com", admin_password="long-enough")

    assert settings.admin_email == "root@example.com"


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"admin_email": "root@example.com"}, "admin_password", "go together"),
        ({"admin_password": "long-enough"}, "admin_password", "go together"),
        ({"admin_email": "root", "admin_password": "long-enough"}, "admin_email", "not a valid"),
        ({"admin_email": "a@example.com", "admin_password": "short"}, "admin_password", "at least"),
        ({"jwt_private_key": "-----BEGIN nonsense"}, "jwt_private_key", "Ed25519"),
    ],
)
def test_bad_settings_are_refused_without_echoing_them(
    values: dict[str, str], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]

    (error,) = caught.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]
    for value in values.values():
        assert value not in str(caught.value)


def test_build_connects_to_nothing(tmp_path: Path) -> None:
    nowhere = "127.0.0.1:1"  # nothing listens there: connecting would fail
    settings = Settings(
        broker_url=f"amqp://guest:guest@{nowhere}/",
        database_url=f"postgresql+asyncpg://postgres@{nowhere}/shop",
        demo_data=True,
    )

    service = build(settings)

    assert not service.broker.is_connected
    assert TOKENS not in service.app  # the signing key is read at start, not at build


async def test_the_demo_runs_on_sqlite_and_keeps_its_key_across_restarts(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, port=free_port(), demo_data=True, heartbeat_seconds=60)
    tokens = []
    jwks = []
    for _ in range(2):
        service = build(settings, broker=MemoryBroker())
        await service.start()
        try:
            async with aiohttp.ClientSession(settings.public_url) as http:
                body = {"email": "carol@example.com", "password": DEMO_PASSWORD}
                async with http.post("/auth/login", json=body) as response:
                    tokens.append((await response.json())["access_token"])
                headers = {"Authorization": f"Bearer {tokens[0]}"}
                async with http.get("/users", headers=headers) as response:
                    listing = await response.json()
                async with http.get("/.well-known/jwks.json") as response:
                    jwks.append(await response.json())
        finally:
            await service.stop()
        assert listing["total"] == 3
        assert listing["items"][0]["created_at"].endswith("Z")

    assert jwks[0] == jwks[1]


async def test_on_sqlite_a_success_resets_the_login_throttle_and_a_restart_keeps_it(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        port=free_port(),
        demo_data=True,
        heartbeat_seconds=60,
        login_max_attempts=2,
    )
    right = {"email": "carol@example.com", "password": DEMO_PASSWORD}
    wrong = {"email": "carol@example.com", "password": "not-the-password"}
    statuses: list[list[int]] = []
    for attempts in ([wrong, right, wrong, wrong, right], [right]):
        service = build(settings, broker=MemoryBroker())
        await service.start()
        try:
            async with aiohttp.ClientSession(settings.public_url) as http:
                statuses.append([])
                for body in attempts:
                    async with http.post("/auth/login", json=body) as response:
                        statuses[-1].append(response.status)
                        retry_after = response.headers.get("Retry-After")
        finally:
            await service.stop()

    assert statuses == [[401, 200, 401, 401, 429], [429]]
    assert retry_after is not None
    assert 0 < int(retry_after) <= 300
