"""Response models of the storybook app, for `/openapi.json` (the handlers build plain dicts)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from apps.core.doc_models import JobStatus


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class LegacyProgress(_Open):
    total: int = Field(description="always 4")
    current: int = Field(description="0 started, 1 title, 3 all texts, 4 all pictures (done)")


class LegacySnapshot(_Open):
    """One message of `GET /get_updates/<task_id>` (no `event:` field: the original listens to `onmessage`).

    A cumulative snapshot: `data` is null until the title exists, then grows in the original key
    order `user_input, total_pages, title, text_description, image_description, illustrations`
    (+ `cover`). The stream ends after `done`, or `failed`/`cancelled` with `error`."""

    status: Literal["working", "done", "failed", "cancelled"]
    progress: LegacyProgress
    data: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class BookEvent(_Open):
    """One message of `GET /books/<id>/events`: SSE `event:` = the type, `id:` = the log sequence.

    Types and `data`: `book.plan` {title, pages: [{page, scene}]}; `page.delta` {page, delta} (text as
    written); `page.reset` {page, reason}; `page.text` {page, text, progress}; `page.image` {page, url,
    image_id, instance}; `cover` {url, image_id, instance}; `stage` {stage, message}; `error`; then
    `done` (with the whole `book`), `failed` or `cancelled`. Resumable with `Last-Event-ID`."""

    page: int | None = None
    delta: str | None = None
    text: str | None = None
    url: str | None = None
    book: dict[str, Any] | None = Field(default=None, description="`done` only: the finished book")


class FinalOutput(_Open):
    final_output: dict[str, Any] = Field(
        description="the original's finished book: user_input, total_pages, title, text_description, "
        "image_description, illustrations (+ cover); `{}` when none"
    )
    status: JobStatus | None = Field(default=None, description="with task_id: the task's status")
    error: Any = None


class BookPage(_Open):
    page: int | None = None
    text: str | None = None
    summary: str | None = None
    image_description: str | None = None
    image_prompt: str | None = None
    illustration: str | None = Field(default=None, description="absolute picture URL")
    instance: str | None = None


class BookOut(_Open):
    id: str
    legacy_id: int | None = None
    status: JobStatus
    owner: str | None = None
    title: str | None = None
    description: str | None = None
    pages_requested: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    sheet: Any = None
    seed: int | None = None
    pages: list[BookPage] = Field(default_factory=list)
    cover: dict[str, Any] | None = None
    progress: Any = None
    error: Any = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    links: dict[str, str] = Field(description="self, events, and the original contract's URLs")


class BookSummary(_Open):
    id: str
    legacy_id: int | None = None
    title: str | None = None
    status: JobStatus | None = None
    description: str | None = None
    pages: int | None = None
    cover: str | None = None
    created_at: str | None = None
    finished_at: str | None = None


class BookList(_Open):
    books: list[BookSummary]


class InvalidTask(_Open):
    error: str = Field(description="`Invalid task id` (the original's 404 body)")
