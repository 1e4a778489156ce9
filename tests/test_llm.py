"""agent.llm against the fake OpenAI server over real HTTP: text, templates, JSON + repair,
retries (500, 429 + Retry-After, timeouts), 400 not retried, streaming (deltas, first token,
broken and cancelled streams), Azure, vision, the per-process and the global (MongoDB) caps,
and the `generations` record of every call."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from agent.llm import LLM, CallContext, ChatStream, GlobalSlots, SlotTimeout, parse_json_text
from agent.llm.build import build_llm
from agent.llm.providers.openai_compat import OpenAICompatProvider, parse_retry_after
from agent.prompts import PromptLibrary, default_library
from agent.records import GenerationRecord, GenerationRecorder
from agent.types import ModelError
from config import load_settings
from tests.fakes.pngs import png_bytes
from tests.mongo_commands import CommandLog

USER = [{"role": "user", "content": "Write a haiku about tea."}]
CTX = CallContext(app="storybook", user="alice", session="s1", job="j1", step="title")
TITLE_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "pages": {"type": "integer", "minimum": 1}},
    "required": ["title", "pages"],
    "additionalProperties": False,
}
GREET = """---
description: Greets someone by name.
system: You are terse.
params:
  temperature: 0.2
  max_tokens: 50
samples:
  basic: {name: Ada}
---
Say hello to {{ name }}.
"""
BOOK = """---
description: A book outline as JSON.
response_format: json
schema:
  type: object
  properties:
    title: {type: string, maxLength: 40}
    pages: {type: integer, minimum: 1, maximum: 20}
  required: [title, pages]
samples:
  basic: {topic: cats}
---
Outline a book about {{ topic }}.
"""


@pytest.fixture
def make_llm(fake_openai: Any, db: Any) -> Iterator[Callable[..., LLM]]:
    """make_llm(timeout=5, max_retries=3, vision_model=None, **LLM kwargs) -> LLM on the fake, recording to db."""
    made: list[LLM] = []

    def make(
        *, timeout: float = 5.0, max_retries: int = 3, vision_model: str | None = None, **kwargs: Any
    ) -> LLM:
        provider = OpenAICompatProvider.openai(
            base_url=fake_openai.url,
            api_key="test-key",
            model="fake-model",
            timeout=timeout,
            vision_model=vision_model,
        )
        kwargs.setdefault("recorder", GenerationRecorder(db))
        llm = LLM(provider, max_retries=max_retries, retry_base_s=0.01, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def only_record(db: Any, **query: Any) -> dict[str, Any]:
    docs = list(db.generations.find(query))
    assert len(docs) == 1, docs
    return docs[0]


def write_templates(root: Path) -> PromptLibrary:
    (root / "demo").mkdir(parents=True, exist_ok=True)
    (root / "demo" / "greet.j2").write_text(GREET, encoding="utf-8")
    (root / "demo" / "book.j2").write_text(BOOK, encoding="utf-8")
    return PromptLibrary(root)


def run_parallel(fn: Callable[[int], Any], n: int) -> list[Any]:
    """fn(0..n-1) in n threads released together; results in order; the first error re-raised."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- text and templates


def test_text_completion_is_returned_and_recorded(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    fake_openai.script("Steam rises, leaves unfurl")
    llm = make_llm()
    result = llm.chat(USER, params={"temperature": 0.3, "top_k": 5}, context=CTX)

    assert result.text == "Steam rises, leaves unfurl"
    assert (result.provider, result.model, result.attempts) == ("openai", "fake-model", 1)
    assert result.usage["completion_tokens"] == 4 and result.usage["total_tokens"] > 4
    assert result.latency_ms > 0
    sent = fake_openai.last_chat()
    assert sent["messages"] == USER and sent["model"] == "fake-model" and sent["temperature"] == 0.3
    assert "top_k" not in sent  # OpenAI rejects unknown arguments; it is only recorded
    assert fake_openai.requests[-1]["headers"]["authorization"] == "Bearer test-key"

    doc = only_record(db)
    assert str(doc["_id"]) == result.generation_id
    assert doc["kind"] == "chat" and doc["status"] == "ok" and doc["ok"] is True and doc["error"] is None
    assert (doc["app"], doc["user"], doc["session"], doc["job"], doc["step"]) == (
        "storybook",
        "alice",
        "s1",
        "j1",
        "title",
    )
    assert doc["output"] == "Steam rises, leaves unfurl" and doc["messages"] == USER
    assert doc["params"] == {"temperature": 0.3, "top_k": 5}
    assert doc["usage"] == result.usage and doc["attempts"] == 1 and doc["latency_ms"] > 0
    assert doc["provider"] == "openai" and doc["model"] == "fake-model" and doc["stream"] is False
    assert doc["created_at"] >= doc["started_at"]


def test_template_variables_params_and_hash(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any, tmp_path: Path
) -> None:
    lib = write_templates(tmp_path)
    llm = make_llm(prompts=lib)
    result = llm.chat(
        template="demo/greet", variables={"name": "Grace"}, params={"max_tokens": 20}, context=CTX
    )

    sent = fake_openai.last_chat()
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to Grace."},
    ]
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 20  # call params override the template's
    assert "response_format" not in sent
    assert result.text == "Fake reply to: Say hello to Grace."
    doc = only_record(db)
    assert doc["template"] == "demo/greet" and doc["template_hash"] == lib.get("demo/greet").hash
    assert doc["params"] == {"temperature": 0.2, "max_tokens": 20}

    sampled = llm.chat(template="demo/greet", sample="basic")
    assert sampled.text == "Fake reply to: Say hello to Ada."


def test_json_template_valid_first_time(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any, tmp_path: Path
) -> None:
    llm = make_llm(prompts=write_templates(tmp_path))
    result = llm.chat(template="demo/book", variables={"topic": "owls"}, context=CTX)

    assert isinstance(result.data, dict) and set(result.data) == {"title", "pages"}
    assert 1 <= result.data["pages"] <= 20
    assert len(fake_openai.chat_requests()) == 1 and result.attempts == 1 and result.notes == []
    fmt = fake_openai.last_chat()["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == ["title", "pages"]
    doc = only_record(db)
    assert doc["data"] == result.data and doc["json"] is True and doc["repair"] is None


@pytest.mark.parametrize(
    "bad",
    ["Sure! Here is your outline: title = Owls", {"title": "Owls", "pages": "three"}],
    ids=["not-json", "schema-invalid"],
)
def test_json_invalid_then_repaired(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any, bad: Any
) -> None:
    fake_openai.script(bad, '```json\n{"title": "Owls", "pages": 3}\n```')
    llm = make_llm()
    result = llm.chat(USER, schema=TITLE_SCHEMA, context=CTX)

    assert result.data == {"title": "Owls", "pages": 3}
    chats = fake_openai.chat_requests()
    assert len(chats) == 2 and result.attempts == 2
    repair_msgs = chats[1]["json"]["messages"]
    assert repair_msgs[:-2] == USER and repair_msgs[-2]["role"] == "assistant"
    assert "not valid" in repair_msgs[-1]["content"] and '"pages"' in repair_msgs[-1]["content"]
    assert any(n.startswith("repaired after:") for n in result.notes)
    doc = only_record(db)
    assert doc["status"] == "ok" and doc["attempts"] == 2 and doc["data"] == {"title": "Owls", "pages": 3}
    assert doc["repair"]["first_output"] == (bad if isinstance(bad, str) else json.dumps(bad))
    assert doc["repair"]["problem"] and doc["repair"]["second_problem"] is None
    assert any("repaired after" in n for n in doc["notes"])


def test_json_usage_sums_both_calls(make_llm: Callable[..., LLM], fake_openai: Any) -> None:
    fake_openai.script("nope", {"title": "Owls", "pages": 3})
    result = make_llm().chat(USER, schema=TITLE_SCHEMA)
    first_completion = 1  # "nope"
    assert result.usage["completion_tokens"] > first_completion
    assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    assert result.usage["prompt_tokens"] > 2 * 3  # two requests' prompts, the second longer


def test_json_invalid_twice_raises_and_records(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    fake_openai.script("no JSON here", {"title": 7})
    with pytest.raises(ModelError) as info:
        make_llm().chat(USER, schema=TITLE_SCHEMA, context=CTX)

    assert "even after one repair" in info.value.message and "openai" in info.value.message
    assert info.value.retryable is False
    assert len(fake_openai.chat_requests()) == 2
    doc = only_record(db)
    assert doc["status"] == "failed" and doc["ok"] is False and doc["attempts"] == 2
    assert doc["output"] == '{"title": 7}' and doc["repair"]["first_output"] == "no JSON here"
    assert "even after one repair" in doc["error"]["message"]


def test_json_output_flag_and_array_schema(make_llm: Callable[..., LLM], fake_openai: Any) -> None:
    llm = make_llm()
    assert isinstance(llm.chat(USER, json_output=True).data, dict)
    schema = {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 2}
    result = llm.chat(USER, schema=schema)
    assert isinstance(result.data, list) and len(result.data) == 2
    # OpenAI's json_schema needs an object at the top: the array travels wrapped and comes back unwrapped
    sent = fake_openai.last_chat()["response_format"]["json_schema"]["schema"]
    assert sent["properties"]["value"] == schema
    with pytest.raises(ValueError, match="invalid JSON schema"):
        llm.chat(USER, schema={"type": "not-a-type"})


def test_parse_json_text_tolerates_fences_and_prose() -> None:
    assert parse_json_text('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_text('Here you go: {"a": [1, 2]} hope that helps') == {"a": [1, 2]}
    assert parse_json_text("[1, 2]") == [1, 2]
    with pytest.raises(ValueError):
        parse_json_text("no json at all")


# --------------------------------------------------------------------------- retries


def test_retries_on_500_then_success(make_llm: Callable[..., LLM], fake_openai: Any, db: Any) -> None:
    fake_openai.fail_next(500, times=2)
    result = make_llm().chat(USER, context=CTX)

    assert result.attempts == 3 and result.text.startswith("Fake reply to:")
    assert len(fake_openai.chat_requests()) == 3
    doc = only_record(db)
    assert doc["status"] == "ok" and doc["attempts"] == 3
    assert [r["status"] for r in doc["retries"]] == [500, 500]


def test_429_honours_retry_after(make_llm: Callable[..., LLM], fake_openai: Any, db: Any) -> None:
    fake_openai.fail_next(429, retry_after=0.3)
    result = make_llm().chat(USER)

    assert result.attempts == 2
    first, second = fake_openai.chat_requests()
    assert second["time"] - first["time"] >= 0.28  # the server's 0.3 s, not our 0.01 s backoff
    assert only_record(db)["retries"] == [
        {
            "attempt": 1,
            "error": "openai answered HTTP 429: Rate limit reached for requests (injected by the fake).",
            "status": 429,
            "wait_s": 0.3,
        }
    ]


def test_retry_after_is_capped(make_llm: Callable[..., LLM], fake_openai: Any) -> None:
    fake_openai.fail_next(429, retry_after=60)
    start = time.monotonic()
    result = make_llm(retry_after_cap_s=0.05).chat(USER)
    assert result.attempts == 2 and time.monotonic() - start < 5


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 25 < (parse_retry_after({"retry-after": future}) or 0) <= 30
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_400_is_not_retried(make_llm: Callable[..., LLM], fake_openai: Any, db: Any) -> None:
    fake_openai.fail_next(400)
    with pytest.raises(ModelError) as info:
        make_llm().chat(USER, context=CTX)

    err = info.value
    assert err.status == 400 and err.retryable is False and err.provider == "openai"
    assert "openai" in err.message and "400" in err.message and "1 attempt" in err.message
    assert len(fake_openai.chat_requests()) == 1
    doc = only_record(db)
    assert doc["status"] == "failed" and doc["attempts"] == 1 and doc["error"]["status"] == 400


def test_retries_exhausted_gives_clear_error_and_failed_record(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    fake_openai.fail_next(503, times=10)
    with pytest.raises(ModelError) as info:
        make_llm(max_retries=2).chat(USER, context=CTX)

    err = info.value
    assert err.status == 503 and err.retryable and err.attempts == 3  # type: ignore[attr-defined]
    assert "openai answered HTTP 503" in err.message and "gave up after 3 attempts" in err.message
    assert len(fake_openai.chat_requests()) == 3
    doc = only_record(db)
    assert doc["status"] == "failed" and doc["ok"] is False and doc["attempts"] == 3
    assert doc["error"]["status"] == 503 and "gave up after 3 attempts" in doc["error"]["message"]
    assert doc["output"] is None and len(doc["retries"]) == 2 and doc["app"] == "storybook"


def test_timeout_is_retried_then_model_error(make_llm: Callable[..., LLM], fake_openai: Any, db: Any) -> None:
    fake_openai.delay = 2.0
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        make_llm(timeout=0.2, max_retries=1).chat(USER)
    elapsed = time.monotonic() - start

    assert "timed out after 0.2 s" in info.value.message and "gave up after 2 attempts" in info.value.message
    assert info.value.retryable and elapsed < 1.5
    assert len(fake_openai.chat_requests()) == 2
    assert only_record(db)["status"] == "failed"


def test_timeout_setting_reaches_the_client(make_app: Callable[..., Any], fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, LLM_TIMEOUT_S=0.2, LLM_MAX_RETRIES=0
    )
    fake_openai.delay = 2.0
    with pytest.raises(ModelError, match=r"timed out after 0\.2 s \(1 attempt; retries are off\)"):
        app.extensions["services"].llm.chat(USER)


# --------------------------------------------------------------------------- streaming


def test_stream_deltas_join_and_record_first_token(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    text = "Once upon a time a small robot learned to paint"
    fake_openai.script(text)
    fake_openai.stream_delay = 0.02
    stream = make_llm().chat(USER, stream=True, context=CTX)
    assert isinstance(stream, ChatStream)
    deltas = list(stream)

    assert len(deltas) > 5 and "".join(deltas) == text and stream.text == text
    result = stream.result
    assert result is not None and result.text == text
    assert result.first_token_ms is not None and 0 < result.first_token_ms < result.latency_ms
    assert result.usage["completion_tokens"] == 10  # from the server's usage chunk (include_usage)
    assert fake_openai.last_chat()["stream"] is True
    doc = only_record(db)
    assert str(doc["_id"]) == result.generation_id == stream.generation_id
    assert doc["stream"] is True and doc["status"] == "ok" and doc["output"] == text
    assert doc["first_token_ms"] == result.first_token_ms and doc["deltas"] == len(deltas)
    assert (
        doc["usage"]["completion_tokens"] == 10 and doc["finish_reason"] == "stop" and doc["user"] == "alice"
    )


def test_stream_retried_before_first_delta(make_llm: Callable[..., LLM], fake_openai: Any, db: Any) -> None:
    fake_openai.fail_next(502)
    fake_openai.script("hello there")
    stream = make_llm().chat(USER, stream=True)
    assert "".join(stream) == "hello there"
    assert stream.result is not None and stream.result.attempts == 2
    assert only_record(db)["attempts"] == 2


def test_stream_broken_midway_raises_and_records_partial(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    fake_openai.script("alpha beta gamma delta epsilon")
    fake_openai.drop_stream_after(3)  # the role chunk + two content chunks, then the connection is cut
    stream = make_llm().chat(USER, stream=True, context=CTX)
    got: list[str] = []
    with pytest.raises(ModelError) as info:
        for delta in stream:
            got.append(delta)

    assert "".join(got) == "alpha beta" and stream.text == "alpha beta"
    assert "not retried" in info.value.message and info.value.provider == "openai"
    assert len(fake_openai.chat_requests()) == 1  # text was already shown: no retry
    doc = only_record(db)
    assert doc["status"] == "failed" and doc["output"] == "alpha beta" and doc["deltas"] == 2
    assert "broke after 2 deltas" in doc["error"]["message"]


def test_stream_closed_early_is_recorded_as_cancelled(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    fake_openai.script("one two three four five six seven eight")
    fake_openai.stream_delay = 0.05
    llm = make_llm(db=db, global_concurrency=1)
    with llm.chat(USER, stream=True, context=CTX) as stream:
        first = next(stream)
        assert llm.global_slots is not None and llm.global_slots.held() == 1
    assert first == "one"
    doc = only_record(db)
    assert doc["status"] == "cancelled" and doc["ok"] is False and doc["error"] is None
    assert doc["output"] == "one"
    # both caps were given back: the next call runs at once
    assert llm.global_slots.held() == 0
    assert db.llm_slots.find_one({"_id": "slot-0"})["holder"] is None
    assert llm.chat(USER).text.startswith("Fake reply")


def test_stream_dropped_without_close_frees_its_slots_at_once(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    """A client that went away: the server drops the iterator; no garbage-collector run is needed."""
    fake_openai.script("one two three four five six")
    fake_openai.stream_delay = 0.05
    llm = make_llm(db=db, global_concurrency=1, max_concurrency=1)
    stream = llm.chat(USER, stream=True)
    assert next(stream) == "one"
    assert llm.global_slots is not None and llm.global_slots.held() == 1
    del stream
    assert llm.global_slots.held() == 0
    assert only_record(db)["status"] == "cancelled"
    assert llm.chat(USER, params={"max_tokens": 5}).text  # the process slot is free again too


def test_stream_with_schema_is_refused(make_llm: Callable[..., LLM]) -> None:
    with pytest.raises(ValueError, match="stream=True"):
        make_llm().chat(USER, schema=TITLE_SCHEMA, stream=True)


# --------------------------------------------------------------------------- Azure, vision


def test_azure_provider_hits_the_deployment_path(
    make_app: Callable[..., Any], fake_openai: Any, tmp_path: Path
) -> None:
    write_templates(tmp_path)
    app = make_app(
        LLM_PROVIDER="azure",
        AZURE_OPENAI_ENDPOINT=fake_openai.base,
        AZURE_OPENAI_API_KEY="k",
        AZURE_OPENAI_DEPLOYMENT="dep",
        PROMPTS_DIR=str(tmp_path),
    )
    svc = app.extensions["services"]
    result = svc.llm.chat(template="demo/book", variables={"topic": "bees"}, context=CTX)

    assert result.provider == "azure" and set(result.data) == {"title", "pages"}
    req = fake_openai.chat_requests()[-1]
    assert req["path"] == "/openai/deployments/dep/chat/completions"
    assert req["headers"]["api-key"] == "k" and req["args"]["api-version"]
    assert req["json"]["response_format"]["type"] == "json_schema"
    stream = svc.llm.chat(template="demo/greet", variables={"name": "Bo"}, stream=True)
    assert "".join(stream) == "Fake reply to: Say hello to Bo."  # Azure's filter chunk (no choices) skipped
    docs = list(svc.db.generations.find().sort("created_at", 1))
    assert [d["provider"] for d in docs] == ["azure", "azure"] and docs[0]["template"] == "demo/book"


def test_vision_image_parts_reach_the_model_and_are_scrubbed_in_the_record(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    png = png_bytes(64, 64, "sketch", "sketch")
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    llm = make_llm(vision_model="fake-vision")
    llm.chat([{"role": "user", "content": "Describe this sketch."}], images=[data_url, png])

    sent = fake_openai.last_chat()
    assert sent["model"] == "fake-vision"
    parts = sent["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"] == data_url and parts[1]["image_url"]["url"] == data_url
    assert parts[2]["text"] == "Describe this sketch."
    doc = only_record(db)
    stored = json.dumps(doc["messages"])
    assert base64.b64encode(png).decode()[:40] not in stored and "image/png data URL" in stored
    with pytest.raises(ValueError, match="images="):
        llm.chat(USER, images=["/etc/passwd"])


def test_provider_without_vision_drops_images_with_a_note(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    llm = make_llm()
    llm.provider.supports_vision = False  # e.g. a text-only model behind an OpenAI-compatible server
    png = png_bytes(32, 32, "x")
    result = llm.chat([{"role": "user", "content": "What is in the picture?"}], images=[png])

    assert fake_openai.last_chat()["messages"] == [{"role": "user", "content": "What is in the picture?"}]
    assert result.notes == ["image parts dropped: openai has no vision (1)"]
    assert only_record(db)["notes"] == result.notes


# --------------------------------------------------------------------------- concurrency caps


def test_per_process_cap(make_llm: Callable[..., LLM], fake_openai: Any) -> None:
    fake_openai.delay = 0.25
    llm = make_llm(max_concurrency=2)
    results = run_parallel(lambda i: llm.chat(USER), 6)
    assert all(r.text for r in results)
    assert len(fake_openai.chat_requests()) == 6
    assert fake_openai.max_in_flight == 2


def test_global_cap_across_llm_objects(make_llm: Callable[..., LLM], fake_openai: Any, db: Any) -> None:
    fake_openai.delay = 0.25
    # two "workers": separate LLM objects (own semaphores of 8 each), one database
    a = make_llm(db=db, global_concurrency=2, max_concurrency=8)
    b = make_llm(db=db, global_concurrency=2, max_concurrency=8)
    results = run_parallel(lambda i: (a if i % 2 else b).chat(USER), 6)

    assert all(r.text for r in results)
    assert len(fake_openai.chat_requests()) == 6
    assert fake_openai.max_in_flight == 2
    slots = list(db.llm_slots.find().sort("_id", 1))
    assert [s["_id"] for s in slots] == ["slot-0", "slot-1"] and all(s["holder"] is None for s in slots)
    records = list(db.generations.find())
    assert len(records) == 6 and max(r["queue_ms"] for r in records) > 100  # some waited for a slot


def test_dead_holders_slot_frees_itself_live_holder_blocks(db: Any) -> None:
    slots = GlobalSlots(db, 1, lease_s=5, wait_s=0.3)
    past = datetime.now(UTC) - timedelta(seconds=1)
    db.llm_slots.insert_one({"_id": "slot-0", "holder": "dead-worker:1", "lease_until": past})
    token = slots.acquire()  # the dead worker's lease ran out: taken at once
    assert db.llm_slots.find_one({"_id": "slot-0"})["holder"] == token
    slots.release(token)

    future = datetime.now(UTC) + timedelta(seconds=30)
    db.llm_slots.update_one({"_id": "slot-0"}, {"$set": {"holder": "live-worker:2", "lease_until": future}})
    start = time.monotonic()
    with pytest.raises(SlotTimeout) as info:
        slots.acquire()
    assert 0.25 <= time.monotonic() - start < 2
    assert (
        info.value.status == 503 and info.value.retryable and "LLM_GLOBAL_CONCURRENCY=1" in info.value.message
    )
    slots.close()


def test_a_free_slot_is_taken_with_one_plain_update(mongo_uri: str, db: Any) -> None:
    """The common case (free slots) costs one update by _id, not the find_one_and_update over every slot;
    with every slot but a dead holder's busy, the fallback search still takes the dead one over."""
    log = CommandLog(db.name)
    client: MongoClient = MongoClient(mongo_uri, tz_aware=True, event_listeners=[log])
    try:
        slots = GlobalSlots(client[db.name], 8, lease_s=5, wait_s=0.5)
        slots.acquire()  # creates the slots
        log.clear()
        tokens = [slots.acquire() for _ in range(3)]
        assert log.counts == {("update", "llm_slots"): 3}, log.counts
        held = {d["_id"] for d in db.llm_slots.find({"holder": {"$in": tokens}})}
        assert len(held) == 3  # three different slots, each ours

        past = datetime.now(UTC) - timedelta(seconds=1)
        future = datetime.now(UTC) + timedelta(seconds=30)
        db.llm_slots.update_many(
            {"holder": None}, {"$set": {"holder": "busy-worker:1", "lease_until": future}}
        )
        db.llm_slots.update_one(
            {"holder": "busy-worker:1"}, {"$set": {"holder": "dead-worker:2", "lease_until": past}}
        )
        log.clear()
        token = slots.acquire()
        assert db.llm_slots.find_one({"holder": token})["_id"] not in held
        assert ("findAndModify", "llm_slots") in log.counts  # the fallback found the dead holder's slot
        for t in [*tokens, token]:
            slots.release(t)
        slots.close()
    finally:
        client.close()


def test_lease_is_renewed_while_held(db: Any) -> None:
    holder = GlobalSlots(db, 1, lease_s=0.3, wait_s=0.1)
    other = GlobalSlots(db, 1, lease_s=0.3, wait_s=0.2)
    token = holder.acquire()
    first_until = db.llm_slots.find_one({"_id": "slot-0"})["lease_until"]
    threading.Event().wait(0.9)  # three lease lengths: without renewal the slot would be free
    doc = db.llm_slots.find_one({"_id": "slot-0"})
    assert doc["holder"] == token and doc["lease_until"] > first_until
    with pytest.raises(SlotTimeout):
        other.acquire()
    holder.release(token)
    other.release(other.acquire())
    holder.close()
    other.close()


def test_chat_waits_for_a_global_slot_then_fails_clearly(
    make_llm: Callable[..., LLM], fake_openai: Any, db: Any
) -> None:
    llm = make_llm(db=db, global_concurrency=1, slot_wait_s=0.2)
    future = datetime.now(UTC) + timedelta(seconds=30)
    db.llm_slots.insert_one({"_id": "slot-0", "holder": "busy-worker:9", "lease_until": future})
    with pytest.raises(SlotTimeout) as info:
        llm.chat(USER, context=CTX)
    assert info.value.status == 503 and "slots stayed busy" in info.value.message
    assert fake_openai.chat_requests() == []
    doc = only_record(db)
    assert doc["status"] == "failed" and doc["attempts"] == 1  # waiting already took long: not retried


# --------------------------------------------------------------------------- records, standalone LLM, CLI


def test_record_failure_never_breaks_the_call(fake_openai: Any) -> None:
    dead = MongoClient("mongodb://127.0.0.1:1", serverSelectionTimeoutMS=200, connectTimeoutMS=200)
    try:
        provider = OpenAICompatProvider.openai(base_url=fake_openai.url, api_key="k", model="m", timeout=5)
        llm = LLM(provider, recorder=GenerationRecorder(dead["x"]))
        result = llm.chat(USER)
        assert result.text.startswith("Fake reply") and result.generation_id is None
    finally:
        dead.close()


def test_record_mongodb_refuses_is_kept_reduced(db: Any) -> None:
    recorder = GenerationRecorder(db)
    gid = recorder.save(
        GenerationRecord(
            kind="chat",
            provider="openai",
            output="x",
            extra={"data": {"tags": {"a"}}},
            messages=[{"role": "user", "content": "data:image/png;base64," + "A" * 500}],
        )
    )
    doc = db.generations.find_one()
    assert gid == str(doc["_id"]) and doc["output"] == "x"
    assert doc["reduced"] is True and json.loads(doc["data"]) == {"tags": "{'a'}"}  # BSON has no sets
    assert "A" * 100 not in doc["messages"] and "image/png data URL, 522 chars" in doc["messages"]


def test_llm_built_outside_an_app(openai_app: Any, fake_openai: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PROVIDER", "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.url)
    monkeypatch.setenv("LLM_MODEL", "standalone-model")
    standalone = build_llm(load_settings(), None, default_library())
    assert standalone is not openai_app.extensions["services"].llm
    assert standalone.chat(USER).model == "standalone-model"
    assert standalone.global_slots is None and standalone.recorder.db is None


def test_prompts_run_cli_calls_the_model_and_records(
    make_app: Callable[..., Any], fake_openai: Any, tmp_path: Path
) -> None:
    write_templates(tmp_path)
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, PROMPTS_DIR=str(tmp_path))
    out = app.test_cli_runner().invoke(args=["prompts", "run", "demo/greet", "--var", "name=Lin"])
    assert out.exit_code == 0, out.output
    assert "Fake reply to: Say hello to Lin." in out.output and "provider openai" in out.output
    doc = app.extensions["services"].db.generations.find_one()
    assert doc["template"] == "demo/greet" and doc["user"] == "prompts-cli" and doc["app"] == "demo"


def test_app_llm_uses_the_retry_settings(openai_app: Any, fake_openai: Any) -> None:
    fake_openai.fail_next(500, times=10)
    llm = openai_app.extensions["services"].llm
    with pytest.raises(ModelError) as info:
        llm.chat(USER)
    assert "gave up after 4 attempts" in info.value.message  # LLM_MAX_RETRIES=3 by default
