"""The /v1 request path: authenticate, read the body once, choose a key, send, fail over,
relay, record.

Failover happens only before the first byte reaches the caller. After that the answer is
committed: a stream that breaks ends with one SSE error event, never with a silent retry.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import ApiError, error_body
from ..limits import UserCounters
from ..log import REDACTED, redact, upstream_log
from ..pool import KeyStatus, NoKeyAvailable, Outcome, PooledKey, classify_response
from ..pool.health import RETRYABLE, Verdict
from ..state import Services
from ..upstream import UpstreamError, UpstreamResponse
from . import sticky
from .access import add_exchange_headers
from .body import RequestBody, arrived_body, inspect_body, read_body
from .chunked import ChunkedBody
from .exchange import Exchange, open_exchange
from .headers import caller_response_headers, upstream_header_block
from .sse import JsonTap, UsageTap, usage_from

# Answers up to this size without a streaming content type are read whole and sent in one
# write; anything else is relayed chunk by chunk as it arrives.
BUFFER_LIMIT = 4 * 1024 * 1024
ERROR_BODY_LIMIT = 1024 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# How long a key whose account said "no access to this model" is not offered that model.
MODEL_REFUSAL_SECONDS = 3600.0
UPSTREAM_FAILURES = (UpstreamError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one attempt with one key failed, before anything reached the caller."""

    reason: str
    verdict: Verdict
    # The upstream's own answer, for the caller if no other key does better.
    relay: web.Response | None = None


# An attempt that must be sent again to the same key (without the injected stream_options).
RESEND = Failure("resend without stream_options", Verdict(Outcome.CALLER_ERROR))


def bearer_token(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authenticate(request: web.BaseRequest, services: Services) -> Any:
    principal = services.accounts.authenticate(bearer_token(request))
    if principal is None:
        raise ApiError(
            401,
            "Incorrect API key provided. Use a token issued by this apipool-proxy"
            " (apipool login, or POST /api/tokens on the admin port).",
            code="invalid_api_key",
            type="invalid_request_error",
        )
    return principal


async def handle(request: web.BaseRequest, services: Services) -> web.StreamResponse:
    """Serve a /v1 request: admit it against the caller's limits, forward it, record it."""
    principal = authenticate(request, services)
    exchange = open_exchange(request, principal)
    if services.draining:
        raise ApiError(503, "The proxy is shutting down; retry shortly.", code="shutting_down")
    body: RequestBody | None = None
    if request.headers.get("Upgrade", "").lower() == "websocket":
        # A WebSocket session (the Realtime API) counts against the caller's limits and
        # leaves a usage row like any request; its model is in the query string.
        exchange.model, exchange.stream = request.query.get("model"), True
    else:
        limit = services.settings.proxy.max_body_mb * 1024 * 1024
        raw = arrived_body(request, limit)
        if raw is None:
            raw = await read_body(request, limit)
        body = inspect_body(request.content_type, raw)
        exchange.model, exchange.stream = body.model, body.stream

    user = principal.user
    limiter = services.limiter
    limits = limiter.limits_for(user.limits)
    counters: UserCounters | None = None
    services.metrics.in_flight += 1
    try:
        now = time.time()
        counters = limiter.admit(user.id, limits, now)
        # Sent when the response headers go out (proxy/access.py), so before a stream's
        # first byte; a refusal by the limiter carries its own.
        exchange.rate_headers = limiter.headers(counters, limits, now)
        if body is None:
            from .websocket import relay_websocket  # it imports this module

            return await relay_websocket(request, services, exchange)
        return await _forward(request, services, exchange, body)
    except ApiError as exc:
        exchange.status = exc.status
        raise
    except asyncio.CancelledError:
        exchange.status = 499  # the caller went away
        raise
    finally:
        services.metrics.in_flight -= 1
        tokens = exchange.tokens.total if exchange.tokens else None
        if counters is not None:
            limiter.finish(counters, tokens, time.time())
        if tokens and exchange.key is not None:
            exchange.key.add_tokens(tokens, time.time())  # against its daily budget
        # Refused requests get a row too, so members and admins see limits being hit. The
        # access line and the request count are written by proxy/app.py.
        services.writer.record(exchange.usage_row())


async def _forward(
    request: web.BaseRequest, services: Services, exchange: Exchange, body: RequestBody
) -> web.StreamResponse:
    settings = services.settings
    pool = services.pool
    user_id = exchange.principal.user.id
    if settings.pool.require_contribution and not _has_working_key(services, user_id):
        raise ApiError(
            403,
            "This pool serves members who contribute a working key of their own; add one"
            " with 'apipool add-key'.",
            code="contribution_required",
        )

    listing = sticky.listing_of(request)
    if listing is not None:
        return await sticky.list_objects(request, services, exchange, listing)
    # A request about a recorded object goes to the key that holds it, and no other.
    pinned = sticky.pinned_key(services, exchange, request, body)
    attempts = 1 if pinned is not None else settings.upstream.max_attempts

    tried: set[int] = set()
    failures: list[str] = []
    verdicts: list[Verdict] = []
    relays: list[web.Response | None] = []
    for attempt in range(attempts):
        try:
            key = pinned or pool.choose(exchange.model, user_id, tried, time.time())
        except NoKeyAvailable as exc:
            if not failures:
                raise _no_key_error(exc) from None
            break
        if attempt:
            services.metrics.failovers += 1  # moving on from a key that failed
        tried.add(key.id)
        response = await _attempt(request, services, exchange, body, key)
        if response is RESEND:
            exchange.attempts -= 1  # the same attempt, resent as the caller asked
            response = await _attempt(request, services, exchange, body, key)
        if isinstance(response, web.StreamResponse):
            if exchange.watch is not None:  # the answer may create or delete an object
                await sticky.after_response(services, exchange)
            return response
        failures.append(response.reason)
        verdicts.append(response.verdict)
        relays.append(response.relay)
    answers = [relay for relay in relays if relay is not None]
    if answers and len(answers) == len(relays):
        # Every key tried said it cannot use the model: that is the caller's answer.
        return answers[-1]
    raise _all_failed(exchange, failures, verdicts, pool, tried)


def _has_working_key(services: Services, user_id: int) -> bool:
    return any(
        k.effective_status(time.time()) in (KeyStatus.ACTIVE, KeyStatus.COOLING)
        for k in services.pool.owned_by(user_id)
    )


async def _attempt(
    request: web.BaseRequest,
    services: Services,
    exchange: Exchange,
    body: RequestBody,
    key: PooledKey,
) -> web.StreamResponse | Failure:
    """One try with one key: the relayed response, why this key failed, or RESEND."""
    pool = services.pool
    exchange.attempts += 1
    exchange.key = key
    services.metrics.attempts += 1
    payload, injected = _payload_for(key, exchange, body)
    tail = upstream_tail(request)
    headers = upstream_header_block(request, key.auth_header)
    key.begin()
    try:
        exchange.upstream_started = time.perf_counter()
        try:
            upstream = await services.upstream.request(
                request.method, key.base_url, tail, headers, payload
            )
        except UPSTREAM_FAILURES as exc:
            reason = _describe_failure(exc)
            pool.record(key, Verdict(Outcome.SERVER_ERROR), reason, time.time())
            upstream_log.info("key %d: %s", key.id, reason)
            return Failure(f"key {key.id}: {reason}", Verdict(Outcome.SERVER_ERROR))
        services.metrics.observe_upstream_latency(time.perf_counter() - exchange.upstream_started)
        try:
            status = upstream.status
            now = key.last_used_at = time.time()
            if status >= 400 or status in REDIRECTS:
                return await _refused(services, exchange, key, upstream, injected)
            pool.record(key, _OK, None, now)
            exchange.status = status
            whole = _whole_answer(exchange, upstream)
            if whole is not None:
                return whole
            return await _relay(request, exchange, upstream, injected)
        finally:
            upstream.release()
    finally:
        key.end()


_OK = Verdict(Outcome.OK)


async def _refused(
    services: Services,
    exchange: Exchange,
    key: PooledKey,
    upstream: UpstreamResponse,
    injected: bool,
) -> web.StreamResponse | Failure:
    """An answer of 300 or more: why the key failed, RESEND, or the caller's error."""
    status = upstream.status
    now = key.last_used_at
    if status in REDIRECTS:
        # Never followed, never relayed: a redirect could point the caller or us anywhere.
        exchange.status = 502
        raise ApiError(
            502,
            "The upstream answered with a redirect, which the proxy does not follow.",
            code="upstream_redirect",
        )

    error = await _read_error_body(upstream)
    if injected and status == 400 and b"stream_options" in error:
        # This upstream does not know stream_options: remember, and resend as asked.
        key.no_stream_options = True
        services.pool.dirty.add(key.id)
        return RESEND
    # 404, or 403 from a project barred from the model (OpenAI), with model_not_found: this
    # key's account cannot use the model. Not the caller's mistake, not a broken key.
    refused_model = status in (403, 404) and bool(exchange.model) and b'"model_not_found"' in error
    verdict = (
        Verdict(Outcome.NOT_ALLOWED)
        if refused_model
        else classify_response(status, upstream.headers, error)
    )
    services.pool.record(key, verdict, _error_text(status, error), now or time.time())
    if verdict.outcome in RETRYABLE:
        upstream_log.info("key %d: upstream answered %d; trying another key", key.id, status)
        return Failure(f"key {key.id} got {_status_words(status, verdict)}", verdict)
    # The caller's own mistake (400, 404, 422...): relayed verbatim, costs the key nothing,
    # except that an upstream echoing the pooled key must not hand it to the caller.
    not_allowed = verdict.outcome is Outcome.NOT_ALLOWED
    # A 401 about the pooled key's permissions would read as "your token is wrong" to the
    # caller, whose token is fine: 403 says what happened.
    exchange.status = 403 if not_allowed and status == 401 else status
    headers = caller_response_headers(upstream.headers, exchange.request_id)
    secret = key.secret.encode()
    if secret in error:
        error = error.replace(secret, REDACTED.encode())
    response = web.Response(status=exchange.status, body=error, headers=headers)
    if not not_allowed:
        return response
    # Another key's account may be allowed: try it; the caller gets this answer if none is.
    if refused_model and exchange.model:
        # And this key is not offered the model for a while.
        services.pool.refuse_model(key, exchange.model, time.time() + MODEL_REFUSAL_SECONDS)
        upstream_log.info("key %d cannot use model %s; trying another key", key.id, exchange.model)
        return Failure(f"key {key.id} has no access to the model", verdict, response)
    upstream_log.info("key %d may not do this (%d); trying another key", key.id, status)
    return Failure(f"key {key.id} lacks the permission", verdict, response)


def _payload_for(key: PooledKey, exchange: Exchange, body: RequestBody) -> tuple[bytes, bool]:
    """The bytes to send with this key; streams are asked to report usage when they don't."""
    data = body.json
    if (
        data is None
        or not body.stream
        or key.no_stream_options
        or exchange.endpoint not in ("/chat/completions", "/completions")
    ):
        return body.raw, False
    if "stream_options" not in data:
        # Appended to the caller's own bytes rather than re-encoding the whole body: the
        # rest goes upstream exactly as sent, and a long prompt costs no json.dumps.
        return body.raw.rstrip()[:-1] + _USAGE_OPTION, True
    options = data["stream_options"]
    if isinstance(options, dict) and options.get("include_usage"):
        return body.raw, False
    if options is not None and not isinstance(options, dict):
        return body.raw, False
    extended = {**data, "stream_options": {**(options or {}), "include_usage": True}}
    try:
        return json.dumps(extended).encode(), True
    except (RecursionError, ValueError):
        return body.raw, False  # too deep to re-encode: send as asked, tokens unknown


# What a JSON object body without "stream_options" gets before its closing brace. The body
# holds at least "stream": true, so a comma always belongs before it.
_USAGE_OPTION = b', "stream_options": {"include_usage": true}}'


def upstream_tail(request: web.BaseRequest) -> str:
    """What follows the key's base URL: the raw path after "/v1", with its query.

    The raw path keeps the caller's encoding (a %2F stays %2F). The upstream client joins
    it to the base URL's path only, so it can never change the host or port.
    """
    tail = request.raw_path[3:]
    if tail not in _CHECKED_TAILS:
        if _has_dot_segment(tail):
            raise ApiError(
                400, "The request path must not contain '.' or '..' segments.", code="invalid_path"
            )
        if len(_CHECKED_TAILS) >= 1024:
            _CHECKED_TAILS.clear()  # bounded: paths with object ids are many and seen once
        _CHECKED_TAILS.add(tail)
    return tail


# Paths already found free of dot segments: most requests use the same few.
_CHECKED_TAILS: set[str] = set()


def _has_dot_segment(tail: str) -> bool:
    # Read as an upstream that decodes before normalising would: "..%2f" climbs too.
    path = tail.split("?", 1)[0].lower().replace("%2e", ".").replace("%2f", "/")
    return any(seg in (".", "..") for seg in path.split("/"))


async def _read_error_body(upstream: UpstreamResponse) -> bytes:
    try:
        return await upstream.read(ERROR_BODY_LIMIT)
    except UPSTREAM_FAILURES:
        return b""


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    if isinstance(message, str):
        return f"HTTP {status}: {redact(message)[:300]}"
    return f"HTTP {status}"


def _status_words(status: int, verdict: Verdict) -> str:
    words = {
        Outcome.RATE_LIMITED: "rate-limited (429)",
        Outcome.EXHAUSTED: f"out of quota ({status})",
        Outcome.INVALID: f"rejected as invalid ({status})",
        Outcome.FORBIDDEN: f"refused ({status})",
    }
    return words.get(verdict.outcome, f"an upstream error ({status})")


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, UpstreamError):
        return exc.describe
    if isinstance(exc, asyncio.TimeoutError):
        return "upstream timed out"
    return "upstream request failed"


def _no_key_error(exc: NoKeyAvailable) -> ApiError:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
    return ApiError(exc.status, exc.message, code=exc.code, headers=headers)


def _all_failed(
    exchange: Exchange,
    failures: list[str],
    verdicts: list[Verdict],
    pool: Any,
    tried: set[int],
) -> ApiError:
    summary = "; ".join(failures)
    what = f"model '{exchange.model}'" if exchange.model else "this request"
    limited = all(v.outcome is Outcome.RATE_LIMITED for v in verdicts)
    if limited:
        waits = [
            k.cooldown_until - time.time()
            for k in (pool.get(i) for i in tried)
            if k is not None and k.cooldown_until
        ]
        wait = max(1, int(min(waits) + 0.999)) if waits else 1
        subject = "The key" if len(tried) == 1 else "Every key"
        return ApiError(
            429,
            f"{subject} tried for {what} is rate-limited ({summary}); retry in {wait} s.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
    return ApiError(
        502,
        f"The upstream could not serve {what} after {len(failures)} attempt(s): {summary}.",
        code="upstream_error",
    )


def _whole_answer(exchange: Exchange, upstream: UpstreamResponse) -> web.Response | None:
    """The caller's response, when the answer already arrived whole and may be sent in one
    write; None when it has to be waited for or relayed piece by piece."""
    if not _bufferable(upstream):
        return None
    data = upstream.body_if_complete()
    return None if data is None else _buffered(exchange, upstream, data)


async def _relay(
    request: web.BaseRequest, exchange: Exchange, upstream: UpstreamResponse, injected: bool
) -> web.StreamResponse:
    if _bufferable(upstream):
        return _buffered(exchange, upstream, await upstream.read())
    headers = caller_response_headers(upstream.headers, exchange.request_id)
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    return await _relay_stream(request, exchange, upstream, headers, is_sse, injected)


def _bufferable(upstream: UpstreamResponse) -> bool:
    # Small answers with a length go out in one write; streams, big answers and compressed
    # ones (which arrive without a length: their decoded size is unknown) are relayed
    # piece by piece with bounded memory.
    length = upstream.content_length
    return (
        length is not None
        and length <= BUFFER_LIMIT
        and not upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    )


def _buffered(exchange: Exchange, upstream: UpstreamResponse, data: bytes) -> web.Response:
    headers = upstream.headers
    if b'"usage"' in data and headers.get("Content-Type", "").startswith("application/json"):
        exchange.tokens = _usage_of(data)
    if exchange.watch is not None:
        exchange.watch.feed(data)
    return web.Response(
        status=upstream.status,
        body=data,
        headers=caller_response_headers(headers, exchange.request_id),
    )


_DECODER = json.JSONDecoder()


def _usage_of(data: bytes) -> Any:
    """Token counts of a JSON answer, decoding only its "usage" object when possible.

    OpenAI-style answers end with "usage", so decoding from its last mention reads a few
    dozen bytes instead of the whole answer; anything unexpected falls back to a full parse.
    """
    at = data.rfind(b'"usage"')
    colon = data.find(b":", at + 7) if at >= 0 else -1
    if colon > 0:
        try:
            usage, _ = _DECODER.raw_decode(data[colon + 1 :].decode().lstrip())
        except ValueError:  # UnicodeDecodeError included
            usage = None
        counts = usage_from({"usage": usage}) if isinstance(usage, dict) else None
        if counts is not None and counts.total is not None:
            return counts
    try:
        return usage_from(json.loads(data))
    except ValueError:
        return None


class _StreamRelay:
    """What a streamed answer passes through on its way to the caller, piece by piece.

    Pieces are pushed to ``push`` straight from the upstream connection's read callback
    while the caller keeps up, so a piece costs no task switch; the relay coroutine only
    wakes for the end of the answer, a failure, or a caller to wait for.
    """

    __slots__ = ("tap", "json_tap", "watch", "body", "must_drain", "failure")

    def __init__(
        self,
        tap: UsageTap | None,
        json_tap: JsonTap | None,
        watch: Any,
        body: ChunkedBody | None,
    ) -> None:
        self.tap = tap
        self.json_tap = json_tap
        self.watch = watch
        self.body = body
        self.must_drain = False  # the caller's buffer is full: wait before sending more
        self.failure: ConnectionResetError | None = None  # the caller hung up mid-push

    def outgoing(self, chunk: bytes) -> bytes:
        """Watch a piece from upstream; return what the caller gets of it now."""
        if self.watch is not None and self.tap is None:
            self.watch.feed(chunk)
        if self.json_tap is not None:
            self.json_tap.feed(chunk)
        return self.tap.feed(chunk) if self.tap is not None else chunk

    def push(self, chunk: bytes) -> bool:
        """The sink for ``UpstreamResponse.push_to``: False stops the pushing."""
        body = self.body
        if body is None:
            raise RuntimeError("only a chunked body can be pushed to")
        out = self.outgoing(chunk)
        if not out:
            return True
        try:
            self.must_drain = body.write(out)
        except ConnectionResetError as exc:
            self.failure = exc
            return False
        return not self.must_drain


async def _relay_stream(
    request: web.BaseRequest,
    exchange: Exchange,
    upstream: UpstreamResponse,
    headers: Any,
    is_sse: bool,
    injected: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers=headers)
    # Before the first byte, while headers can still change.
    add_exchange_headers(request, response, exchange)
    body = ChunkedBody.for_request(request, response)
    await response.prepare(request)
    watch = exchange.watch
    tap = UsageTap(injected, keep_first_event=watch is not None) if is_sse else None
    # A JSON answer without a Content-Length (sent chunked) still reports its usage.
    is_json = upstream.headers.get("Content-Type", "").startswith("application/json")
    relay = _StreamRelay(tap, JsonTap(BUFFER_LIMIT) if is_json else None, watch, body)
    last = b""  # sent together with the end of the body: one write fewer per stream
    try:
        while True:
            chunk = upstream.take()
            if chunk is None:
                pushing = body is not None and upstream.push_to(relay.push)
                await upstream.arrival()
                if pushing:
                    await _after_pushing(relay)
                continue
            if not chunk:
                break
            out = relay.outgoing(chunk)
            if upstream.drained():
                last = out
                break
            if not out:
                continue
            if body is None:
                await response.write(out)
            elif body.write(out):
                await body.drain()
        if tap is not None:
            last += tap.flush()
        if relay.json_tap is not None:
            exchange.tokens = relay.json_tap.usage()
    except ConnectionResetError:
        # Writing to a caller that hung up; the upstream is released by our caller.
        exchange.status = 499
        upstream_log.debug("caller left stream %s", exchange.request_id)
        return response
    except UPSTREAM_FAILURES as exc:
        await _end_broken_stream(request, exchange, response, is_sse, exc)
        return response
    finally:
        if tap is not None:
            exchange.tokens = tap.tokens
            if watch is not None:
                watch.first_event = tap.first_event
    try:
        await response.write_eof(last)
    except ConnectionResetError:
        # openai-python waits 0.1 s for the end of a stream after "[DONE]", then hangs up:
        # the caller already has the whole answer.
        upstream_log.debug("caller left before the end of stream %s", exchange.request_id)
    return response


async def _after_pushing(relay: _StreamRelay) -> None:
    """The pushing stopped or the answer moved on: act on what the push left behind."""
    if relay.failure is not None:
        raise relay.failure
    if relay.must_drain and relay.body is not None:
        relay.must_drain = False
        await relay.body.drain()


async def _end_broken_stream(
    request: web.BaseRequest,
    exchange: Exchange,
    response: web.StreamResponse,
    is_sse: bool,
    exc: BaseException,
) -> None:
    """The upstream failed after bytes went out: say so once, then close the connection."""
    reason = _describe_failure(exc)
    upstream_log.info("stream %s broke: %s", exchange.request_id, reason)
    exchange.status = 502
    if is_sse:
        frame = error_body(502, f"The upstream stream broke: {reason}.", code="upstream_error")
        try:
            await response.write(b"data: " + frame + b"\n\n")
        except (ConnectionError, RuntimeError):
            pass
    # Closing the transport (not write_eof) ends a chunked body without its terminator, so
    # the client sees an incomplete response rather than a clean end.
    if request.transport is not None:
        request.transport.close()
