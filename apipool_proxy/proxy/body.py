"""Reading the caller's body once and finding what routing needs in it."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

from ..errors import ApiError


@dataclass(slots=True)
class RequestBody:
    raw: bytes
    json: dict[str, Any] | None  # the parsed object, when the body is a JSON object
    model: str | None
    stream: bool


def arrived_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body when all of it has already arrived with a declared length, else None
    (then ``read_body``). Most JSON bodies come in the packet that carries the headers."""
    length = request.content_length
    content = request.content
    if length is None or length > limit or not content.is_eof():
        return None
    data = content.read_nowait(-1)
    if len(data) != length:
        raise ApiError(400, "The request body ended early.", code="invalid_body")
    return data


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refusing anything over ``limit`` bytes with 413."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    await _continue_if_expected(request)
    if length is not None:
        # The common case: a declared length, read in one call.
        try:
            return await request.content.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise ApiError(400, "The request body ended early.", code="invalid_body") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _continue_if_expected(request: web.BaseRequest) -> None:
    """Answer "Expect: 100-continue", which clients such as curl send before a large upload.

    aiohttp's router does this for applications; the proxy port has no router, and a client
    left unanswered waits (curl: one second) before sending the body anyway. It is called
    once the caller is authenticated and the declared size is acceptable, so a refused
    upload is never sent at all.
    """
    expect = request.headers.get("Expect")
    if expect is None:
        return
    if expect.strip().lower() != "100-continue":
        raise ApiError(417, f"Unsupported Expect header: {expect[:64]!r}.", code="invalid_expect")
    if request.version >= HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than the proxy accepts ({limit // (1024 * 1024)} MiB).",
        code="request_too_large",
    )


def inspect_body(content_type: str, raw: bytes) -> RequestBody:
    """Parse a JSON body (once) or scan a multipart form for the ``model`` field."""
    if not raw:
        return RequestBody(raw, None, None, False)
    if content_type == "application/json" or content_type.endswith("+json"):
        return _inspect_json(raw)
    if content_type == "multipart/form-data":
        return RequestBody(raw, None, _multipart_model(raw), False)
    return RequestBody(raw, None, None, False)


def _inspect_json(raw: bytes) -> RequestBody:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8.", code="invalid_body") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at position {exc.pos}"
        raise ApiError(
            400, f"We could not parse the JSON body of your request ({where}).", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        return RequestBody(raw, None, None, False)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string.", param="model", code="invalid_type")
    return RequestBody(raw, data, model, data.get("stream") is True)


_MODEL_PART = re.compile(
    rb'Content-Disposition:[^\r\n]*name="model"[^\r\n]*\r\n'  # the part's header line
    rb"(?:[^\r\n]+\r\n)*\r\n"  # any further headers, then the blank line
    rb"([^\r\n]{0,512})\r\n",  # the value
    re.IGNORECASE,
)


def _multipart_model(raw: bytes) -> str | None:
    # The form's other parts may be megabytes of audio; a bounded regex finds the small
    # "model" part without parsing the rest.
    match = _MODEL_PART.search(raw)
    if match is None:
        return None
    try:
        return match.group(1).decode("utf-8") or None
    except UnicodeDecodeError:
        return None


# A simple form field: a part without a filename whose value is one short line.
_FORM_FIELD = re.compile(
    rb'Content-Disposition:[ \t]*form-data;[ \t]*name="?([^";\r\n]{1,100})"?'
    rb"(?![^\r\n]*filename)[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,512})\r\n",
    re.IGNORECASE,
)


def multipart_fields(raw: bytes) -> list[tuple[str, str]]:
    """(name, value) of the short text fields of a multipart form, file parts skipped."""
    return [
        (name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
        for name, value in _FORM_FIELD.findall(raw)
    ]
