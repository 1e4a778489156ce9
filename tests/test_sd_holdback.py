"""A call queued behind a running image is held back until that image is about to end (`holdback.py`),
and moves to an instance that goes idle meanwhile. Real fake WebUIs over HTTP, the real pool on the
embedded database; each test also runs with holding back off (SD_SEND_AHEAD_S=0) to show it can fail."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from agent.images.sdwebui.holdback import seconds_left
from agent.images.sdwebui.provider import SDPoolProvider
from agent.types import ImageResult, ModelError
from tests.test_sd_pool import make_provider, req, wait_until  # noqa: F401 - make_provider is a fixture


def providers(request: pytest.FixtureRequest) -> Callable[..., SDPoolProvider]:
    """test_sd_pool's make_provider fixture (imported above), closed after the test."""
    return request.getfixturevalue("make_provider")


def start(provider: SDPoolProvider, prompt: str, out: dict[str, ImageResult]) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.__setitem__(prompt, provider.generate(req(prompt))))
    thread.start()
    return thread


@pytest.mark.parametrize("send_ahead_s", [0.3, 0.0])
def test_a_call_queued_behind_a_running_image_is_sent_shortly_before_it_ends(
    fake_sd_fleet: Any, request: pytest.FixtureRequest, send_ahead_s: float
) -> None:
    (fake,) = fake_sd_fleet(1, delay=1.2)
    provider = providers(request)([fake], send_ahead_s=send_ahead_s)
    out: dict[str, ImageResult] = {}
    first = start(provider, "first", out)
    wait_until(lambda: fake.running == 1, what="the first image running")
    second = start(provider, "second", out)
    first.join(10)
    second.join(10)
    a, b = fake.generation_requests()
    assert b["start"] < a["gen_end"]  # either way it was inside before the running one ended: no gap
    assert b["gen_start"] - a["gen_end"] < 0.2
    if send_ahead_s:
        assert b["start"] - a["gen_start"] > 0.5  # held back: sent about 0.3 s before the end (of 1.2 s)
    else:
        assert b["start"] - a["gen_start"] < 0.5  # sent at once, as before
    assert fake.max_running == 1 and fake.max_concurrent_seen == 2


@pytest.mark.parametrize("send_ahead_s", [0.3, 0.0])
def test_a_held_back_call_moves_to_an_instance_that_goes_idle(
    fake_sd_fleet: Any, request: pytest.FixtureRequest, send_ahead_s: float
) -> None:
    fleet = fake_sd_fleet(2, delay=1.6)
    provider = providers(request)(fleet, send_ahead_s=send_ahead_s)
    out: dict[str, ImageResult] = {}
    long_one = start(provider, "long", out)
    x = wait_until(lambda: next((f for f in fleet if f.running), None), what="the long image running")
    y = next(f for f in fleet if f is not x)
    y.delay = 0.3
    short_one = start(provider, "short", out)
    wait_until(lambda: y.running == 1, what="the short image running on the other instance")
    queued = start(provider, "queued", out)  # no idle instance: the seat behind the long image
    for thread in (long_one, short_one, queued):
        thread.join(10)
    if send_ahead_s:
        assert out["queued"].instance == y.url  # it moved when the short one's instance went idle
        assert len(x.generation_requests()) == 1 and x.max_concurrent_seen == 1
        assert (
            y.generation_requests()[1]["end"] < x.generation_requests()[0]["gen_end"]
        )  # done before the long one
    else:
        assert out["queued"].instance == x.url  # sent at once: it waited behind the long one
        assert x.max_concurrent_seen == 2
    assert all(r.attempts == 1 for r in out.values())
    docs = list(provider.pool.db.sd_instances.find())
    assert all(d["holder"] is None and d.get("holder_1") is None for d in docs)  # every seat freed


def test_a_held_back_call_is_not_sent_once_shutdown_began(
    fake_sd_fleet: Any, request: pytest.FixtureRequest
) -> None:
    (fake,) = fake_sd_fleet(1, delay=1.5)
    provider = providers(request)([fake])
    out: dict[str, ImageResult] = {}
    errors: list[ModelError] = []
    first = start(provider, "first", out)
    wait_until(lambda: fake.running == 1, what="the first image running")

    def second() -> None:
        try:
            provider.generate(req("second"))
        except ModelError as exc:
            errors.append(exc)

    held = threading.Thread(target=second)
    held.start()
    db = provider.pool.db
    wait_until(lambda: db.sd_instances.find_one({"holder_1": {"$ne": None}}), what="the seat behind it")
    provider.pool.interrupt_held()  # shutdown: the running one is ours, so it is stopped too
    first.join(10)
    held.join(10)
    assert [e.status for e in errors] == [503]
    assert len(fake.generation_requests()) == 1  # the held-back call never reached the WebUI
    assert db.sd_instances.find_one({"holder_1": {"$ne": None}}) is None  # and its seat was freed


def test_seconds_left_reads_the_webui_progress() -> None:
    idle = {"progress": 0.0, "eta_relative": 0.0, "state": {"job": "", "job_count": 0}}
    starting = {"progress": 0.0, "eta_relative": None, "state": {"job": "txt2img", "job_count": 1}}
    running = {"progress": 0.5, "eta_relative": 2.5, "state": {"job": "Batch 1 out of 1", "job_count": 1}}
    assert seconds_left(idle) == 0.0
    assert seconds_left(starting) is None  # no sampling step done: the WebUI cannot estimate yet
    assert seconds_left(running) == 2.5
    assert seconds_left({}) == 0.0
