"""The OpenAI error envelope, built in one place for both ports.

Every error the proxy or the admin API makes itself has the shape OpenAI uses,
``{"error": {"message", "type", "param", "code"}}``, so the official SDKs raise the
matching exception class (``AuthenticationError`` for 401, ``RateLimitError`` for 429...).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from . import SERVER_NAME
from .log import redact, server_log

# The ``type`` OpenAI uses for each status; the SDKs pick exception classes by status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


class ApiError(Exception):
    """An error the caller should see, raised anywhere below a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(
            self.status,
            self.message,
            code=self.code,
            param=self.param,
            type=self.type,
            headers=self.headers,
        )


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
) -> bytes:
    error = {
        "message": redact(message),
        "type": type or _TYPE_BY_STATUS.get(status, "api_error"),
        "param": param,
        "code": code,
    }
    return json.dumps({"error": error}).encode()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = error_body(status, message, code=code, param=param, type=type)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# aiohttp's own HTTP exceptions (unknown route, wrong method, body too large) mapped to
# messages and codes in the envelope, instead of aiohttp's text/plain pages.
_HTTP_EXCEPTION_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


class EnvelopeRequestHandler(web.RequestHandler):
    """aiohttp's per-connection handler, answering what never reached a handler of ours (a
    malformed request line or header, a header line too long) in the envelope as well.

    aiohttp's own page is text that quotes the offending bytes back, and it logs a traceback
    for every such request; this answer quotes nothing and the log gets one debug line.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: no error answer can follow")
        reason = type(exc).__name__ if exc is not None else str(status)
        server_log.debug("unusable request from %s: %s", request.remote, reason)
        if status < 500:
            response = error_response(status, "The request is not valid HTTP.", code="bad_http")
        else:
            response = error_response(status, "The server had an error processing your request.")
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class EnvelopeServer(web.Server):
    """aiohttp's low-level server with ``EnvelopeRequestHandler`` for its connections."""

    def __call__(self) -> web.RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class EnvelopeAppRunner(web.AppRunner):
    """aiohttp's runner for an application, serving it with ``EnvelopeServer``."""

    async def _make_server(self) -> web.Server:
        # The application's own server, rebuilt with the same settings as an
        # EnvelopeServer: aiohttp offers no other way to choose a runner's handler class.
        server = await super()._make_server()
        return EnvelopeServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure below a handler into the envelope; never an HTML page or a trace."""
    try:
        return await handler(request)
    except Exception as exc:
        return envelope_for(request, exc)


def envelope_for(request: web.BaseRequest, exc: Exception) -> web.Response:
    """The enveloped answer for an exception a handler raised.

    aiohttp's redirects and other HTTP exceptions under 400 are not failures: re-raised.
    """
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _from_http_exception(request, exc)
    # A bug of ours: log it (the formatter redacts secrets), answer without details.
    server_log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "The server had an error processing your request.")


def _from_http_exception(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = f"Unknown request URL: {request.method} {request.path}."
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed for {request.path}."
    elif exc.status == 413:
        message = "The request body is too large."
    else:
        message = exc.reason or "Bad request."
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    server_log.debug("%s %s -> %s", request.method, request.path, exc.status)
    return error_response(
        exc.status, message, code=_HTTP_EXCEPTION_CODES.get(exc.status), headers=headers
    )
