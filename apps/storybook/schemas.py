"""Request models of the storybook app: the original contract (query/path) and the JSON API.

Limits are enforced here so every bad input is a FastAPI-style 422 with the field's location:
the description is 1-2000 characters after trimming, the page count 1..STORYBOOK_MAX_PAGES
(read from the running app's Settings, default 20).
"""

from __future__ import annotations

from typing import Any, Literal

from flask import current_app, has_app_context
from pydantic import BaseModel, ConfigDict, Field, field_validator

from apps.core.openapi import body_example
from apps.core.query_models import QueryModel

DESCRIPTION_MAX = 2000
DEFAULT_MAX_PAGES = 20
USER_PATTERN = r"^[\w.\-@]{1,64}$"
MODEL_PATTERN = r"^[\w.\-:/]{1,100}$"


def max_pages() -> int:
    """STORYBOOK_MAX_PAGES of the running app (Settings field; env var of the same name)."""
    if has_app_context():
        settings = current_app.config.get("SETTINGS")
        value = getattr(settings, "STORYBOOK_MAX_PAGES", None)
        if isinstance(value, int) and value >= 1:
            return value
    return DEFAULT_MAX_PAGES


def _description(value: str) -> str:
    text = value.strip()
    if not text:
        raise ValueError("must not be empty or only spaces")
    if len(text) > DESCRIPTION_MAX:
        raise ValueError(f"must be at most {DESCRIPTION_MAX} characters (got {len(text)})")
    return text


def _pages(value: int) -> int:
    limit = max_pages()
    if value < 1 or value > limit:
        raise ValueError(f"must be between 1 and {limit} (STORYBOOK_MAX_PAGES)")
    return value


# ------------------------------------------------------------------ the original contract


class LegacyCreateQuery(QueryModel):
    """`GET /get_storybook/?des=...&pgs=N` (the original's query names)."""

    des: str = Field(description="the story idea (1-2000 characters after trimming)")
    pgs: int = Field(description="number of pages (1..STORYBOOK_MAX_PAGES)")

    @field_validator("des")
    @classmethod
    def _check_des(cls, value: str) -> str:
        return _description(value)

    @field_validator("pgs")
    @classmethod
    def _check_pgs(cls, value: int) -> int:
        return _pages(value)


class TaskPath(BaseModel):
    task_id: int = Field(description="the integer task id returned by /get_storybook/")


class FinalOutputQuery(QueryModel):
    task_id: int | None = Field(
        default=None, description="that task's final output; omitted: your latest book"
    )
    user: str | None = Field(
        default=None, pattern=USER_PATTERN, description="AUTH_MODE=none only: whose latest book"
    )


# ------------------------------------------------------------------ the JSON API


class Character(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=60)
    appearance: str = Field(default="", max_length=300, description="what the character looks like")

    @field_validator("name", "appearance")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


class BookBody(BaseModel):
    """`POST /storybook/books`: everything a reader (or a study) can set."""

    model_config = ConfigDict(
        extra="forbid",
        **body_example(
            {
                "description": "A shy fox learns to sing with the birds",
                "pages": 3,
                "style": "watercolor, soft light",
                "main_character": {"name": "Fern", "appearance": "a small red fox with a white tail tip"},
                "language": "English",
            }
        ),
    )

    description: str = Field(description="the story idea (1-2000 characters after trimming)")
    pages: int = Field(description="number of pages (1..STORYBOOK_MAX_PAGES)")
    style: str | None = Field(
        default=None,
        max_length=300,
        description="illustration style tags; appended to every image prompt (a WebUI "
        "LoRA tag such as <lora:name:0.8> works here)",
    )
    characters: list[Character] | None = Field(
        default=None, max_length=4, description="supporting characters"
    )
    main_character: Character | None = None
    setting: str | None = Field(default=None, max_length=300)
    language: str | None = Field(
        default=None, max_length=40, description="language of the text, e.g. English"
    )
    model: str | None = Field(
        default=None, pattern=MODEL_PATTERN, description="chat model (provider-specific)"
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="image seed for every page (random if unset)"
    )
    chain_images: bool = Field(
        default=False,
        description="img2img from the previous page's picture: more "
        "consistent, but pages are drawn one after another",
    )
    user: str | None = Field(default=None, pattern=USER_PATTERN, description="AUTH_MODE=none: who made it")

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str) -> str:
        return _description(value)

    @field_validator("pages")
    @classmethod
    def _check_pages(cls, value: int) -> int:
        return _pages(value)

    @field_validator("style", "setting", "language")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class BookPath(BaseModel):
    book_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class HistoryQuery(QueryModel):
    user: str | None = Field(
        default=None,
        pattern=USER_PATTERN,
        description="AUTH_MODE=none: whose books (omitted: anonymous ones); admins: any user",
    )
    limit: int = Field(default=20, ge=1, le=200)
    status: Literal["queued", "working", "done", "failed", "cancelled"] | None = None


def book_params(body: BookBody) -> dict[str, Any]:
    """The stored job input of a JSON-API book."""
    return {
        "description": body.description,
        "pages": body.pages,
        "style": body.style,
        "characters": [c.model_dump() for c in body.characters or []],
        "main_character": body.main_character.model_dump() if body.main_character else None,
        "setting": body.setting,
        "language": body.language,
        "model": body.model,
        "temperature": body.temperature,
        "seed": body.seed,
        "chain_images": body.chain_images,
    }
