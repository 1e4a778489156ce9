"""`/health` tells the truth: every part a request needs is probed for real, cached, bounded (issue 14)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port

PROGRESS = "/sdapi/v1/progress"


def _models_calls(fake_openai: Any) -> int:
    return sum(1 for r in list(fake_openai.requests) if r["kind"] == "models")


def _pings(fake_sd: Any) -> int:
    return sum(1 for r in list(fake_sd.requests) if r["path"] == PROGRESS)


def _health(app: Any) -> tuple[int, dict[str, Any]]:
    resp = app.test_client().get("/health")
    return resp.status_code, resp.get_json()


@pytest.fixture
def healthy(make_app: Callable[..., Any], fake_openai: Any, fake_sd: Any) -> Callable[..., Any]:
    """An app whose every part works: the fake OpenAI server, one fake SD WebUI, the real templates."""

    def make(**overrides: Any) -> Any:
        return make_app(
            **{
                "LLM_PROVIDER": "openai",
                "OPENAI_BASE_URL": fake_openai.url,
                "OPENAI_API_KEY": "k",
                "LLM_MODEL": "fake-model",
                "IMAGE_PROVIDER": "sdwebui",
                "SD_INSTANCES": fake_sd.url,
                **overrides,
            }
        )

    return make


def _problem(body: dict[str, Any], part: str) -> dict[str, Any]:
    found = [p for p in body.get("problems", []) if p["part"] == part]
    assert found, body
    return found[0]


def test_ok_with_working_fakes(healthy: Callable[..., Any], fake_openai: Any, fake_sd: Any) -> None:
    status, body = _health(healthy())
    assert status == 200, body
    assert body["status"] == "ok" and "problems" not in body
    assert all(body[part]["ok"] for part in ("database", "model", "images", "prompts"))
    assert body["model"]["provider"] == "openai" and body["model"]["model_listed"] is True
    assert body["images"]["provider"] == "sdwebui" and body["images"]["answering"] == 1
    assert body["images"]["instances"][0]["answers"] is True
    assert body["prompts"]["templates"] > 10
    assert _models_calls(fake_openai) == 1 and _pings(fake_sd) == 1  # it really asked both


def test_unreachable_sd_instances_are_not_ok(healthy: Callable[..., Any]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    status, body = _health(healthy(SD_INSTANCES=dead))
    assert status == 503 and body["status"] == "degraded"
    problem = _problem(body, "images")
    assert dead in problem["error"] and "SD_INSTANCES" in problem["remedy"]
    assert body["images"]["ok"] is False and body["images"]["instances"][0]["answers"] is False
    assert body["model"]["ok"] and body["database"]["ok"]  # only the broken part is blamed
    assert time.monotonic() - start < 5


def test_a_hung_sd_instance_is_not_ok(healthy: Callable[..., Any], fake_sd: Any) -> None:
    app = healthy()
    fake_sd.hang = True  # accepts connections, never answers: only the ping's timeout catches it
    start = time.monotonic()
    status, body = _health(app)
    assert status == 503 and "within 2 s" in _problem(body, "images")["error"]
    assert time.monotonic() - start < 5
    fake_sd.hang = False


def test_one_answering_instance_is_enough(healthy: Callable[..., Any], fake_sd: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    status, body = _health(healthy(SD_INSTANCES=f"{dead},{fake_sd.url}"))
    assert status == 200, body
    assert body["images"]["answering"] == 1


def test_unreachable_openai_base_url_is_not_ok(healthy: Callable[..., Any]) -> None:
    status, body = _health(healthy(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1"))
    assert status == 503 and body["status"] == "degraded"
    problem = _problem(body, "model")
    assert "cannot reach openai" in problem["error"] and "OPENAI_BASE_URL" in problem["remedy"]


def test_rejected_api_key_is_not_ok(make_app: Callable[..., Any]) -> None:
    from tests.fakes.fake_openai import FakeOpenAI

    with FakeOpenAI(api_key="the-right-key") as fake:
        app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake.url, OPENAI_API_KEY="a-wrong-key")
        status, body = _health(app)
    assert status == 503 and "401" in _problem(body, "model")["error"]


def test_azure_model_is_probed(make_app: Callable[..., Any], fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="azure",
        AZURE_OPENAI_ENDPOINT=fake_openai.base,
        AZURE_OPENAI_API_KEY="az",
        AZURE_OPENAI_DEPLOYMENT="dep",
    )
    status, body = _health(app)
    assert status == 200, body
    (call,) = [r for r in fake_openai.requests if r["kind"] == "models"]
    assert (
        call["path"] == "/openai/models"
        and call["headers"]["api-key"] == "az"
        and "api-version" in call["args"]
    )


def test_openai_images_are_probed(make_app: Callable[..., Any], fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", IMAGE_PROVIDER="openai"
    )
    status, body = _health(app)
    assert status == 200 and body["images"]["provider"] == "openai" and body["images"]["ok"]
    assert _models_calls(fake_openai) == 2  # the model's and the images' endpoints, each asked once
    fake_openai.fail_next(503, times=2, endpoint="models")
    app.extensions["health"].cache_s = 0
    status, body = _health(app)
    assert status == 503 and {p["part"] for p in body["problems"]} == {"model", "images"}


def _broken_prompts(tmp_path: Path) -> tuple[Path, Path]:
    prompts = tmp_path / "settings"
    shutil.copytree(ROOT / "settings", prompts)
    broken = prompts / "storybook" / "page.j2"
    good = broken.read_text()
    broken.write_text(good.replace("{{", "{% if %}{{", 1))  # a Jinja syntax error
    return prompts, broken


def test_broken_template_is_not_ok_and_fixing_it_is_seen(healthy: Callable[..., Any], tmp_path: Path) -> None:
    prompts, broken = _broken_prompts(tmp_path)
    app = healthy(PROMPTS_DIR=str(prompts), HEALTH_CACHE_S=0)
    status, body = _health(app)
    assert status == 503 and body["status"] == "degraded"
    problem = _problem(body, "prompts")
    assert "storybook/page" in problem["error"] and "flask prompts check" in problem["remedy"]
    assert body["prompts"]["errors"][0].startswith("storybook/page")
    shutil.copy(ROOT / "settings" / "storybook" / "page.j2", broken)  # the designer fixes it
    status, body = _health(app)
    assert status == 200, body


def test_empty_prompt_dir_is_not_ok(healthy: Callable[..., Any], tmp_path: Path) -> None:
    status, body = _health(healthy(PROMPTS_DIR=str(tmp_path)))
    assert status == 503 and "no templates" in _problem(body, "prompts")["error"]


def test_the_check_is_cached(healthy: Callable[..., Any], fake_openai: Any, fake_sd: Any) -> None:
    app = healthy()
    client = app.test_client()
    assert client.get("/health").status_code == 200
    assert client.get("/health").status_code == 200
    assert _models_calls(fake_openai) == 1 and _pings(fake_sd) == 1  # the second answer came from the cache
    fake_sd.dead = True  # the instance dies: still "ok" within the cache time, the truth after it
    app.extensions["health"].cache_s = 0.2
    time.sleep(0.3)
    resp = client.get("/health")
    assert resp.status_code == 503 and _problem(resp.get_json(), "images")
    assert _models_calls(fake_openai) == 2


def test_a_hanging_model_server_costs_the_timeout_once(healthy: Callable[..., Any], fake_openai: Any) -> None:
    fake_openai.hang_next(times=5, endpoint="models")
    app = healthy(HEALTH_TIMEOUT_S=2, HEALTH_CACHE_S=0)
    start = time.monotonic()
    status, body = _health(app)
    assert time.monotonic() - start < 4  # the timeout (2 s), not the probe's own 3 s
    assert status == 503 and "still checking" in _problem(body, "model")["error"]
    assert body["images"]["ok"] and body["prompts"]["ok"]  # the other parts answered meanwhile
    status, body = _health(app)
    assert status == 503
    assert _models_calls(fake_openai) == 1  # the probe still running was waited for, not started again


def test_a_model_that_cannot_run_is_not_ok(make_app: Callable[..., Any], tmp_path: Path) -> None:
    """The embedded model's self-test (a child process) fails on a file llama.cpp cannot run."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 4096)
    app = make_app(
        LLM_PROVIDER="local", LOCAL_MODEL_PATH=str(broken), LOCAL_LLM_MODE="inprocess", HEALTH_TIMEOUT_S=60
    )
    status, body = _health(app)
    assert status == 503 and body["status"] == "degraded", body
    problem = _problem(body, "model")
    assert body["model"]["selftest"] == "failed" and problem["error"] and problem["remedy"]
