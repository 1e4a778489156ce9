"""chat(): the one way every app talks to a language model.

Give it messages, or a template name + variables (rendered from settings/); get back
text, a JSON value validated against a schema (one repair retry when the model's
reply does not parse or validate), or a stream of text deltas. Every call is
retried with exponential backoff on 429/5xx/timeouts, capped in concurrency, and
written to `generations`, failures included.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jsonschema
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from agent.records import GenerationRecorder
from agent.types import ChatResult, LLMProvider, Message, ModelError

log = logging.getLogger(__name__)

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)


@dataclass
class CallContext:
    """Who a call is for; stored with its record."""

    app: str | None = None
    user: str | None = None
    session: str | None = None
    job: str | None = None
    step: str | None = None


def parse_json_text(text: str) -> Any:
    """Parse a model's JSON reply, tolerating code fences and prose around one object/array."""
    candidate = text.strip()
    match = _FENCE.match(candidate)
    if match:
        candidate = match.group(1).strip()
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        starts = [i for i in (candidate.find("{"), candidate.find("[")) if i >= 0]
        if not starts:
            raise
        start = min(starts)
        end = max(candidate.rfind("}"), candidate.rfind("]"))
        return json.loads(candidate[start : end + 1])


def _attach_images(messages: list[Message], images: list[str]) -> list[Message]:
    """Add image parts (data URLs or http URLs) to the last user message."""
    if not images:
        return messages
    out = [dict(m) for m in messages]
    for msg in reversed(out):
        if msg.get("role") == "user":
            content = msg.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            msg["content"] = [*({"type": "image_url", "image_url": {"url": url}} for url in images), *parts]
            break
    return out


class ChatStream:
    """Iterator of text deltas; `.result` is set once it is exhausted."""

    def __init__(self, llm: LLM, messages: list[Message], params: dict[str, Any], record: dict[str, Any]) -> None:
        self._llm = llm
        self._messages = messages
        self._params = params
        self._record = record
        self.result: ChatResult | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        llm = self._llm
        start = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        attempts = 0
        error: ModelError | None = None
        try:
            with llm._slot():
                while True:
                    attempts += 1
                    try:
                        for delta in llm.provider.stream(self._messages, params=self._params):
                            if not delta:
                                continue
                            if first is None:
                                first = (time.perf_counter() - start) * 1000
                            pieces.append(delta)
                            yield delta
                        break
                    except ModelError as exc:
                        # retry only while nothing reached the client: a half-shown text can't be redone
                        if pieces or not exc.retryable or attempts > llm.max_retries:
                            error = exc
                            raise
                        time.sleep(llm.backoff(attempts))
        finally:
            self.text = "".join(pieces)
            latency = (time.perf_counter() - start) * 1000
            self.result = ChatResult(text=self.text, provider=llm.provider.name, model=llm.provider.model,
                                     latency_ms=latency, first_token_ms=first, attempts=attempts,
                                     usage={"completion_tokens": len(pieces)})
            self.result.generation_id = llm.recorder.record(
                kind="chat", provider=llm.provider.name, model=llm.provider.model,
                messages=self._messages, params=self._params, output=self.text or None,
                error=error.to_dict() if error else None, latency_ms=latency, usage=self.result.usage,
                extra={"stream": True, "first_token_ms": first, "attempts": attempts}, **self._record,
            )


class LLM:
    """The chat front door: retries, JSON validation, streaming, concurrency cap, records."""

    def __init__(self, provider: LLMProvider, *, prompts: Any = None, recorder: GenerationRecorder | None = None,
                 max_retries: int = 3, retry_base_s: float = 0.5, max_concurrency: int = 8,
                 moderator: Any = None) -> None:
        self.provider = provider
        self.prompts = prompts
        self.recorder = recorder or GenerationRecorder(None)
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self._sem = threading.BoundedSemaphore(max(1, max_concurrency))
        self.moderator = moderator

    def backoff(self, attempt: int) -> float:
        return min(8.0, self.retry_base_s * (2 ** (attempt - 1)))

    @contextmanager
    def _slot(self) -> Iterator[None]:
        self._sem.acquire()
        try:
            yield
        finally:
            self._sem.release()

    def _call(self, messages: list[Message], params: dict[str, Any], schema: dict[str, Any] | None) -> ChatResult:
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential_jitter(initial=self.retry_base_s, max=8.0, jitter=self.retry_base_s / 2),
            retry=retry_if_exception(lambda e: isinstance(e, ModelError) and e.retryable),
            reraise=True,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts += 1
                    with self._slot():
                        result = self.provider.complete(messages, params=params, json_schema=schema)
        except RetryError as exc:  # pragma: no cover - reraise=True re-raises the ModelError
            raise exc.last_attempt.exception() from exc  # type: ignore[misc]
        result.attempts = attempts
        return result

    def chat(self, messages: list[Message] | None = None, *, template: str | None = None,
             variables: dict[str, Any] | None = None, sample: str | None = None,
             schema: dict[str, Any] | None = None, json_output: bool | None = None,
             params: dict[str, Any] | None = None, images: list[str] | None = None,
             context: CallContext | None = None, stream: bool = False) -> ChatResult | ChatStream:
        """Run one chat call. Returns ChatResult (text, .data for JSON) or a ChatStream."""
        ctx = context or CallContext()
        merged: dict[str, Any] = {}
        template_name = template_hash = None
        if template is not None:
            if self.prompts is None:
                raise ModelError("no prompt library configured", provider=self.provider.name)
            rendered = self.prompts.render(template, variables or {}, sample=sample)
            messages = rendered.messages
            merged.update(rendered.params or {})
            template_name, template_hash = rendered.name, rendered.hash
            if schema is None and rendered.response_format == "json":
                schema = rendered.schema or {"type": "object"}
        if not messages:
            raise ValueError("chat() needs messages or a template")
        merged.update({k: v for k, v in (params or {}).items() if v is not None})
        if json_output and schema is None:
            schema = {"type": "object"}
        messages = _attach_images(messages, images or [])
        record = {"app": ctx.app, "user": ctx.user, "session": ctx.session, "job": ctx.job,
                  "template": template_name, "template_hash": template_hash}
        if stream:
            return ChatStream(self, messages, merged, record)
        return self._complete(messages, merged, schema, record, ctx)

    def _complete(self, messages: list[Message], params: dict[str, Any], schema: dict[str, Any] | None,
                  record: dict[str, Any], ctx: CallContext) -> ChatResult:
        start = time.perf_counter()
        try:
            result = self._call(messages, params, schema)
            if schema is not None:
                result.data = self._validated(result, messages, params, schema)
        except ModelError as exc:
            self.recorder.record(kind="chat", provider=self.provider.name, model=self.provider.model,
                                 messages=messages, params=params, error=exc.to_dict(),
                                 latency_ms=(time.perf_counter() - start) * 1000,
                                 extra={"step": ctx.step, "schema": schema is not None}, **record)
            raise
        result.latency_ms = (time.perf_counter() - start) * 1000
        result.generation_id = self.recorder.record(
            kind="chat", provider=result.provider, model=result.model, messages=messages, params=params,
            output=result.text, latency_ms=result.latency_ms, usage=result.usage,
            extra={"step": ctx.step, "data": result.data, "attempts": result.attempts, "notes": result.notes,
                   "schema": schema is not None},
            **record,
        )
        return result

    def _validated(self, result: ChatResult, messages: list[Message], params: dict[str, Any],
                   schema: dict[str, Any]) -> Any:
        """Parse + validate; on failure ask once for a corrected reply."""
        if result.data is not None:
            candidate, problem = result.data, self._problem(result.data, schema)
        else:
            candidate, problem = self._parse(result.text, schema)
        if problem is None:
            return candidate
        repair = [*messages, {"role": "assistant", "content": result.text},
                  {"role": "user", "content": f"That reply was not valid: {problem}. Reply again with only JSON "
                                              f"that matches this JSON Schema, no prose:\n{json.dumps(schema, ensure_ascii=False)}"}]
        log.info("JSON reply invalid (%s); asking once for a repair", problem)
        second = self._call(repair, params, schema)
        result.attempts += second.attempts
        result.notes.append(f"repaired after: {problem}")
        result.text = second.text
        for key, value in second.usage.items():
            result.usage[key] = result.usage.get(key, 0) + value
        candidate, problem = (second.data, self._problem(second.data, schema)) if second.data is not None \
            else self._parse(second.text, schema)
        if problem is not None:
            raise ModelError(f"the model's reply did not match the expected JSON after one repair: {problem}",
                             provider=self.provider.name, retryable=False)
        return candidate

    def _parse(self, text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
        try:
            value = parse_json_text(text)
        except (json.JSONDecodeError, ValueError) as exc:
            return None, f"not JSON ({exc})"
        return value, self._problem(value, schema)

    @staticmethod
    def _problem(value: Any, schema: dict[str, Any]) -> str | None:
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            return f"{where}: {exc.message}"
        return None

    def health(self) -> dict[str, Any]:
        try:
            return self.provider.health()
        except Exception as exc:  # noqa: BLE001 - health reports any failure as text
            return {"ok": False, "provider": self.provider.name, "error": str(exc)}


def get_llm() -> LLM:
    """The app's LLM inside an app context (CLI), else one built from settings (no records)."""
    from flask import current_app, has_app_context

    if has_app_context() and "services" in current_app.extensions:
        return current_app.extensions["services"].llm
    from agent.factory import build_llm
    from agent.prompts import default_library
    from config import load_settings

    return build_llm(load_settings(), None, default_library())
