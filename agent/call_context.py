"""Who a model call is for: one spelling, shared by the chat front door, image calls and their records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FIELDS = ("app", "user", "session", "job", "step")


@dataclass
class CallContext:
    """Who a call is for; stored with its record."""

    app: str | None = None
    user: str | None = None
    session: str | None = None
    job: str | None = None
    step: str | None = None

    @classmethod
    def of(cls, value: CallContext | Mapping[str, Any] | None) -> CallContext:
        """The context from what a caller passed: a CallContext, a dict (extra keys ignored) or None."""
        if value is None:
            return cls()
        if isinstance(value, CallContext):
            return value
        if isinstance(value, Mapping):
            return cls(**{k: value.get(k) for k in FIELDS})
        raise TypeError(f"context must be a CallContext or a dict, not {type(value).__name__}")

    def fields(self) -> dict[str, str | None]:
        """The record fields this context fills."""
        return {k: getattr(self, k) for k in FIELDS}
