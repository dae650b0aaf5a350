"""Stateful endpoints on a pool: objects stick to the key that holds them and stay private
to the member who made them. Driven by the openai SDK against fake upstream accounts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest

from apipool_proxy.objects import (
    ObjectRegistry,
    created_by,
    deleted_by,
    ids_in_body,
    ids_in_inference_body,
    outputs_of,
    path_segments,
)
from apipool_proxy.proxy.body import multipart_fields
from apipool_proxy.server import RunningServer

from .fake_upstream import FakeUpstream
from .support import Member

MODEL = "gpt-4o-mini"
# Loopback keys serve everyone, and requests take turns over the keys, so that objects
# spread over every key of the pool.
POOL = {"upstream": {"shared_hosts": ["127.0.0.1"]}, "pool": {"strategy": "round_robin"}}
StartServer = Callable[..., AbstractAsyncContextManager[RunningServer]]


@dataclass
class Pool:
    server: RunningServer
    up: FakeUpstream
    http: aiohttp.ClientSession
    alice: Member
    bob: Member
    keys: list[str]
    key_ids: list[int]
    clients: dict[str, openai.AsyncOpenAI] = field(default_factory=dict)

    def client(self, member: Member) -> openai.AsyncOpenAI:
        """The member's SDK client: no retries, so every error reaches the test."""
        if member.token not in self.clients:
            self.clients[member.token] = openai.AsyncOpenAI(
                base_url=self.server.proxy_url, api_key=member.token, max_retries=0
            )
        return self.clients[member.token]

    def holder(self, object_id: str) -> str:
        """The upstream key whose account holds the object, asked of the fake itself."""
        for key in self.keys:
            account = self.up.account(key)
            stores = (account.files, account.batches, account.responses)
            if any(object_id in store for store in (*stores, account.fine_tuning_jobs)):
                return key
        raise AssertionError(f"no account holds {object_id}")

    def keys_that_saw(self, object_id: str) -> set[str | None]:
        """Every key a request naming the object (in its path or body) was sent with."""
        return {
            r.key for r in self.up.requests if object_id in r.path or object_id.encode() in r.body
        }

    async def upload(self, member: Member, purpose: str = "batch") -> str:
        file = await self.client(member).files.create(
            file=("input.jsonl", b'{"custom_id": "1"}\n'),
            purpose=purpose,  # type: ignore[arg-type]
        )
        return file.id

    async def raw_list(self, member: Member, path: str) -> Any:
        """A list page as JSON, to check first_id, last_id and has_more as sent."""
        async with self.http.get(self.server.proxy_url + path, headers=member.auth) as resp:
            assert resp.status == 200
            return await resp.json()

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


async def join(server: RunningServer, http: aiohttp.ClientSession, name: str) -> Member:
    return await Member(http, server.admin_url, name).join()


@asynccontextmanager
async def pool_of(
    start_server: StartServer, http: aiohttp.ClientSession, n_keys: int = 3
) -> AsyncIterator[Pool]:
    async with FakeUpstream() as up, start_server(**POOL) as server:
        alice, bob = await join(server, http, "alice"), await join(server, http, "bob")
        keys = [f"sk-objects-{i}-{'k' * 20}" for i in range(n_keys)]
        ids = [(await alice.add_key(k, up.base_url, models=[MODEL]))["id"] for k in keys]
        pool = Pool(server, up, http, alice, bob, keys, ids)
        try:
            yield pool
        finally:
            await pool.close()


def messages(text: str = "hello") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- follow-ups reach the key that holds the object -------------------------------------------


async def test_file_then_batch_then_read_back_never_misses_on_three_keys(start_server, http):
    async with pool_of(start_server, http, n_keys=3) as p:
        client = p.client(p.alice)
        for _ in range(20):
            file_id = await p.upload(p.alice)
            batch = await client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            holder = p.holder(file_id)
            assert p.holder(batch.id) == holder
            # The upstream makes the output file itself: no create call ever returned it.
            output_id = p.up.complete_batch(holder, batch.id, b'{"custom_id": "1"}\n')
            again = await client.batches.retrieve(batch.id)
            assert again.input_file_id == file_id and again.output_file_id == output_id
            assert (await client.files.content(output_id)).content == b'{"custom_id": "1"}\n'
            assert p.keys_that_saw(file_id) == {holder}
            assert p.keys_that_saw(batch.id) == {holder}
            assert p.keys_that_saw(output_id) == {holder}
        # Round robin spread the uploads: every key holds some, so pinning did the work.
        assert all(p.up.account(key).files for key in p.keys)


async def test_previous_response_id_lands_on_the_key_that_stored_it(start_server, http):
    async with pool_of(start_server, http, n_keys=3) as p:
        client = p.client(p.alice)
        first = await client.responses.create(model=MODEL, input="one")
        stream = await client.responses.create(model=MODEL, input="two", stream=True)
        streamed = [event async for event in stream]
        streamed_id = streamed[-1].response.id  # type: ignore[union-attr]
        for previous in (first.id, streamed_id) * 4:
            reply = await client.responses.create(
                model=MODEL, input="more", previous_response_id=previous
            )
            assert reply.output_text == "echo: more"
        assert p.keys_that_saw(first.id) == {p.holder(first.id)}
        assert p.keys_that_saw(streamed_id) == {p.holder(streamed_id)}

        unstored = await client.responses.create(model=MODEL, input="x", store=False)
        assert p.server.services.objects.get(unstored.id) is None


async def test_ids_nested_in_a_body_pin_the_request(start_server, http):
    async with pool_of(start_server, http, n_keys=3) as p:
        file_id = await p.upload(p.alice, purpose="user_data")
        for _ in range(4):
            await p.client(p.alice).responses.create(
                model=MODEL,
                input=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_file", "file_id": file_id},
                            {"type": "input_text", "text": "summarise"},
                        ],
                    }
                ],
            )
        assert p.keys_that_saw(file_id) == {p.holder(file_id)}


async def test_request_naming_objects_on_two_keys_is_409(start_server, http):
    async with pool_of(start_server, http, n_keys=2) as p:
        a, b = await p.upload(p.alice), await p.upload(p.alice)
        assert p.holder(a) != p.holder(b)
        sent = len(p.up.requests)
        with pytest.raises(openai.ConflictError) as caught:
            await p.client(p.alice).vector_stores.create(file_ids=[a, b])
        assert caught.value.code == "objects_on_different_keys"
        assert a in caught.value.message and b in caught.value.message
        assert len(p.up.requests) == sent


# -- members cannot reach each other's objects -------------------------------------------------


async def test_another_member_gets_404_as_for_an_unknown_id(start_server, http):
    async with pool_of(start_server, http, n_keys=2) as p:
        file_id = await p.upload(p.alice)
        response = await p.client(p.alice).responses.create(model=MODEL, input="secret")
        bob = p.client(p.bob)

        unknown = "file-" + "z" * 24
        with pytest.raises(openai.NotFoundError) as never_seen:
            await bob.files.retrieve(unknown)  # forwarded: the upstream's own answer
        sent = len(p.up.requests)
        with pytest.raises(openai.NotFoundError) as foreign:
            await bob.files.retrieve(file_id)
        expected = dict(never_seen.value.body)  # type: ignore[call-overload]
        expected["message"] = expected["message"].replace(unknown, file_id)
        assert foreign.value.body == expected
        with pytest.raises(openai.NotFoundError):
            await bob.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            await bob.files.content(file_id)
        with pytest.raises(openai.NotFoundError) as in_body:
            await bob.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert in_body.value.body["param"] == "input_file_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as chained:
            await bob.responses.create(model=MODEL, input="x", previous_response_id=response.id)
        assert chained.value.code == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            attached = {"type": "file", "file": {"file_id": file_id}}
            await bob.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [attached]}]
            )
        # Spelling the path differently does not get past: the upstream would decode it.
        encoded = file_id.replace("-", "%2D", 1)
        async with p.http.get(f"{p.server.proxy_url}/files/{encoded}", headers=p.bob.auth) as resp:
            assert resp.status == 404
        assert (await p.raw_list(p.bob, "/files/"))["data"] == []
        assert len(p.up.requests) == sent  # none of it left the proxy

        assert [f.id async for f in bob.files.list()] == []
        assert [f.id async for f in p.client(p.alice).files.list()] == [file_id]


async def test_lists_merge_the_callers_objects_across_keys(start_server, http):
    async with pool_of(start_server, http, n_keys=2) as p:
        mine = [await p.upload(p.alice, purpose="batch") for _ in range(4)]
        mine.append(await p.upload(p.alice, purpose="assistants"))
        theirs = [await p.upload(p.bob) for _ in range(2)]
        assert {p.holder(f) for f in mine} == set(p.keys)
        client = p.client(p.alice)

        first = await client.files.list(limit=2)
        assert len(first.data) == 2 and first.has_more is True
        paged = [f async for f in client.files.list(limit=2)]
        assert sorted(f.id for f in paged) == sorted(mine)  # each once, none of bob's
        stamps = [f.created_at for f in paged]
        assert stamps == sorted(stamps, reverse=True)  # newest first, as OpenAI lists files
        assert [f.id for f in paged[:2]] == [f.id for f in first.data]

        raw = await p.raw_list(p.alice, "/files?limit=3&order=asc")
        assert [f["id"] for f in raw["data"]] == [f.id for f in reversed(paged)][:3]
        assert raw["first_id"] == raw["data"][0]["id"] and raw["last_id"] == raw["data"][-1]["id"]
        assert raw["has_more"] is True
        rest = await p.raw_list(p.alice, f"/files?order=asc&after={raw['last_id']}")
        assert len(rest["data"]) == 2 and rest["has_more"] is False

        filtered = [f.id async for f in client.files.list(purpose="assistants")]
        assert filtered == [mine[-1]]  # the caller's filters reach the upstream
        assert sorted([f.id async for f in p.client(p.bob).files.list()]) == sorted(theirs)

        carol = await join(p.server, http, "carol")
        sent = len(p.up.requests)
        assert [b.id async for b in p.client(carol).batches.list()] == []
        assert len(p.up.requests) == sent  # nothing of carol's anywhere: no upstream call


async def test_deleting_an_object_forgets_it(start_server, http):
    async with pool_of(start_server, http, n_keys=2) as p:
        client = p.client(p.alice)
        file_id = await p.upload(p.alice)
        response = await client.responses.create(model=MODEL, input="short-lived")
        deleted = await client.files.delete(file_id)
        assert deleted.deleted is True
        await client.responses.delete(response.id)
        registry = p.server.services.objects
        assert registry.get(file_id) is None and registry.get(response.id) is None
        assert not registry.has_objects(p.alice.user_id)
        assert [f.id async for f in client.files.list()] == []


# -- keys that left or cannot serve -------------------------------------------------------------


async def test_objects_of_a_removed_key_answer_410_even_when_its_id_is_reused(start_server, http):
    async with pool_of(start_server, http, n_keys=2) as p:
        files = [await p.upload(p.alice), await p.upload(p.alice)]
        last_key = p.keys[-1]
        lost = next(f for f in files if p.holder(f) == last_key)
        status, _ = await p.alice.call("DELETE", f"/api/keys/{p.key_ids[-1]}")
        assert status == 204

        with pytest.raises(openai.APIStatusError) as caught:
            await p.client(p.alice).files.retrieve(lost)
        assert caught.value.status_code == 410
        assert f"holds file {lost} was removed from the pool" in caught.value.message

        # SQLite hands the freed id to the next key; the new key holds nothing of the old.
        added = await p.alice.add_key("sk-objects-new-" + "n" * 20, p.up.base_url)
        assert added["id"] == p.key_ids[-1]
        with pytest.raises(openai.APIStatusError) as again:
            await p.client(p.alice).files.retrieve(lost)
        assert again.value.status_code == 410
        assert p.keys_that_saw(lost) == set()  # never sent anywhere once its key left


async def test_a_cooling_key_makes_its_objects_wait_and_an_invalid_one_answers_410(
    start_server, http
):
    async with pool_of(start_server, http, n_keys=2) as p:
        files = [await p.upload(p.alice), await p.upload(p.alice)]
        cooling, broken = files if p.holder(files[0]) == p.keys[0] else files[::-1]
        client = p.client(p.alice)

        p.up.fail(p.keys[0], "429", retry_after=30)
        for _ in range(2):  # the upstream's 429, then the proxy's own without asking
            with pytest.raises(openai.RateLimitError) as limited:
                await client.files.retrieve(cooling)
            assert int(limited.value.response.headers["Retry-After"]) >= 29
        assert p.keys_that_saw(cooling) == {p.keys[0]}
        assert len(p.up.requests_for(p.keys[0])) == 2  # the upload, one retrieve

        p.up.revoke(p.keys[1])
        with pytest.raises(openai.APIStatusError):
            await client.files.retrieve(broken)  # the upstream's 401 marks the key invalid
        with pytest.raises(openai.APIStatusError) as gone:
            await client.files.retrieve(broken)
        assert gone.value.status_code == 410 and "rejected by its upstream" in gone.value.message
        assert p.keys_that_saw(broken) == {p.keys[1]}


# -- fine-tuned models --------------------------------------------------------------------------


async def test_a_fine_tuned_model_pins_to_its_key_and_shows_only_to_its_maker(start_server, http):
    async with pool_of(start_server, http, n_keys=3) as p:
        alice, bob = p.client(p.alice), p.client(p.bob)
        training = await p.upload(p.alice, purpose="fine-tune")
        job = await alice.fine_tuning.jobs.create(model=MODEL, training_file=training)
        holder = p.holder(training)
        assert p.holder(job.id) == holder
        model = p.up.finish_fine_tune(holder, job.id)

        assert (await alice.fine_tuning.jobs.retrieve(job.id)).fine_tuned_model == model
        for _ in range(3):
            await alice.chat.completions.create(model=model, messages=messages())
        assert p.up.requests[-1].key == holder
        assert model in [m.id async for m in alice.models.list()]

        with pytest.raises(openai.NotFoundError) as caught:
            await bob.chat.completions.create(model=model, messages=messages())
        assert caught.value.code == "model_not_found"
        # Even once the key's owner lists it among the key's models.
        index = p.keys.index(holder)
        status, _ = await p.alice.call(
            "PATCH", f"/api/keys/{p.key_ids[index]}", {"models": [MODEL, model]}
        )
        assert status == 200
        assert model not in [m.id async for m in bob.models.list()]
        with pytest.raises(openai.NotFoundError):
            await bob.models.retrieve(model)
        assert [j.id async for j in alice.fine_tuning.jobs.list()] == [job.id]
        assert [j.id async for j in bob.fine_tuning.jobs.list()] == []


# -- persistence ------------------------------------------------------------------------------


async def test_objects_survive_a_restart(start_server, http, tmp_path):
    async with FakeUpstream() as up:
        async with start_server(**POOL) as server:
            alice, bob = await join(server, http, "alice"), await join(server, http, "bob")
            keys = [f"sk-restart-{i}-{'r' * 20}" for i in range(3)]
            ids = [(await alice.add_key(k, up.base_url, models=[MODEL]))["id"] for k in keys]
            p = Pool(server, up, http, alice, bob, keys, ids)
            file_id = await p.upload(alice)
            # Written through: on disk before the caller has the id, no flush needed.
            with sqlite3.connect(tmp_path / "apipool.db") as db:
                rows = db.execute(
                    "SELECT key_id FROM upstream_objects WHERE object_id = ?", (file_id,)
                ).fetchall()
            assert rows == [(ids[keys.index(p.holder(file_id))],)]
            response = await p.client(alice).responses.create(model=MODEL, input="keep")
            lost = await p.upload(alice)
            while p.holder(lost) == p.holder(file_id):
                lost = await p.upload(alice)
            await alice.call("DELETE", f"/api/keys/{ids[keys.index(p.holder(lost))]}")
            await p.close()

        async with start_server(**POOL) as server:
            for member in (alice, bob):
                member.admin_url = server.admin_url
            p = Pool(server, up, http, alice, bob, keys, ids)
            client = p.client(alice)
            for _ in range(3):
                assert (await client.files.retrieve(file_id)).id == file_id
                await client.responses.create(
                    model=MODEL, input="again", previous_response_id=response.id
                )
            assert p.keys_that_saw(file_id) == {p.holder(file_id)}
            assert p.keys_that_saw(response.id) == {p.holder(response.id)}
            assert file_id in [f.id async for f in client.files.list()]
            with pytest.raises(openai.NotFoundError):
                await p.client(bob).files.retrieve(file_id)
            with pytest.raises(openai.APIStatusError) as gone:
                await client.files.retrieve(lost)
            assert gone.value.status_code == 410
            await p.close()


async def test_stored_responses_are_forgotten_after_their_retention(start_server, http, tmp_path):
    settings = {**POOL, "pool": {**POOL["pool"], "stored_response_days": 1.0 / 86400}}
    async with FakeUpstream() as up, start_server(**settings) as server:
        alice = await join(server, http, "alice")
        await alice.add_key(f"sk-expiry-{'e' * 20}", up.base_url, models=[MODEL])
        client = openai.AsyncOpenAI(base_url=server.proxy_url, api_key=alice.token)
        file = await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        response = await client.responses.create(model=MODEL, input="short-lived")
        await client.close()
        objects = server.services.objects
        assert objects.get(response.id) is not None

        def stored_ids() -> set[str]:
            with sqlite3.connect(tmp_path / "apipool.db") as db:
                return {row[0] for row in db.execute("SELECT object_id FROM upstream_objects")}

        for _ in range(100):  # expired within a second, deleted from disk half a second on
            if response.id not in stored_ids():
                break
            await asyncio.sleep(0.1)
        assert objects.get(response.id) is None
        assert stored_ids() == {file.id}  # files stay until deleted
        assert objects.get(file.id) is not None


def test_registry_expires_only_expiring_kinds_in_slices():
    registry = ObjectRegistry()
    made = [("resp_0", "response"), ("chatcmpl_1", "chat.completion"), ("resp_1", "response")]
    made += [(f"resp_{index}", "response") for index in range(2, 7)]
    for when, (object_id, kind) in enumerate(made):
        registry.record(object_id, kind, 1, 1, 100.0 + when)
        registry.record(f"file-{when}", "file", 1, 1, 100.0 + when)
    registry.forget("resp_2")  # deleted by its member before it expired
    registry.forget("resp_3")
    registry.record("resp_3", "response", 1, 1, 500.0)  # the same id recorded anew, later
    registry.take_unsaved()

    cutoff = 100.0 + 5.5  # made[0] to made[5] are older
    assert registry.expire(cutoff, most=3) == 3
    assert registry.expire(cutoff) == 3  # resp_2 and the old resp_3 looked at, not forgotten
    assert registry.expire(cutoff) == 0
    forgotten = ["resp_0", "chatcmpl_1", "resp_1", "resp_4"]
    assert registry.take_unsaved() == dict.fromkeys(forgotten)
    assert {r.object_id for r in registry.owned(1, "response")} == {"resp_3", "resp_5", "resp_6"}
    assert registry.owned(1, "chat.completion") == []
    assert len(registry.owned(1, "file")) == len(made)


# -- the hot path --------------------------------------------------------------------------------


async def test_chat_without_objects_of_ones_own_does_not_walk_the_body(start_server, http):
    async with pool_of(start_server, http, n_keys=2) as p:
        registry = p.server.services.objects
        file_id = await p.upload(p.bob)  # the pool holds objects, alice none
        alice = p.client(p.alice)
        for _ in range(3):
            await alice.chat.completions.create(model=MODEL, messages=messages())
        assert registry.walks == 0

        await p.upload(p.alice)
        await alice.chat.completions.create(model=MODEL, messages=messages())
        assert registry.walks == 1  # now alice has objects her requests may name
        assert registry.get(file_id) is not None


def _registry(*objects: tuple[str, str]) -> ObjectRegistry:
    registry = ObjectRegistry()
    for object_id, kind in objects:
        registry.record(object_id, kind, key_id=1, user_id=7, now=1.0)
    return registry


def test_registry_finds_ids_in_paths_bodies_and_forms():
    registry = _registry(("file-a", "file"), ("vs_b", "vector_store"), ("conv_c", "conversation"))
    assert registry.has_objects(7) and not registry.has_objects(8)
    # The path as aiohttp decoded it; empty segments (//, a trailing /) do not hide an id.
    assert path_segments("/v1//files/file-a/") == ["files", "file-a"]
    body = {
        "model": MODEL,
        "tool_resources": {"file_search": {"vector_store_ids": ["vs_b", "vs_other"]}},
        "conversation": {"id": "conv_c"},
        "messages": [{"content": "file-a", "attachments": [{"file_id": "file-a"}]}],
        "deep": [[[[[[[[[[{"file_id": "file-a"}]]]]]]]]]],
    }
    found = {(record.object_id, field) for record, field in ids_in_body(registry, body)}
    # Message text that happens to equal an id is not a reference; nor is anything
    # nested deeper than the API ever reads references.
    assert found == {("vs_b", "vector_store_ids"), ("conv_c", "id"), ("file-a", "file_id")}
    assert registry.walks == 1

    form = (
        b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\nfile-a\r\n'
        b"--x--\r\n"
    )
    assert multipart_fields(form) == [("purpose", "batch")]


def test_inference_requests_are_checked_without_a_walk():
    registry = _registry(("file-a", "file"))
    part = {"type": "file", "file": {"file_id": "file-a"}}
    chat = {"messages": [{"role": "user", "content": [part]}]}
    found = ids_in_inference_body(registry, "/chat/completions", chat)
    assert [record.object_id for record, _ in found] == ["file-a"]
    assert ids_in_inference_body(registry, "/chat/completions", {"messages": messages()}) == []
    assert registry.walks == 0


def _created(answer: dict[str, Any], path: str, stored_chat: bool = False) -> list[Any]:
    segments = path_segments(path)
    return created_by(answer, "/" + segments[0], segments, stored_chat)


def test_answers_tell_what_was_created():
    upload = {"id": "upload_1", "object": "upload", "file": {"id": "file-1", "object": "file"}}
    assert _created(upload, "/v1/uploads/upload_1/complete") == [("file-1", "file")]
    run = {"id": "run_1", "object": "thread.run", "thread_id": "thread_1"}
    assert _created(run, "/v1/threads/runs") == [("run_1", "thread.run"), ("thread_1", "thread")]
    assert _created(run, "/v1/threads/thread_1/runs") == [("run_1", "thread.run")]
    chat = {"id": "chatcmpl-1", "object": "chat.completion"}
    assert _created(chat, "/v1/chat/completions") == []
    assert _created(chat, "/v1/chat/completions", stored_chat=True) == [
        ("chatcmpl-1", "chat.completion")
    ]
    assistant = {"id": "asst_1", "object": "assistant"}
    assert _created(assistant, "/v1/assistants/asst_1") == []  # an update, not a create
    tool_call = {"type": "code_interpreter_call", "container_id": "cntr_1"}
    response = {"id": "resp_1", "object": "response", "output": [tool_call]}
    assert _created(response, "/v1/responses") == [("resp_1", "response"), ("cntr_1", "container")]
    assert _created({**response, "store": False}, "/v1/responses") == [("cntr_1", "container")]

    job = {
        "id": "ftjob-1",
        "object": "fine_tuning.job",
        "fine_tuned_model": "ft:m:o::1",
        "result_files": ["file-r"],
        "output_file_id": None,
    }
    assert outputs_of(job) == ("ftjob-1", [("file-r", "file"), ("ft:m:o::1", "model")])
    assert outputs_of({"id": "file-1", "object": "file", "output_file_id": "file-2"}) == (None, [])


def test_answers_tell_what_was_deleted():
    registry = _registry(("file-1", "file"), ("conv_1", "conversation"))
    deleted = {"id": "file-1", "object": "file", "deleted": True}
    assert deleted_by(deleted, registry, ["files", "file-1"]) == "file-1"
    assert deleted_by(None, registry, ["conversations", "conv_1"]) == "conv_1"  # no body
    # Taking a file out of a vector store leaves the file; deleting an item leaves its
    # conversation.
    unlinked = {"id": "file-1", "object": "vector_store.file.deleted", "deleted": True}
    assert deleted_by(unlinked, registry, ["vector_stores", "vs_1", "files", "file-1"]) is None
    item_gone = {"id": "conv_1", "object": "conversation"}
    assert deleted_by(item_gone, registry, ["conversations", "conv_1", "items", "msg_1"]) is None
