"""A selected part of a story: its offsets on the original page's newline-free text, and the
bounded context (text before and after it) a rewrite prompt is given."""

from __future__ import annotations

from typing import Any

CONTEXT_CHARS = 1500  # text before/after a selection given to the model (the story keeps all of it)
_NEWLINES = str.maketrans("", "", "\r\n")


def words(text: str) -> int:
    """Words as the storyteller counts them (white-space separated)."""
    return len(text.split())


def strip_newlines(text: str) -> str:
    return text.translate(_NEWLINES)


def map_stripped(text: str, before: str, selected: str) -> tuple[int, int] | None:
    """Offsets in `text` of a selection made on `text` with its newlines removed (the original page)."""
    start_count, end_count = len(before), len(before) + len(selected)
    count = 0
    start = end = None
    for i, ch in enumerate(text + "\0"):
        if count == start_count:
            start = i  # keep advancing: newlines at the boundary stay in `before`
        if count == end_count and end is None:
            end = i
        if ch in "\r\n":
            continue
        count += 1
    if start is None or end is None:
        return None
    return (start, max(start, end))


def rewrite_variables(story_prompt: str, before: str, selected: str, after: str) -> dict[str, Any]:
    """The rewrite template's variables: the selection's surroundings (bounded) and its word count."""
    return {
        "story_prompt": story_prompt,
        "before": _tail(before),
        "selected": _head(selected, 4 * CONTEXT_CHARS),
        "after": _head(after),
        "words": max(1, words(selected)),
    }


def _tail(text: str, limit: int = CONTEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = cut.find(" ")
    return "…" + (cut[space + 1 :] if 0 <= space < 80 else cut)


def _head(text: str, limit: int = CONTEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit - 80 else cut) + "…"
