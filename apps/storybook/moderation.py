"""Moderation of a book's texts, and the step failure a flagged text (or a failed step) becomes."""

from __future__ import annotations

from typing import Any

from agent.llm import CallContext
from apps.core.context import Services
from apps.core.errors import ApiError


def moderate(svc: Services, text: str, context: CallContext) -> dict[str, Any]:
    """svc.llm.moderate when the LLM front door has it, else its moderator directly."""
    fn = getattr(svc.llm, "moderate", None)
    if callable(fn):
        return fn(text, context)
    moderator = getattr(svc.llm, "moderator", None)
    if moderator is None:
        return {"flagged": False, "categories": [], "provider": "off"}
    return moderator.moderate(text)


class StepFailed(ApiError):
    """A failure with the step it happened in (stored on the book and shown in the stream)."""

    def __init__(self, code: str, message: str, step: str, **extra: Any) -> None:
        super().__init__(422 if code == "moderated" else 502, message, code=code)
        self.step = step
        self.extra = extra


def check_moderation(svc: Services, text: str, context: CallContext, step: str, message: str) -> None:
    """Raise StepFailed (code `moderated`, with the flagged categories) when `text` is flagged."""
    verdict = moderate(svc, text, context)
    if verdict.get("flagged"):
        categories = verdict.get("categories") or []
        if isinstance(categories, dict):
            categories = sorted(k for k, v in categories.items() if v)
        why = f" ({', '.join(map(str, categories))})" if categories else ""
        raise StepFailed(
            "moderated",
            f"{message}{why}; please rephrase it.",
            step,
            categories=list(categories),
            provider=verdict.get("provider"),
        )
