"""Response models of the storyteller app, and its stream messages, for `/openapi.json`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptList(RootModel[list[str]]):
    """The original shape: a one-element list with the prompt."""


class SavedOut(_Open):
    saved: bool
    id: str = Field(description="the feedback record")
    version: str
    n: int
    good: bool | None = None


class SettingsOut(_Open):
    session: str
    prompt: str
    template: str | None = None
    template_hash: str | None = None
    settings: dict[str, Any]


class RewriteOut(_Open):
    session: str
    prompt: str
    version: str | None = None
    selected: Any = None
    words: Any = None


class StoryVersionOut(_Open):
    id: str
    n: int
    kind: str = Field(description="generated, rewrite or edited")
    parent: str | None = None
    created_at: Any = None
    words: int
    model: str | None = None
    provider: str | None = None
    template: str | None = None
    template_hash: str | None = None
    prompt: str | None = None
    settings: dict[str, Any] | None = None
    feedback: bool
    rewrite: Any = None
    text: str | None = None


class CancelOut(_Open):
    cancelled: bool
    session: str


class StorySessionOut(_Open):
    session: str
    settings: dict[str, Any] | None = None
    prompt: str | None = None
    template: str | None = None
    template_hash: str | None = None
    current_version: str | None = None
    versions: int
    pending: dict[str, Any] | None = None
    updated_at: Any = None


class VersionsOut(_Open):
    session: str
    current_version: str | None = None
    versions: list[StoryVersionOut]


class StoryStreamEvent(_Open):
    """One message of the story stream. SSE (`GET /stream`): `event:` = `type`, `data:` = this JSON.
    WebSocket (`/ws?format=json`): one text frame each, first `start`. WebSocket default (the
    original): raw text frames with the `delta` texts only, closed 1000 when done, 1011 + reason on error.

    `start` {session, kind}; `delta` {text}; then one of `done` {story, version, n, kind, model},
    `cancelled` {text}, `error` {message}. Cancel: send `{"type": "cancel"}` (or `cancel`) on the
    socket, or `POST api/cancel` (SSE). Close an EventSource after `done`/`error`."""

    type: Literal["start", "delta", "done", "cancelled", "error"]
    text: str | None = None
    story: str | None = None
    version: str | None = None
    n: int | None = None
    kind: str | None = None
    model: str | None = None
    session: str | None = None
    message: str | None = None


class CancelMessage(_Open):
    """A client → server WebSocket message: stop the running generation."""

    type: Literal["cancel"]
