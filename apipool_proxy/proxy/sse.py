"""Watching a server-sent-event stream for token usage as it passes through.

Events are forwarded as soon as they are complete, byte for byte. The only change ever
made is dropping the usage-only chunk that the proxy itself asked for (see
``stream_options.include_usage``) so the caller sees exactly the stream it asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


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


class UsageTap:
    """Splits a byte stream into SSE events, notes usage, and drops injected usage chunks."""

    def __init__(self, drop_usage_chunk: bool) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.tokens: TokenCounts | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from upstream; return the bytes to send to the caller now."""
        data = self._pending + chunk if self._pending else chunk
        end = max(data.rfind(sep) + len(sep) if sep in data else 0 for sep in _EVENT_ENDS)
        if end == 0:
            self._pending = data
            return b""
        complete, self._pending = data[:end], data[end:]
        if b'"usage"' not in complete:
            return complete
        return self._scan(complete)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

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
    events: list[bytes] = []
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
