"""Output quality of every app's model steps, on fixed inputs, through the apps' own code path.

    python bench/quality.py [--provider local|openai] [--model smollm2-135m|gemma3-270m] [--n N] [--json]

Each step renders the real template from settings/ (agent/prompts/library.py) and calls the LLM front door
(agent/llm.py) with the schema and post-processing the app uses (storyteller replies pass the app's
sentence gate; page texts the storybook's clean_page), so the figures are what a participant gets.
Inputs: bench/quality_inputs.yaml. `--provider openai` uses OPENAI_BASE_URL / OPENAI_API_KEY / LLM_MODEL
(any OpenAI-compatible server). `--n` caps the inputs per step (the rewrite step has 20).

Per step: schema-valid rate (JSON steps), instruction-echo rate (the output contains a >= 6-word
sentence of the rendered instructions, case-insensitive; "raw" = before the app's filter), word-limit
adherence (within +-20% of the asked words AND ending at a sentence end), repeated 4-gram share, language
match (zh prompts answered with >= 50% CJK characters), tokens/s, latency mean/p95, first-token mean.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.llm import LLM  # noqa: E402
from agent.llm.build import build_llm  # noqa: E402
from agent.prompts import PromptLibrary  # noqa: E402
from agent.textcheck import (  # noqa: E402
    cjk_share,
    copies_instructions,
    ends_at_sentence_end,
    find_echo,
    instruction_sentences,
    repeated_ngram_share,
    split_sentences,
    strip_echo,
    strip_meta,
    template_sentences,
    word_count,
)
from agent.types import ChatResult, ModelError  # noqa: E402
from apps.refinement.pipeline import exact_counts  # noqa: E402
from apps.storybook.book_prompts import plan_schema  # noqa: E402
from apps.storybook.text_cleanup import (  # noqa: E402
    clean_page,
    clean_title,
    page_instructions,
    plan_title,
)
from apps.storyteller.reply_gate import gated_reply, prompt_instructions, story_params, token_cap  # noqa: E402
from apps.storyteller.selection import rewrite_variables  # noqa: E402
from config import load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INPUTS = Path(__file__).resolve().with_name("quality_inputs.yaml")


@dataclass
class Sample:
    """One model call's output and the checks on it (None = not applicable to this step)."""

    text: str
    result: ChatResult | None
    valid: bool | None = None
    echo: bool = False
    raw_echo: bool | None = None
    in_limit: bool | None = None
    zh_ok: bool | None = None
    error: str | None = None
    asked: int | None = None  # words asked for (story steps)


@dataclass
class Step:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def rate(self, attr: str) -> str:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        if not values:
            return "-"
        return f"{sum(bool(v) for v in values)}/{len(values)}"

    def row(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.result is not None]
        lat = sorted(s.result.latency_ms for s in ok if s.result)
        first = [s.result.first_token_ms for s in ok if s.result and s.result.first_token_ms is not None]
        tokens = sum(int((s.result.usage or {}).get("completion_tokens") or 0) for s in ok if s.result)
        seconds = sum(lat) / 1000
        return {
            "step": self.name,
            "n": len(self.samples),
            "errors": sum(1 for s in self.samples if s.error),
            "schema_valid": self.rate("valid"),
            "echo": self.rate("echo"),
            "raw_echo": self.rate("raw_echo"),
            "word_limit": self.rate("in_limit"),
            "repeat_4gram": round(statistics.mean(repeated_ngram_share(s.text) for s in ok), 3)
            if ok
            else None,
            "zh_match": self.rate("zh_ok"),
            "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else None,
            "latency_mean_s": round(statistics.mean(lat) / 1000, 2) if lat else None,
            "latency_p95_s": round(lat[max(0, math.ceil(0.95 * len(lat)) - 1)] / 1000, 2) if lat else None,
            "first_token_ms": round(statistics.mean(first)) if first else None,
        }


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    return [str(m.get("content") or "") for m in messages if isinstance(m.get("content"), str)]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _schema_descriptions(schema: dict[str, Any]) -> list[str]:
    out = []
    if isinstance(schema, dict):
        if isinstance(schema.get("description"), str):
            out.append(schema["description"])
        for v in schema.values():
            if isinstance(v, dict):
                out += _schema_descriptions(v)
    return out


class Bench:
    """Runs the steps against one LLM front door (the configured provider)."""

    def __init__(
        self, llm: LLM, prompts: PromptLibrary, n: int | None, local_ctx: int | None, seed: int | None = None
    ) -> None:
        self.llm = llm
        self.seed = seed  # set: every call gets seed, seed+1, ... (repeatable runs; the tests use it)
        self._calls = 0
        self.prompts = prompts
        self.n = n
        self.local_ctx = local_ctx
        self.inputs = yaml.safe_load(INPUTS.read_text(encoding="utf-8"))

    def _seeded(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        out = dict(params or {})
        if self.seed is not None:
            out["seed"] = self.seed + self._calls
            self._calls += 1
        return out

    def _take(self, items: list[Any]) -> list[Any]:
        return items[: self.n] if self.n else items

    def _json(self, template: str, variables: dict[str, Any], schema: dict[str, Any]) -> tuple[Any, Sample]:
        rendered = self.prompts.render(template, variables)
        try:
            result = self.llm.chat(
                template=template, variables=variables, schema=schema, params=self._seeded()
            )
        except ModelError as exc:
            return None, Sample(text="", result=None, valid=False, error=exc.message)
        data = result.data
        try:
            jsonschema.validate(data, schema)
            valid = True
        except jsonschema.ValidationError:
            valid = False
        texts = _texts(rendered.messages) + _schema_descriptions(schema)
        sentences = instruction_sentences(texts)
        strings = _strings(data)
        echo = any(find_echo(s, sentences) for s in strings)
        zh = None
        if (self.prompts.get(template).language or "") == "zh" or "/zh/" in template:
            zh = cjk_share(" ".join(strings)) >= 0.5
        return data, Sample(text=" ".join(strings), result=result, valid=valid, echo=echo, zh_ok=zh)

    # ---- storybook
    def storybook(self) -> tuple[Step, Step]:
        plan_step, page_step = Step("storybook plan"), Step("storybook pages")
        tpl = self.prompts.get("storybook/plan")
        for item in self._take(self.inputs["storybook"]):
            variables = {
                "description": item["description"],
                "pages": item["pages"],
                "language": "",
                "style": "",
                "setting": "",
                "main_character": None,
                "characters": [],
            }
            data, sample = self._json(
                "storybook/plan", variables, plan_schema(tpl.schema or {}, item["pages"])
            )
            if data:
                # the title the app stores: one copied from the instructions ("A Short Title for the
                # Book") is replaced by the idea; raw_echo says how often the model copied one
                rendered = self.prompts.render("storybook/plan", variables)
                body = " ".join(_texts(rendered.messages)).replace(item["description"], "\n")
                raw_title = str(data.get("title") or "")
                data["title"] = plan_title(raw_title, body, item["description"])
                sentences = instruction_sentences(_texts(rendered.messages))
                sample.raw_echo = sample.echo or copies_instructions(clean_title(raw_title), body)
                sample.echo = copies_instructions(data["title"], body) or any(
                    find_echo(x, sentences) for x in _strings(data)
                )
            plan_step.samples.append(sample)
            if not data:
                continue
            summaries = [str(p.get("summary") or "") for p in data.get("pages") or []]
            characters = [f"{c.get('name')}: {c.get('appearance')}" for c in data.get("characters") or []]
            previous = ""
            for i, summary in enumerate(summaries, start=1):
                page_vars = {
                    "title": clean_title(str(data.get("title") or "")),
                    "description": item["description"],
                    "setting": str(data.get("setting") or ""),
                    "characters": characters,
                    "plan": summaries,
                    "page": i,
                    "pages": len(summaries),
                    "summary": summary,
                    "previous": previous,
                    "language": "",
                }
                page_step.samples.append(self._page(page_vars))
                previous = page_step.samples[-1].text
        return plan_step, page_step

    def _page(self, variables: dict[str, Any]) -> Sample:
        try:
            stream = self.llm.chat(
                template="storybook/page", variables=variables, stream=True, params=self._seeded()
            )
            raw = "".join(stream)
        except ModelError as exc:
            return Sample(text="", result=None, error=exc.message)
        # the app's own cleaning (storybook/text_cleanup.py), then the check on what it stores
        dropped = page_instructions(self.prompts, variables)
        text = clean_page(strip_echo(raw, dropped))
        rendered = self.prompts.render("storybook/page", variables)
        values = [v for v in variables.values() if isinstance(v, str)] + list(variables["plan"])
        sentences = template_sentences(_texts(rendered.messages), values)
        meta = strip_meta(text) != text  # "Here's the page text with two short sentences:"
        return Sample(
            text=text,
            result=stream.result,
            echo=bool(find_echo(text, sentences)) or meta,
            raw_echo=bool(find_echo(raw, sentences)) or strip_meta(raw.strip()) != raw.strip(),
        )

    # ---- storyteller
    def _story_call(self, kind: str, template: str, variables: dict[str, Any], words: int) -> Sample:
        rendered = self.prompts.render(template, variables)
        if kind == "rewrite":  # the same settings as storyteller's plan_stream
            params: dict[str, Any] = {"max_tokens": token_cap(words + 8, 24, self.local_ctx)}
        else:
            params = story_params(words, self.local_ctx)
        try:
            reply = gated_reply(
                self.llm,
                kind=kind,
                template=template,
                variables=variables,
                messages=rendered.messages,
                params=self._seeded(params),
                word_limit=words,
            )
        except ModelError as exc:
            return Sample(text="", result=None, error=exc.message)
        sentences = prompt_instructions(kind, rendered.messages, variables)
        n = word_count(reply.text)
        in_limit = 0.8 * words <= n <= 1.2 * words and ends_at_sentence_end(reply.text)
        return Sample(
            text=reply.text,
            result=reply.result,
            echo=bool(find_echo(reply.text, sentences)),
            raw_echo=bool(find_echo(reply.raw, sentences)),
            in_limit=in_limit if kind != "rewrite" else None,
            asked=words,
        )

    def stories(self) -> Step:
        step = Step("storyteller story")
        for item in self._take(self.inputs["stories"]):
            step.samples.append(self._story_call("generated", "storyteller/story", item, item["max_words"]))
        return step

    def rewrites(self) -> Step:
        step = Step("storyteller rewrite")
        cases = []
        for entry in self.inputs["rewrite_stories"]:
            sentences = split_sentences(entry["text"])
            for index in entry["select"]:
                before = " ".join(sentences[:index]) + (" " if index else "")
                after = (" " + " ".join(sentences[index + 1 :])) if index + 1 < len(sentences) else ""
                cases.append((entry["prompt"], before, sentences[index], after))
        for prompt, before, selected, after in self._take(cases):
            variables = rewrite_variables(prompt, before, selected, after)
            step.samples.append(
                self._story_call("rewrite", "storyteller/rewrite", variables, variables["words"])
            )
        return step

    # ---- refinement type 0 and ideation
    def refinement(self) -> Step:
        step = Step("refinement type-0 texts")
        for item in self._take(self.inputs["refinement"]):
            lang, num = item["language"], item["num"]
            name = f"refinement/{lang}/products"
            schema = exact_counts(self.prompts.get(name).schema or {}, {"products": num})
            data, sample = self._json(
                name, {"stage": "rapid", "task": item["task"], "scheme": "", "num": num}, schema
            )
            step.samples.append(sample)
            if not data:
                continue
            name = f"refinement/{lang}/concept_texts"
            schema = exact_counts(self.prompts.get(name).schema or {}, {"texts": num})
            _, sample = self._json(name, {"stage": "rapid", "products": data["products"]}, schema)
            step.samples.append(sample)
        return step

    def ideation(self) -> Step:
        step = Step("ideation brief")
        tpl = self.prompts.get("ideation/brief_new")
        for item in self._take(self.inputs["ideation"]):
            schema = json.loads(json.dumps(tpl.schema))
            schema["properties"]["briefs"]["minItems"] = schema["properties"]["briefs"]["maxItems"] = item[
                "n"
            ]
            _, sample = self._json("ideation/brief_new", item, schema)
            sample.zh_ok = cjk_share(sample.text) >= 0.5 if sample.result else False
            step.samples.append(sample)
        return step


COLUMNS = [
    ("step", "step"),
    ("n", "n"),
    ("errors", "err"),
    ("schema_valid", "schema ok"),
    ("echo", "echo"),
    ("raw_echo", "raw echo"),
    ("word_limit", "in limit"),
    ("repeat_4gram", "rep 4g"),
    ("zh_match", "zh ok"),
    ("tokens_per_s", "tok/s"),
    ("latency_mean_s", "lat s"),
    ("latency_p95_s", "p95 s"),
    ("first_token_ms", "1st ms"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (the README quotes it)."""
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[k] is None else str(row[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", choices=["local", "openai"], default="local")
    ap.add_argument("--model", default=None, help="local: smollm2-135m | gemma3-270m; openai: the model name")
    ap.add_argument("--n", type=int, default=None, help="at most N inputs per step")
    ap.add_argument("--steps", default="storybook,stories,rewrites,refinement,ideation")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--show", action="store_true", help="print every output (flagged: ECHO / OUT)")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = {"LLM_PROVIDER": args.provider, "LOCAL_LLM_MODE": "inprocess"}
    if args.model and args.provider == "local":
        overrides["LOCAL_MODEL"] = args.model
    elif args.model:
        overrides["LLM_MODEL"] = args.model
    settings = load_settings(overrides)
    prompts = PromptLibrary(ROOT / "settings")
    llm = build_llm(settings, None, prompts)
    local_ctx = settings.LOCAL_N_CTX if args.provider == "local" else None
    bench = Bench(llm, prompts, args.n, local_ctx)
    start = time.perf_counter()
    steps: list[Step] = []
    for name in args.steps.split(","):
        out = getattr(bench, name.strip())()
        steps.extend(out if isinstance(out, tuple) else [out])
    rows = [s.row() for s in steps]
    load = os.getloadavg()
    print(
        f"# bench/quality.py --provider {args.provider} model={llm.provider.model} n={args.n or 'all'} "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.perf_counter() - start:.0f} s, load {load[0]:.2f}"
    )
    print(table(rows))
    for s in steps:
        for sample in s.samples:
            if sample.error:
                print(f"error in {s.name}: {sample.error[:200]}")
    if args.show:
        for s in steps:
            for sample in s.samples:
                flag = "ECHO " if sample.echo else "" + ("OUT " if sample.in_limit is False else "")
                size = f"({word_count(sample.text)}/{sample.asked} words) " if sample.asked else ""
                print(f"[{s.name}] {flag}{size}{sample.text[:150]!r} ... {sample.text[-80:]!r}")
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
