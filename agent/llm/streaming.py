"""ChatStream: one streamed chat call, its retries (only before the first delta) and its record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.llm.retries import Tracker, as_model_error, error_dict
from agent.records import GenerationRecord
from agent.types import ChatResult, Message, ModelError

if TYPE_CHECKING:  # annotations only: the client builds ChatStreams, a stream never builds a client
    from agent.llm.client import LLM

TRUNCATED_NOTE = "output truncated: the max_tokens limit was reached"


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
        record: GenerationRecord,
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
    record: GenerationRecord,
    notes: list[str],
    state: _StreamState,
) -> Iterator[str]:
    provider = llm.provider
    start = time.perf_counter()
    first: float | None = None
    pieces = state.pieces
    tracker = Tracker()
    status = "failed"  # until it ends well (or is cancelled)
    inner: Any = None
    try:
        # retry only while nothing reached the client: a half-shown text can't be redone
        for attempt in llm.retry.retrying(tracker, still_allowed=lambda: not pieces):
            with attempt:
                tracker.attempts += 1
                with as_model_error(provider.name, "stream"), llm.slots.hold(tracker):
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
        status = "ok"
    except GeneratorExit:
        status = "cancelled"
        raise
    except ModelError as exc:
        if pieces:
            msg = f"{exc.message} (the stream broke after {len(pieces)} deltas; not retried)"
        else:
            msg = llm.retry.final_message(exc, tracker.attempts)
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
        _finish(llm, record, notes, state, start, first, tracker, status, inner)


def _finish(
    llm: LLM,
    record: GenerationRecord,
    notes: list[str],
    state: _StreamState,
    start: float,
    first: float | None,
    tracker: Tracker,
    status: str,
    inner: Any,
) -> None:
    """The stream's ChatResult and its record, however it ended."""
    text = "".join(state.pieces)
    latency = (time.perf_counter() - start) * 1000
    usage = dict(getattr(inner, "usage", None) or {})
    model = getattr(inner, "model", None) or llm.provider.model
    finish_reason = getattr(inner, "finish_reason", None)
    notes = list(notes)
    if finish_reason == "length":
        notes.append(TRUNCATED_NOTE)
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
    record.model = model
    record.output = text
    record.error = error_dict(state.error) if state.error else None
    record.status = status
    record.attempts = tracker.attempts
    record.latency_ms = latency
    record.usage = usage
    record.extra = {
        "stream": True,
        "first_token_ms": first,
        "deltas": len(state.pieces),
        "notes": notes,
        "retries": tracker.retries,
        "queue_ms": round(tracker.queue_ms, 1),
        "finish_reason": finish_reason,
    }
    state.generation_id = state.result.generation_id = llm.recorder.save(record)
