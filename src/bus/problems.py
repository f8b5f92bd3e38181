"""RFC 9457 problem details: every HTTP error microshop answers, whatever raised it."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from pydantic_core import to_json


def status_phrase(status: int) -> str:
    """The standard reason phrase for ``status`` ("Error" for codes HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class HttpProblem(Exception):
    """Raise from a handler to answer with problem details; ``extra`` members join the body."""

    status: int = 500

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        type_: str = "about:blank",
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        """Describe the problem; the status defaults to the class's, the title to its phrase."""
        super().__init__(detail)
        self.status = status or self.status
        self.title = title or status_phrase(self.status)
        self.detail = detail
        self.type = type_
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self, instance: str | None = None) -> web.Response:
        """This problem as an ``application/problem+json`` response."""
        return problem_response(
            self.status,
            self.title,
            self.detail,
            type_=self.type,
            instance=instance,
            headers=self.headers,
            **self.extra,
        )


class Unauthorized(HttpProblem):
    """No credentials, or credentials we refuse (401)."""

    status = 401


class Forbidden(HttpProblem):
    """Authenticated, but not allowed to do this (403)."""

    status = 403


class NotFound(HttpProblem):
    """The addressed resource does not exist (404)."""

    status = 404


class Conflict(HttpProblem):
    """The request clashes with the resource's current state (409)."""

    status = 409


class Unprocessable(HttpProblem):
    """Well-formed but invalid input (422)."""

    status = 422


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str = "about:blank",
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """An RFC 9457 ``application/problem+json`` response; ``extra`` adds extension members."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    # Extensions never override the standard members: the body must agree with the status line.
    body.update((key, value) for key, value in extra.items() if key not in body)
    merged = CIMultiDict(headers or {})
    # The problem body replaces whatever body these headers described (an HTTPException's).
    merged.popall("Content-Type", None)
    merged.popall("Content-Length", None)
    if status == 401:
        merged.setdefault("WWW-Authenticate", "Bearer")
    return web.Response(
        body=to_json(body), status=status, headers=merged, content_type="application/problem+json"
    )
