"""Input moderation: OpenAI's moderation endpoint where configured, else a local word list.

The local check is a small keyword screen, not a safety classifier, and says so in its
provider name (`local-keyword-check`) so nobody mistakes it for one in the records.

Every moderator returns the same shape: {"flagged": bool, "categories": [names], "provider": str, ...}.
Callers go through `agent.llm.LLM.moderate`, which adds retries and the `generations` record.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from agent.llm.providers.openai_compat import OpenAICompatProvider
from agent.types import ModelError
from config import Settings

log = logging.getLogger(__name__)

LOCAL_NAME = "local-keyword-check"

# Deliberately short: clear-cut terms, grouped under OpenAI's category names. A screen, not a classifier.
_BLOCKLIST: dict[str, tuple[str, ...]] = {
    "self-harm": ("kill yourself", "suicide", "self-harm", "自杀", "自残", "割腕"),
    "sexual": ("porn", "nude", "naked", "sex", "色情", "裸体", "性交"),
    "sexual/minors": ("child porn", "儿童色情"),
    "violence": (
        "rape",
        "behead",
        "massacre",
        "genocide",
        "terrorist attack",
        "bomb making",
        "mutilate",
        "torture",
        "强奸",
        "斩首",
        "屠杀",
        "恐怖袭击",
        "制造炸弹",
        "酷刑",
    ),
}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _term_pattern(word: str) -> str:
    # \b needs a word/non-word edge; CJK text has no spaces, so CJK terms match anywhere
    return re.escape(word) if _CJK.search(word) else rf"\b{re.escape(word)}\b"


class LocalKeywordModerator:
    """Flags text containing a listed word (whole words for Latin script, substrings for CJK)."""

    name = LOCAL_NAME

    def __init__(self, extra_words: list[str] | None = None) -> None:
        self.words: dict[str, str] = {}  # lower-cased word -> category
        for category, words in _BLOCKLIST.items():
            for word in words:
                self.words[word.lower()] = category
        for word in extra_words or []:
            self.words.setdefault(word.lower(), "custom")
        # longest first, so "child porn" wins over "porn"
        alternatives = sorted(self.words, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(_term_pattern(w) for w in alternatives) + ")", re.IGNORECASE)

    def moderate(self, text: str) -> dict[str, Any]:
        hits = sorted({m.group(1).lower() for m in self.pattern.finditer(text or "")})
        categories = sorted({self.words[h] for h in hits})
        return {"flagged": bool(hits), "categories": categories, "matches": hits, "provider": self.name}


class OpenAIModerator:
    """Calls /v1/moderations through an OpenAI-compatible provider.

    A compatible server without that endpoint (Ollama, vLLM, llama.cpp answer 404) is remembered and
    the local keyword check is used instead; the result's provider and `note` say so.
    """

    _UNSUPPORTED = (404, 405, 501)

    def __init__(self, provider: Any, fallback: LocalKeywordModerator | None = None) -> None:
        self.provider = provider
        self.name = f"{provider.name}-moderation"
        self.fallback = fallback or LocalKeywordModerator()
        self.unsupported = False
        self._lock = threading.Lock()

    def moderate(self, text: str) -> dict[str, Any]:
        if self.unsupported:
            return self._fallback(text)
        try:
            return self.provider.moderate(text)
        except ModelError as exc:
            if exc.status not in self._UNSUPPORTED:
                raise
            with self._lock:
                if not self.unsupported:
                    log.warning(
                        "%s has no moderation endpoint (HTTP %s); using %s from now on",
                        self.provider.name,
                        exc.status,
                        self.fallback.name,
                    )
                self.unsupported = True
            return self._fallback(text)

    def _fallback(self, text: str) -> dict[str, Any]:
        result = self.fallback.moderate(text)
        result["note"] = f"{self.provider.name} has no moderation endpoint; local keyword check used"
        return result


class NoModerator:
    name = "off"

    def moderate(self, text: str) -> dict[str, Any]:
        return {"flagged": False, "categories": [], "provider": self.name}


def build_moderator(settings: Settings, provider: Any) -> Any:
    """MODERATION: off | local | openai | auto.

    auto: OpenAI moderation when the chat provider is `openai`, or `azure` with OPENAI_API_KEY set (Azure
    OpenAI itself has no moderation endpoint); otherwise the local keyword check.
    openai: the same, but an error at start-up when no OpenAI moderation is reachable.
    """
    mode = settings.MODERATION
    if mode == "off":
        return NoModerator()
    if mode == "local":
        return LocalKeywordModerator()
    remote = _openai_moderation_provider(settings, provider)
    if remote is not None:
        return OpenAIModerator(remote)
    if mode == "openai":
        raise ValueError(
            "MODERATION=openai needs LLM_PROVIDER=openai, or LLM_PROVIDER=azure with OPENAI_API_KEY "
            "(Azure OpenAI has no moderation endpoint)"
        )
    return LocalKeywordModerator()


def _openai_moderation_provider(settings: Settings, provider: Any) -> Any:
    if getattr(provider, "name", "") == "openai" and hasattr(provider, "moderate"):
        return provider
    if getattr(provider, "name", "") == "azure" and settings.OPENAI_API_KEY:
        return OpenAICompatProvider.openai(
            base_url=settings.OPENAI_BASE_URL,
            api_key=settings.OPENAI_API_KEY,
            model=settings.LLM_MODEL,
            timeout=settings.LLM_TIMEOUT_S,
        )
    return None
