"""What each model call of a book is given: the plan's variables and exact-N schema, the
character/style sheet, a page's variables and the Stable Diffusion prompts of its pictures.

Pure functions of the reader's parameters and the plan, so the runner (pipeline.py) only
sequences calls and writes.
"""

from __future__ import annotations

import copy
from typing import Any

from .text_cleanup import tidy_tags

PREVIOUS_CHARS = 600  # how much of the previous page the next page's prompt sees


def _chosen_characters(params: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in [params.get("main_character"), *(params.get("characters") or [])] if c]


def typed_text(params: dict[str, Any]) -> str:
    """Everything the reader typed (idea, style, setting, characters): what moderation checks first."""
    typed = [params["description"], params.get("style") or "", params.get("setting") or ""]
    for c in _chosen_characters(params):
        typed += [c.get("name", ""), c.get("appearance", "")]
    return "\n".join(t for t in typed if t)


def plan_variables(params: dict[str, Any], pages: int) -> dict[str, Any]:
    """The variables of `storybook/plan`."""
    return {
        "description": params["description"],
        "pages": pages,
        "language": params.get("language") or "",
        "style": params.get("style") or "",
        "setting": params.get("setting") or "",
        "main_character": params.get("main_character"),
        "characters": params.get("characters") or [],
    }


def plan_schema(template_schema: dict[str, Any], pages: int) -> dict[str, Any]:
    """The plan template's schema with `pages` bounded to exactly N items."""
    schema = copy.deepcopy(template_schema)
    spec = schema.setdefault("properties", {}).setdefault("pages", {"type": "array"})
    spec["minItems"] = spec["maxItems"] = pages
    return schema


def plan_instructions(prompts: Any, variables: dict[str, Any], params: dict[str, Any]) -> str:
    """The rendered plan prompt without the reader's own words (which are no instruction echo in a
    title: "Benny goes to Mars")."""
    rendered = prompts.render("storybook/plan", variables)
    instructions = " ".join(str(m.get("content") or "") for m in rendered.messages)
    for typed in (params["description"], params.get("style"), params.get("setting")):
        if typed:
            instructions = instructions.replace(str(typed), "\n")
    return instructions


def build_sheet(params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The character/style sheet from the plan's `data`: the reader's choices win over the model's."""
    characters = [
        {"name": str(c.get("name") or "").strip(), "appearance": str(c.get("appearance") or "").strip()}
        for c in (data.get("characters") or [])
        if isinstance(c, dict) and c.get("name")
    ]
    chosen = _chosen_characters(params)
    if chosen:
        names = {c["name"].lower() for c in chosen}
        merged = []
        for c in chosen:
            model_c = next((m for m in characters if m["name"].lower() == c["name"].lower()), None)
            merged.append(
                {
                    "name": c["name"],
                    "appearance": c.get("appearance") or (model_c["appearance"] if model_c else ""),
                }
            )
        characters = merged + [c for c in characters if c["name"].lower() not in names]
    return {
        "characters": characters[:4],
        "style": params.get("style") or str(data.get("style") or "").strip(),
        "setting": params.get("setting") or str(data.get("setting") or "").strip(),
    }


def page_variables(
    params: dict[str, Any],
    title: str,
    sheet: dict[str, Any],
    plan: list[dict[str, str]],
    page: int,
    previous: str,
) -> dict[str, Any]:
    """The variables of `storybook/page` for page `page` (1-based) of the plan."""
    return {
        "title": title,
        "description": params["description"],
        "setting": sheet["setting"],
        "characters": [
            f"{c['name']}: {c['appearance']}" if c["appearance"] else c["name"] for c in sheet["characters"]
        ],
        "plan": [x["summary"] for x in plan],
        "page": page,
        "pages": len(plan),
        "summary": plan[page - 1]["summary"],
        "previous": previous[-PREVIOUS_CHARS:],
        "language": params.get("language") or "",
    }


def sd_prompts(
    prompts: Any, kind: str, sheet: dict[str, Any], scene: str = "", title: str = ""
) -> tuple[str, str]:
    """(positive, negative) Stable Diffusion prompt of a page picture or the cover."""
    looks = [c["appearance"] or c["name"] for c in sheet["characters"]]
    common = {
        "kind": kind,
        "scene": scene,
        "title": title,
        "characters": looks,
        "style": sheet["style"],
        "setting": sheet["setting"],
    }
    positive = prompts.render("storybook/sd_prompt", {**common, "negative": False}).messages[-1]["content"]
    negative = prompts.render("storybook/sd_prompt", {**common, "negative": True}).messages[-1]["content"]
    return tidy_tags(positive), tidy_tags(negative)
