"""The model's words made fit to print: a title or page without labels, preambles, wrapping quotes
or pasted instructions, and SD tag lists on one line.

bench/quality.py measures the same functions, so its figures are what a reader is shown.
"""

from __future__ import annotations

import re
from typing import Any

from agent.textcheck import copies_instructions, strip_chatter, strip_meta, template_sentences

_QUOTES = "\"'“”‘’«»「」『』`"
_TITLE_PREFIX = re.compile(r"^\s*(?:\*\*)?\s*(?:book\s+)?title\s*[:：-]\s*", re.IGNORECASE)
_PAGE_PREFIX = re.compile(
    r"^\s*(?:\*\*)?\s*(?:page|p\.)\s*\d+\s*(?:of\s*\d+)?\s*[:.：\-–]?\s*(?:\*\*)?\s*", re.IGNORECASE
)


def clean_title(text: str) -> str:
    """The model's title without surrounding quotes/markdown or a `Title:` prefix (the original kept them)."""
    title = _TITLE_PREFIX.sub("", (text or "").strip().splitlines()[0] if (text or "").strip() else "")
    title = title.strip().strip("*#_ ").strip()
    while len(title) >= 2 and title[0] in _QUOTES and title[-1] in _QUOTES:
        title = title[1:-1].strip()
    return title.strip(_QUOTES + " ").strip() or "Untitled"


def clean_page(text: str) -> str:
    """A page's text without a leading `Page 2:` label, a "Here's the page text ...:" preamble (small
    models write one), an assistant's chatter ("I'm so happy to help you ...") or wrapping quotes;
    paragraphs kept."""
    out = _PAGE_PREFIX.sub("", strip_chatter(strip_meta((text or "").strip())), count=1).strip()
    if len(out) >= 2 and out[0] in _QUOTES and out[-1] in _QUOTES and out.count(out[0]) == 2:
        out = out[1:-1].strip()
    return re.sub(r"\n{3,}", "\n\n", out)


# template syntax a small model copied from its prompt instead of filling in: "{{story}}", "{ description }}",
# "{% if %}", "{page}" (a scene or summary made of these would be drawn or written as-is)
_PLACEHOLDER = re.compile(r"\{\s*\{|\}\s*\}|\{%|%\}|\{\s*[A-Za-z_][\w.]*\s*\}")


def plan_field(raw: str, fallback: str) -> str:
    """A plan's page summary or scene, or `fallback` when the model left it empty or wrote template
    placeholders into it (the embedded SmolLM2 writes "{ {story}}, [{ description }}" for a scene)."""
    text = (raw or "").strip()
    return fallback if not text or _PLACEHOLDER.search(text) else text


def plan_title(raw: str, instructions: str, description: str) -> str:
    """The plan's title, unless the model copied it from the instructions ("A Short Title for the Book"):
    then the story idea itself, which at least says what the book is about."""
    title = clean_title(raw)
    if title == "Untitled" or copies_instructions(title, instructions):
        idea = " ".join(description.split()[:8]).strip(_QUOTES + " .")
        return (idea[:1].upper() + idea[1:]) if idea else "Untitled"
    return title


def page_instructions(prompts: Any, variables: dict[str, Any]) -> list[str]:
    """The page prompt's instruction sentences (a small model pastes "Two to four short sentences for
    young children" into the page), and the previous page's sentences (a copied page): dropped from a page."""
    rendered = prompts.render("storybook/page", variables)
    values = [str(v) for v in variables.values() if isinstance(v, str)]
    values += [str(v) for v in (*variables.get("plan", []), *variables.get("characters", []))]
    texts = [str(m.get("content") or "") for m in rendered.messages]
    return template_sentences(texts, values) + template_sentences([variables.get("previous") or ""], [])


def tidy_tags(prompt: str) -> str:
    """One line, single `, ` separators: the model's scenes sometimes start or end with commas."""
    return re.sub(r"(?:\s*,\s*)+", ", ", " ".join(prompt.split())).strip(" ,")
