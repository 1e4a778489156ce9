"""The storyteller's logic, free of Flask: sessions, prompts, streamed generation, part rewrites,
edits, feedback and the fine-tuning dataset.

A generation is a stream of events (dicts) that the WebSocket and SSE routes forward:
`{"type": "delta", "text"}` ..., then `{"type": "done", "story", "version", ...}`, or
`{"type": "cancelled", "text"}`; failures raise ModelError / ApiError. A part rewrite asks
the model only for the replacement of the selection (the text before and after it is
context), and streams `before + new part + after`, so the ends are byte-identical and a
page that replaces its textarea with the stream still shows the whole story.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.llm import CallContext
from agent.textcheck import SentenceGate, instruction_sentences, max_tokens_for_words
from agent.types import ModelError
from apps.core.errors import ApiError
from apps.core.studies import study_render

from .schemas import StorySettings
from .store import StoryStore

if TYPE_CHECKING:
    from apps.core.context import Services

log = logging.getLogger(__name__)

APP = "storyteller"
STORY_TEMPLATE = "storyteller/story"
DEFAULT_TEMPLATE = "storyteller/default"
REWRITE_TEMPLATE = "storyteller/rewrite"
DEFAULT_WORDS = 100  # the original's default prompt: "Write a story of 100 words."
CONTEXT_CHARS = 1500  # text before/after a selection given to the model (the story keeps all of it)
CANCEL_POLL_S = 0.5
REWRITE_ATTEMPTS = 2  # a rewrite that was all instruction echo is asked once more, then fails
_NEWLINES = str.maketrans("", "", "\r\n")
_QUOTES = "\"'“”‘’«»"


@dataclass
class Caller:
    """Who is calling: the authenticated user (or None) and the client address (session fallback)."""

    user: str | None = None
    client: str | None = None
    admin: bool = False


def story_template(svc: Services) -> str:
    """`STORYTELLER_TEMPLATE` (e.g. storyteller/story_original for the byte-exact original prompt)."""
    return getattr(svc.settings, "STORYTELLER_TEMPLATE", None) or STORY_TEMPLATE


def _words(text: str) -> int:
    return len(text.split())


def strip_newlines(text: str) -> str:
    return text.translate(_NEWLINES)


# --------------------------------------------------------------------------- sessions


SESSION_NOT_FOUND = "unknown session"  # missing and not yours alike


def resolve_session(
    store: StoryStore,
    caller: Caller,
    *,
    explicit: str | None,
    cookie: str | None,
    fallback: bool = True,
    create: bool = True,
    create_named: bool = False,
) -> dict[str, Any] | None:
    """The session of a call: its explicit id, else the cookie's, else this client's latest, else new.

    The original page opens its socket on `localhost` and posts to `127.0.0.1`, so the socket
    carries no cookie; the client's latest session keeps that page working (with auth on: the
    user's latest session).

    An explicit id that does not exist becomes a new session only where a session is created
    (`create_named`: the settings POSTs); anywhere else it is the same 404 as another user's session,
    so naming ids cannot tell which exist. A new session is written only by its first write.
    """
    for session_id in (explicit, cookie):
        if not session_id:
            continue
        doc = store.session(session_id)
        if doc is not None:
            _check_user(doc, caller)
            return doc
        if session_id == explicit:
            if not (create and create_named):
                raise ApiError(404, SESSION_NOT_FOUND)
            return store.create_session(session_id, user=caller.user, client=caller.client)
    if fallback:
        doc = store.latest_session(client=caller.client, user=caller.user)
        if doc is not None:
            return doc
    return store.create_session(None, user=caller.user, client=caller.client) if create else None


def _check_user(doc: dict[str, Any], caller: Caller) -> None:
    if caller.user is not None and doc.get("user") != caller.user and not caller.admin:
        raise ApiError(404, SESSION_NOT_FOUND)


def set_story(
    svc: Services, store: StoryStore, session: dict[str, Any], settings: StorySettings, caller: Caller
) -> dict[str, Any]:
    """Submit the settings form: render the story prompt and keep it for this session only."""
    limit = svc.settings.STORYTELLER_MAX_WORDS
    if settings.maxnowords > limit:
        raise ApiError(
            422,
            f"invalid request: maxnowords: must be at most {limit} (STORYTELLER_MAX_WORDS)",
            detail=[
                {
                    "loc": ["body", "maxnowords"],
                    "msg": f"Input should be less than or equal to {limit}",
                    "type": "less_than_equal",
                    "input": settings.maxnowords,
                }
            ],
        )
    template = story_template(svc)
    variables = settings.prompt_variables()
    rendered = study_render(
        svc, template, variables, app=APP, user=caller.user or session.get("user"), session=session["_id"]
    )
    story = _story_snapshot(template, variables, rendered)
    store.update_session(
        session["_id"],
        {"settings": settings.stored(), "story": story, "pending": None, "generated": 0},
        client=caller.client,
    )
    return story


def _story_snapshot(template: str, variables: dict[str, Any], rendered: Any) -> dict[str, Any]:
    return {
        "template": template,
        "template_hash": rendered.hash,
        "variables": variables,
        "messages": rendered.messages,
        "prompt": user_prompt(rendered.messages),
        "max_words": int(variables["max_words"]),
    }


def user_prompt(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return str(msg.get("content") or "")
    return ""


def system_prompt(messages: list[dict[str, Any]]) -> str | None:
    for msg in messages:
        if msg.get("role") == "system":
            return str(msg.get("content") or "")
    return None


def session_story(svc: Services, session: dict[str, Any]) -> dict[str, Any]:
    """The session's story prompt, re-rendered now (so template edits apply and the hash is current)."""
    story = session.get("story")
    if story is None:
        variables = {"max_words": DEFAULT_WORDS}
        return _story_snapshot(DEFAULT_TEMPLATE, variables, svc.prompts.render(DEFAULT_TEMPLATE, variables))
    rendered = study_render(
        svc, story["template"], story["variables"], app=APP, user=session.get("user"), session=session["_id"]
    )
    return _story_snapshot(story["template"], story["variables"], rendered)


def public_session(session: dict[str, Any]) -> dict[str, Any]:
    story = session.get("story") or {}
    pending = session.get("pending")
    return {
        "session": session["_id"],
        "settings": session.get("settings"),
        "prompt": story.get("prompt"),
        "template": story.get("template"),
        "template_hash": story.get("template_hash"),
        "current_version": session.get("current_version"),
        "versions": session.get("version_seq", 0),
        "pending": None
        if not pending
        else {
            "kind": pending["kind"],
            "prompt": pending.get("prompt"),
            "version": pending.get("version"),
            "selected": pending.get("selected"),
        },
        "updated_at": session.get("updated_at"),
    }


def public_version(version: dict[str, Any], *, text: bool = True) -> dict[str, Any]:
    out = {
        "id": version["_id"],
        "n": version["n"],
        "kind": version["kind"],
        "parent": version.get("parent"),
        "created_at": version.get("created_at"),
        "words": _words(version.get("text", "")),
        "model": version.get("model"),
        "provider": version.get("provider"),
        "template": version.get("template"),
        "template_hash": version.get("template_hash"),
        "prompt": version.get("prompt"),
        "settings": version.get("settings"),
        "feedback": bool((version.get("feedback") or {}).get("good")),
        "rewrite": version.get("rewrite"),
    }
    if text:
        out["text"] = version.get("text", "")
    return out


# --------------------------------------------------------------------------- edits and rewrites


def _version_for(store: StoryStore, session: dict[str, Any], version_id: str | None) -> dict[str, Any] | None:
    version_id = version_id or session.get("current_version")
    if not version_id:
        return None
    version = store.version(version_id)
    if version is None or version["session"] != session["_id"]:
        raise ApiError(404, f"unknown version {version_id!r} in this session")
    return version


def save_edit(
    svc: Services, store: StoryStore, session: dict[str, Any], text: str, parent_id: str | None
) -> dict[str, Any]:
    """A manual edit becomes a new version (its prompt is the one that produced the parent)."""
    parent = _version_for(store, session, parent_id)
    if parent is not None and parent.get("text") == text:
        return parent
    base = _base_fields(svc, session, parent)
    return store.add_version(
        session,
        {
            **base,
            "kind": "edited",
            "text": text,
            "parent": parent["_id"] if parent else None,
            "messages": None,
        },
    )


def _base_fields(svc: Services, session: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any]:
    """What a version derived from `parent` inherits: the story prompt that produced the story."""
    if parent is not None:
        keys = (
            "settings",
            "story_messages",
            "prompt",
            "system",
            "template",
            "template_hash",
            "model",
            "provider",
        )
        return {k: parent.get(k) for k in keys}
    story = session_story(svc, session)
    return {
        "settings": session.get("settings"),
        "story_messages": story["messages"],
        "prompt": story["prompt"],
        "system": system_prompt(story["messages"]),
        "template": story["template"],
        "template_hash": story["template_hash"],
        "model": None,
        "provider": None,
    }


def _map_stripped(text: str, before: str, selected: str) -> tuple[int, int] | None:
    """Offsets in `text` of a selection made on `text` with its newlines removed (the original page)."""
    start_count, end_count = len(before), len(before) + len(selected)
    count = 0
    start = end = None
    for i, ch in enumerate(text + "\0"):
        if count == start_count:
            start = i  # keep advancing: newlines at the boundary stay in `before`
        if count == end_count and end is None:
            end = i
        if ch in "\r\n":
            continue
        count += 1
    if start is None or end is None:
        return None
    return (start, max(start, end))


def prepare_rewrite(
    svc: Services,
    store: StoryStore,
    session: dict[str, Any],
    *,
    before: str | None,
    selected: str | None,
    after: str | None,
    start: int | None = None,
    end: int | None = None,
    version_id: str | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Set the session's pending rewrite of one part; returns it (with the rendered prompt).

    `strict` (the JSON API): the three texts must rebuild the version exactly, else 409.
    Not strict (the original page, whose textarea may hold unsaved edits and whose parts have
    their newlines removed): a matching version keeps its newlines; anything else is first
    stored as an `edited` version so the rewrite has an exact parent.
    """
    version = _version_for(store, session, version_id)
    if before is None or selected is None or after is None:
        if version is None:
            raise ApiError(409, "there is no story to rewrite yet: write one first")
        text = version["text"]
        if start is None or end is None or end > len(text):
            raise ApiError(422, f"start/end must lie within the story (0..{len(text)})")
        before, selected, after = text[:start], text[start:end], text[end:]
    if not selected.strip():  # checked before the edit below is stored: a refused request writes nothing
        raise ApiError(422, "select the part of the story to rewrite (the selection is empty)")
    if version is not None and before + selected + after != version["text"]:
        text = version["text"]
        flat = strip_newlines(selected)
        mapped = _map_stripped(text, before, flat) if strip_newlines(text) == before + flat + after else None
        if mapped is not None:
            before, selected, after = text[: mapped[0]], text[mapped[0] : mapped[1]], text[mapped[1] :]
        elif strict:
            raise ApiError(
                409,
                "the selection does not match the story version; save the edit first "
                "(POST api/edit) and rewrite that version",
            )
        else:
            version = save_edit(svc, store, session, before + selected + after, version["_id"])
    elif version is None:
        version = save_edit(svc, store, session, before + selected + after, None)
    story = (
        session_story(svc, session)
        if version is None or not version.get("story_messages")
        else {"prompt": version.get("prompt") or "", "messages": version["story_messages"]}
    )
    variables = rewrite_variables(story["prompt"], before, selected, after)
    words = variables["words"]
    rendered = svc.prompts.render(REWRITE_TEMPLATE, variables)
    pending = {
        "kind": "rewrite",
        "version": version["_id"] if version else None,
        "before": before,
        "selected": selected,
        "after": after,
        "words": words,
        "variables": variables,
        "prompt": user_prompt(rendered.messages),
    }
    store.update_session(session["_id"], {"pending": pending})
    session["pending"] = pending
    return pending


def rewrite_variables(story_prompt: str, before: str, selected: str, after: str) -> dict[str, Any]:
    """The rewrite template's variables: the selection's surroundings (bounded) and its word count."""
    return {
        "story_prompt": story_prompt,
        "before": _tail(before),
        "selected": _head(selected, 4 * CONTEXT_CHARS),
        "after": _head(after),
        "words": max(1, _words(selected)),
    }


def _tail(text: str, limit: int = CONTEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = cut.find(" ")
    return "…" + (cut[space + 1 :] if 0 <= space < 80 else cut)


def _head(text: str, limit: int = CONTEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit - 80 else cut) + "…"


# --------------------------------------------------------------------------- streaming

_CONTEXT_KEYS = ("before", "selected", "after")


def prompt_instructions(kind: str, messages: list[dict[str, Any]], variables: dict[str, Any]) -> list[str]:
    """The instruction sentences of a rendered story/rewrite prompt (what must never reach the story).

    For a rewrite the story's own text (before, selection, after) is cut out first: it is context,
    not instruction, and the selection may legitimately survive in the new passage.
    """
    texts = [str(m.get("content") or "") for m in messages if isinstance(m.get("content"), str)]
    if kind == "rewrite":
        for key in _CONTEXT_KEYS:
            value = str(variables.get(key) or "").strip()
            if value:
                texts = [t.replace(value, "\n") for t in texts]
    return instruction_sentences(texts)


def story_gate(
    kind: str, messages: list[dict[str, Any]], variables: dict[str, Any], word_limit: int | None
) -> SentenceGate:
    """The filter every story and rewrite reply streams through: no echoed instruction, no repeated
    context sentence (a rewrite that pastes the text after it), complete sentences near the word limit."""
    drop = prompt_instructions(kind, messages, variables)
    if kind == "rewrite":
        drop += instruction_sentences([str(variables.get("before") or ""), str(variables.get("after") or "")])
    return SentenceGate(drop, word_limit=word_limit)


@dataclass
class StreamPlan:
    kind: str  # generated | regenerated | rewrite
    template: str
    variables: dict[str, Any]
    params: dict[str, Any]
    story: dict[str, Any]  # the story prompt snapshot (template, hash, messages, prompt)
    parent: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    word_limit: int | None = None  # the words asked for: the reply stops at the sentence end near it


def _token_cap(svc: Services, words: int, minimum: int) -> int:
    local_ctx = svc.settings.LOCAL_N_CTX if svc.llm.provider.name == "local" else None
    return token_cap(words, minimum, local_ctx)


def token_cap(words: int, minimum: int, local_ctx: int | None = None) -> int:
    """max_tokens sized from the word limit (+20% and the sentence that crosses it), not a blind 2x.

    The reply is then cut back to its last sentence end (`SentenceGate`), so it never ends mid-sentence.
    `local_ctx`: the embedded model's context, which prompt + reply must fit.
    """
    cap = max_tokens_for_words(words, minimum=minimum)
    if local_ctx is not None:
        cap = min(cap, max(minimum, local_ctx - 512))
    return cap


def story_params(words: int, local_ctx: int | None = None) -> dict[str, Any]:
    """A whole story's length settings: max_tokens from the word limit; on the embedded model also
    `min_tokens` (no end token before about 85% of the words: SmolLM2 ends "100 words" after 30)."""
    params: dict[str, Any] = {"max_tokens": token_cap(words, 64, local_ctx)}
    if local_ctx is not None:
        params["min_tokens"] = math.ceil(1.1 * words)
    return params


@dataclass
class GatedReply:
    """A story or rewrite reply as the app stores it (`text`), with the model's raw output beside it."""

    text: str
    raw: str
    result: Any
    dropped: list[str]
    attempts: int


def gated_reply(
    llm: Any,
    *,
    kind: str,
    template: str,
    variables: dict[str, Any],
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    word_limit: int | None,
    context: CallContext | None = None,
) -> GatedReply:
    """One story/rewrite call through the same gate and retry as `run_stream`, without a session:
    what bench/quality.py and the quality tests measure is what a participant would be shown."""
    raw = ""
    text = ""
    result: Any = None
    dropped: list[str] = []
    attempt = 0
    for attempt in range(1, REWRITE_ATTEMPTS + 1):
        gate = story_gate(kind, messages, variables, word_limit)
        call = dict(params)
        if attempt > 1:
            call["seed"] = attempt
        stream = llm.chat(template=template, variables=variables, params=call, context=context, stream=True)
        out: list[str] = []
        try:
            for delta in stream:
                out.append(gate.feed(delta))
                if gate.full:
                    break
        finally:
            stream.close()
        result = stream.result
        out.append(gate.finish(truncated=bool(result and result.finish_reason == "length") or gate.full))
        raw, text, dropped = stream.text, "".join(out).strip(), gate.dropped
        if text or kind != "rewrite":
            break
    return GatedReply(text=text, raw=raw, result=result, dropped=dropped, attempts=attempt)


def _model_params(svc: Services) -> dict[str, Any]:
    model = svc.settings.STORYTELLER_MODEL
    return {"model": model} if model and svc.llm.provider.name != "local" else {}


def plan_stream(
    svc: Services, store: StoryStore, session: dict[str, Any], action: str = "next"
) -> StreamPlan:
    pending = session.get("pending") if action == "next" else None
    current = _version_for(store, session, None) if session.get("current_version") else None
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


def request_cancel(store: StoryStore, session: dict[str, Any]) -> None:
    if store.is_draft(session["_id"]):
        return  # a session that was never written has nothing running
    store.update_session(session["_id"], {}, inc={"cancel_seq": 1})


# --------------------------------------------------------------------------- feedback


def save_feedback(
    svc: Services,
    store: StoryStore,
    session: dict[str, Any],
    *,
    version_id: str | None,
    good: bool = True,
    comment: str | None = None,
    story: str | None = None,
    form: dict[str, Any] | None = None,
    source: str = "api",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mark the exact version shown. `story` (from /savestory/) must be that version's text, with or
    without newlines; a different text (unsaved edits on the original page) becomes an `edited` version."""
    version = _version_for(store, session, version_id)
    if story is not None:
        if version is None or strip_newlines(story) != strip_newlines(version["text"]):
            if version is None and session.get("story") is None and form is not None:
                settings = StorySettings.model_validate(form)
                set_story(svc, store, session, settings, Caller(user=session.get("user")))
                session = store.session(session["_id"]) or session
            version = save_edit(svc, store, session, story, version["_id"] if version else None)
    if version is None:
        raise ApiError(409, "there is no story in this session yet: write one first")
    doc = {
        "good": good,
        "comment": comment,
        "session": session["_id"],
        "user": session.get("user"),
        "version_n": version["n"],
        "kind": version["kind"],
        "story": version["text"],
        "prompt": version.get("prompt"),
        "system": version.get("system"),
        "messages": version.get("story_messages"),
        "template": version.get("template"),
        "template_hash": version.get("template_hash"),
        "model": version.get("model"),
        "provider": version.get("provider"),
        "settings": version.get("settings"),
        "form": form,
        "source": source,
    }
    saved = store.save_feedback(version, doc)
    return saved, version


# --------------------------------------------------------------------------- fine-tuning dataset


def dataset_records(store: StoryStore, *, user: str | None = None, since: Any = None) -> list[dict[str, Any]]:
    """Liked stories as chat records: system (writer role), user (the story prompt used), assistant (story)."""
    out = []
    for fb in store.positive_feedback(user=user, since=since):
        prompt = fb.get("prompt") or ""
        story = fb.get("story") or ""
        if not prompt.strip() or not story.strip():
            continue
        messages = []
        if fb.get("system"):
            messages.append({"role": "system", "content": fb["system"]})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": story}]
        out.append({"messages": messages, "id": fb["_id"], "version": fb["version"]})
    return out


def write_dataset(records: list[dict[str, Any]], out: Path, fmt: str) -> int:
    """JSONL chat records, or the original's `Prompt,Story` CSV (quoted; header first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(out, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps({"messages": rec["messages"]}, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
            writer.writerow(["Prompt", "Story"])
            for rec in records:
                msgs = rec["messages"]
                system = next((m["content"] for m in msgs if m["role"] == "system"), "")
                user = next(m["content"] for m in msgs if m["role"] == "user")
                story = next(m["content"] for m in msgs if m["role"] == "assistant")
                writer.writerow([f"{system.strip()}\n\n{user}" if system else user, story])
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (jsonl or csv)")
    return len(records)
