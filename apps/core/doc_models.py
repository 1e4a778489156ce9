"""Response models of the server-wide routes, for `/openapi.json` (the handlers build plain dicts).

Open (`extra="allow"`) so that documenting a reply never constrains it; enums where the values are fixed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "working", "done", "failed", "cancelled"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class HealthOut(_Open):
    status: Literal["ok", "degraded", "down"] = Field(
        description="ok (HTTP 200); degraded: a part a request needs fails (503); down: no database (503)"
    )
    problems: list[dict[str, Any]] = Field(
        default_factory=list, description="each failing part: {part, error, remedy}"
    )
    database: dict[str, Any]
    model: dict[str, Any] = Field(description="the language model provider's status (probed)")
    images: dict[str, Any] = Field(description="the image provider's status (probed)")
    prompts: dict[str, Any] = Field(default_factory=dict, description="the prompt library's check")
    apps: list[str] = Field(description="mounted apps (prefixes)")


class JobOut(_Open):
    id: str
    kind: str | None = None
    app: str | None = None
    owner: str | None = None
    status: JobStatus
    progress: Any = None
    data: Any = None
    result: Any = None
    error: Any = None
    events: int = Field(description="number of events so far (the last SSE id)")
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None


class JobEvent(_Open):
    """One message of `GET /jobs/<id>/events`: SSE `event:` = `type`, `id:` = `seq`, `data:` = this JSON.

    Types: `status` (`data.status`), `progress`, the job kind's own steps (storybook: `book.plan`,
    `page.delta`, `page.text`, `page.image`, `cover`, `stage`, `error`), and last one of `done`,
    `failed`, `cancelled`. A comment line (`: ping`) is sent at once and every SSE_HEARTBEAT_S.
    Reconnect with `Last-Event-ID` to resume after that event."""

    seq: int = Field(description="the event's sequence number in the job's log (also the SSE id)")
    type: str = Field(description="event type (also the SSE `event:` field)")
    data: Any = Field(default=None, description="the event's payload")
