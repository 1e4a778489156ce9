"""Cost per model call from a price table (`MODEL_PRICES`), so a study's spend is in its data.

The table maps a model name to its price in US dollars per 1M tokens, given as JSON text or as a
path to a JSON/YAML file:

    MODEL_PRICES={"gpt-4o-mini": {"input": 0.15, "output": 0.60}}

A provider often answers with a dated name (`gpt-4o-mini-2024-07-18`); the longest table key that
the model name starts with is used. Unknown models cost None (unknown), never 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class PriceError(ValueError):
    """MODEL_PRICES is not a valid price table; the message says what is wrong."""


@dataclass(frozen=True)
class Price:
    input: float  # USD per 1M prompt tokens
    output: float  # USD per 1M completion tokens


def parse_prices(value: str | None) -> dict[str, Price]:
    """JSON text, or a path to a .json/.yaml file; empty -> no table."""
    if not value or not value.strip():
        return {}
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise PriceError(f"MODEL_PRICES: {text!r} is neither JSON nor an existing file")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PriceError(f"MODEL_PRICES is not valid JSON/YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PriceError("MODEL_PRICES must map model -> {input: USD per 1M tokens, output: ...}")
    table: dict[str, Price] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or not {"input", "output"} <= set(entry):
            raise PriceError(f"MODEL_PRICES[{model!r}] needs 'input' and 'output' (USD per 1M tokens)")
        try:
            table[str(model)] = Price(float(entry["input"]), float(entry["output"]))
        except (TypeError, ValueError) as exc:
            raise PriceError(f"MODEL_PRICES[{model!r}]: prices must be numbers") from exc
    return table


def price_for(table: dict[str, Price], model: str | None) -> Price | None:
    if not model or not table:
        return None
    if model in table:
        return table[model]
    matches = [key for key in table if model.startswith(key)]
    return table[max(matches, key=len)] if matches else None


def tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens of a record's usage (OpenAI or llama.cpp names)."""
    usage = usage or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
    return int(prompt), int(completion)


def cost(table: dict[str, Price], model: str | None, usage: dict[str, Any] | None) -> float | None:
    """USD for one call, or None when the model has no price (or the call used no tokens)."""
    price = price_for(table, model)
    if price is None:
        return None
    prompt, completion = tokens(usage)
    if not prompt and not completion:
        return None
    return round((prompt * price.input + completion * price.output) / 1_000_000, 8)
