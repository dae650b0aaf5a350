"""Which headers cross the proxy, in each direction.

Requests: the caller's credentials and anything naming the caller's network or the key
owner's OpenAI organisation stay behind; everything else (Content-Type with its multipart
boundary, Accept, User-Agent, OpenAI-Beta, X-Stainless-*, OpenRouter's HTTP-Referer...)
passes, so endpoints we never heard of keep working.
"""

from __future__ import annotations

from aiohttp.web import BaseRequest
from multidict import CIMultiDict, MultiMapping, istr

# The sets below hold lower-case names (the caller's as bytes, the form they arrive in);
# every lookup lower-cases the header name first.

# RFC 9110 section 7.6.1: connection-specific headers are never forwarded.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)

_DROP_FROM_CALLER = frozenset(
    name.encode()
    for name in HOP_BY_HOP
    | frozenset(
        (
            "host",
            "content-length",  # recomputed for the replayed body
            "accept-encoding",  # the upstream client negotiates its own and decodes
            "authorization",  # the caller's pool token; the pooled key replaces it
            "api-key",
            "x-api-key",
            "cookie",
            "forwarded",
            "x-real-ip",
            "via",
            "openai-organization",  # these name the key owner's account, not the caller's
            "openai-project",
        )
    )
)

_DROP_FROM_UPSTREAM = HOP_BY_HOP | frozenset(
    (
        "content-length",  # aiohttp frames the body it sends
        "set-cookie",
        "openai-organization",
        "openai-project",
        "x-request-id",  # replaced by ours; the upstream's moves to x-upstream-request-id
        "server",
        "date",
        "alt-svc",
    )
)

REQUEST_ID = istr("x-request-id")
UPSTREAM_REQUEST_ID = istr("x-upstream-request-id")


def upstream_header_block(request: BaseRequest, auth_header: str) -> bytes:
    """The caller's headers as sent upstream, as the "Name: value" lines the upstream
    client takes, with the pooled key's Authorization.

    Built from the caller's header bytes as received, which spares every proxied request
    decoding and re-encoding them. Host, Content-Length and Accept-Encoding are the upstream
    client's to add.
    """
    connection_named = _connection_tokens(request.headers.get("connection"))
    parts: list[bytes] = []
    for name, value in request.raw_headers:
        lowered = name.lower()
        if lowered in _DROP_FROM_CALLER or lowered[:12] == b"x-forwarded-":
            continue
        if connection_named and lowered in connection_named:
            continue
        parts += (name, b": ", value, b"\r\n")
    parts += (b"Authorization: ", auth_header.encode(), b"\r\n")
    return b"".join(parts)


def upstream_request_headers(request: BaseRequest, auth_header: str) -> list[tuple[str, str]]:
    """``upstream_header_block`` as (name, value) pairs, for aiohttp's client."""
    text = upstream_header_block(request, auth_header).decode("utf-8", "surrogateescape")
    return [_pair(line) for line in text.split("\r\n") if line]


def _pair(line: str) -> tuple[str, str]:
    name, _, value = line.partition(": ")
    return name, value


def caller_response_headers(upstream: MultiMapping[str], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in _DROP_FROM_UPSTREAM:
            if lowered == "x-request-id":
                out[UPSTREAM_REQUEST_ID] = value
            continue
        if lowered.startswith("x-ratelimit-"):
            # The pooled key's account limits: not the caller's, and not theirs to see. The
            # caller's own limits go out under these names (proxy/access.py).
            continue
        if lowered.startswith("access-control-"):
            continue  # which pages may read the answer is the proxy's policy (proxy/cors.py)
        out.add(name, value)
    out[REQUEST_ID] = request_id
    return out


def _connection_tokens(value: str | None) -> frozenset[bytes]:
    """The header names a Connection header lists: hop-by-hop too (RFC 9110 7.6.1)."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower().encode() for t in value.split(",") if t.strip())
