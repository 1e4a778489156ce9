"""chat(): the one way every app talks to a language model.

Give it messages, or a template name + variables (rendered from settings/); get back
text, a JSON value validated against a schema (one repair retry when the model's
reply does not parse or validate), or a stream of text deltas. Every call:

- is retried with exponential backoff (tenacity) on 429/5xx/timeouts/broken connections,
  waiting what a `Retry-After` header asks (capped); other 4xx fail at once;
- runs under two concurrency caps: one per process (a semaphore) and one shared by every
  worker on every host (`GlobalSlots`: N lease documents in MongoDB, `llm_slots`);
- is written to `generations` (agent.records), failures and cancelled streams included.

Failures reach the apps as one `ModelError` whose message names the provider, the HTTP
status (when there was one) and how many attempts were made.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import jsonschema
from pymongo import ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, PyMongoError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from agent.records import GenerationRecorder
from agent.types import ChatResult, LLMProvider, Message, ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")

SLOTS_COLLECTION = "llm_slots"
NO_VISION_NOTE = "image parts dropped: {provider} has no vision"


# --------------------------------------------------------------------------- call context


@dataclass
class CallContext:
    """Who a call is for; stored with its record."""

    app: str | None = None
    user: str | None = None
    session: str | None = None
    job: str | None = None
    step: str | None = None


def _context(value: CallContext | dict[str, Any] | None) -> CallContext:
    if value is None:
        return CallContext()
    if isinstance(value, CallContext):
        return value
    if isinstance(value, dict):
        return CallContext(**{k: value.get(k) for k in ("app", "user", "session", "job", "step")})
    raise TypeError(f"context must be a CallContext or a dict, not {type(value).__name__}")


# --------------------------------------------------------------------------- JSON


_FENCE_OPEN = "```"


def parse_json_text(text: str) -> Any:
    """Parse a model's JSON reply, tolerating code fences and prose around one object/array."""
    candidate = (text or "").strip()
    if candidate.startswith(_FENCE_OPEN):
        first_newline = candidate.find("\n")
        body = candidate[first_newline + 1 :] if first_newline >= 0 else candidate[3:]
        end = body.rfind(_FENCE_OPEN)
        candidate = (body[:end] if end >= 0 else body).strip()
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        starts = [i for i in (candidate.find("{"), candidate.find("[")) if i >= 0]
        if not starts:
            raise
        start = min(starts)
        end = max(candidate.rfind("}"), candidate.rfind("]"))
        if end <= start:
            raise
        return json.loads(candidate[start : end + 1])


def schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    """None when `value` validates, else a short description of (up to three of) the errors."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(
        validator.iter_errors(value), key=lambda e: (len(e.absolute_path), list(map(str, e.path)))
    )
    if not errors:
        return None
    parts = []
    for err in errors[:3]:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        parts.append(f"{where}: {err.message[:200]}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def _check_schema(schema: dict[str, Any]) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"invalid JSON schema for chat(): {exc.message}") from exc


# --------------------------------------------------------------------------- images


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise ValueError("images=: bytes are not PNG, JPEG, WebP or GIF")


def _image_url(image: str | bytes) -> str:
    """A data URL or http(s) URL for one image (bytes are encoded as a data URL)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return f"data:{_sniff(data)};base64,{base64.b64encode(data).decode('ascii')}"
    if isinstance(image, str) and (
        image.startswith("data:image/") or image.startswith(("http://", "https://"))
    ):
        return image
    raise ValueError("images= takes data URLs (data:image/...;base64,...), http(s) URLs or image bytes")


def _attach_images(messages: list[Message], images: list[str | bytes]) -> list[Message]:
    """Add image parts (OpenAI vision form) before the text of the last user message."""
    if not images:
        return messages
    urls = [_image_url(i) for i in images]
    out = [dict(m) for m in messages]
    for msg in reversed(out):
        if msg.get("role") == "user":
            content = msg.get("content")
            parts = list(content) if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            msg["content"] = [*({"type": "image_url", "image_url": {"url": url}} for url in urls), *parts]
            return out
    raise ValueError("images= needs a user message to attach the images to")


def _drop_images(messages: list[Message]) -> tuple[list[Message], int]:
    """Text-only copy of the messages (for providers without vision) and how many images were dropped."""
    dropped = 0
    out: list[Message] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                dropped += 1
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
            elif isinstance(part, str):
                texts.append(part)
        out.append({**msg, "content": "\n".join(t for t in texts if t)})
    return (out, dropped) if dropped else (messages, 0)


def _check_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat() needs messages (a non-empty list) or a template")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
    return messages


# --------------------------------------------------------------------------- concurrency


class SlotTimeout(ModelError):
    """No concurrency slot came free in time. Not retried: the caller already waited."""


class GlobalSlots:
    """A counting semaphore shared by every process on every host, kept in MongoDB.

    `size` documents `{_id: "slot-<i>", holder, lease_until}` in `llm_slots`. Taking a slot is one
    atomic find_one_and_update on a slot that is free or whose lease ran out (its holder died), polled
    with short jittered sleeps until `wait_s` passes. A background thread renews the leases this process
    holds (every lease_s / 3), so a long stream keeps its slot and a killed worker's slot frees itself
    within `lease_s`. Clocks: hosts sharing a database need synchronised clocks (NTP).
    """

    def __init__(
        self,
        db: Database,
        size: int,
        *,
        lease_s: float = 60.0,
        wait_s: float = 60.0,
        name: str = "llm",
        collection: str = SLOTS_COLLECTION,
        poll_min_s: float = 0.005,
        poll_max_s: float = 0.1,
    ) -> None:
        if size < 1:
            raise ValueError("GlobalSlots needs size >= 1")
        self.coll = db[collection]
        self.size = size
        self.ids = [f"slot-{i}" for i in range(size)]
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.name = name
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._owner = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # token -> slot id
        self._seq = 0
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked worker: the parent's leases and thread are not ours
            self._reset()

    def _ensure_slots(self) -> None:
        if self._ready:
            return
        ops = [
            UpdateOne({"_id": slot_id}, {"$setOnInsert": {"holder": None, "lease_until": None}}, upsert=True)
            for slot_id in self.ids
        ]
        try:
            self.coll.bulk_write(ops, ordered=False)  # one command for all slots, not one per slot
        except BulkWriteError as exc:  # another process created some at the same moment: they exist
            if any(err.get("code") != 11000 for err in exc.details.get("writeErrors", [])):
                raise
        self._ready = True

    def acquire(self) -> str:
        """Take a slot; returns the lease token for release(). Raises SlotTimeout after `wait_s`."""
        self._check_fork()
        start = time.monotonic()
        delay = self.poll_min_s
        with self._lock:
            self._seq += 1
            token = f"{self._owner}:{self._seq}"
        try:
            self._ensure_slots()
            while True:
                now = datetime.now(UTC)
                before = self.coll.find_one_and_update(
                    {"_id": {"$in": self.ids}, "$or": [{"holder": None}, {"lease_until": {"$lt": now}}]},
                    {
                        "$set": {
                            "holder": token,
                            "lease_until": now + timedelta(seconds=self.lease_s),
                            "acquired_at": now,
                        }
                    },
                    return_document=ReturnDocument.BEFORE,
                )
                if before is not None:
                    if before.get("holder"):
                        log.warning(
                            "global LLM slot %s: lease of %s had expired; taken over",
                            before["_id"],
                            before["holder"],
                        )
                    self._hold(token, before["_id"])
                    return token
                waited = time.monotonic() - start
                if waited >= self.wait_s:
                    raise SlotTimeout(
                        f"all {self.size} global {self.name} slots stayed busy for {waited:.1f} s "
                        f"(LLM_GLOBAL_CONCURRENCY={self.size}); try again later",
                        provider=self.name,
                        status=503,
                        retryable=True,
                    )
                time.sleep(min(delay * random.uniform(0.5, 1.5), max(0.0, self.wait_s - waited)))
                delay = min(delay * 1.5, self.poll_max_s)
        except PyMongoError as exc:
            raise ModelError(
                f"cannot take a global {self.name} slot: database error: {exc}",
                provider=self.name,
                status=503,
                retryable=True,
            ) from exc

    def _hold(self, token: str, slot_id: str) -> None:
        with self._lock:
            self._held[token] = slot_id
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._renew_loop, name="llm-slot-renew", daemon=True)
                self._thread.start()

    def release(self, token: str) -> None:
        with self._lock:
            slot_id = self._held.pop(token, None)
        if slot_id is None:
            return
        try:
            self.coll.update_one(
                {"_id": slot_id, "holder": token},
                {"$set": {"holder": None, "lease_until": None, "released_at": datetime.now(UTC)}},
            )
        except PyMongoError as exc:
            log.error(
                "could not release global LLM slot %s (it frees itself in %.0f s): %s",
                slot_id,
                self.lease_s,
                exc,
            )

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def renew(self) -> int:
        """Push out the leases this process holds; returns how many were renewed."""
        with self._lock:
            held = dict(self._held)
        if not held:
            return 0
        now = datetime.now(UTC)
        result = self.coll.update_many(
            {"_id": {"$in": list(held.values())}, "holder": {"$in": list(held)}},
            {"$set": {"lease_until": now + timedelta(seconds=self.lease_s)}},
        )
        if result.matched_count < len(held):
            log.warning(
                "%d global LLM slot lease(s) were lost before renewal (expired and taken)",
                len(held) - result.matched_count,
            )
        return result.matched_count

    def _renew_loop(self) -> None:
        every = max(0.05, self.lease_s / 3)
        while not self._stop.wait(every):
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
            try:
                self.renew()
            except PyMongoError as exc:
                log.error("could not renew global LLM slot leases: %s", exc)

    def busy(self) -> int:
        """Slots held right now by anyone (for health/metrics)."""
        now = datetime.now(UTC)
        return self.coll.count_documents(
            {"_id": {"$in": self.ids}, "holder": {"$ne": None}, "lease_until": {"$gte": now}}
        )

    def close(self) -> None:
        self._stop.set()


@dataclass
class _Tracker:
    """What happened during one call's attempts, for the result and the record."""

    attempts: int = 0
    queue_ms: float = 0.0
    retries: list[dict[str, Any]] = field(default_factory=list)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ModelError) and exc.retryable and not isinstance(exc, SlotTimeout)


def _error_dict(exc: ModelError) -> dict[str, Any]:
    return {**exc.to_dict(), "retryable": exc.retryable, "type": type(exc).__name__}


# --------------------------------------------------------------------------- streaming


@dataclass
class _StreamState:
    """What a stream produced. Kept apart from ChatStream so the running generator does not point back
    at it: dropping the last reference to a ChatStream then closes it at once (no reference cycle
    waiting for the garbage collector while a slot is held)."""

    pieces: list[str] = field(default_factory=list)
    result: ChatResult | None = None
    error: ModelError | None = None
    generation_id: str | None = None


class ChatStream:
    """Iterator of text deltas. `.text` is the text so far; `.result` is set once the stream has ended.

    The record is written when the stream ends, fails, or is closed early (`close()`, leaving a
    `with` block, or the last reference being dropped — a client that went away): status "cancelled".
    Retries happen only before the first delta: text already shown cannot be taken back.
    """

    def __init__(
        self,
        llm: LLM,
        messages: list[Message],
        params: dict[str, Any],
        record: dict[str, Any],
        notes: list[str],
    ) -> None:
        self._state = _StreamState()
        self._gen = _run_stream(llm, messages, params, record, notes, self._state)

    @property
    def text(self) -> str:
        """The text streamed so far (all of it once the stream has ended)."""
        return "".join(self._state.pieces)

    @property
    def result(self) -> ChatResult | None:
        return self._state.result

    @property
    def error(self) -> ModelError | None:
        return self._state.error

    @property
    def generation_id(self) -> str | None:
        return self._state.generation_id

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stop early (the HTTP response to the model is closed); the record says "cancelled"."""
        self._gen.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _run_stream(
    llm: LLM,
    messages: list[Message],
    params: dict[str, Any],
    record: dict[str, Any],
    notes: list[str],
    state: _StreamState,
) -> Iterator[str]:
    provider = llm.provider
    start = time.perf_counter()
    first: float | None = None
    pieces = state.pieces
    tracker = _Tracker()
    status = "failed"  # until it ends well (or is cancelled)
    inner: Any = None
    try:
        while True:
            tracker.attempts += 1
            try:
                with llm._slot(tracker):
                    inner = provider.stream(messages, params=params)
                    try:
                        for delta in inner:
                            if not delta:
                                continue
                            if first is None:
                                first = (time.perf_counter() - start) * 1000
                            pieces.append(delta)
                            yield delta
                    finally:
                        close = getattr(inner, "close", None)
                        if close is not None:
                            close()
                break
            except ModelError as exc:
                # retry only while nothing reached the client: a half-shown text can't be redone
                if pieces or not _retryable(exc) or tracker.attempts > llm.max_retries:
                    raise
                llm._note_retry(tracker, exc, llm.delay_for(exc, tracker.attempts))
            except Exception as exc:  # noqa: BLE001 - a provider bug still ends as a recorded ModelError
                log.exception("%s stream failed unexpectedly", provider.name)
                raise ModelError(
                    f"{provider.name} stream failed: {type(exc).__name__}: {exc}", provider=provider.name
                ) from exc
        status = "ok"
    except GeneratorExit:
        status = "cancelled"
        raise
    except ModelError as exc:
        if pieces:
            msg = f"{exc.message} (the stream broke after {len(pieces)} deltas; not retried)"
        else:
            msg = llm._final_message(exc, tracker.attempts)
        error = ModelError(
            msg,
            provider=exc.provider or provider.name,
            status=exc.status,
            retryable=exc.retryable,
            kind=exc.kind,
        )
        error.attempts = tracker.attempts  # type: ignore[attr-defined]
        state.error = error
        raise error from exc
    finally:
        _finish_stream(llm, messages, params, record, notes, state, start, first, tracker, status, inner)


def _finish_stream(
    llm: LLM,
    messages: list[Message],
    params: dict[str, Any],
    record: dict[str, Any],
    notes: list[str],
    state: _StreamState,
    start: float,
    first: float | None,
    tracker: _Tracker,
    status: str,
    inner: Any,
) -> None:
    text = "".join(state.pieces)
    latency = (time.perf_counter() - start) * 1000
    usage = dict(getattr(inner, "usage", None) or {})
    model = getattr(inner, "model", None) or llm.provider.model
    finish_reason = getattr(inner, "finish_reason", None)
    notes = list(notes)
    if finish_reason == "length":
        notes.append("output truncated: the max_tokens limit was reached")
    state.result = ChatResult(
        text=text,
        provider=llm.provider.name,
        model=model,
        usage=usage,
        latency_ms=latency,
        first_token_ms=first,
        attempts=tracker.attempts,
        notes=notes,
        finish_reason=finish_reason,
    )
    state.generation_id = state.result.generation_id = llm.recorder.record(
        kind="chat",
        provider=llm.provider.name,
        model=model,
        messages=messages,
        params=params,
        output=text,
        error=_error_dict(state.error) if state.error else None,
        status=status,
        attempts=tracker.attempts,
        latency_ms=latency,
        usage=usage,
        extra={
            "stream": True,
            "first_token_ms": first,
            "deltas": len(state.pieces),
            "notes": notes,
            "retries": tracker.retries,
            "queue_ms": round(tracker.queue_ms, 1),
            "finish_reason": finish_reason,
        },
        **record,
    )


# --------------------------------------------------------------------------- the front door


class LLM:
    """The chat front door: retries, JSON validation, streaming, concurrency caps, records."""

    def __init__(
        self,
        provider: LLMProvider,
        *,
        prompts: Any = None,
        recorder: GenerationRecorder | None = None,
        max_retries: int = 3,
        retry_base_s: float = 0.5,
        retry_max_s: float = 8.0,
        retry_after_cap_s: float = 30.0,
        max_concurrency: int = 8,
        moderator: Any = None,
        db: Database | None = None,
        global_concurrency: int = 32,
        slot_wait_s: float = 60.0,
        slot_lease_s: float = 60.0,
    ) -> None:
        """db + global_concurrency > 0: the cross-process cap in MongoDB (`llm_slots`); db=None: no global cap."""
        self.provider = provider
        self.prompts = prompts
        self.recorder = recorder or GenerationRecorder(db)
        self.max_retries = max(0, max_retries)
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self.max_concurrency = max(1, max_concurrency)
        self.slot_wait_s = slot_wait_s
        self._sem = threading.BoundedSemaphore(self.max_concurrency)
        self.global_slots: GlobalSlots | None = None
        if db is not None and global_concurrency and global_concurrency > 0:
            self.global_slots = GlobalSlots(
                db, global_concurrency, lease_s=slot_lease_s, wait_s=slot_wait_s, name=provider.name
            )
        self.moderator = moderator
        self._local_moderator: Any = None
        self.study: Any = None  # agent.studies.StudyAssigner while STUDY is set: variants + param overrides

    # ---- retries and slots

    def delay_for(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before the next attempt: the server's Retry-After (capped), else backoff + jitter."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(0.0, float(retry_after)), self.retry_after_cap_s)
        delay = min(self.retry_max_s, self.retry_base_s * (2 ** (attempt - 1)))
        return delay / 2 + random.uniform(0, delay / 2)

    def backoff(self, attempt: int) -> float:  # kept for callers of the first version
        return min(self.retry_max_s, self.retry_base_s * (2 ** (attempt - 1)))

    def _note_retry(self, tracker: _Tracker, exc: ModelError, wait_s: float, sleep: bool = True) -> None:
        tracker.retries.append(
            {
                "attempt": tracker.attempts,
                "error": exc.message,
                "status": exc.status,
                "wait_s": round(wait_s, 3),
            }
        )
        log.warning(
            "%s attempt %d failed (%s); retrying in %.2f s",
            self.provider.name,
            tracker.attempts,
            exc.message,
            wait_s,
        )
        if sleep:
            time.sleep(wait_s)

    @contextmanager
    def _slot(self, tracker: _Tracker | None = None) -> Iterator[None]:
        """Hold one per-process and one global slot for the duration of one attempt."""
        start = time.perf_counter()
        if not self._sem.acquire(timeout=self.slot_wait_s):
            raise SlotTimeout(
                f"all {self.max_concurrency} {self.provider.name} slots of this process stayed busy "
                f"for {self.slot_wait_s:g} s (LLM_MAX_CONCURRENCY); try again later",
                provider=self.provider.name,
                status=503,
                retryable=True,
            )
        token = None
        try:
            if self.global_slots is not None:
                token = self.global_slots.acquire()
            if tracker is not None:
                tracker.queue_ms += (time.perf_counter() - start) * 1000
            yield
        finally:
            if token is not None and self.global_slots is not None:
                self.global_slots.release(token)
            self._sem.release()

    def _with_retries(self, fn: Callable[[], T], tracker: _Tracker) -> T:
        """fn() with retries on retryable ModelErrors; counts attempts; raises the last error."""

        def attempt() -> T:
            tracker.attempts += 1
            try:
                return fn()
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - a provider bug still ends as a recorded ModelError
                log.exception("%s call failed unexpectedly", self.provider.name)
                raise ModelError(
                    f"{self.provider.name} call failed: {type(exc).__name__}: {exc}",
                    provider=self.provider.name,
                ) from exc

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.delay_for(exc, state.attempt_number) if exc else 0.0

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ModelError):
                self._note_retry(tracker, exc, state.upcoming_sleep, sleep=False)

        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(attempt)

    def _final_message(self, exc: ModelError, attempts: int) -> str:
        if attempts > 1:
            if exc.retryable:
                return f"{exc.message} (gave up after {attempts} attempts)"
            return f"{exc.message} ({attempts} attempts)"
        if isinstance(exc, SlotTimeout):
            return exc.message
        if not exc.retryable:
            return f"{exc.message} (1 attempt; not retried: a retry would not help)"
        return f"{exc.message} (1 attempt; retries are off)"

    def _final(self, exc: ModelError, attempts: int) -> ModelError:
        """The error the app sees: the last attempt's, with the attempt count in its message."""
        cls = SlotTimeout if isinstance(exc, SlotTimeout) else ModelError
        err = cls(
            self._final_message(exc, attempts),
            provider=exc.provider or self.provider.name,
            status=exc.status,
            retryable=exc.retryable,
            kind=exc.kind,
        )
        err.attempts = attempts  # type: ignore[attr-defined]
        return err

    # ---- chat

    def chat(
        self,
        messages: list[Message] | None = None,
        *,
        template: str | None = None,
        variables: dict[str, Any] | None = None,
        sample: str | None = None,
        schema: dict[str, Any] | None = None,
        json_output: bool | None = None,
        params: dict[str, Any] | None = None,
        images: list[str | bytes] | None = None,
        context: CallContext | dict[str, Any] | None = None,
        stream: bool = False,
    ) -> ChatResult | ChatStream:
        """Run one chat call. Returns ChatResult (text, .data for JSON) or a ChatStream (iterate deltas).

        template + variables (+ sample): render settings/<app>/<name>.j2; its params apply, `params`
        override them. schema (or the template's `response_format: json` + schema, or json_output=True):
        the reply is parsed and validated, `.data` holds it. json_output=False: plain text even when the
        template asks for JSON. images: data URLs / http(s) URLs / image bytes added to the last user
        message (dropped with a note when the provider has no vision).
        """
        ctx = _context(context)
        merged: dict[str, Any] = {}
        template_name = template_hash = variant = None
        assignment = self.study.for_call(ctx.app, ctx.user, ctx.session) if self.study is not None else None
        if template is not None:
            if self.prompts is None:
                raise ModelError("no prompt library configured", provider=self.provider.name)
            chosen = assignment.variant(template) if assignment is not None else None
            if chosen is not None:
                rendered = self.prompts.render(template, variables or {}, sample=sample, variant=chosen)
            else:
                rendered = self.prompts.render(template, variables or {}, sample=sample)
            messages = rendered.messages
            merged.update(rendered.params or {})
            template_name, template_hash, variant = rendered.name, rendered.hash, chosen
            if schema is None and rendered.response_format == "json":
                schema = rendered.schema or {"type": "object"}
        messages = _check_messages(messages)
        merged.update({k: v for k, v in (params or {}).items() if v is not None})
        if assignment is not None:
            merged.update(assignment.params)  # the condition's params win: they are the manipulation
        if json_output is False:
            schema = None
        elif json_output and schema is None:
            schema = {"type": "object"}
        if schema is not None:
            _check_schema(schema)
        messages = _attach_images(messages, list(images or []))
        notes: list[str] = []
        if not getattr(self.provider, "supports_vision", False):
            messages, dropped = _drop_images(messages)
            if dropped:
                notes.append(NO_VISION_NOTE.format(provider=self.provider.name) + f" ({dropped})")
        record = {
            "app": ctx.app,
            "user": ctx.user,
            "session": ctx.session,
            "job": ctx.job,
            "step": ctx.step,
            "template": template_name,
            "template_hash": template_hash,
            "variant": variant,
        }
        if stream:
            if schema is not None:
                raise ValueError("stream=True returns text deltas; JSON output (schema) needs stream=False")
            return ChatStream(self, messages, merged, record, notes)
        return self._complete(messages, merged, schema, record, notes)

    def _complete(
        self,
        messages: list[Message],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        record: dict[str, Any],
        notes: list[str],
    ) -> ChatResult:
        start = time.perf_counter()
        tracker = _Tracker()
        repair: dict[str, Any] = {}
        outputs: list[str] = []

        def call(msgs: list[Message]) -> ChatResult:
            def once() -> ChatResult:
                with self._slot(tracker):
                    return self.provider.complete(msgs, params=params, json_schema=schema)

            result = self._with_retries(once, tracker)
            outputs.append(result.text)
            return result

        extra: dict[str, Any] = {"stream": False, "json": schema is not None}
        if schema is not None:
            extra["schema"] = schema
        try:
            result = call(messages)
            if schema is not None:
                result.data = self._validated(result, messages, schema, call, repair)
        except ModelError as exc:
            final = self._final(exc, tracker.attempts)
            latency = (time.perf_counter() - start) * 1000
            self.recorder.record(
                kind="chat",
                provider=self.provider.name,
                model=self.provider.model,
                messages=messages,
                params=params,
                output=outputs[-1] if outputs else None,
                error=_error_dict(final),
                attempts=tracker.attempts,
                latency_ms=latency,
                extra={
                    **extra,
                    "notes": notes,
                    "retries": tracker.retries,
                    "repair": repair or None,
                    "queue_ms": round(tracker.queue_ms, 1),
                },
                **record,
            )
            raise final from exc
        result.attempts = tracker.attempts
        result.notes = [*notes, *result.notes]
        result.latency_ms = (time.perf_counter() - start) * 1000
        result.generation_id = self.recorder.record(
            kind="chat",
            provider=result.provider,
            model=result.model,
            messages=messages,
            params=params,
            output=result.text,
            attempts=result.attempts,
            latency_ms=result.latency_ms,
            usage=result.usage,
            extra={
                **extra,
                "data": result.data,
                "notes": result.notes,
                "retries": tracker.retries,
                "repair": repair or None,
                "queue_ms": round(tracker.queue_ms, 1),
            },
            **record,
        )
        return result

    def _validated(
        self,
        result: ChatResult,
        messages: list[Message],
        schema: dict[str, Any],
        call: Callable[[list[Message]], ChatResult],
        repair: dict[str, Any],
    ) -> Any:
        """Parse + validate; on failure ask once for a corrected reply (recorded in `repair`)."""
        candidate, problem = self._checked(result, schema)
        if problem is None:
            return candidate
        repair.update({"problem": problem, "first_output": result.text})
        log.info("%s: JSON reply invalid (%s); asking once for a repair", self.provider.name, problem)
        instructions = (
            f"That reply was not valid: {problem}. Reply again with only JSON that matches this "
            f"JSON Schema, no prose and no code fences:\n{json.dumps(schema, ensure_ascii=False)}"
        )
        repair_messages = [
            *messages,
            {"role": "assistant", "content": result.text},
            {"role": "user", "content": instructions},
        ]
        second = call(repair_messages)
        result.notes.append(f"repaired after: {problem}")
        result.text = second.text
        result.model = second.model or result.model
        for key, value in second.usage.items():
            result.usage[key] = result.usage.get(key, 0) + value
        candidate, problem = self._checked(second, schema)
        repair["second_problem"] = problem
        if problem is not None:
            raise ModelError(
                f"{self.provider.name}'s reply did not match the expected JSON, even after one "
                f"repair request: {problem}",
                provider=self.provider.name,
                retryable=False,
            )
        return candidate

    @staticmethod
    def _checked(result: ChatResult, schema: dict[str, Any]) -> tuple[Any, str | None]:
        if result.data is not None:
            return result.data, schema_problem(result.data, schema)
        try:
            value = parse_json_text(result.text)
        except (json.JSONDecodeError, ValueError) as exc:
            return None, f"not JSON ({exc})"
        return value, schema_problem(value, schema)

    # ---- moderation

    def moderate(self, text: str, context: CallContext | dict[str, Any] | None = None) -> dict[str, Any]:
        """{"flagged", "categories", "provider", ...} from the configured moderator, retried and recorded."""
        ctx = _context(context)
        moderator = self.moderator
        if moderator is None:
            if self._local_moderator is None:
                from agent.moderation import LocalKeywordModerator

                self._local_moderator = LocalKeywordModerator()
            moderator = self._local_moderator
        text = text if isinstance(text, str) else str(text)
        name = getattr(moderator, "name", "moderation")
        tracker = _Tracker()
        start = time.perf_counter()
        record = {"app": ctx.app, "user": ctx.user, "session": ctx.session, "job": ctx.job, "step": ctx.step}
        try:
            result = dict(self._with_retries(lambda: moderator.moderate(text), tracker))
        except ModelError as exc:
            final = self._final(exc, tracker.attempts)
            self.recorder.record(
                kind="moderation",
                provider=name,
                prompt=text,
                error=_error_dict(final),
                attempts=tracker.attempts,
                latency_ms=(time.perf_counter() - start) * 1000,
                extra={"retries": tracker.retries},
                **record,
            )
            raise final from exc
        latency = (time.perf_counter() - start) * 1000
        result["generation_id"] = self.recorder.record(
            kind="moderation",
            provider=result.get("provider", name),
            model=result.get("model"),
            prompt=text,
            output={k: v for k, v in result.items() if k != "generation_id"},
            attempts=tracker.attempts,
            latency_ms=latency,
            extra={"flagged": bool(result.get("flagged")), "retries": tracker.retries},
            **record,
        )
        return result

    # ---- status

    def health(self) -> dict[str, Any]:
        try:
            out = dict(self.provider.health())
        except Exception as exc:  # noqa: BLE001 - health reports any failure as text
            out = {"ok": False, "provider": self.provider.name, "error": str(exc)}
        out["concurrency"] = {
            "process": self.max_concurrency,
            "global": self.global_slots.size if self.global_slots else None,
        }
        return out

    def close(self) -> None:
        if self.global_slots is not None:
            self.global_slots.close()


def get_llm() -> LLM:
    """The app's LLM inside an app context (CLI), else one built from settings (no records)."""
    from flask import current_app, has_app_context

    if has_app_context() and "services" in current_app.extensions:
        return current_app.extensions["services"].llm
    from agent.factory import build_llm
    from agent.prompts import default_library
    from config import load_settings

    return build_llm(load_settings(), None, default_library())


__all__ = [
    "LLM",
    "CallContext",
    "ChatStream",
    "GlobalSlots",
    "SlotTimeout",
    "get_llm",
    "parse_json_text",
    "schema_problem",
]
