"""The story prompt of a session: rendered from the settings form, kept as a snapshot, re-rendered on use.

A snapshot holds the template name and hash, the variables, the rendered messages and the user
prompt, so every version can say exactly which prompt produced it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apps.core.studies import study_render

if TYPE_CHECKING:
    from apps.core.context import Services

APP = "storyteller"
STORY_TEMPLATE = "storyteller/story"
DEFAULT_TEMPLATE = "storyteller/default"
REWRITE_TEMPLATE = "storyteller/rewrite"
DEFAULT_WORDS = 100  # the original's default prompt: "Write a story of 100 words."


def story_snapshot(template: str, variables: dict[str, Any], rendered: Any) -> dict[str, Any]:
    return {
        "template": template,
        "template_hash": rendered.hash,
        "variables": variables,
        "messages": rendered.messages,
        "prompt": user_prompt(rendered.messages),
        "max_words": int(variables["max_words"]),
    }


def user_prompt(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return str(msg.get("content") or "")
    return ""


def system_prompt(messages: list[dict[str, Any]]) -> str | None:
    for msg in messages:
        if msg.get("role") == "system":
            return str(msg.get("content") or "")
    return None


def session_story(svc: Services, session: dict[str, Any]) -> dict[str, Any]:
    """The session's story prompt, re-rendered now (so template edits apply and the hash is current)."""
    story = session.get("story")
    if story is None:
        variables = {"max_words": DEFAULT_WORDS}
        return story_snapshot(DEFAULT_TEMPLATE, variables, svc.prompts.render(DEFAULT_TEMPLATE, variables))
    rendered = study_render(
        svc, story["template"], story["variables"], app=APP, user=session.get("user"), session=session["_id"]
    )
    return story_snapshot(story["template"], story["variables"], rendered)
