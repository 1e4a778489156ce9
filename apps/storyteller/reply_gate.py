"""The gate every story and rewrite reply streams through, and the token budgets sized from words.

The gate drops echoed instructions and repeated context sentences and stops at a sentence end
near the word limit; `gated_reply` is one such call without a session (bench/quality.py and the
quality tests measure exactly what a participant would be shown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.llm import CallContext
from agent.textcheck import SentenceGate, instruction_sentences, max_tokens_for_words

REWRITE_ATTEMPTS = 2  # a rewrite that was all instruction echo is asked once more, then fails

_CONTEXT_KEYS = ("before", "selected", "after")


def prompt_instructions(kind: str, messages: list[dict[str, Any]], variables: dict[str, Any]) -> list[str]:
    """The instruction sentences of a rendered story/rewrite prompt (what must never reach the story).

    For a rewrite the story's own text (before, selection, after) is cut out first: it is context,
    not instruction, and the selection may legitimately survive in the new passage.
    """
    texts = [str(m.get("content") or "") for m in messages if isinstance(m.get("content"), str)]
    if kind == "rewrite":
        for key in _CONTEXT_KEYS:
            value = str(variables.get(key) or "").strip()
            if value:
                texts = [t.replace(value, "\n") for t in texts]
    return instruction_sentences(texts)


def story_gate(
    kind: str, messages: list[dict[str, Any]], variables: dict[str, Any], word_limit: int | None
) -> SentenceGate:
    """The filter every story and rewrite reply streams through: no echoed instruction, no repeated
    context sentence (a rewrite that pastes the text after it), complete sentences near the word limit."""
    drop = prompt_instructions(kind, messages, variables)
    if kind == "rewrite":
        drop += instruction_sentences([str(variables.get("before") or ""), str(variables.get("after") or "")])
    return SentenceGate(drop, word_limit=word_limit)


def token_cap(words: int, minimum: int, local_ctx: int | None = None) -> int:
    """max_tokens sized from the word limit (+20% and the sentence that crosses it), not a blind 2x.

    The reply is then cut back to its last sentence end (`SentenceGate`), so it never ends mid-sentence.
    `local_ctx`: the embedded model's context, which prompt + reply must fit.
    """
    cap = max_tokens_for_words(words, minimum=minimum)
    if local_ctx is not None:
        cap = min(cap, max(minimum, local_ctx - 512))
    return cap


def story_params(words: int, local_ctx: int | None = None) -> dict[str, Any]:
    """A whole story's length settings: max_tokens from the word limit; on the embedded model also
    `min_tokens` (no end token before about 85% of the words: SmolLM2 ends "100 words" after 30)."""
    params: dict[str, Any] = {"max_tokens": token_cap(words, 64, local_ctx)}
    if local_ctx is not None:
        params["min_tokens"] = math.ceil(1.1 * words)
    return params


@dataclass
class GatedReply:
    """A story or rewrite reply as the app stores it (`text`), with the model's raw output beside it."""

    text: str
    raw: str
    result: Any
    dropped: list[str]


def gated_reply(
    llm: Any,
    *,
    kind: str,
    template: str,
    variables: dict[str, Any],
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    word_limit: int | None,
    context: CallContext | None = None,
) -> GatedReply:
    """One story/rewrite call through the same gate and retry as `run_stream`, without a session:
    what bench/quality.py and the quality tests measure is what a participant would be shown."""
    raw = ""
    text = ""
    result: Any = None
    dropped: list[str] = []
    for attempt in range(1, REWRITE_ATTEMPTS + 1):
        gate = story_gate(kind, messages, variables, word_limit)
        call = dict(params)
        if attempt > 1:
            call["seed"] = attempt
        stream = llm.chat(template=template, variables=variables, params=call, context=context, stream=True)
        out: list[str] = []
        try:
            for delta in stream:
                out.append(gate.feed(delta))
                if gate.full:
                    break
        finally:
            stream.close()
        result = stream.result
        out.append(gate.finish(truncated=bool(result and result.finish_reason == "length") or gate.full))
        raw, text, dropped = stream.text, "".join(out).strip(), gate.dropped
        if text or kind != "rewrite":
            break
    return GatedReply(text=text, raw=raw, result=result, dropped=dropped)
