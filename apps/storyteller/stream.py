"""A streamed generation of a session: plan it (whole story or part rewrite), then run it.

A generation is a stream of events (dicts) that the WebSocket and SSE routes forward:
`{"type": "delta", "text"}` ..., then `{"type": "done", "story", "version", ...}`, or
`{"type": "cancelled", "text"}`; failures raise ModelError / ApiError. A part rewrite asks
the model only for the replacement of the selection (the text before and after it is
context), and streams `before + new part + after`, so the ends are byte-identical and a
page that replaces its textarea with the stream still shows the whole story.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.llm import CallContext
from agent.types import ModelError

from .reply_gate import REWRITE_ATTEMPTS, story_gate, story_params, token_cap
from .service import Caller, version_for
from .store import StoryStore
from .story_prompt import APP, REWRITE_TEMPLATE, session_story, system_prompt

if TYPE_CHECKING:
    from apps.core.context import Services

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5
_QUOTES = "\"'“”‘’«»"


@dataclass
class StreamPlan:
    kind: str  # generated | regenerated | rewrite
    template: str
    variables: dict[str, Any]
    params: dict[str, Any]
    story: dict[str, Any]  # the story prompt snapshot (template, hash, messages, prompt)
    parent: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    word_limit: int | None = None  # the words asked for: the reply stops at the sentence end near it


def _token_cap(svc: Services, words: int, minimum: int) -> int:
    local_ctx = svc.settings.LOCAL_N_CTX if svc.llm.provider.name == "local" else None
    return token_cap(words, minimum, local_ctx)


def _model_params(svc: Services) -> dict[str, Any]:
    model = svc.settings.STORYTELLER_MODEL
    return {"model": model} if model and svc.llm.provider.name != "local" else {}


def plan_stream(
    svc: Services, store: StoryStore, session: dict[str, Any], action: str = "next"
) -> StreamPlan:
    pending = session.get("pending") if action == "next" else None
    current = version_for(store, session, None) if session.get("current_version") else None
    if pending and pending.get("kind") == "rewrite":
        parent = store.version(pending["version"]) if pending.get("version") else None
        story = (
            {
                "prompt": parent.get("prompt"),
                "messages": parent.get("story_messages"),
                "template": parent.get("template"),
                "template_hash": parent.get("template_hash"),
                "settings": parent.get("settings"),
            }
            if parent
            else session_story(svc, session)
        )
        params = {"max_tokens": _token_cap(svc, pending["words"] + 8, 24), **_model_params(svc)}
        return StreamPlan(
            kind="rewrite",
            template=REWRITE_TEMPLATE,
            variables=pending["variables"],
            params=params,
            story=story,
            parent=parent,
            pending=pending,
            word_limit=pending["words"],
        )
    story = session_story(svc, session)
    local_ctx = svc.settings.LOCAL_N_CTX if svc.llm.provider.name == "local" else None
    params = {**story_params(story["max_words"], local_ctx), **_model_params(svc)}
    kind = "generated" if not session.get("generated") else "regenerated"
    return StreamPlan(
        kind=kind,
        template=story["template"],
        variables=story["variables"],
        params=params,
        story=story,
        parent=current,
        word_limit=story["max_words"],
    )


class _Trim:
    """Streams the model's replacement without its surrounding whitespace/quotes (held back at the end)."""

    def __init__(self, keep_quotes_start: bool, keep_quotes_end: bool) -> None:
        self.started = False
        self.held = ""
        self.strip_start = " \t\r\n" + ("" if keep_quotes_start else _QUOTES)
        self.strip_end = " \t\r\n" + ("" if keep_quotes_end else _QUOTES)
        self.text = ""

    def feed(self, delta: str) -> str:
        if not self.started:
            delta = delta.lstrip(self.strip_start)
            if not delta:
                return ""
            self.started = True
        delta = self.held + delta
        core = delta.rstrip(self.strip_end)
        self.held = delta[len(core) :]
        self.text += core
        return core


def _leading_ws(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def _trailing_ws(text: str) -> str:
    return text[len(text.rstrip()) :]


def run_stream(
    svc: Services,
    store: StoryStore,
    session: dict[str, Any],
    plan: StreamPlan,
    caller: Caller,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run one generation; yields delta events then `done` (or `cancelled`); raises on failure."""
    should_stop = should_stop or (lambda: False)
    cancel_seq = store.cancel_seq(session["_id"])
    last_poll = time.monotonic()

    def stopped() -> bool:
        nonlocal last_poll
        if should_stop():
            return True
        if time.monotonic() - last_poll >= CANCEL_POLL_S:
            last_poll = time.monotonic()
            return store.cancel_seq(session["_id"]) != cancel_seq
        return False

    ctx = CallContext(
        app=APP, user=caller.user or session.get("user"), session=session["_id"], step=plan.kind
    )
    rendered = svc.prompts.render(plan.template, plan.variables)
    prefix = suffix = ""
    trim: _Trim | None = None
    if plan.kind == "rewrite":
        pending = plan.pending or {}
        selected = pending["selected"]
        prefix = pending["before"] + _leading_ws(selected)
        suffix = _trailing_ws(selected) + pending["after"]
        body = selected.strip()
    sent: list[str] = []
    if prefix:
        sent.append(prefix)
        yield {"type": "delta", "text": prefix}
    cancelled = False
    generated = ""
    stream: Any = None
    for attempt in range(1, REWRITE_ATTEMPTS + 1):
        gate = story_gate(plan.kind, rendered.messages, plan.variables, plan.word_limit)
        if plan.kind == "rewrite":
            trim = _Trim(body[:1] in _QUOTES, body[-1:] in _QUOTES)
        params = dict(plan.params)
        if attempt > 1:
            params["seed"] = attempt  # a different sample than the echoing one
        stream = svc.llm.chat(
            template=plan.template, variables=plan.variables, params=params, context=ctx, stream=True
        )
        pieces: list[str] = []
        iterator = iter(stream)
        try:
            for delta in iterator:
                piece = gate.feed(delta)
                if trim is not None:
                    piece = trim.feed(piece)
                if piece:
                    pieces.append(piece)
                    yield {"type": "delta", "text": piece}
                if gate.full or stopped():
                    cancelled = not gate.full
                    break
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # stops the model's stream (closes the HTTP response / frees the local model)
        if cancelled:
            sent.extend(pieces)
            yield {"type": "cancelled", "text": "".join(sent)}
            return
        result = stream.result
        piece = gate.finish(truncated=bool(result and result.finish_reason == "length") or gate.full)
        if trim is not None:
            piece = trim.feed(piece)
        if piece:
            pieces.append(piece)
            yield {"type": "delta", "text": piece}
        sent.extend(pieces)
        generated = trim.text if trim is not None else "".join(pieces)
        if gate.dropped:
            log.info("storyteller %s: dropped from the reply: %r", plan.kind, gate.dropped)
        if generated.strip() or plan.kind != "rewrite":
            break
    if not generated.strip():
        raise ModelError(
            "the model returned no text; nothing was changed", provider=svc.llm.provider.name, retryable=True
        )
    if suffix:
        sent.append(suffix)
        yield {"type": "delta", "text": suffix}
    text = "".join(sent)
    result = stream.result
    model = plan.params.get("model") or (result.model if result else svc.llm.provider.model)
    doc: dict[str, Any] = {
        "kind": plan.kind,
        "text": text,
        "parent": plan.parent["_id"] if plan.parent else None,
        "settings": plan.story.get("settings", session.get("settings"))
        if plan.kind == "rewrite"
        else session.get("settings"),
        "story_messages": plan.story["messages"],
        "prompt": plan.story["prompt"],
        "system": system_prompt(plan.story["messages"] or []),
        "template": plan.story.get("template"),
        "template_hash": plan.story.get("template_hash"),
        "messages": rendered.messages,
        "call_template": plan.template,
        "call_template_hash": rendered.hash,
        "params": plan.params,
        "model": model,
        "provider": svc.llm.provider.name,
        "generation_id": getattr(stream, "generation_id", None) or (result.generation_id if result else None),
        "latency_ms": result.latency_ms if result else None,
        "first_token_ms": result.first_token_ms if result else None,
    }
    if plan.kind == "rewrite":
        pending = plan.pending or {}
        before, after = pending["before"], pending["after"]
        doc["rewrite"] = {
            "start": len(before),
            "end": len(text) - len(after),
            "selected": pending["selected"],
            "replacement": text[len(before) : len(text) - len(after)],
            "prompt": pending.get("prompt"),
            "before_chars": len(before),
            "after_chars": len(after),
        }
    version = store.add_version(session, doc)
    # a finished rewrite or whole story clears the pending rewrite: "Regenerate" means the story prompt again
    store.update_session(
        session["_id"], {"pending": None}, inc=None if plan.kind == "rewrite" else {"generated": 1}
    )
    yield {
        "type": "done",
        "story": text,
        "version": version["_id"],
        "n": version["n"],
        "kind": plan.kind,
        "model": model,
    }
