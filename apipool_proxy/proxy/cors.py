"""Cross-origin requests: web apps calling the proxy port straight from a browser.

The OpenAI API answers browsers' CORS preflights, and chat front-ends that run in the browser
rely on it; a drop-in replacement has to do the same. Pool tokens travel only in the
Authorization header, never in cookies, so a page can use the proxy only with a token its
user typed into it: allowing every origin (the default, as the OpenAI API does) lets no site
do anything it could not do with the token anyway. ``proxy.cors_origins`` narrows the list,
and an empty list turns cross-origin access off.

Preflights are answered before authentication, because browsers send them without the
Authorization header. Every other answer to an allowed origin carries
Access-Control-Allow-Origin, errors included, so the page can read the error envelope.
"""

from __future__ import annotations

import re

from aiohttp import web

from ..errors import ApiError

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# What a page may read of an answer: all of it (the request id, rate limits, retry-after).
# The wildcard is valid because these requests never carry credentials.
EXPOSE_HEADERS = "*"
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse a preflight
CORS_HEADERS = web.RequestKey("apipool_cors_headers", dict)
# Header names a preflight may ask for: tokens, listed with commas (RFC 9110 5.6.2).
_HEADER_LIST = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*$")


class CorsPolicy:
    """Which origins may call the proxy port from a browser, and the headers that say so."""

    def __init__(self, origins: list[str]) -> None:
        self.enabled = bool(origins)
        self._any = "*" in origins
        self._origins = frozenset(origin.lower().rstrip("/") for origin in origins)

    def allows(self, origin: str) -> bool:
        return self.enabled and (self._any or origin.lower() in self._origins)

    def note(self, request: web.BaseRequest, origin: str) -> None:
        """Remember, for the answer, the headers a request from ``origin`` gets."""
        if not self.allows(origin):
            return  # no header at all: the browser keeps the answer from the page
        headers = self._allow(origin)
        headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        request[CORS_HEADERS] = headers

    def preflight(self, request: web.BaseRequest, origin: str) -> web.Response:
        """The answer to ``OPTIONS`` with Access-Control-Request-Method."""
        if not self.allows(origin):
            raise ApiError(
                403,
                "This origin may not call the proxy from a browser (see proxy.cors_origins).",
                code="origin_not_allowed",
            )
        headers = self._allow(origin)
        headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        asked = request.headers.get("Access-Control-Request-Headers", "").strip()
        if asked:
            if not _HEADER_LIST.match(asked):
                raise ApiError(
                    400, "Invalid Access-Control-Request-Headers.", code="invalid_preflight"
                )
            # Any header may cross (the upstream decides what it accepts), so the answer
            # names what was asked for; a wildcard would not cover Authorization.
            headers["Access-Control-Allow-Headers"] = asked
        return web.Response(status=204, headers=headers)

    def _allow(self, origin: str) -> dict[str, str]:
        if self._any:
            return {"Access-Control-Allow-Origin": "*"}
        # The answer differs by origin: caches must know.
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def is_preflight(request: web.BaseRequest) -> bool:
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and "Origin" in headers
        and "Access-Control-Request-Method" in headers
    )
