"""LLM: the one way every app talks to a language model (chat, stream, JSON, moderate).

Give it messages, or a template name + variables (rendered from settings/); get back text, a JSON
value validated against a schema (one repair retry when the model's reply does not parse or
validate), or a stream of text deltas. Every call:

- is retried with exponential backoff (agent.llm.retries) on 429/5xx/timeouts/broken connections,
  waiting what a `Retry-After` header asks (capped); other 4xx fail at once;
- runs under two concurrency caps (agent.llm.slots): one per process and one shared by every
  worker on every host (`llm_slots` in MongoDB);
- is written to `generations` (agent.records), failures and cancelled streams included.

Failures reach the apps as one `ModelError` whose message names the provider, the HTTP status
(when there was one) and how many attempts were made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pymongo.database import Database

from agent.call_context import CallContext
from agent.llm.json_reply import check_schema, checked, repair_request
from agent.llm.messages import NO_VISION_NOTE, attach_images, check_messages, drop_images
from agent.llm.moderation import LocalKeywordModerator
from agent.llm.retries import RetryPolicy, Tracker, error_dict
from agent.llm.slots import CallSlots, GlobalSlots
from agent.llm.streaming import ChatStream
from agent.records import GenerationRecord, GenerationRecorder
from agent.types import ChatResult, LLMProvider, Message, ModelError

log = logging.getLogger(__name__)


class LLM:
    """The chat front door: retries, JSON validation, streaming, concurrency caps, records."""

    def __init__(
        self,
        provider: LLMProvider,
        *,
        prompts: Any = None,
        recorder: GenerationRecorder | None = None,
        max_retries: int = 3,
        retry_base_s: float = 0.5,
        retry_max_s: float = 8.0,
        retry_after_cap_s: float = 30.0,
        max_concurrency: int = 8,
        moderator: Any = None,
        db: Database | None = None,
        global_concurrency: int = 32,
        slot_wait_s: float = 60.0,
        slot_lease_s: float = 60.0,
    ) -> None:
        """db + global_concurrency > 0: the cross-process cap in MongoDB (`llm_slots`); db=None: no global cap."""
        self.provider = provider
        self.prompts = prompts
        self.recorder = recorder or GenerationRecorder(db)
        self.retry = RetryPolicy(
            provider.name,
            max_retries=max(0, max_retries),
            base_s=retry_base_s,
            max_s=retry_max_s,
            retry_after_cap_s=retry_after_cap_s,
        )
        global_slots = None
        if db is not None and global_concurrency and global_concurrency > 0:
            global_slots = GlobalSlots(
                db, global_concurrency, lease_s=slot_lease_s, wait_s=slot_wait_s, name=provider.name
            )
        self.slots = CallSlots(provider.name, max_concurrency, slot_wait_s, global_slots)
        self.moderator = moderator
        self._local_moderator: LocalKeywordModerator | None = None
        self.study: Any = None  # agent.studies.StudyAssigner while STUDY is set: variants + param overrides

    @property
    def global_slots(self) -> GlobalSlots | None:
        return self.slots.global_slots

    @property
    def max_concurrency(self) -> int:
        return self.slots.max_concurrency

    # ---- chat

    def chat(
        self,
        messages: list[Message] | None = None,
        *,
        template: str | None = None,
        variables: dict[str, Any] | None = None,
        sample: str | None = None,
        schema: dict[str, Any] | None = None,
        json_output: bool | None = None,
        params: dict[str, Any] | None = None,
        images: list[str | bytes] | None = None,
        context: CallContext | dict[str, Any] | None = None,
        stream: bool = False,
    ) -> ChatResult | ChatStream:
        """Run one chat call. Returns ChatResult (text, .data for JSON) or a ChatStream (iterate deltas).

        template + variables (+ sample): render settings/<app>/<name>.j2; its params apply, `params`
        override them. schema (or the template's `response_format: json` + schema, or json_output=True):
        the reply is parsed and validated, `.data` holds it. json_output=False: plain text even when the
        template asks for JSON. images: data URLs / http(s) URLs / image bytes added to the last user
        message (dropped with a note when the provider has no vision).
        """
        ctx = CallContext.of(context)
        record = GenerationRecord(kind="chat", provider=self.provider.name, context=ctx)
        merged: dict[str, Any] = {}
        assignment = self.study.for_call(ctx.app, ctx.user, ctx.session) if self.study is not None else None
        if template is not None:
            if self.prompts is None:
                raise ModelError("no prompt library configured", provider=self.provider.name)
            chosen = assignment.variant(template) if assignment is not None else None
            if chosen is not None:
                rendered = self.prompts.render(template, variables or {}, sample=sample, variant=chosen)
            else:
                rendered = self.prompts.render(template, variables or {}, sample=sample)
            messages = rendered.messages
            merged.update(rendered.params or {})
            record.template, record.template_hash, record.variant = rendered.name, rendered.hash, chosen
            if schema is None and rendered.response_format == "json":
                schema = rendered.schema or {"type": "object"}
        messages = check_messages(messages)
        merged.update({k: v for k, v in (params or {}).items() if v is not None})
        if assignment is not None:
            merged.update(assignment.params)  # the condition's params win: they are the manipulation
        if json_output is False:
            schema = None
        elif json_output and schema is None:
            schema = {"type": "object"}
        if schema is not None:
            check_schema(schema)
        messages = attach_images(messages, list(images or []))
        notes: list[str] = []
        if not getattr(self.provider, "supports_vision", False):
            messages, dropped = drop_images(messages)
            if dropped:
                notes.append(NO_VISION_NOTE.format(provider=self.provider.name) + f" ({dropped})")
        record.messages, record.params = messages, merged
        if stream:
            if schema is not None:
                raise ValueError("stream=True returns text deltas; JSON output (schema) needs stream=False")
            return ChatStream(self, messages, merged, record, notes)
        return self._complete(messages, merged, schema, record, notes)

    def _complete(
        self,
        messages: list[Message],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        record: GenerationRecord,
        notes: list[str],
    ) -> ChatResult:
        start = time.perf_counter()
        tracker = Tracker()
        repair: dict[str, Any] = {}
        outputs: list[str] = []

        def call(msgs: list[Message]) -> ChatResult:
            def once() -> ChatResult:
                with self.slots.hold(tracker):
                    return self.provider.complete(msgs, params=params, json_schema=schema)

            result = self.retry.run(once, tracker)
            outputs.append(result.text)
            return result

        extra: dict[str, Any] = {"stream": False, "json": schema is not None}
        if schema is not None:
            extra["schema"] = schema
        try:
            result = call(messages)
            if schema is not None:
                result.data = self._validated(result, messages, schema, call, repair)
        except ModelError as exc:
            final = self.retry.final(exc, tracker.attempts)
            record.output = outputs[-1] if outputs else None
            record.error = error_dict(final)
            record.attempts = tracker.attempts
            record.latency_ms = (time.perf_counter() - start) * 1000
            record.model = self.provider.model
            record.extra = {
                **extra,
                "notes": notes,
                "retries": tracker.retries,
                "repair": repair or None,
                "queue_ms": round(tracker.queue_ms, 1),
            }
            self.recorder.save(record)
            raise final from exc
        result.attempts = tracker.attempts
        result.notes = [*notes, *result.notes]
        result.latency_ms = (time.perf_counter() - start) * 1000
        record.provider, record.model = result.provider, result.model
        record.output = result.text
        record.attempts = result.attempts
        record.latency_ms = result.latency_ms
        record.usage = result.usage
        record.extra = {
            **extra,
            "data": result.data,
            "notes": result.notes,
            "retries": tracker.retries,
            "repair": repair or None,
            "queue_ms": round(tracker.queue_ms, 1),
        }
        result.generation_id = self.recorder.save(record)
        return result

    def _validated(
        self,
        result: ChatResult,
        messages: list[Message],
        schema: dict[str, Any],
        call: Callable[[list[Message]], ChatResult],
        repair: dict[str, Any],
    ) -> Any:
        """Parse + validate; on failure ask once for a corrected reply (recorded in `repair`)."""
        candidate, problem = checked(result, schema)
        if problem is None:
            return candidate
        repair.update({"problem": problem, "first_output": result.text})
        log.info("%s: JSON reply invalid (%s); asking once for a repair", self.provider.name, problem)
        repair_messages = [
            *messages,
            {"role": "assistant", "content": result.text},
            {"role": "user", "content": repair_request(problem, schema)},
        ]
        second = call(repair_messages)
        result.notes.append(f"repaired after: {problem}")
        result.text = second.text
        result.model = second.model or result.model
        for key, value in second.usage.items():
            result.usage[key] = result.usage.get(key, 0) + value
        candidate, problem = checked(second, schema)
        repair["second_problem"] = problem
        if problem is not None:
            raise ModelError(
                f"{self.provider.name}'s reply did not match the expected JSON, even after one "
                f"repair request: {problem}",
                provider=self.provider.name,
                retryable=False,
            )
        return candidate

    # ---- moderation

    def moderate(self, text: str, context: CallContext | dict[str, Any] | None = None) -> dict[str, Any]:
        """{"flagged", "categories", "provider", ...} from the configured moderator, retried and recorded."""
        moderator = self.moderator
        if moderator is None:
            if self._local_moderator is None:
                self._local_moderator = LocalKeywordModerator()
            moderator = self._local_moderator
        text = text if isinstance(text, str) else str(text)
        name = getattr(moderator, "name", "moderation")
        record = GenerationRecord(
            kind="moderation", provider=name, context=CallContext.of(context), prompt=text
        )
        tracker = Tracker()
        start = time.perf_counter()
        try:
            result = dict(self.retry.run(lambda: moderator.moderate(text), tracker))
        except ModelError as exc:
            final = self.retry.final(exc, tracker.attempts)
            record.error = error_dict(final)
            record.attempts = tracker.attempts
            record.latency_ms = (time.perf_counter() - start) * 1000
            record.extra = {"retries": tracker.retries}
            self.recorder.save(record)
            raise final from exc
        record.latency_ms = (time.perf_counter() - start) * 1000
        record.provider = result.get("provider", name)
        record.model = result.get("model")
        record.output = {k: v for k, v in result.items() if k != "generation_id"}
        record.attempts = tracker.attempts
        record.extra = {"flagged": bool(result.get("flagged")), "retries": tracker.retries}
        result["generation_id"] = self.recorder.save(record)
        return result

    # ---- status

    def health(self) -> dict[str, Any]:
        try:
            out = dict(self.provider.health())
        except Exception as exc:  # noqa: BLE001 - health reports any failure as text
            out = {"ok": False, "provider": self.provider.name, "error": str(exc)}
        out["concurrency"] = {
            "process": self.max_concurrency,
            "global": self.global_slots.size if self.global_slots else None,
        }
        return out

    def close(self) -> None:
        self.slots.close()
