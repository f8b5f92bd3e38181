"""The gateway's self-contained HTML pages, served from memory with a strict CSP.

Inline scripts and styles are allowed by their SHA-256 hashes, computed once at load, so
the pages need no CDN, no build step and no ``'unsafe-inline'``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

_HERE = Path(__file__).parent
_INLINE = {
    "script": re.compile(r"<script>(.*?)</script>", re.S),
    "style": re.compile(r"<style>(.*?)</style>", re.S),
}


def _hashes(pattern: re.Pattern[str], html: str) -> str:
    digests = (hashlib.sha256(block.encode()).digest() for block in pattern.findall(html))
    return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)


@dataclass(frozen=True, slots=True)
class Page:
    """An HTML page and the Content-Security-Policy that lets exactly its own code run."""

    body: bytes
    csp: str

    @classmethod
    def load(cls, name: str) -> Page:
        """Read ``name`` from this package's folder."""
        return cls.of((_HERE / name).read_text(encoding="utf-8"))

    @classmethod
    def of(cls, html: str) -> Page:
        """A page made in memory (rendered on the server)."""
        scripts = _hashes(_INLINE["script"], html) or "'none'"
        styles = _hashes(_INLINE["style"], html) or "'none'"
        csp = (
            "default-src 'none'; "
            f"script-src {scripts}; style-src {styles}; "
            "connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return cls(html.encode(), csp)

    def response(self) -> web.Response:
        """The page as an answer."""
        return web.Response(
            body=self.body,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": self.csp},
        )
