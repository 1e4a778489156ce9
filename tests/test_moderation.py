"""Moderation: OpenAI's endpoint through the fake (flagged / not flagged, retries, a server without
the endpoint), the local keyword check (honestly named), which one the settings pick, and the
`generations` record of every moderation call."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from agent.llm import LLM, CallContext
from agent.llm.moderation import LocalKeywordModerator, NoModerator, OpenAIModerator, build_moderator
from agent.llm.providers.openai_compat import OpenAICompatProvider
from agent.records import GenerationRecorder
from agent.types import ModelError
from config import load_settings

CTX = CallContext(app="storybook", user="alice", session="s9", step="moderate story")


def _text_only_provider() -> Any:
    """A stand-in chat provider with no moderation endpoint (like the embedded local model)."""
    return SimpleNamespace(name="local", model="tiny", supports_vision=False)


def test_openai_moderation_flagged_and_not_flagged(openai_app: Any, fake_openai: Any) -> None:
    svc = openai_app.extensions["services"]
    assert isinstance(svc.llm.moderator, OpenAIModerator)  # MODERATION=auto with the openai provider
    fake_openai.flag_words = {"dragonfire"}

    flagged = svc.llm.moderate("The dragonfire burns the village", CTX)
    clean = svc.llm.moderate("A kitten naps in the sun", {"app": "storybook", "user": "bob"})

    assert flagged["flagged"] is True and flagged["categories"] == ["violence"]
    assert flagged["provider"] == "openai-moderation" and flagged["scores"] == {"violence": 0.98}
    assert clean["flagged"] is False and clean["categories"] == []
    reqs = [r for r in fake_openai.requests if r["kind"] == "moderations"]
    assert [r["path"] for r in reqs] == ["/v1/moderations", "/v1/moderations"]
    assert reqs[0]["json"]["input"] == "The dragonfire burns the village"
    docs = {d["user"]: d for d in svc.db.generations.find({"kind": "moderation"})}
    assert set(docs) == {"alice", "bob"}
    assert docs["alice"]["flagged"] is True and docs["alice"]["provider"] == "openai-moderation"
    assert (
        docs["alice"]["prompt"] == "The dragonfire burns the village"
        and docs["alice"]["step"] == "moderate story"
    )
    assert docs["alice"]["output"]["categories"] == ["violence"] and docs["bob"]["flagged"] is False
    assert str(docs["alice"]["_id"]) == flagged["generation_id"]


def test_moderation_is_retried_like_chat(openai_app: Any, fake_openai: Any) -> None:
    svc = openai_app.extensions["services"]
    fake_openai.fail_next(500, endpoint="moderations")
    fake_openai.fail_next(429, retry_after=0, endpoint="moderations")
    result = svc.llm.moderate("hello", CTX)
    assert result["flagged"] is False
    assert len([r for r in fake_openai.requests if r["kind"] == "moderations"]) == 3
    doc = svc.db.generations.find_one({"kind": "moderation"})
    assert doc["attempts"] == 3 and [r["status"] for r in doc["retries"]] == [500, 429]


def test_moderation_failure_is_a_model_error_and_recorded(
    make_app: Callable[..., Any], fake_openai: Any
) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, LLM_MAX_RETRIES=1)
    svc = app.extensions["services"]
    fake_openai.fail_next(503, times=2, endpoint="moderations")
    with pytest.raises(ModelError) as info:
        svc.llm.moderate("hello", CTX)
    assert info.value.status == 503 and "gave up after 2 attempts" in info.value.message
    doc = svc.db.generations.find_one({"kind": "moderation"})
    assert doc["status"] == "failed" and doc["attempts"] == 2 and doc["error"]["status"] == 503
    fake_openai.fail_next(400, endpoint="moderations")
    with pytest.raises(ModelError, match="1 attempt"):
        svc.llm.moderate("hello again", CTX)


def test_server_without_moderation_endpoint_falls_back_to_keywords(openai_app: Any, fake_openai: Any) -> None:
    """Ollama/vLLM/llama.cpp answer 404 on /v1/moderations: the local check is used, and says so."""
    svc = openai_app.extensions["services"]
    fake_openai.fail_next(404, endpoint="moderations")
    first = svc.llm.moderate("thinking about suicide", CTX)
    second = svc.llm.moderate("a sunny day", CTX)

    assert first["flagged"] is True and first["provider"] == "local-keyword-check" and "note" in first
    assert second["flagged"] is False and second["provider"] == "local-keyword-check"
    assert len([r for r in fake_openai.requests if r["kind"] == "moderations"]) == 1  # remembered
    providers = {d["provider"] for d in svc.db.generations.find({"kind": "moderation"})}
    assert providers == {"local-keyword-check"}


def test_local_keyword_moderator() -> None:
    mod = LocalKeywordModerator(extra_words=["grue"])
    assert mod.name == "local-keyword-check"

    hit = mod.moderate("The knight wanted to Behead the dragon")
    assert hit == {
        "flagged": True,
        "categories": ["violence"],
        "matches": ["behead"],
        "provider": "local-keyword-check",
    }
    assert mod.moderate("child porn")["categories"] == ["sexual/minors"]  # the longer phrase wins
    assert mod.moderate("我不想活了，想自杀")["categories"] == ["self-harm"]  # CJK: no word boundaries
    assert mod.moderate("A grue lurks")["categories"] == ["custom"]
    for clean in ("A trip to Essex and Sussex", "The therapist helped", "", "Sextant navigation"):
        assert mod.moderate(clean)["flagged"] is False, clean


def test_llm_without_remote_moderation_uses_local_check_and_records(db: Any) -> None:
    llm = LLM(_text_only_provider(), recorder=GenerationRecorder(db))  # no moderator given
    result = llm.moderate("a massacre", CTX)
    assert result["flagged"] is True and result["provider"] == "local-keyword-check"
    doc = db.generations.find_one({"kind": "moderation"})
    assert doc["provider"] == "local-keyword-check" and doc["flagged"] is True and doc["app"] == "storybook"


@pytest.mark.parametrize(
    ("overrides", "provider_name", "expected"),
    [
        ({"MODERATION": "auto"}, "openai", OpenAIModerator),
        ({"MODERATION": "auto"}, "local", LocalKeywordModerator),
        ({"MODERATION": "auto"}, "azure", LocalKeywordModerator),  # Azure OpenAI has no moderation endpoint
        ({"MODERATION": "auto", "OPENAI_API_KEY": "sk-x"}, "azure", OpenAIModerator),
        ({"MODERATION": "local"}, "openai", LocalKeywordModerator),
        ({"MODERATION": "off"}, "openai", NoModerator),
    ],
)
def test_build_moderator_choice(
    fake_openai: Any, overrides: dict[str, Any], provider_name: str, expected: type
) -> None:
    settings = load_settings({"OPENAI_BASE_URL": fake_openai.url, **overrides}, use_env=False)
    if provider_name == "local":
        provider = _text_only_provider()
    else:
        provider = OpenAICompatProvider.openai(base_url=fake_openai.url, api_key="k", model="m", timeout=5)
        provider.name = provider_name
    assert isinstance(build_moderator(settings, provider), expected)


def test_moderation_openai_without_an_openai_endpoint_is_a_config_error() -> None:
    settings = load_settings({"MODERATION": "openai"}, use_env=False)
    with pytest.raises(ValueError, match="MODERATION=openai"):
        build_moderator(settings, _text_only_provider())


def test_azure_with_openai_key_moderates_through_openai(
    make_app: Callable[..., Any], fake_openai: Any
) -> None:
    app = make_app(
        LLM_PROVIDER="azure",
        AZURE_OPENAI_ENDPOINT=fake_openai.base,
        AZURE_OPENAI_API_KEY="az",
        AZURE_OPENAI_DEPLOYMENT="dep",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="sk-mod",
    )
    fake_openai.flag_words = {"dragonfire"}
    result = app.extensions["services"].llm.moderate("dragonfire!", CTX)
    assert result["flagged"] is True and result["provider"] == "openai-moderation"
    req = [r for r in fake_openai.requests if r["kind"] == "moderations"][-1]
    assert req["path"] == "/v1/moderations" and req["headers"]["authorization"] == "Bearer sk-mod"
