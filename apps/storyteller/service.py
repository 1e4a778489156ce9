"""The storyteller's use cases, free of Flask: sessions, the story prompt, manual edits, part
rewrites (prepared here, streamed by stream.py) and "Good story" feedback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apps.core.errors import ApiError
from apps.core.studies import study_render

from .schemas import StorySettings
from .selection import map_stripped, rewrite_variables, strip_newlines, words
from .store import StoryStore
from .story_prompt import (
    APP,
    REWRITE_TEMPLATE,
    STORY_TEMPLATE,
    session_story,
    story_snapshot,
    system_prompt,
    user_prompt,
)

if TYPE_CHECKING:
    from apps.core.context import Services


@dataclass
class Caller:
    """Who is calling: the authenticated user (or None) and the client address (session fallback)."""

    user: str | None = None
    client: str | None = None
    admin: bool = False


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
    template = STORY_TEMPLATE
    variables = settings.prompt_variables()
    rendered = study_render(
        svc, template, variables, app=APP, user=caller.user or session.get("user"), session=session["_id"]
    )
    story = story_snapshot(template, variables, rendered)
    store.update_session(
        session["_id"],
        {"settings": settings.stored(), "story": story, "pending": None, "generated": 0},
        client=caller.client,
    )
    return story


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
        "words": words(version.get("text", "")),
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


def version_for(store: StoryStore, session: dict[str, Any], version_id: str | None) -> dict[str, Any] | None:
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
    parent = version_for(store, session, parent_id)
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
    version = version_for(store, session, version_id)
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
        mapped = map_stripped(text, before, flat) if strip_newlines(text) == before + flat + after else None
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
    version = version_for(store, session, version_id)
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
