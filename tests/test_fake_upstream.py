"""Self-tests of the fake OpenAI upstream, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import openai
import pytest
from multidict import CIMultiDict
from openai import AsyncOpenAI, OpenAI
from yarl import URL

from tests.fake_upstream import (  # noqa: F401  (the fixtures are used by name)
    FakeUpstream,
    fake_embedding,
    fake_upstream_fixture,
    make_fake_upstream_fixture,
    speech_audio,
)

KEY_A = "sk-test-aaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-test-bbbbbbbbbbbbbbbbbbbb"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there world"}]}


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A fault must look deliberate from the outside and leave no traceback in aiohttp's log."""
    caplog.set_level(logging.ERROR, logger="aiohttp")
    yield
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp")]
    assert not errors


@pytest.fixture
async def client(fake_upstream: FakeUpstream) -> AsyncIterator[AsyncOpenAI]:
    async with _client(fake_upstream, KEY_A) as sdk:
        yield sdk


def _client(up: FakeUpstream, key: str, **kwargs: object) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=up.base_url, api_key=key, max_retries=0, **kwargs)


async def _raw_get(up: FakeUpstream, path: str, **kwargs: object) -> tuple[int, CIMultiDict, bytes]:
    """GET with KEY_A and no decompression: status, headers and body exactly as sent."""
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        url = URL(f"http://127.0.0.1:{up.port}{path}", encoded=True)
        async with session.get(url, headers=headers, **kwargs) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


# -- chat --------------------------------------------------------------------------------------


async def test_chat_completion_echoes_and_names_the_serving_key(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    raw = await client.chat.completions.with_raw_response.create(**CHAT)
    completion = raw.parse()

    assert completion.choices[0].message.content == "echo: hello there world"
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == fake_upstream.stream_chunks
    assert raw.headers["x-fake-key-id"] == fake_upstream.key_id(KEY_A)
    assert KEY_A not in raw.headers["x-fake-key-id"]
    assert raw.headers["x-upstream-port"] == str(fake_upstream.port)
    recorded = fake_upstream.requests[-1]
    assert (recorded.method, recorded.path, recorded.key) == ("POST", "/v1/chat/completions", KEY_A)
    assert recorded.json()["messages"] == CHAT["messages"]


async def test_sync_client_works_from_a_thread(fake_upstream: FakeUpstream) -> None:
    # The sync SDK blocks, so it must not run on the loop that serves the fake.
    def call() -> str | None:
        with OpenAI(base_url=fake_upstream.base_url, api_key=KEY_A, max_retries=0) as sdk:
            return sdk.chat.completions.create(**CHAT).choices[0].message.content

    assert await asyncio.to_thread(call) == "echo: hello there world"


async def test_stream_without_usage_sends_stamped_chunks(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(**CHAT, stream=True)
    chunks = [chunk async for chunk in stream]

    assert len(chunks) == 5
    assert "".join(c.choices[0].delta.content for c in chunks) == "echo: hello there world"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.x_sent_at > 0 for c in chunks)


async def test_stream_with_include_usage_ends_with_a_usage_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert len(chunks) == 6
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 3 + 5


async def test_stream_options_can_be_rejected_per_key(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.account(KEY_A).reject_stream_options = True
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )


async def test_unknown_model_is_404_model_not_found(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(**{**CHAT, "model": "gpt-9"})
    assert caught.value.code == "model_not_found"


async def test_legacy_completion_and_moderation(client: AsyncOpenAI) -> None:
    completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi you")
    moderation = await client.moderations.create(input=["a", "b"])

    assert completion.choices[0].text == "echo: hi you"
    assert completion.usage.prompt_tokens == 2
    assert [r.flagged for r in moderation.results] == [False, False]


# -- embeddings, models ------------------------------------------------------------------------


async def test_embeddings_round_trip_in_base64_and_float(client: AsyncOpenAI) -> None:
    default = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b c"])
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input="a", encoding_format="float"
    )

    assert [d.embedding for d in default.data] == [fake_embedding("a"), fake_embedding("b c")]
    assert default.usage.prompt_tokens == 3
    assert floats.data[0].embedding == fake_embedding("a")


async def test_models_follow_the_key_and_keep_slashes_encoded(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    model = await client.models.retrieve("qwen/qwen2.5-coder-7b-instruct")
    fake_upstream.set_models(KEY_A, ["only-this"])
    listed = [m.id async for m in client.models.list()]

    assert model.id == "qwen/qwen2.5-coder-7b-instruct"
    assert fake_upstream.requests[0].raw_path == "/v1/models/qwen%2Fqwen2.5-coder-7b-instruct"
    assert listed == ["only-this"]


async def test_models_fail_answers_500_until_healed(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.models_fail(KEY_A)
    with pytest.raises(openai.InternalServerError):
        await client.models.list()
    fake_upstream.heal(KEY_A)
    assert len((await client.models.list()).data) > 0


# -- files, batches, accounts ------------------------------------------------------------------


async def test_file_and_batch_belong_to_the_account_that_made_them(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    content = b'{"custom_id": "1"}\r\n\x00\xff--boundary-lookalike\r\n'
    file = await client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    assert file.id.startswith("file-") and file.bytes == len(content)
    assert (await client.files.content(file.id)).content == content
    assert (await client.batches.retrieve(batch.id)).input_file_id == file.id
    assert (await client.batches.cancel(batch.id)).status == "cancelling"
    async with _client(fake_upstream, KEY_B) as other:
        with pytest.raises(openai.NotFoundError, match="No such File object"):
            await other.files.retrieve(file.id)
        with pytest.raises(openai.NotFoundError):
            await other.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(batch.id)


async def test_file_list_pages_with_limit_and_after(client: AsyncOpenAI) -> None:
    ids = [
        (await client.files.create(file=(f"{n}.txt", b"x"), purpose="user_data")).id for n in "abc"
    ]
    first = await client.files.list(limit=2)
    everything = [f.id async for f in await client.files.list(limit=1)]
    deleted = await client.files.delete(ids[0])

    assert [f.id for f in first.data] == ids[:0:-1]
    assert first.has_more
    assert everything == ids[::-1]
    assert deleted.deleted and ids[0] not in [f.id async for f in client.files.list()]


async def test_completed_batch_exposes_its_output_file(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    file = await client.files.create(file=("in.jsonl", b"{}"), purpose="batch")
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    output_id = fake_upstream.complete_batch(KEY_A, batch.id, b"out")

    assert (await client.batches.retrieve(batch.id)).output_file_id == output_id
    assert (await client.files.content(output_id)).content == b"out"


# -- responses ---------------------------------------------------------------------------------


async def test_responses_chain_within_one_account_only(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    first = await client.responses.create(model="gpt-4o-mini", input="one two")
    second = await client.responses.create(
        model="gpt-4o-mini", input="three", previous_response_id=first.id
    )

    assert second.output_text == "echo: three"
    assert second.previous_response_id == first.id
    assert (await client.responses.retrieve(first.id)).output_text == "echo: one two"
    async with _client(fake_upstream, KEY_B) as other:
        with pytest.raises(openai.NotFoundError, match="Previous response with id"):
            await other.responses.create(
                model="gpt-4o-mini", input="x", previous_response_id=first.id
            )
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)


async def test_responses_stream_events_parse_in_the_sdk(client: AsyncOpenAI) -> None:
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    events = [event async for event in stream]

    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert "".join(deltas) == events[-1].response.output_text == "echo: hi"
    assert [e.sequence_number for e in events] == list(range(len(events)))


# -- audio -------------------------------------------------------------------------------------


async def test_transcription_reports_the_uploaded_bytes_digest(client: AsyncOpenAI) -> None:
    audio = bytes(range(256)) * 40
    result = await client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", audio, "audio/wav")
    )
    assert hashlib.sha256(audio).hexdigest() in result.text


async def test_speech_streams_deterministic_binary(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    speech = await client.audio.speech.create(model="tts-1", voice="alloy", input="say this")

    assert speech.response.headers["content-type"] == "audio/mpeg"
    assert speech.content == speech_audio("say this")
    assert len(speech.content) == 200 * 1024


# -- faults ------------------------------------------------------------------------------------


async def test_429_carries_retry_headers_and_is_used_up(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(
        KEY_A, "429", times=1, retry_after=2, retry_after_ms=1500, reset_requests="1s"
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(**CHAT)

    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
    assert headers["x-ratelimit-reset-requests"] == "1s"
    assert caught.value.code == "rate_limit_exceeded"
    assert (await client.chat.completions.create(**CHAT)).choices


async def test_faults_queue_in_order_per_key(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "insufficient_quota", times=1)
    fake_upstream.fail(KEY_A, "503", times=1)
    async with _client(fake_upstream, KEY_B) as other:
        assert (await other.chat.completions.create(**CHAT)).choices

    with pytest.raises(openai.RateLimitError) as quota:
        await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(**CHAT)
    assert quota.value.body["type"] == "insufficient_quota"
    assert (await client.chat.completions.create(**CHAT)).choices


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("400", openai.BadRequestError),
        ("401", openai.AuthenticationError),
        ("403", openai.PermissionDeniedError),
        ("500", openai.InternalServerError),
        ("502", openai.InternalServerError),
        ("504", openai.InternalServerError),
    ],
)
async def test_status_faults_last_until_healed(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
    mode: str,
    error: type[openai.APIStatusError],
) -> None:
    fake_upstream.fail(KEY_A, mode)
    for _ in range(2):
        with pytest.raises(error) as caught:
            await client.chat.completions.create(**CHAT)
        assert caught.value.status_code == int(mode)
        assert set(caught.value.body) == {"message", "type", "param", "code"}
    fake_upstream.heal(KEY_A)
    assert (await client.chat.completions.create(**CHAT)).choices


async def test_400_message_and_param_are_scriptable(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "400", times=1, message="Bad 'n'.", param="n")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**CHAT)
    assert caught.value.body == {
        "message": "Bad 'n'.",
        "type": "invalid_request_error",
        "param": "n",
        "code": "decimal_above_max_value",
    }


async def test_502_can_answer_html(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail(KEY_A, "502", times=1, html=True)
    status, headers, _ = await _raw_get(fake_upstream, "/v1/models")
    assert status == 502
    assert headers["Content-Type"].startswith("text/html")


async def test_revoked_key_echoes_itself_in_the_401(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.revoke(KEY_A)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.models.list()
    assert caught.value.code == "invalid_api_key"
    assert KEY_A in caught.value.body["message"]


async def test_missing_key_is_401(fake_upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake_upstream.base_url}/models") as response:
            assert response.status == 401
    assert fake_upstream.requests[0].key is None


async def test_hang_times_out_and_is_released(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "hang", times=1)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(**CHAT, timeout=0.5)
    async with asyncio.timeout(1):
        await fake_upstream.wait_idle()
    assert fake_upstream.disconnects == 1


async def test_hang_does_not_hold_shutdown() -> None:
    async with FakeUpstream() as up:
        up.fail(KEY_A, "hang")
        pending = asyncio.ensure_future(_raw_get(up, "/v1/models"))
        async with asyncio.timeout(1):
            await up.wait_inflight(1)
    with pytest.raises(aiohttp.ClientError):
        await pending
    assert up.disconnects == 0


async def test_reset_is_a_connection_error(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "reset", times=1)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(**CHAT)
    assert (await client.chat.completions.create(**CHAT)).choices


async def test_die_midstream_breaks_iteration_after_n_chunks(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "die_midstream", times=1, after_chunks=2)
    received = []
    stream = await client.chat.completions.create(**CHAT, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2


async def test_die_midstream_truncates_a_plain_body(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "die_midstream", times=1)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(**CHAT)


async def test_slow_stream_spaces_chunks(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "slow_stream", times=1, chunk_delay=0.05)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    stamps = [chunk.x_sent_at async for chunk in stream]
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]
    assert min(gaps) >= 0.04


async def test_client_leaving_midstream_is_counted_and_released(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.fail(KEY_A, "slow_stream", times=1, chunk_delay=0.2)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    await stream.__anext__()
    await stream.close()

    async with asyncio.timeout(1):
        await fake_upstream.wait_idle()
    assert fake_upstream.disconnects == 1


async def test_redirect_is_not_followed_by_the_fake(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail(KEY_A, "302", times=1, location="http://127.0.0.1:9/x")
    status, headers, _ = await _raw_get(fake_upstream, "/v1/models", allow_redirects=False)
    assert status == 302
    assert headers["Location"] == "http://127.0.0.1:9/x"


async def test_unknown_url_and_wrong_method_are_openai_404s(
    fake_upstream: FakeUpstream,
) -> None:
    for path in ("/v1/nope", "/v1/chat/completions"):
        status, _, raw = await _raw_get(fake_upstream, path)
        body = json.loads(raw)
        assert status == 404
        assert body["error"]["code"] == "unknown_url"
        assert body["error"]["message"] == f"Invalid URL (GET {path})"


async def test_gzip_compresses_json_and_the_sdk_still_parses(
    fake_upstream: FakeUpstream,
    client: AsyncOpenAI,
) -> None:
    fake_upstream.gzip = True
    _, headers, raw = await _raw_get(fake_upstream, "/v1/models")

    assert headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["object"] == "list"
    assert (await client.chat.completions.create(**CHAT)).choices


# -- websocket, several upstreams --------------------------------------------------------------


async def test_realtime_websocket_echoes_and_closes_after_n_frames(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.ws_close_after = 2
    url = f"ws://127.0.0.1:{fake_upstream.port}/v1/realtime?model=gpt-4o-realtime-preview"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers={"Authorization": f"Bearer {KEY_A}"}) as ws:
            await ws.send_str('{"type": "session.update"}')
            echoed = await ws.receive_json()
            await ws.send_bytes(b"\x00\x01")
            binary = await ws.receive_bytes()
            closing = await ws.receive()

    assert echoed == {"type": "echo", "data": {"type": "session.update"}}
    assert binary == b"\x00\x01"
    assert closing.type == aiohttp.WSMsgType.CLOSE
    assert fake_upstream.requests[0].key == KEY_A
    assert fake_upstream.requests[0].query_string == "model=gpt-4o-realtime-preview"


async def test_factory_starts_independent_upstreams(
    make_fake_upstream: Callable[[], Awaitable[FakeUpstream]],
) -> None:
    first, second = await make_fake_upstream(), await make_fake_upstream()
    async with _client(second, KEY_A) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(**CHAT)

    assert first.port != second.port
    assert raw.headers["x-upstream-port"] == str(second.port)
    assert (len(first.requests), len(second.requests)) == (0, 1)
