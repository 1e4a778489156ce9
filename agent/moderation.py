"""Input moderation: OpenAI's moderation endpoint where configured, else a local word list.

The local check is a small keyword screen, not a safety classifier, and says so in its
provider name (`local-keyword-check`) so nobody mistakes it for one in the records.
"""

from __future__ import annotations

import re
from typing import Any

from config import Settings

# Deliberately short: clear-cut violent/sexual/self-harm terms. A screen, not a classifier.
_BLOCKLIST = (
    "kill yourself", "suicide", "self-harm", "rape", "child porn", "porn", "nude", "naked", "sex",
    "behead", "massacre", "genocide", "terrorist attack", "bomb making", "mutilate", "torture",
)
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in _BLOCKLIST) + r")\b", re.IGNORECASE)


class LocalKeywordModerator:
    name = "local-keyword-check"

    def __init__(self, extra_words: list[str] | None = None) -> None:
        words = list(_BLOCKLIST) + list(extra_words or [])
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def moderate(self, text: str) -> dict[str, Any]:
        hits = sorted({m.group(1).lower() for m in self.pattern.finditer(text or "")})
        return {"flagged": bool(hits), "categories": ["keyword"] if hits else [], "matches": hits,
                "provider": self.name}


class OpenAIModerator:
    """Calls /v1/moderations through the configured OpenAI-compatible client."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.name = f"{provider.name}-moderation"

    def moderate(self, text: str) -> dict[str, Any]:
        return self.provider.moderate(text)


class NoModerator:
    name = "off"

    def moderate(self, text: str) -> dict[str, Any]:
        return {"flagged": False, "categories": [], "provider": self.name}


def build_moderator(settings: Settings, provider: Any) -> Any:
    mode = settings.MODERATION
    if mode == "off":
        return NoModerator()
    if mode == "openai" or (mode == "auto" and getattr(provider, "name", "") == "openai" and hasattr(provider, "moderate")):
        return OpenAIModerator(provider)
    return LocalKeywordModerator()
