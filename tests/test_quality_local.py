"""Output quality on the default embedded model (real llama.cpp, no mocks), through bench/quality.py's
steps, i.e. the apps' templates, the LLM front door and the apps' own filters: issue 20's "done when".

The suite runs the rewrite and story steps on all their inputs (20 rewrites with the app's token budget,
10 stories) and one input per JSON step; `python bench/quality.py` runs every input of every step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.llm.build import build_llm
from agent.prompts import PromptLibrary
from config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Any:
    quality = _bench_module()
    settings = load_settings(
        {"LLM_PROVIDER": "local", "LOCAL_LLM_MODE": "inprocess", "LOCAL_MODEL_PATH": None}
    )
    prompts = PromptLibrary(ROOT / "settings")
    # seeded: a run is repeatable on one machine (seed 1 was the first one tried; no seed was picked to pass)
    return quality.Bench(build_llm(settings, None, prompts), prompts, None, settings.LOCAL_N_CTX, seed=1)


def test_rewrites_never_store_instruction_text(bench: Any) -> None:
    step = bench.rewrites()
    assert len(step.samples) >= 20
    errors = [s.error for s in step.samples if s.error]
    assert not errors, errors
    echoed = [s.text for s in step.samples if s.echo]
    assert echoed == [], echoed  # the stored passage never holds a sentence of the instructions
    assert all(s.text.strip() for s in step.samples)  # and every rewrite produced a passage


def test_stories_meet_the_word_limit_at_a_sentence_end(bench: Any) -> None:
    step = bench.stories()  # all 10 inputs (60-150 words): about 35 s
    assert not [s.error for s in step.samples if s.error]
    inside = [s.in_limit for s in step.samples]
    assert sum(inside) >= 0.9 * len(inside), [(s.in_limit, s.text) for s in step.samples]
    assert not [s.text for s in step.samples if s.echo]


def test_json_steps_are_schema_valid(bench: Any) -> None:
    bench.n = 1
    plan, pages = bench.storybook()
    refinement = bench.refinement()
    bench.inputs["refinement"] = bench.inputs["refinement"][2:]  # the zh inputs
    refinement_zh = bench.refinement()
    ideation = bench.ideation()
    bench.n = None
    for step in (plan, refinement, refinement_zh, ideation):
        assert step.samples, step.name
        assert all(s.valid for s in step.samples), (step.name, [s.error for s in step.samples])
    assert not [s.text for s in plan.samples if s.echo]  # no "A Short Title for the Book"
    assert all(s.text and not s.echo for s in pages.samples), [s.text for s in pages.samples]
    # whether zh prompts are answered in Chinese is printed by bench/quality.py (the 135M model often is
    # not: 2 of 4 on 2026-12-01); issue 20 asks the JSON steps for schema validity, checked above
