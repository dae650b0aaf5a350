"""Objects that live on one upstream account, and which pooled key and member hold them.

Half of the OpenAI API is stateful: a file uploaded with one key does not exist for
another, a batch is read back through the key that created it, ``previous_response_id``
resolves only on the account that stored the response. The registry remembers, for every
object created through the pool, the key that holds it and the member who created it, so
that follow-ups go to that key and no other member can reach the object.

This module is the pure part: in-memory maps, and the rules for finding object ids in a
request's path and body and in an upstream's answer. ``proxy/sticky.py`` acts on it over
HTTP; nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from .storage import Database

Row = tuple[str, str, int, int, float]

# The kind under which a fine-tuned model name is recorded, next to the job that made it.
MODEL = "model"
# Kinds the upstream deletes on its own after a while (OpenAI keeps stored responses for 30
# days by default): one is made per call, so their records are dropped after
# ``pool.stored_response_days`` rather than kept, and grown, forever.
EXPIRING_KINDS = frozenset(("response", "chat.completion"))
# Records forgotten per step of an expiry sweep, so a large backlog never stalls the loop.
EXPIRY_SLICE = 5000


@dataclass(slots=True)
class ObjectRecord:
    object_id: str
    kind: str  # the upstream's "object" type: "file", "batch", "response"... or MODEL
    key_id: int
    user_id: int
    # When the pool recorded it. A key created later cannot hold the object: its id was
    # reused after the key that did hold it was removed.
    created_at: float

    def row(self) -> Row:
        return (self.object_id, self.kind, self.key_id, self.user_id, self.created_at)


class ObjectRegistry:
    """Every recorded object in memory: looked up on the request path, never the database.

    Changes are kept until :meth:`take_unsaved` hands them to whoever writes them.
    """

    def __init__(self) -> None:
        self._records: dict[str, ObjectRecord] = {}
        # user id -> kind -> ids, so that a member without objects costs one lookup and a
        # list needs no scan of everyone's objects.
        self._by_user: dict[int, dict[str, set[str]]] = {}
        # id -> the record to write, or None to delete it.
        self._unsaved: dict[str, ObjectRecord | None] = {}
        # (created_at, id) of records of EXPIRING_KINDS, oldest first.
        self._expiring: deque[tuple[float, str]] = deque()
        self.walks = 0  # full body walks so far (tests prove the hot path skips them)

    def load(self, rows: Iterable[Any]) -> None:
        """Take the stored rows (object_id, kind, key_id, user_id, created_at) at startup."""
        for row in rows:
            self._add(
                ObjectRecord(
                    row["object_id"], row["kind"], row["key_id"], row["user_id"], row["created_at"]
                )
            )
        self._expiring = deque(sorted(self._expiring))

    def __len__(self) -> int:
        return len(self._records)

    def get(self, object_id: str) -> ObjectRecord | None:
        return self._records.get(object_id)

    def has_objects(self, user_id: int) -> bool:
        return user_id in self._by_user

    def owned(self, user_id: int, kind: str) -> list[ObjectRecord]:
        ids = self._by_user.get(user_id, {}).get(kind, ())
        return [self._records[i] for i in ids]

    def record(
        self, object_id: str, kind: str, key_id: int, user_id: int, now: float
    ) -> ObjectRecord | None:
        """Remember a new object; None when the id is already known (it keeps its owner)."""
        if object_id in self._records:
            return None
        record = ObjectRecord(object_id, kind, key_id, user_id, now)
        self._add(record)
        self._unsaved[object_id] = record
        return record

    def forget(self, object_id: str) -> ObjectRecord | None:
        record = self._records.pop(object_id, None)
        if record is None:
            return None
        kinds = self._by_user[record.user_id]
        kinds[record.kind].discard(object_id)
        if not kinds[record.kind]:
            del kinds[record.kind]
            if not kinds:
                del self._by_user[record.user_id]
        self._unsaved[object_id] = None
        return record

    def _add(self, record: ObjectRecord) -> None:
        self._records[record.object_id] = record
        kinds = self._by_user.setdefault(record.user_id, {})
        kinds.setdefault(record.kind, set()).add(record.object_id)
        if record.kind in EXPIRING_KINDS:
            self._expiring.append((record.created_at, record.object_id))

    def expire(self, cutoff: float, most: int = EXPIRY_SLICE) -> int:
        """Forget up to ``most`` records of EXPIRING_KINDS made before ``cutoff``; returns
        how many entries were looked at (``most`` means there may be more)."""
        expiring = self._expiring
        looked = 0
        while expiring and expiring[0][0] < cutoff and looked < most:
            created_at, object_id = expiring.popleft()
            looked += 1
            record = self._records.get(object_id)
            # Forgotten already (deleted by its member), or the id was recorded anew since.
            if record is not None and record.created_at == created_at:
                self.forget(object_id)
        return looked

    # -- persistence -----------------------------------------------------------------------

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    def take_unsaved(self) -> dict[str, ObjectRecord | None]:
        changes, self._unsaved = self._unsaved, {}
        return changes

    def restore_unsaved(self, changes: dict[str, ObjectRecord | None]) -> None:
        """Put back changes whose write failed, unless the id changed again meanwhile."""
        for object_id, change in changes.items():
            self._unsaved.setdefault(object_id, change)


async def save_objects(registry: ObjectRegistry, db: Database) -> None:
    """Write the registry's unsaved changes; on failure they stay queued for the next try."""
    changes = registry.take_unsaved()
    if not changes:
        return
    rows = [record.row() for record in changes.values() if record is not None]
    gone = [object_id for object_id, record in changes.items() if record is None]
    try:
        if rows:
            await db.record_objects(rows)
        if gone:
            await db.forget_objects(gone)
    except BaseException:
        registry.restore_unsaved(changes)
        raise


async def expire_stored_outputs(registry: ObjectRegistry, days: float) -> None:
    """Background loop: forget stored responses and chat completions older than ``days``.

    The upstream has deleted them by then, and the records would otherwise pile up by one
    per call. Forgotten ids are deleted from the database by the write-behind saver.
    """
    keep_for = days * 86400
    interval = min(600.0, max(0.05, keep_for / 4))
    while True:
        looked = registry.expire(time.time() - keep_for)
        # A full slice means a backlog: the next slice after other work had its turn.
        await asyncio.sleep(0 if looked == EXPIRY_SLICE else interval)


def saver(registry: ObjectRegistry, db: Database) -> Callable[[], Coroutine[Any, Any, None] | None]:
    """A write-behind source: a write when something changed, else nothing to await."""
    return lambda: save_objects(registry, db) if registry.unsaved else None


# -- kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Missing:
    """How the upstream says an object of one kind does not exist (status 404)."""

    message: str  # with {id}
    param: str | None = None
    code: str | None = None


# OpenAI's own wording where we know it, so a member probing another member's id gets the
# answer an unknown id gets.
_MISSING = {
    "file": Missing("No such File object: {id}", "id"),
    "batch": Missing("No batch found with id '{id}'.", "batch_id"),
    "response": Missing("Response with id '{id}' not found.", "id"),
    MODEL: Missing(
        "The model '{id}' does not exist or you do not have access to it.",
        "model",
        "model_not_found",
    ),
}
_MISSING_IN_BODY = {
    "previous_response_id": Missing(
        "Previous response with id '{id}' not found.",
        "previous_response_id",
        "previous_response_not_found",
    ),
}


def noun(kind: str) -> str:
    """The words for an object type in messages: "vector_store" -> "vector store"."""
    return kind.replace(".", " ").replace("_", " ")


def missing(kind: str, field: str | None = None) -> Missing:
    """The 404 for an id of ``kind`` named in the path, or in the body under ``field``."""
    if field is not None:
        if field in _MISSING_IN_BODY:
            return _MISSING_IN_BODY[field]
        if kind == "file":
            return Missing(_MISSING["file"].message, field)
    return _MISSING.get(kind) or Missing(f"No {noun(kind)} found with id '{{id}}'.", field)


@dataclass(frozen=True, slots=True)
class Listing:
    """A list endpoint of account-wide objects, and how its upstream pages."""

    kind: str
    order: str = "desc"  # the upstream's default order
    limit: int = 20  # the upstream's default page size
    created: str = "created_at"  # the timestamp to merge pages from several keys by


# GET on these paths lists everything on the key's upstream account, whoever created it:
# the pool answers them from the caller's own objects. "/responses" and "/conversations"
# have no list in OpenAI's API today; they are listed so that one added later cannot show
# one member's objects to another. ChatKit threads are never recorded: always empty.
LISTINGS = {
    "/files": Listing("file", limit=10000),
    "/batches": Listing("batch"),
    "/vector_stores": Listing("vector_store"),
    "/assistants": Listing("assistant"),
    "/fine_tuning/jobs": Listing("fine_tuning.job"),
    "/chat/completions": Listing("chat.completion", order="asc", created="created"),
    "/responses": Listing("response"),
    "/conversations": Listing("conversation"),
    "/containers": Listing("container"),
    "/evals": Listing("eval", order="asc"),
    "/videos": Listing("video"),
    "/skills": Listing("skill"),
    "/audio/voice_consents": Listing("audio.voice_consent"),
    "/chatkit/threads": Listing("chatkit.thread"),
}


# -- ids named by a request ----------------------------------------------------------------


def path_segments(path: str) -> list[str]:
    """The decoded segments of a /v1 path after "/v1", empty ones dropped.

    Decoded, because the upstream decodes: "/v1/files/file%2Dabc" names file-abc.
    """
    segments = path[4:].split("/")
    return segments if "" not in segments else [segment for segment in segments if segment]


def ids_in_path(registry: ObjectRegistry, segments: list[str]) -> list[ObjectRecord]:
    # The first segment names the collection ("files", "threads"); ids come after it.
    found = []
    for segment in segments[1:]:
        record = registry.get(segment)
        if record is not None:
            found.append(record)
    return found


# Body fields that carry object ids in OpenAI's API: top level (input_file_id,
# previous_response_id), nested (tool_resources.file_search.vector_store_ids,
# attachments[].file_id, input[].content[].file_id, conversation.id, data_source.source.id).
REFERENCE_FIELDS = frozenset(
    {
        "assistant_id",
        "batch_id",
        "container",
        "container_id",
        "conversation",
        "conversation_id",
        "eval_id",
        "file_id",
        "file_ids",
        "id",
        "input_file_id",
        "previous_response_id",
        "response_id",
        "run_id",
        "skill_id",
        "thread_id",
        "training_file",
        "upload_id",
        "validation_file",
        "vector_store_id",
        "vector_store_ids",
        "video_id",
        "voice",
    }
)
# The upstream reads references at fixed places, none deeper than a few levels
# (threads/runs: thread.messages[].attachments[].file_id is the deepest); anything below
# this depth (JSON schemas of tools, say) is not looked at.
MAX_DEPTH = 8


def ids_in_body(registry: ObjectRegistry, data: Any) -> list[tuple[ObjectRecord, str]]:
    """Recorded ids under reference fields anywhere in a JSON body, with their field."""
    registry.walks += 1
    get = registry.get
    found: list[tuple[ObjectRecord, str]] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            for name, item in value.items():
                if name in REFERENCE_FIELDS:
                    _collect(get, name, item, found)
                if depth < MAX_DEPTH and isinstance(item, dict | list):
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value if isinstance(item, dict | list))
    return found


def _collect(
    get: Callable[[str], ObjectRecord | None],
    name: str,
    value: Any,
    found: list[tuple[ObjectRecord, str]],
) -> None:
    values = value if isinstance(value, list) else (value,)
    for item in values:
        if isinstance(item, str):
            record = get(item)
            if record is not None:
                found.append((record, name))


def ids_in_inference_body(
    registry: ObjectRegistry, endpoint: str, data: dict[str, Any]
) -> list[tuple[ObjectRecord, str]]:
    """Recorded ids at the few places a plain inference request can name one.

    Used instead of the full walk for members with no objects of their own: any id found
    is someone else's. Chat messages can attach a file ({"type": "file", "file":
    {"file_id": ...}}), speech can use a custom voice, image edits can take file ids.
    """
    get = registry.get
    found: list[tuple[ObjectRecord, str]] = []
    if endpoint == "/chat/completions":
        messages = data.get("messages")
        for message in messages if isinstance(messages, list) else ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                for part in content:
                    file = part.get("file") if isinstance(part, dict) else None
                    if isinstance(file, dict):
                        _collect(get, "file_id", file.get("file_id"), found)
    elif endpoint == "/audio/speech":
        voice = data.get("voice")
        _collect(get, "voice", voice.get("id") if isinstance(voice, dict) else voice, found)
    elif endpoint == "/images/edits":
        return ids_in_body(registry, {"images": data.get("images"), "mask": data.get("mask")})
    return found


# -- objects an answer creates ---------------------------------------------------------------

# "object" types that are answers, not objects kept on the account (or, for
# vector_store.file, kept under the id of a file that is recorded on its own).
TRANSIENT = frozenset(
    {
        "chat.completion",  # recorded only when the request asked for store: true
        "chat.completion.chunk",
        "text_completion",
        "list",
        "embedding",
        "moderation",
        "response.input_tokens",
        "response.compaction",
        "upload.part",
        "vector_store.file",
        "vector_store.search_results.page",
        "realtime.session",
        "realtime.transcription_session",
        "content_provenance_check",
        "checkpoint.permission",
    }
)
# Answers without an "object" type that still create something on the account.
_UNTYPED_CREATES = {"/videos/characters": "video.character"}


def created_by(
    answer: Any, endpoint: str, named: Iterable[str], stored_chat: bool
) -> list[tuple[str, str]]:
    """(id, kind) of every object a 2xx answer to a POST brought into existence.

    An answer echoing an id the request named (an update, a cancel) creates nothing.
    """
    if not isinstance(answer, dict):
        return []
    named = set(named)
    found: list[tuple[str, str]] = []
    object_id, kind = answer.get("id"), answer.get("object")
    if kind is None:
        kind = _UNTYPED_CREATES.get(endpoint)
    if isinstance(object_id, str) and isinstance(kind, str) and object_id not in named:
        if _kept(kind, stored_chat) and answer.get("store") is not False:
            found.append((object_id, kind))
    # A completed upload carries the file it made; a run on a new thread, that thread; a
    # response whose code interpreter ran in a new container, that container.
    file = answer.get("file")
    if isinstance(file, dict) and file.get("object") == "file" and isinstance(file.get("id"), str):
        found.append((file["id"], "file"))
    thread_id = answer.get("thread_id")
    if kind == "thread.run" and isinstance(thread_id, str) and thread_id not in named:
        found.append((thread_id, "thread"))
    output = answer.get("output") if kind == "response" else None
    for item in output if isinstance(output, list) else ():
        container_id = item.get("container_id") if isinstance(item, dict) else None
        if isinstance(container_id, str) and container_id not in named:
            found.append((container_id, "container"))
    return found


def _kept(kind: str, stored_chat: bool) -> bool:
    if kind == "chat.completion":
        return stored_chat
    if kind in TRANSIENT or kind.endswith(".deleted"):
        return False
    # Organisation and project administration is not an account object a member owns.
    return not kind.startswith(("organization.", "project.", "group.", "user.", "role"))


def deleted_by(answer: Any, registry: ObjectRegistry, segments: list[str]) -> str | None:
    """The recorded id a 2xx DELETE removed, if any: the object the path ends with.

    When the answer has a type it must be that object's: removing a file from a vector
    store answers "vector_store.file.deleted" and the file itself stays; deleting a
    conversation item answers with the conversation, which stays too.
    """
    record = registry.get(segments[-1]) if len(segments) > 1 else None
    if record is None:
        return None
    if isinstance(answer, dict):
        if answer.get("deleted") is False:
            return None
        kind = answer.get("object")
        if kind is not None and kind not in (record.kind, record.kind + ".deleted"):
            return None
    return record.object_id


# Objects whose answers name what the upstream made for them later (see outputs_of).
PRODUCERS = frozenset({"batch", "fine_tuning.job"})


def outputs_of(answer: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """What the upstream made on its own for a batch or a fine-tuning job.

    Returns the batch's or job's id and the (id, kind) of its output and error files,
    result files and fine-tuned model: objects no create call of the caller returned,
    which still live on the job's account only.
    """
    if not isinstance(answer, dict) or answer.get("object") not in PRODUCERS:
        return None, []
    parent = answer.get("id")
    found = [
        (answer[name], "file")
        for name in ("output_file_id", "error_file_id")
        if isinstance(answer.get(name), str)
    ]
    results = answer.get("result_files")
    for file_id in results if isinstance(results, list) else ():
        if isinstance(file_id, str):
            found.append((file_id, "file"))
    model = answer.get("fine_tuned_model")
    if isinstance(model, str) and model:
        found.append((model, MODEL))
    return (parent if isinstance(parent, str) else None), found
