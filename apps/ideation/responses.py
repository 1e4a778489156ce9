"""Response models of the ideation app, for `/openapi.json` (the handlers build plain dicts).

StepIdeator's envelope is `{success, data, code, message}` with HTTP 200 for business failures
(`success: false`, `code: 1`); `/upload`, `/uploadImage` and `/timeRecord` answer without it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class IdeationEnvelope(_Open):
    """The original envelope; `data` is the operation's result (see each operation)."""

    success: bool
    code: int = Field(description="0 ok, 1 business failure, 2 model failure")
    message: str
    data: Any = Field(
        default=None,
        description="`/generate`: an object of JSON-string values (texts) or of image URLs ending in .png, "
        "or a list of such objects (reference results)",
    )


class UploadOut(_Open):
    url: str = Field(description="absolute URL of the stored image, ending in .png")


class UploadImageOut(_Open):
    success: bool
    url: str = Field(description="absolute URL of the stored image, ending in .png")


class UploadError(_Open):
    """`/upload`, `/uploadImage` failures in the original's shape (`error`), plus `success`/`message`."""

    success: bool
    error: str
    message: str


class TimeRecordOut(_Open):
    success: bool
    message: str
