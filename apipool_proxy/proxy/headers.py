"""Which headers cross the proxy, in each direction.

Requests: the caller's credentials and anything naming the caller's network or the key
owner's OpenAI organisation stay behind; everything else (Content-Type with its multipart
boundary, Accept, User-Agent, OpenAI-Beta, X-Stainless-*, OpenRouter's HTTP-Referer...)
passes, so endpoints we never heard of keep working.
"""

from __future__ import annotations

from collections.abc import Iterator

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


def upstream_request_headers(request: BaseRequest, auth_header: str) -> list[tuple[str, str]]:
    """The caller's headers as sent upstream, with the pooled key's Authorization.

    Host, Content-Length and Accept-Encoding are the upstream client's to add.
    """
    pairs = [
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in _forwarded(request)
    ]
    pairs.append(("Authorization", auth_header))
    return pairs


def upstream_header_block(request: BaseRequest, auth_header: str) -> bytes:
    """``upstream_request_headers`` as the upstream client takes them: "Name: value" lines.

    Built from the caller's header bytes as received, which spares every proxied request
    decoding and re-encoding them.
    """
    lines = [b"%s: %s\r\n" % pair for pair in _forwarded(request)]
    lines.append(b"Authorization: %s\r\n" % auth_header.encode())
    return b"".join(lines)


def _forwarded(request: BaseRequest) -> Iterator[tuple[bytes, bytes]]:
    connection_named = _connection_tokens(request.headers.get("connection"))
    for name, value in request.raw_headers:
        lowered = name.lower()
        if lowered in _DROP_FROM_CALLER or lowered.startswith(b"x-forwarded-"):
            continue
        if connection_named and lowered in connection_named:
            continue
        yield name, value


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
        out.add(name, value)
    out[REQUEST_ID] = request_id
    return out


def _connection_tokens(value: str | None) -> frozenset[bytes]:
    """The header names a Connection header lists: hop-by-hop too (RFC 9110 7.6.1)."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower().encode() for t in value.split(",") if t.strip())
