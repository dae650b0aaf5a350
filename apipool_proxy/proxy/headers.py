"""Which headers cross the proxy, in each direction.

Requests: the caller's credentials and anything naming the caller's network or the key
owner's OpenAI organisation stay behind; everything else (Content-Type with its multipart
boundary, Accept, User-Agent, OpenAI-Beta, X-Stainless-*, OpenRouter's HTTP-Referer...)
passes, so endpoints we never heard of keep working.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping, istr

# The sets below hold lower-case names; every lookup lower-cases the header name first.

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

_DROP_FROM_CALLER = HOP_BY_HOP | frozenset(
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


def upstream_request_headers(
    caller: CIMultiDictProxy[str], auth_header: str
) -> list[tuple[str, str]]:
    """The caller's headers as sent upstream (Host, Content-Length and Accept-Encoding are
    added by the upstream client)."""
    connection_named = _connection_tokens(caller)
    out = []
    for name, value in caller.items():
        lowered = name.lower()
        if lowered in _DROP_FROM_CALLER or lowered.startswith("x-forwarded-"):
            continue
        if connection_named and lowered in connection_named:
            continue
        out.append((name, value))
    out.append(("Authorization", auth_header))
    return out


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


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    value = headers.get("connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())
