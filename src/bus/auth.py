"""JWT auth shared by every service: the user service mints, everyone else verifies.

Tokens are EdDSA (Ed25519) only. Verifiers pin the algorithm rather than trusting the
token header, so ``alg=none`` and HS256-with-the-public-key tricks cannot work.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ROLES = ("admin", "manager", "user")
ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]
# Real tokens are a few hundred bytes; the cap keeps junk from costing parse time or cache memory.
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, as stated by a verified token."""

    user_id: str
    role: str
    email: str | None = None

    @property
    def is_staff(self) -> bool:
        """True for admins and managers."""
        return self.role in ("admin", "manager")

    def has_role(self, *roles: str) -> bool:
        """True when the principal's role is one of ``roles``."""
        return self.role in roles


class AuthError(Exception):
    """A token or header was refused; the message says why and never echoes the token."""


class KeysUnavailable(AuthError):
    """The keys to check a token with could not be had: the token may be good (try later)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SigningKey:
    """An Ed25519 key pair with a key id; only the user service should hold one."""

    def __init__(self, private_key: Ed25519PrivateKey, kid: str | None = None) -> None:
        """Wrap ``private_key``; ``kid`` defaults to the RFC 7638 JWK thumbprint."""
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._x = _b64url(raw)
        # Members in lexicographic order, no whitespace: RFC 7638 section 3.
        canonical = json.dumps(
            {"crv": "Ed25519", "kty": "OKP", "x": self._x}, separators=(",", ":")
        )
        self.kid = kid or _b64url(hashlib.sha256(canonical.encode()).digest())

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        """Create a fresh random key pair."""
        return cls(Ed25519PrivateKey.generate(), kid)

    @classmethod
    def from_pem(cls, pem: bytes, kid: str | None = None) -> SigningKey:
        """Load an unencrypted PKCS8 PEM private key; anything but Ed25519 is a ValueError."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        return cls(key, kid)

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS8 PEM."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self._x,
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """A JWKS document holding just this key, as served to verifiers."""
        return {"keys": [self.public_jwk()]}

    def mint(
        self,
        *,
        subject: str,
        role: str,
        issuer: str,
        audience: str,
        ttl: int = 3600,
        email: str | None = None,
        now: int | None = None,
    ) -> str:
        """Sign a token for ``subject``; ``now`` (unix seconds) is for tests and clock control."""
        # Failing here beats minting a token every verifier will refuse.
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        issued = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "sub": subject,
            "role": role,
            "iss": issuer,
            "aud": audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if email is not None:
            claims["email"] = email
        return jwt.encode(claims, self._private, algorithm=ALGORITHM, headers={"kid": self.kid})


def _load_jwks(jwks: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Usable signing keys by kid; keys we could never verify with are skipped, not fatal."""
    keys: dict[str, Ed25519PublicKey] = {}
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=ALGORITHM).key
        except jwt.PyJWTError:
            continue
        if isinstance(key, Ed25519PublicKey):
            keys[jwk["kid"]] = key
    return keys


# Order matters: a subclass has to come before its base (InvalidSignatureError is a DecodeError).
_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAlgorithmError, "unsupported algorithm"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.DecodeError, "malformed token"),
)


def _auth_error(exc: jwt.PyJWTError) -> AuthError:
    """Translate a PyJWT exception into a message fit for logs and 401 bodies."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError(f"missing claim {exc.claim}")
    for kind, message in _JWT_ERRORS:
        if isinstance(exc, kind):
            return AuthError(message)
    # PyJWT's remaining messages describe the claim, never the token itself.
    return AuthError(f"invalid token: {exc}")


@dataclass(slots=True)
class VerifierStats:
    """Counters for tests and metrics."""

    signature_checks: int = 0
    cache_hits: int = 0
    jwks_fetches: int = 0


class TokenVerifier:
    """Verifies tokens against a JWKS, static or fetched from ``jwks_url`` and cached."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        session: aiohttp.ClientSession | None = None,
        leeway: float = 5.0,
        min_refresh_interval: float = 30.0,
        failure_backoff: float = 1.0,
        fetch_timeout: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        """Give exactly one of ``jwks_url`` or ``jwks``; ``from_jwks`` is the usual static path.

        An unknown key id refetches the JWKS at most once per ``min_refresh_interval``
        seconds; after a failed fetch, the next one may come ``failure_backoff`` seconds later.
        A fetch taking longer than ``fetch_timeout`` seconds fails.
        """
        if (jwks_url is None) == (jwks is None):
            raise ValueError("pass exactly one of jwks_url or jwks")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.stats = VerifierStats()
        self._jwks_url = jwks_url
        self._session = session
        self._keys = _load_jwks(jwks) if jwks is not None else {}
        self._min_refresh_interval = min_refresh_interval
        self._failure_backoff = failure_backoff
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._fetched_at: float | None = None  # monotonic, last successful fetch
        self._failed_at: float | None = None  # monotonic, last failed fetch; None after a success
        self._fetch_lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_jwks(
        cls, jwks: Mapping[str, Any], *, issuer: str, audience: str, leeway: float = 5.0
    ) -> TokenVerifier:
        """A verifier with a fixed key set and no network access."""
        return cls(jwks=jwks, issuer=issuer, audience=audience, leeway=leeway)

    async def verify(self, token: str) -> Principal:
        """Return the token's principal, or raise AuthError saying why it was refused."""
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp = cached
            if exp > time.time() - self.leeway:
                self._cache.move_to_end(token)
                self.stats.cache_hits += 1
                return principal
            del self._cache[token]
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _auth_error(exc) from None
        # Checked before the key lookup so that forged headers get the honest reason.
        if header.get("alg") != ALGORITHM:
            raise AuthError("unsupported algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("missing key id")
        key = await self._key_for(kid)
        self.stats.signature_checks += 1
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise _auth_error(exc) from None
        principal = self._principal(claims)
        self._remember(token, principal, float(claims["exp"]))
        return principal

    @staticmethod
    def _principal(claims: dict[str, Any]) -> Principal:
        role = claims.get("role")
        if role is None:
            raise AuthError("missing claim role")
        if role not in ROLES:
            raise AuthError("unknown role")
        email = claims.get("email")
        if email is not None and not isinstance(email, str):
            raise AuthError("invalid claim email")
        return Principal(user_id=claims["sub"], role=role, email=email)

    def _remember(self, token: str, principal: Principal, exp: float) -> None:
        self._cache[token] = (principal, exp)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _key_for(self, kid: str) -> Ed25519PublicKey:
        key = self._keys.get(kid)
        if key is None and self._jwks_url is not None:
            # The lock collapses concurrent misses into one fetch, and the interval (or the
            # backoff after a failure) stops a stream of made-up kids from turning us into a
            # JWKS-endpoint hammer.
            async with self._fetch_lock:
                if kid not in self._keys:
                    if self._backing_off():
                        # the keys are unknown, not the token bad: say so (a 503, not a 401)
                        raise KeysUnavailable("could not fetch JWKS: waiting after a failed fetch")
                    if self._may_refresh():
                        await self._refresh(self._jwks_url)
            key = self._keys.get(kid)
        if key is None:
            raise AuthError("unknown key id")
        return key

    def _backing_off(self) -> bool:
        failed_at = self._failed_at
        return failed_at is not None and time.monotonic() - failed_at < self._failure_backoff

    def _may_refresh(self) -> bool:
        fetched_at = self._fetched_at
        return fetched_at is None or time.monotonic() - fetched_at >= self._min_refresh_interval

    async def _refresh(self, url: str) -> None:
        self.stats.jwks_fetches += 1
        try:
            document = await self._download(url)
        except AuthError:
            # A failed fetch is no refresh: once the user service is back, the next unknown
            # kid may fetch again after the short backoff, not the whole refresh interval.
            self._failed_at = time.monotonic()
            raise
        self._keys = _load_jwks(document)
        self._fetched_at = time.monotonic()
        self._failed_at = None

    async def _download(self, url: str) -> dict[str, Any]:
        try:
            if self._session is not None:
                document = await self._fetch(self._session, url)
            else:
                # Fetches are rare, so a throwaway session beats owning one that needs closing.
                async with aiohttp.ClientSession() as session:
                    document = await self._fetch(session, url)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KeysUnavailable(f"could not fetch JWKS: {type(exc).__name__}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise KeysUnavailable("could not fetch JWKS: not a JSON object with a list of keys")
        return document

    async def _fetch(self, session: aiohttp.ClientSession, url: str) -> Any:
        timeout = self._fetch_timeout
        async with session.get(url, timeout=timeout, raise_for_status=True) as response:
            return await response.json(content_type=None)


def parse_bearer(header_value: str | None) -> str:
    """Extract the token from an ``Authorization: Bearer <token>`` header value."""
    if header_value is None or not header_value.strip():
        raise AuthError("missing bearer token")
    parts = header_value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthError("malformed Authorization header")
    return parts[1]
