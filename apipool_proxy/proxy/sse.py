"""Watching a relayed body for token usage as it passes through.

Server-sent events are forwarded as soon as they are complete, byte for byte. The only
change ever made is dropping the usage-only chunk that the proxy itself asked for (see
``stream_options.include_usage``) so the caller sees exactly the stream it asked for.
A JSON answer relayed in pieces (chunked, without a Content-Length) passes unchanged
while a bounded copy is kept to read its ``usage`` at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
# The most bytes of an unfinished event held back while waiting for its end. Events are
# small, a streamed image (base64) a few MiB; past this the tap stops watching and relays
# bytes as they come, so an upstream that never ends an event cannot fill memory.
PENDING_LIMIT = 16 * 1024 * 1024


@dataclass(slots=True)
class TokenCounts:
    prompt: int | None = None
    completion: int | None = None
    total: int | None = None


def usage_from(obj: Any) -> TokenCounts | None:
    """Token counts from a completion, a chunk, or a Responses API object or event."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    if total is None and isinstance(prompt, int) and isinstance(completion, int):
        total = prompt + completion
    return TokenCounts(_int(prompt), _int(completion), _int(total))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class JsonTap:
    """Keeps a copy of a JSON body up to ``limit`` bytes, to read its usage at the end."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.limit:
            self._parts.append(chunk)
        else:
            self._parts.clear()  # too large to be worth parsing; usage stays unknown

    def usage(self) -> TokenCounts | None:
        """The usage of the whole body, once it has all been fed."""
        data = b"".join(self._parts) if self._size <= self.limit else b""
        if b'"usage"' not in data:
            return None
        try:
            return usage_from(json.loads(data))
        except ValueError:
            return None


class UsageTap:
    """Splits a byte stream into SSE events, notes usage, and drops injected usage chunks.

    With ``keep_first_event`` it also keeps the first event's JSON: a streamed response's
    ``response.created`` names the response the stream stores.
    """

    def __init__(self, drop_usage_chunk: bool, keep_first_event: bool = False) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.tokens: TokenCounts | None = None
        self.first_event: Any = None
        self._want_first = keep_first_event
        self._pending = b""
        self._watching = True

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from upstream; return the bytes to send to the caller now."""
        if not self._watching:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        if data.endswith(b"\n\n"):
            # The usual case: the upstream sent whole events.
            complete, self._pending = data, b""
        else:
            end = max(data.rfind(sep) + len(sep) if sep in data else 0 for sep in _EVENT_ENDS)
            if end == 0:
                if len(data) > PENDING_LIMIT:
                    self._watching = False  # not SSE as we know it: relay, stop counting
                    self._pending = b""
                    return data
                self._pending = data
                return b""
            complete, self._pending = data[:end], data[end:]
        if self._want_first:
            self._take_first(complete)
        if b'"usage"' not in complete:
            return complete
        return self._scan(complete)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _take_first(self, complete: bytes) -> None:
        for event in _split_events(complete):
            payload = _event_data(event)
            if payload is None:
                continue  # a comment or a blank keep-alive
            self._want_first = False
            try:
                self.first_event = json.loads(payload)
            except ValueError:
                pass
            return

    def _scan(self, complete: bytes) -> bytes:
        kept: list[bytes] = []
        for event in _split_events(complete):
            if b'"usage"' in event and self._take_usage(event):
                continue
            kept.append(event)
        return b"".join(kept)

    def _take_usage(self, event: bytes) -> bool:
        """Record usage found in ``event``; True when the event must not reach the caller."""
        payload = _event_data(event)
        if payload is None:
            return False
        try:
            obj = json.loads(payload)
        except ValueError:
            return False
        counts = usage_from(obj)
        if counts is None:
            return False
        self.tokens = counts
        # The usage-only chunk of chat completions has an empty choices list.
        return self.drop_usage_chunk and obj.get("choices") == []


def _split_events(data: bytes) -> list[bytes]:
    if b"\r" not in data:
        # The usual case, events ended by "\n\n" only: split in C.
        parts = data.split(b"\n\n")
        events = [part + b"\n\n" for part in parts[:-1]]
        if parts[-1]:
            events.append(parts[-1])
        return events
    events = []
    start = 0
    while start < len(data):
        cut = min(
            (i + len(sep) for sep in _EVENT_ENDS if (i := data.find(sep, start)) >= 0),
            default=len(data),
        )
        events.append(data[start:cut])
        start = cut
    return events


def _event_data(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
