"""Tests for bus.auth: minting, verification, key rotation and the verified-token cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.auth import AuthError, Principal, SigningKey, TokenVerifier, parse_bearer

ISS = "microshop-user"
AUD = "microshop"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "u1", "role": "user", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 60}
    return {k: v for k, v in (base | overrides).items() if v is not None}


def sign_raw(key: SigningKey, payload: dict[str, Any]) -> str:
    """Sign arbitrary claims with the real key, bypassing mint()'s own checks."""
    return jwt.encode(payload, key.to_pem(), algorithm="EdDSA", headers={"kid": key.kid})


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    message = str(info.value)
    assert not token or token not in message
    return message


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate(kid="k1")


@pytest.fixture
def verifier(key: SigningKey) -> TokenVerifier:
    return TokenVerifier.from_jwks(key.jwks(), issuer=ISS, audience=AUD)


def mint(key: SigningKey, **kwargs: Any) -> str:
    args: dict[str, Any] = {"subject": "u1", "role": "user", "issuer": ISS, "audience": AUD}
    return key.mint(**(args | kwargs))


# --- Principal and SigningKey ---------------------------------------------------------------


def test_principal_staff_and_roles() -> None:
    assert Principal("a", "admin").is_staff
    assert Principal("m", "manager").is_staff
    assert not Principal("u", "user").is_staff
    assert Principal("u", "user").has_role("admin", "user")
    assert not Principal("u", "user").has_role("admin")


def test_default_kid_is_rfc7638_thumbprint() -> None:
    # RFC 8037 appendix A: the Ed25519 test key and its RFC 7638 thumbprint.
    d = base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    key = SigningKey(Ed25519PrivateKey.from_private_bytes(d))
    assert key.public_jwk()["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert key.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_public_jwk_has_only_public_fields(key: SigningKey) -> None:
    jwk = key.public_jwk()
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": jwk["x"],
        "kid": "k1",
        "alg": "EdDSA",
        "use": "sig",
    }
    assert key.jwks() == {"keys": [jwk]}


async def test_pem_round_trip_keeps_the_key(key: SigningKey, verifier: TokenVerifier) -> None:
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    reloaded = SigningKey.from_pem(pem, kid="k1")
    assert reloaded.public_jwk() == key.public_jwk()
    assert (await verifier.verify(mint(reloaded))).user_id == "u1"


def test_from_pem_rejects_non_ed25519_keys() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="Ed25519"):
        SigningKey.from_pem(pem)


def test_mint_rejects_unknown_role(key: SigningKey) -> None:
    with pytest.raises(ValueError, match="role"):
        mint(key, role="root")


# --- verification -----------------------------------------------------------------------------


async def test_minted_token_verifies_to_its_principal(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = mint(key, subject="u42", role="manager", email="m@example.com")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == "k1"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert {"sub", "role", "email", "iss", "aud", "iat", "nbf", "exp", "jti"} <= payload.keys()
    assert await verifier.verify(token) == Principal("u42", "manager", "m@example.com")


async def test_each_minted_token_has_a_fresh_jti(key: SigningKey) -> None:
    def jti(token: str) -> str:
        return str(jwt.decode(token, options={"verify_signature": False})["jti"])

    assert jti(mint(key)) != jti(mint(key))


async def test_expired_token_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint(key, ttl=60, now=int(time.time()) - 3600)
    assert await refused(verifier, token) == "token expired"


async def test_token_expired_within_leeway_is_accepted(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = mint(key, ttl=60, now=int(time.time()) - 62)
    assert (await verifier.verify(token)).user_id == "u1"


async def test_alg_none_token_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": key.kid}
    token = f"{b64json(header)}.{b64json(claims(role='admin'))}."
    assert await refused(verifier, token) == "unsupported algorithm"


@pytest.mark.parametrize("as_pem", [False, True], ids=["raw-public-key", "pem-public-key"])
async def test_hs256_token_signed_with_public_key_is_refused(
    key: SigningKey, verifier: TokenVerifier, as_pem: bool
) -> None:
    # Key confusion: an HMAC "secret" the attacker knows because it is the public key.
    public = serialization.load_pem_private_key(key.to_pem(), password=None).public_key()
    secret = (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if as_pem
        else base64.urlsafe_b64decode(key.public_jwk()["x"] + "=")
    )
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}."
    signing_input += b64json(claims(role="admin"))
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(signature)}"
    assert await refused(verifier, token) == "unsupported algorithm"


async def test_rs256_token_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": key.kid})
    assert await refused(verifier, token) == "unsupported algorithm"


async def test_tampered_payload_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    header, _, signature = mint(key).split(".")
    forged = f"{header}.{b64json(claims(role='admin'))}.{signature}"
    assert await refused(verifier, forged) == "bad signature"


async def test_token_signed_by_another_key_with_same_kid_is_refused(
    verifier: TokenVerifier,
) -> None:
    impostor = SigningKey.generate(kid="k1")
    assert await refused(verifier, mint(impostor)) == "bad signature"


async def test_wrong_audience_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    assert await refused(verifier, mint(key, audience="other")) == "wrong audience"


async def test_wrong_issuer_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    assert await refused(verifier, mint(key, issuer="evil")) == "wrong issuer"


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "iss", "aud", "role"])
async def test_token_missing_a_required_claim_is_refused(
    key: SigningKey, verifier: TokenVerifier, claim: str
) -> None:
    token = sign_raw(key, claims(**{claim: None}))
    assert await refused(verifier, token) == f"missing claim {claim}"


async def test_unknown_role_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    token = sign_raw(key, claims(role="superuser"))
    assert await refused(verifier, token) == "unknown role"


async def test_unknown_kid_with_static_jwks_is_refused(verifier: TokenVerifier) -> None:
    assert await refused(verifier, mint(SigningKey.generate(kid="k2"))) == "unknown key id"


async def test_token_without_kid_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(), key.to_pem(), algorithm="EdDSA")
    assert await refused(verifier, token) == "missing key id"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 10_000])
async def test_garbage_is_refused(verifier: TokenVerifier, token: str) -> None:
    assert await refused(verifier, token) in {"malformed token", "token too large"}


# --- the verified-token cache -----------------------------------------------------------------


async def test_repeated_verify_skips_the_signature_check(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = mint(key)
    for _ in range(5):
        assert (await verifier.verify(token)).user_id == "u1"
    assert verifier.stats.signature_checks == 1
    assert verifier.stats.cache_hits == 4


async def test_failed_tokens_are_not_cached(key: SigningKey, verifier: TokenVerifier) -> None:
    token = mint(key, audience="other")
    for _ in range(2):
        await refused(verifier, token)
    assert verifier.stats.signature_checks == 2
    assert verifier.stats.cache_hits == 0


async def test_cached_token_is_rechecked_once_expired(
    key: SigningKey, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = mint(key, ttl=60)
    await verifier.verify(token)
    # Only the cache reads time.time(); PyJWT keeps the real clock, so the recheck passes.
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    await verifier.verify(token)
    assert verifier.stats.signature_checks == 2
    assert verifier.stats.cache_hits == 0


async def test_cache_evicts_the_least_recently_used_token(key: SigningKey) -> None:
    verifier = TokenVerifier(jwks=key.jwks(), issuer=ISS, audience=AUD, cache_size=2)
    first, second, third = (mint(key) for _ in range(3))
    for token in (first, second, first, third):  # third pushes out second, not first
        await verifier.verify(token)
    await verifier.verify(first)
    assert verifier.stats.signature_checks == 3
    await verifier.verify(second)
    assert verifier.stats.signature_checks == 4


# --- JWKS over HTTP ---------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str
    keys: list[SigningKey]
    hits: int = 0
    status: int = 200
    extra: list[dict[str, Any]] = field(default_factory=list)
    document: dict[str, Any] | None = None  # answered as it is, in place of the keys
    release: asyncio.Event | None = None  # when set: answer only once it is set


@pytest.fixture
async def jwks_server(key: SigningKey) -> AsyncIterator[JwksServer]:
    state = JwksServer(url="", keys=[key])

    async def handler(request: web.Request) -> web.Response:
        state.hits += 1
        if state.release is not None:
            await state.release.wait()
        if state.status != 200:
            return web.Response(status=state.status)
        if state.document is not None:
            return web.json_response(state.document)
        return web.json_response({"keys": [k.public_jwk() for k in state.keys] + state.extra})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", handler)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        state.url = str(server.make_url("/.well-known/jwks.json"))
        yield state


def url_verifier(server: JwksServer, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(jwks_url=server.url, issuer=ISS, audience=AUD, **kwargs)


async def test_jwks_is_fetched_lazily_and_cached(key: SigningKey, jwks_server: JwksServer) -> None:
    verifier = url_verifier(jwks_server)
    assert jwks_server.hits == 0
    for _ in range(3):
        await verifier.verify(mint(key))
    assert jwks_server.hits == 1


async def test_unknown_kid_triggers_one_refetch_then_succeeds_after_rotation(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    verifier = url_verifier(jwks_server, min_refresh_interval=0)
    await verifier.verify(mint(key))
    new_key = SigningKey.generate(kid="k2")
    jwks_server.keys = [key, new_key]
    assert (await verifier.verify(mint(new_key, subject="u2"))).user_id == "u2"
    assert jwks_server.hits == 2


async def test_unknown_kid_still_missing_after_refetch_is_refused(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    verifier = url_verifier(jwks_server, min_refresh_interval=0)
    await verifier.verify(mint(key))
    assert await refused(verifier, mint(SigningKey.generate(kid="k9"))) == "unknown key id"
    assert jwks_server.hits == 2


async def test_concurrent_unknown_kids_share_one_refetch(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    verifier = url_verifier(jwks_server, min_refresh_interval=0)
    await verifier.verify(mint(key))
    new_key = SigningKey.generate(kid="k2")
    jwks_server.keys = [new_key]
    tokens = [mint(new_key, subject=f"u{i}") for i in range(5)]
    await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert jwks_server.hits == 2


async def test_refetch_is_rate_limited_so_bogus_kids_cannot_amplify(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    verifier = url_verifier(jwks_server)  # default 30 s between refetches
    await verifier.verify(mint(key))
    for i in range(5):
        bogus = mint(SigningKey.generate(kid=f"bogus{i}"))
        assert await refused(verifier, bogus) == "unknown key id"
    assert jwks_server.hits == 1


async def test_unusable_jwks_entries_are_ignored(key: SigningKey, jwks_server: JwksServer) -> None:
    jwks_server.extra = [
        {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "OKP", "crv": "Ed25519", "x": "not-a-key", "kid": "bad"},
    ]
    verifier = url_verifier(jwks_server)
    assert (await verifier.verify(mint(key))).user_id == "u1"


async def test_uses_the_given_client_session(key: SigningKey, jwks_server: JwksServer) -> None:
    async with aiohttp.ClientSession() as session:
        verifier = url_verifier(jwks_server, session=session)
        await verifier.verify(mint(key))
        assert not session.closed
    assert jwks_server.hits == 1


async def test_jwks_fetch_failure_is_an_auth_error(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    jwks_server.status = 500
    verifier = url_verifier(jwks_server)
    message = await refused(verifier, mint(key))
    assert message.startswith("could not fetch JWKS")


async def test_a_jwks_fetch_slower_than_its_timeout_fails_in_time(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    jwks_server.release = asyncio.Event()
    verifier = url_verifier(jwks_server, fetch_timeout=0.2)
    started = time.monotonic()
    message = await refused(verifier, mint(key))
    waited = time.monotonic() - started
    jwks_server.release.set()
    assert message == "could not fetch JWKS: TimeoutError"
    assert waited < 2


async def test_a_failed_jwks_fetch_does_not_hold_off_the_next_once_the_service_is_back(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    verifier = url_verifier(jwks_server, failure_backoff=0.05)  # refresh interval: 30 s
    jwks_server.status = 503
    assert (await refused(verifier, mint(key))).startswith("could not fetch JWKS")
    jwks_server.status = 200
    await asyncio.sleep(0.1)
    assert (await verifier.verify(mint(key))).user_id == "u1"
    assert jwks_server.hits == 2


async def test_after_a_failed_jwks_fetch_unknown_kids_wait_out_the_backoff(
    key: SigningKey, jwks_server: JwksServer
) -> None:
    jwks_server.status = 503
    verifier = url_verifier(jwks_server)  # default backoff: 1 s
    tokens = [mint(SigningKey.generate(kid=f"bogus{i}")) for i in range(10)]
    together = await asyncio.gather(*(refused(verifier, t) for t in tokens[:5]))
    one_by_one = [await refused(verifier, t) for t in tokens[5:]]
    assert jwks_server.hits == 1  # one fetch in flight, then none until the backoff is over
    # the keys could not be had: every one of them is told so (a 503 at the edge), none is
    # called a bad token (a 401) while the user service is down
    assert all(m.startswith("could not fetch JWKS") for m in together + one_by_one)


@pytest.mark.parametrize("document", [{"keys": None}, {"keys": "k1"}, {}])
async def test_a_jwks_without_a_list_of_keys_is_a_failed_fetch(
    key: SigningKey, jwks_server: JwksServer, document: dict[str, Any]
) -> None:
    jwks_server.document = document
    verifier = url_verifier(jwks_server)
    first = await refused(verifier, mint(key))
    second = await refused(verifier, mint(key))
    assert first.startswith("could not fetch JWKS: not a JSON object")
    assert second == "could not fetch JWKS: waiting after a failed fetch"  # backing off


def test_verifier_needs_exactly_one_key_source(key: SigningKey) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier(issuer=ISS, audience=AUD)
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier(jwks=key.jwks(), jwks_url="http://x", issuer=ISS, audience=AUD)


# --- parse_bearer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["Bearer abc.def.ghi", "bearer abc.def.ghi", " Bearer  abc.def.ghi "]
)
def test_parse_bearer_returns_the_token(value: str) -> None:
    assert parse_bearer(value) == "abc.def.ghi"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_parse_bearer_without_header_is_missing(value: str | None) -> None:
    with pytest.raises(AuthError, match="missing bearer token"):
        parse_bearer(value)


@pytest.mark.parametrize("value", ["Basic dXNlcjpwdw==", "Bearer", "Bearer a b", "abc.def.ghi"])
def test_parse_bearer_rejects_malformed_headers(value: str) -> None:
    with pytest.raises(AuthError, match="malformed Authorization header"):
        parse_bearer(value)
