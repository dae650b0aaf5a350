"""Watching relayed streams for usage: the tap over real byte streams, no server needed."""

from __future__ import annotations

import json

from apipool_proxy.proxy import sse
from apipool_proxy.proxy.sse import UsageTap


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CHUNK = _event({"choices": [{"delta": {"content": "hi"}}]})
USAGE_ONLY = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})


def test_events_cut_anywhere_come_out_whole_and_in_order():
    stream = CHUNK * 3 + USAGE_ONLY + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        tap = UsageTap(drop_usage_chunk=True)
        out = tap.feed(stream[:cut]) + tap.feed(stream[cut:]) + tap.flush()
        assert out == CHUNK * 3 + b"data: [DONE]\n\n"  # the injected usage chunk dropped
        assert (tap.tokens.prompt, tap.tokens.completion, tap.tokens.total) == (3, 4, 7)


def test_the_callers_own_usage_chunk_is_kept():
    tap = UsageTap(drop_usage_chunk=False)
    assert tap.feed(CHUNK + USAGE_ONLY) == CHUNK + USAGE_ONLY
    assert tap.tokens.total == 7


def test_an_event_without_end_is_relayed_once_it_passes_the_limit(monkeypatch):
    # An upstream that never ends an event must not make the tap hold its bytes forever.
    monkeypatch.setattr(sse, "PENDING_LIMIT", 1000)
    tap = UsageTap(drop_usage_chunk=True)
    piece = b"data: " + b"x" * 94
    out = [tap.feed(piece) for _ in range(30)]
    assert out[:10] == [b""] * 10  # held while it could still be one event
    assert all(out[11:])  # then released as it comes, not at the end
    assert b"".join(out) + tap.flush() == piece * 30  # every byte once, in order
    assert tap.feed(CHUNK) == CHUNK  # and from then on bytes pass as they come
