"""The SD WebUI client and the shared instance pool, against real fake WebUI servers and the embedded MongoDB.

Timeouts, lease lengths and probe backoff are shortened so the whole file runs in well
under a minute; the behaviour under test is the same as with the production values.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from PIL import Image

from agent.images import png_bytes
from agent.images.sdwebui.client import SDClient, SDError, build_payload, decode_first_image
from agent.images.sdwebui.planner import Pick, checkpoint_key, plan_assignment, plan_seats
from agent.images.sdwebui.pool import SDInstancePool
from agent.images.sdwebui.provider import SDPoolProvider
from agent.types import ImageRequest, ModelError
from tests.fakes.fake_sd import FakeSD

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = {
    "timeout_s": 5.0,
    "wait_timeout_s": 10.0,
    "lease_s": 2.0,
    "max_attempts": 3,
    "poll_s": 0.01,
    "probe_base_s": 0.2,
    "probe_max_s": 1.0,
    "ping_timeout_s": 0.5,
}


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll a condition on real state (database, fake server) with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def a_png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    return png_bytes(Image.new("RGB", size, color))


def assert_png(data: bytes, size: tuple[int, int] | None = None) -> None:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if size is not None:
            assert img.size == size


@pytest.fixture
def make_provider(db: Any) -> Iterator[Callable[..., SDPoolProvider]]:
    """make_provider(fakes, **pool_kwargs) -> an SDPoolProvider on the test database (closed afterwards)."""
    made: list[SDPoolProvider] = []

    def make(fakes: list[FakeSD], *, sam: bool = False, **kwargs: Any) -> SDPoolProvider:
        pool = SDInstancePool(db, [f.url for f in fakes], **{**FAST, **kwargs})
        provider = SDPoolProvider(pool, sam_enabled=sam)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def req(prompt: str = "a red bicycle", **kw: Any) -> ImageRequest:
    return ImageRequest(prompt=prompt, width=kw.pop("width", 64), height=kw.pop("height", 64), **kw)


# ---------------------------------------------------------------------------------------------- payloads
def test_payload_txt2img_with_checkpoint_and_extra() -> None:
    endpoint, payload = build_payload(
        ImageRequest(
            prompt="a drone",
            negative_prompt="blurry",
            width=640,
            height=384,
            steps=12,
            cfg_scale=5.5,
            sampler_name="Euler a",
            seed=42,
            checkpoint="v2-1_512-ema-pruned",
            extra={"styles": ["photographic"], "override_settings": {"CLIP_stop_at_last_layers": 2}},
        )
    )
    assert endpoint == "/sdapi/v1/txt2img"
    assert payload["prompt"] == "a drone" and payload["negative_prompt"] == "blurry"
    assert (payload["width"], payload["height"], payload["steps"], payload["cfg_scale"]) == (
        640,
        384,
        12,
        5.5,
    )
    assert payload["sampler_name"] == "Euler a" and payload["seed"] == 42
    # extra is merged last but deeply: our checkpoint override survives next to the extra option
    assert payload["override_settings"] == {
        "sd_model_checkpoint": "v2-1_512-ema-pruned",
        "CLIP_stop_at_last_layers": 2,
    }
    assert payload["override_settings_restore_afterwards"] is False
    assert payload["styles"] == ["photographic"]
    assert "init_images" not in payload and "alwayson_scripts" not in payload
    _, plain = build_payload(ImageRequest(prompt="x"))
    assert "override_settings" not in plain and "sampler_name" not in plain


def test_payload_img2img_mask_and_controlnet_passthrough() -> None:
    init, mask, control = a_png((1, 2, 3)), a_png((255, 255, 255)), a_png((9, 9, 9))
    unit = {
        "enabled": True,
        "module": "lineart_standard",
        "model": "control_v11p_sd15_lineart",
        "weight": 1.0,
        "image": control,
        "processor_res": 64,
        "pixel_perfect": True,
    }
    endpoint, payload = build_payload(
        ImageRequest(
            prompt="scene",
            init_image=init,
            mask=mask,
            inpainting_mask_invert=True,
            denoising_strength=0.6,
            controlnet=[unit],
            extra={"inpainting_fill": 1},
        )
    )
    assert endpoint == "/sdapi/v1/img2img"
    assert base64.b64decode(payload["init_images"][0]) == init
    assert base64.b64decode(payload["mask"]) == mask
    assert payload["inpainting_mask_invert"] == 1 and payload["denoising_strength"] == 0.6
    assert payload["inpainting_fill"] == 1
    (sent,) = payload["alwayson_scripts"]["controlnet"]["args"]
    assert base64.b64decode(sent["image"]) == control  # bytes became base64
    assert {k: v for k, v in sent.items() if k != "image"} == {k: v for k, v in unit.items() if k != "image"}
    assert isinstance(unit["image"], bytes)  # the caller's unit is not modified


def test_decode_first_image_never_returns_empty_bytes() -> None:
    for bad in (
        {},
        {"images": []},
        {"images": [""]},
        {"images": [None]},
        {"images": ["%%not base64%%"]},
        {"images": [base64.b64encode(b"hello").decode()]},
        ["not", "a", "dict"],
    ):
        with pytest.raises(SDError) as err:
            decode_first_image(bad, "http://x")
        assert err.value.kind == "image" and err.value.retryable and err.value.failure == "empty"
    good = a_png()
    assert (
        decode_first_image({"images": ["data:image/png;base64," + base64.b64encode(good).decode()]}) == good
    )
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(jpeg, format="JPEG")
    assert_png(decode_first_image({"images": [base64.b64encode(jpeg.getvalue()).decode()]}), (8, 8))


def test_checkpoint_names_compare_by_name() -> None:
    assert checkpoint_key("v1-5-pruned-emaonly.safetensors [6ce0161689]") == checkpoint_key(
        "v1-5-pruned-emaonly"
    )
    assert checkpoint_key("models/SD/RV.ckpt") == "rv"
    assert checkpoint_key(None) is None


# ---------------------------------------------------------------------------------------------- client
def test_client_talks_to_the_webui(fake_sd: FakeSD) -> None:
    client = SDClient(fake_sd.url, timeout_s=5)
    try:
        assert client.ping()
        assert client.options()["sd_model_checkpoint"] == fake_sd.checkpoint
        assert "v1-5-pruned-emaonly" in [m["model_name"] for m in client.sd_models()]
        client.set_options({"sd_model_checkpoint": "v1-5-pruned-emaonly"})
        assert fake_sd.checkpoint == "v1-5-pruned-emaonly" and fake_sd.switches == 1
        assert "progress" in client.progress()
        client.interrupt()
        endpoint, payload = build_payload(req("a kite"))
        png = decode_first_image(client.txt2img(payload), client.base_url)
        assert_png(png, (64, 64))
        with pytest.raises(SDError) as bad:  # 422: the request's fault, not retried
            client.img2img({"prompt": "no init image"})
        assert bad.value.status == 422 and not bad.value.retryable and bad.value.failure == "client"
        fake_sd.fail_next(500)
        with pytest.raises(SDError) as err:
            client.txt2img(payload)
        assert err.value.status == 500 and err.value.retryable and err.value.failure == "server"
        fake_sd.dead = True
        with pytest.raises(SDError) as dead:
            client.txt2img(payload)
        assert dead.value.failure == "connect" and dead.value.retryable
        assert client.ping() is False
        fake_sd.revive()
        assert client.ping()
    finally:
        client.close()


def test_client_read_timeout_ends_a_hung_call(fake_sd: FakeSD) -> None:
    client = SDClient(fake_sd.url, timeout_s=0.4, ping_timeout_s=0.3)
    fake_sd.hang = True
    try:
        start = time.monotonic()
        with pytest.raises(SDError) as err:
            client.txt2img(build_payload(req())[1])
        assert err.value.failure == "timeout" and err.value.retryable
        assert client.ping() is False
        assert time.monotonic() - start < 2.0
    finally:
        fake_sd.hang = False
        client.close()


# ---------------------------------------------------------------------------------------------- pool basics
def test_txt2img_through_the_pool(fake_sd: FakeSD, make_provider: Callable[..., SDPoolProvider]) -> None:
    provider = make_provider([fake_sd])
    result = provider.generate(req("a lighthouse", width=96, height=80, seed=7))
    assert_png(result.png, (96, 80))
    assert result.provider == "sdwebui" and result.instance == fake_sd.url
    assert result.attempts == 1 and result.seed == 7 and result.wait_ms >= 0
    assert fake_sd.requests[-1]["json"]["prompt"] == "a lighthouse"
    assert provider.stats()["served"] == {fake_sd.url: 1}
    health = provider.health()
    assert health["ok"] and health["up"] == 1 and health["free"] == 1 and health["queue"] == 0
    img = provider.generate(req("scene", init_image=a_png(), mask=a_png((255, 255, 255))))
    assert_png(img.png)
    assert fake_sd.requests[-1]["path"] == "/sdapi/v1/img2img" and fake_sd.requests[-1]["json"]["mask"]


def test_one_generation_per_instance(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    fleet = fake_sd_fleet(2, delay=0.15)
    provider = make_provider(fleet, depth=1)  # one-deep: depth 2 is test_depth_two_*
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda i: provider.generate(req(f"p{i}")), range(6)))
    assert all(r.png[:8] == PNG_SIGNATURE for r in results)
    for fake in fleet:
        assert fake.max_running == 1 and fake.max_concurrent_seen == 1  # nothing queued inside an instance
        assert fake.count >= 1  # both instances served
    assert sum(f.count for f in fleet) == 6
    assert {r.instance for r in results} == {f.url for f in fleet}


def test_two_workers_share_one_view(fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]) -> None:
    """Two providers on one database = two gunicorn workers: still never two generations on one instance."""
    fleet = fake_sd_fleet(3, delay=0.12)
    workers = [make_provider(fleet, depth=1), make_provider(fleet, depth=1)]
    assert workers[0].pool.process_id != workers[1].pool.process_id
    with ThreadPoolExecutor(9) as ex:
        results = list(ex.map(lambda i: workers[i % 2].generate(req(f"w{i}")), range(9)))
    assert len(results) == 9 and all(r.png for r in results)
    for fake in fleet:
        assert fake.max_concurrent_seen == 1 and fake.max_running == 1
        assert fake.count >= 1
    assert workers[0].stats()["total_served"] == 9


def test_generate_many_keeps_request_order(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    fleet = fake_sd_fleet(2, delay=0.05)
    provider = make_provider(fleet)
    results = provider.generate_many([req(f"img{i}", seed=100 + i) for i in range(5)])
    assert [r.seed for r in results] == [100 + i for i in range(5)]
    assert provider.generate_many([]) == []


# ---------------------------------------------------------------------------------------------- fairness
def test_fifo_across_workers(fake_sd: FakeSD, db: Any, make_provider: Callable[..., SDPoolProvider]) -> None:
    """Waiters registered one after another (alternating between two workers) are served in that order."""
    # join_window_s=0: every caller its own entry (by default callers of one process arriving within
    # 20 ms share one, as the images of one request do)
    workers = [
        make_provider([fake_sd], join_window_s=0, depth=1),
        make_provider([fake_sd], join_window_s=0, depth=1),
    ]
    blocker = workers[0].pool.acquire()  # the only instance is busy while the queue forms
    done: list[str] = []
    threads = []
    for i in range(6):

        def run(i: int = i) -> None:
            workers[i % 2].generate(req(f"q{i}"))
            done.append(f"q{i}")

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        wait_until(lambda i=i: db.sd_waiters.count_documents({}) == i + 1, what=f"waiter {i} registered")
    tickets = [d["ticket"] for d in db.sd_waiters.find().sort("ticket", 1)]
    assert tickets == sorted(tickets) and len(set(tickets)) == 6
    workers[0].pool.release(blocker, ok=True)
    for t in threads:
        t.join(10)
    served = [r["json"]["prompt"] for r in fake_sd.requests]
    assert served == [f"q{i}" for i in range(6)]
    assert sorted(done) == served
    assert fake_sd.max_concurrent_seen == 1


def test_images_of_one_request_share_a_queue_entry(
    fake_sd: FakeSD, db: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    """generate_many's images wait as one entry (want = M): fewer queue documents, same FIFO order."""
    # callers of one process arriving within join_window_s share an entry (widened: a busy test machine
    # may start the three threads further apart than the default 20 ms)
    first = make_provider([fake_sd], join_window_s=0.5, depth=1)
    second = make_provider([fake_sd], depth=1)
    blocker = first.pool.acquire()
    batch = threading.Thread(target=first.generate_many, args=([req(f"batch{i}") for i in range(3)],))
    batch.start()
    entry = wait_until(lambda: db.sd_waiters.find_one({"want": 3}), what="one entry wanting 3")
    assert db.sd_waiters.count_documents({}) == 1
    later = threading.Thread(target=second.generate, args=(req("later"),))
    later.start()
    wait_until(lambda: db.sd_waiters.count_documents({}) == 2, what="the later caller's entry")
    assert db.sd_waiters.find_one({"_id": {"$ne": entry["_id"]}})["ticket"] > entry["ticket"]
    first.pool.release(blocker, ok=True)
    batch.join(10)
    later.join(10)
    served = [r["json"]["prompt"] for r in fake_sd.requests]
    assert sorted(served[:3]) == ["batch0", "batch1", "batch2"] and served[3] == "later"
    assert fake_sd.max_concurrent_seen == 1
    wait_until(lambda: db.sd_waiters.count_documents({}) == 0, what="served entries to be deleted")


def test_plan_gives_free_instances_to_the_oldest_waiters() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    instances = [
        {"_id": "a", "state": "up", "holder": None, "checkpoint": "A"},
        {"_id": "b", "state": "up", "holder": None, "checkpoint": "B"},
        {"_id": "c", "state": "up", "holder": "x", "lease_until": now + timedelta(seconds=5)},  # busy
        {"_id": "d", "state": "down", "holder": None},
        {"_id": "e", "state": "up", "holder": "dead", "lease_until": now - timedelta(seconds=1)},  # expired
    ]
    waiters = [
        {"_id": "w1", "checkpoint": "B"},
        {"_id": "w2", "checkpoint": None},
        {"_id": "w3", "checkpoint": "A", "exclude": ["a"]},
        {"_id": "w4"},
    ]
    plan = dict(plan_assignment(waiters, instances, now))
    # w1 gets the B instance; w2 the idle-longest of the rest; w3 avoids `a` (failed it) -> what is left
    assert plan["w1"] == "b"
    assert set(plan) == {"w1", "w2", "w3"} and set(plan.values()) == {"a", "b", "e"}
    assert plan["w3"] != "a"
    # a waiter whose every up instance is excluded still gets one (a pool of one must be able to retry)
    only = [{"_id": "a", "state": "up", "holder": None}]
    assert plan_assignment([{"_id": "w", "exclude": ["a"]}], only, now) == [("w", "a")]
    # an entry wanting 2 (two images of one request) is served twice before the next entry
    two = [{"_id": "r1", "want": 2}, {"_id": "r2", "want": 1}, {"_id": "r0", "want": 0}]
    assert [e for e, _ in plan_assignment(two, instances, now)] == ["r1", "r1", "r2"]


# ---------------------------------------------------------------------------------------------- leases
def test_lease_is_renewed_while_a_long_generation_runs(
    fake_sd: FakeSD, make_provider: Callable[..., SDPoolProvider]
) -> None:
    fake_sd.delay = 1.2
    a, b = make_provider([fake_sd], lease_s=0.4, depth=1), make_provider([fake_sd], lease_s=0.4, depth=1)
    first = threading.Thread(target=a.generate, args=(req("long"),))
    first.start()
    wait_until(lambda: fake_sd.requests, what="the first generation to start")
    second = b.generate(req("second"))  # must wait for the first, not steal an "expired" lease
    first.join()
    assert second.wait_ms > 800
    assert fake_sd.max_concurrent_seen == 1


def test_expired_lease_frees_the_instance(
    fake_sd: FakeSD, db: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    """A holder that stops renewing (its process is gone) loses the instance when the lease runs out."""
    dying = make_provider([fake_sd], lease_s=0.6, depth=1)
    lease = dying.pool.acquire()
    dying.pool.release_held = lambda: 0  # type: ignore[method-assign] - a crashed process frees nothing
    dying.close()  # the watcher stops: the lease is never renewed nor released
    assert db.sd_instances.find_one({"_id": fake_sd.url})["holder"] == lease.id
    other = make_provider([fake_sd], lease_s=0.6, depth=1)
    start = time.monotonic()
    result = other.generate(req("after the crash"))
    assert result.instance == fake_sd.url
    assert 0.2 < time.monotonic() - start < 3.0
    assert result.wait_ms > 200  # it had to wait for the lease to run out
    assert db.sd_instances.find_one({"_id": fake_sd.url})["holder"] is None


KILLED_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
from pymongo import MongoClient
from agent.images.sdwebui.pool import SDInstancePool
from agent.images.sdwebui.provider import SDPoolProvider
from agent.types import ImageRequest
db = MongoClient(sys.argv[2], tz_aware=True)[sys.argv[3]]
pool = SDInstancePool(db, [sys.argv[4]], lease_s=1.0, timeout_s=60, poll_s=0.01, depth=1)
SDPoolProvider(pool).generate(ImageRequest(prompt="from the doomed worker", width=64, height=64))
"""


def test_lease_expires_after_a_worker_is_killed(
    fake_sd: FakeSD, db: Any, mongo_uri: str, make_provider: Callable[..., SDPoolProvider]
) -> None:
    fake_sd.hang = True  # the doomed worker's generation never finishes
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, str(ROOT), mongo_uri, db.name, fake_sd.url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: fake_sd.requests, timeout=30, what="the worker's generation to reach the instance")
        holder = db.sd_instances.find_one({"_id": fake_sd.url})["holder"]
        assert holder and f":{proc.pid}:" in holder
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    fake_sd.hang = False  # the orphaned request drains; the instance's lease is still the dead worker's
    start = time.monotonic()
    result = make_provider([fake_sd], lease_s=1.0, depth=1).generate(req("survivor"))
    assert result.instance == fake_sd.url and result.png[:8] == PNG_SIGNATURE
    assert time.monotonic() - start < 3.0  # lease 1 s: the instance came free soon after the kill
    assert db.sd_instances.find_one({"_id": fake_sd.url})["holder"] is None


# ---------------------------------------------------------------------------------------------- faults
def test_dead_instance_is_skipped_marked_down_and_probed_back(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    dead, alive = fake_sd_fleet(2, delay=0.03)
    dead.dead = True
    provider = make_provider([dead, alive])
    results = provider.generate_many([req(f"d{i}") for i in range(8)])
    for r in results:
        assert_png(r.png, (64, 64))  # never an empty image
        assert r.instance == alive.url
    assert max(r.attempts for r in results) == 2  # whoever met the dead one went elsewhere
    rows = {row["url"]: row for row in provider.health()["instances"]}
    assert rows[dead.url]["state"] == "down" and "refused" in (rows[dead.url]["last_error"] or "").lower()
    assert rows[alive.url]["state"] == "up"
    dead.revive()

    def dead_one_used_again() -> bool:
        provider.generate_many([req("after revive a"), req("after revive b")])
        return dead.count > 0

    wait_until(dead_one_used_again, timeout=10, what="the revived instance to be probed and used")
    assert {row["url"]: row["state"] for row in provider.health()["instances"]}[dead.url] == "up"


def test_hung_instance_times_out_and_work_moves_on(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    hung, ok = fake_sd_fleet(2, delay=0.05)
    hung.hang = True
    provider = make_provider([hung, ok], timeout_s=0.6, depth=1)  # depth 2: test_depth_two_hung_*
    start = time.monotonic()
    results = provider.generate_many([req(f"h{i}") for i in range(4)])
    elapsed = time.monotonic() - start
    assert elapsed < 0.6 + 4 * 0.05 + 1.0  # about the timeout, not forever
    assert all(r.instance == ok.url and r.png[:8] == PNG_SIGNATURE for r in results)
    assert max(r.attempts for r in results) == 2
    health = {row["url"]: row for row in provider.health()["instances"]}
    assert health[hung.url]["state"] == "down" and "within" in health[hung.url]["last_error"]
    # while it stays hung, its probes time out and it is not used again
    provider.generate_many([req("later 1"), req("later 2")])
    assert len([r for r in hung.requests if r["path"].endswith("txt2img")]) == 1


def test_failed_generation_is_retried_elsewhere_and_recorded(
    make_app: Any, fake_sd_fleet: Any, fake_openai: Any
) -> None:
    first, second = sorted(
        fake_sd_fleet(2), key=lambda f: f.url
    )  # a fresh pool hands out the lowest URL first
    first.fail_next(500)
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        IMAGE_PROVIDER="sdwebui",
        SD_INSTANCES=f"{first.url},{second.url}",
        SD_TIMEOUT_S=5,
        SD_WAIT_TIMEOUT_S=5,
    )
    svc = app.extensions["services"]
    result = svc.image_provider.generate(req("retry me", context={"app": "test", "user": "u1"}))
    assert result.attempts == 2 and result.instance == second.url
    assert "500" in result.info["errors"][0]
    record = svc.db.generations.find_one({"_id": ObjectId(result.generation_id)})
    assert record["ok"] and record["attempts"] == 2 and record["instance"] == second.url
    assert record["provider"] == "sdwebui" and record["output"]["image_id"] == result.image_id
    assert svc.images.load(result.image_id) == result.png
    doc = svc.db.sd_instances.find_one({"_id": first.url})
    assert doc["failures"] == 1 and doc["state"] == "up"  # one 5xx is not enough to mark it down
    health = app.test_client().get("/health").get_json()["images"]
    assert health["provider"] == "sdwebui" and health["up"] == 2


def test_empty_image_is_retried_never_returned(
    fake_sd_fleet: Any, fake_sd: FakeSD, make_provider: Callable[..., SDPoolProvider], db: Any
) -> None:
    first, second = sorted(fake_sd_fleet(2), key=lambda f: f.url)
    first.empty_images_next(1)
    result = make_provider([first, second]).generate(req("not empty"))
    assert result.instance == second.url and result.attempts == 2
    assert_png(result.png, (64, 64))
    # a lone instance that keeps answering empty images: an error, and after 2 in a row it is down
    fake_sd.empty_images_next(5)
    lone = make_provider([fake_sd], max_attempts=2)
    with pytest.raises(ModelError) as err:
        lone.generate(req("nothing"))
    assert err.value.kind == "image" and "empty" in err.value.message and "2 attempts" in err.value.message
    doc = db.sd_instances.find_one({"_id": fake_sd.url})
    assert doc["state"] == "down" and "empty" in doc["last_error"]


def test_wait_timeout_when_every_instance_is_down(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    fleet = fake_sd_fleet(2)
    for fake in fleet:
        fake.dead = True
    provider = make_provider(fleet, wait_timeout_s=0.8, max_attempts=3)
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        provider.generate(req("nobody home"))
    assert time.monotonic() - start < 3.0
    e = err.value
    assert e.status == 503 and e.retryable and e.kind == "image"
    assert "within 0.8 s" in e.message and "0 of 2 instances up" in e.message
    assert "2 failed attempts" in e.message and "refused" in e.message.lower()
    assert provider.health()["ok"] is False and provider.health()["down"] == 2


# ---------------------------------------------------------------------------------------------- depth 2
def test_depth_two_queues_exactly_one_behind_the_running_image(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    """Two processes, more callers than seats: every instance runs one and holds the next, never more."""
    fleet = fake_sd_fleet(2, delay=0.15)
    workers = [make_provider(fleet), make_provider(fleet)]
    assert workers[0].pool.depth == 2
    with ThreadPoolExecutor(10) as ex:
        results = list(ex.map(lambda i: workers[i % 2].generate(req(f"d{i}")), range(14)))
    assert len(results) == 14 and all(r.png[:8] == PNG_SIGNATURE and r.attempts == 1 for r in results)
    for fake in fleet:
        assert fake.max_running == 1  # one generation at a time
        assert fake.max_concurrent_seen == 2  # and exactly one waiting behind it, reached under load
    assert sum(f.count for f in fleet) == 14
    assert workers[0].stats()["total_served"] == 14


def test_depth_two_prefers_an_idle_instance_to_a_second_seat(
    fake_sd_fleet: Any, db: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    fleet = fake_sd_fleet(2)
    pool = make_provider(fleet).pool
    first = pool.acquire()
    second = pool.acquire()  # the other instance is idle: it goes there, not behind the first
    assert {first.url, second.url} == {f.url for f in fleet}
    assert not first.queued and not second.queued and first.seat == second.seat == 0
    third = pool.acquire()  # no idle instance left: a second seat
    assert third.seat == 1 and third.queued
    assert pool.client_for(third).timeout_s == 2 * pool.timeout_s  # it waits for the running image too
    assert pool.client_for(first).timeout_s == pool.timeout_s
    fourth = pool.acquire()
    assert fourth.seat == 1 and fourth.queued and fourth.url != third.url
    rows = {r["url"]: r for r in pool.health()["instances"]}
    assert all(r["seats_busy"] == 2 and r["busy"] for r in rows.values())
    # the queue path: with every seat taken the next callers wait; the first seat to free goes first
    waiting = threading.Thread(target=lambda: pool.release(pool.acquire(), ok=True))
    waiting.start()
    wait_until(lambda: db.sd_waiters.count_documents({"want": {"$gt": 0}}) == 1, what="a queued caller")
    pool.release(first, ok=True)
    waiting.join(5)
    assert not waiting.is_alive()
    for lease in (second, third, fourth):
        pool.release(lease, ok=True)
    docs = list(db.sd_instances.find())
    assert all(d["holder"] is None and d.get("holder_1") is None for d in docs)


def test_plan_seats_fills_idle_instances_before_second_seats() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    soon = now + timedelta(seconds=5)
    instances = [
        {"_id": "busy-new", "state": "up", "holder": "x", "lease_until": soon, "leased_at": now},
        {
            "_id": "busy-old",
            "state": "up",
            "holder": "y",
            "lease_until": soon,
            "leased_at": now - timedelta(seconds=1),
            "checkpoint": "B",
        },
        {"_id": "idle", "state": "up", "holder": None},
        {
            "_id": "full",
            "state": "up",
            "holder": "a",
            "lease_until": soon,
            "holder_1": "b",
            "lease_until_1": soon,
        },
        {"_id": "down", "state": "down", "holder": None},
    ]
    waiters = [{"_id": "w1", "want": 2, "checkpoint": "B"}, {"_id": "w2"}, {"_id": "w3"}, {"_id": "w4"}]
    plan = plan_seats(waiters, instances, now, depth=2)
    # the idle instance first (even though "busy-old" has the checkpoint), then the second seat of the
    # instance whose image started first (affinity within the tier), then the newer one, then the
    # idle instance's own second seat; the full and the down instance get nothing
    assert plan == [
        Pick("w1", "idle", 0, True),
        Pick("w1", "busy-old", 1, False),
        Pick("w2", "busy-new", 1, False),
        Pick("w3", "idle", 1, False),
    ]
    assert plan_assignment(waiters, instances, now) == [("w1", "idle")]  # depth 1: one-deep


def test_depth_two_fifo_across_two_processes(
    fake_sd: FakeSD, db: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    """Callers queued alternately in two processes reach the instance in ticket order, one behind another."""
    fake_sd.delay = 0.25
    workers = [make_provider([fake_sd], join_window_s=0), make_provider([fake_sd], join_window_s=0)]
    blockers = [workers[0].pool.acquire(), workers[1].pool.acquire()]  # both seats taken
    assert [b.seat for b in blockers] == [0, 1]
    threads = []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: workers[i % 2].generate(req(f"q{i}")))
        t.start()
        threads.append(t)
        wait_until(lambda i=i: db.sd_waiters.count_documents({}) == i + 1, what=f"waiter {i} registered")
    workers[0].pool.release(blockers[0], ok=True)
    wait_until(lambda: fake_sd.generation_requests(), what="the first caller's request")
    workers[1].pool.release(blockers[1], ok=True)
    for t in threads:
        t.join(15)
    assert [r["json"]["prompt"] for r in fake_sd.generation_requests()] == [f"q{i}" for i in range(6)]
    assert fake_sd.max_running == 1 and fake_sd.max_concurrent_seen == 2


def test_depth_two_dead_instance_fails_both_seats_over(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    victim, other = fake_sd_fleet(2, delay=0.4)
    provider = make_provider([victim, other])
    out: list[Any] = []
    batch = threading.Thread(
        target=lambda: out.extend(provider.generate_many([req(f"v{i}") for i in range(4)]))
    )
    batch.start()
    wait_until(lambda: victim.inside == 2, what="both seats of the victim in use")
    victim.dead = True  # both of its callers (running and queued) lose their connection
    batch.join(15)
    assert not batch.is_alive() and len(out) == 4
    for r in out:
        assert_png(r.png, (64, 64))  # never an empty image
    assert sorted(r.attempts for r in out) == [1, 1, 2, 2]
    assert all(r.instance == other.url for r in out if r.attempts == 2)
    assert other.max_concurrent_seen <= 2 and other.max_running == 1


def test_depth_two_hung_instance_times_out_and_work_moves_on(
    fake_sd_fleet: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    hung, ok = fake_sd_fleet(2, delay=0.05)
    hung.hang = True
    provider = make_provider([hung, ok], timeout_s=0.6)
    start = time.monotonic()
    results = provider.generate_many([req(f"h{i}") for i in range(4)])
    elapsed = time.monotonic() - start
    # the queued caller on the hung instance waits for two generations' timeout, then moves on
    assert elapsed < 2 * 0.6 + 4 * 0.05 + 1.5
    assert all(r.instance == ok.url and r.png[:8] == PNG_SIGNATURE for r in results)
    assert max(r.attempts for r in results) == 2
    assert 1 <= len([r for r in hung.requests if r["path"].endswith("txt2img")]) <= 2
    assert {row["url"]: row for row in provider.health()["instances"]}[hung.url]["state"] == "down"
    assert ok.max_concurrent_seen <= 2


def test_depth_two_interrupts_only_its_own_generation(
    fake_sd: FakeSD, make_provider: Callable[..., SDPoolProvider]
) -> None:
    """At shutdown a process interrupts an instance only when what runs there is its own."""
    fake_sd.delay = 1.0
    theirs, ours = make_provider([fake_sd]), make_provider([fake_sd])
    first = threading.Thread(target=theirs.generate, args=(req("theirs"),))
    first.start()
    assert fake_sd.wait_until_running()
    out: list[Any] = []
    behind = threading.Thread(target=lambda: out.append(ours.generate(req("ours"))))
    behind.start()
    assert fake_sd.wait_until(lambda: fake_sd.inside == 2)  # ours waits inside the WebUI behind theirs
    assert ours.pool.interrupt_held() == 0  # the running image is the other process's
    first.join(5)
    assert fake_sd.interrupts == 0 and fake_sd.requests[0]["json"]["prompt"] == "theirs"
    assert fake_sd.wait_until(lambda: fake_sd.inside == 1 and fake_sd.running == 1)  # now ours runs
    assert ours.pool.interrupt_held() == 1
    behind.join(5)
    assert fake_sd.interrupts == 1 and len(out) == 1  # stopped early, answered, released


def test_images_of_one_request_claim_the_idle_instances_in_one_write(
    fake_sd_fleet: Any, mongo_uri: str, db: Any
) -> None:
    """On an idle pool the first images of a request get the idle instances from one read and one write (they
    used to claim one after another, the last starting a claim's round trip per image later); the rest take
    seats the ordinary way; through the recording wrapper, as the apps call it."""
    from pymongo import MongoClient

    from agent.images.recording import RecordingImageProvider
    from agent.records import GenerationRecorder
    from tests.mongo_commands import CommandLog

    fleet = fake_sd_fleet(4, delay=0.2)
    log = CommandLog(db.name)
    client: MongoClient = MongoClient(mongo_uri, tz_aware=True, event_listeners=[log])
    pool = SDInstancePool(client[db.name], [f.url for f in fleet], **FAST)
    images = RecordingImageProvider(SDPoolProvider(pool), GenerationRecorder(client[db.name]))
    try:
        log.clear()
        results = images.generate_many([req(f"scene {i}", seed=i) for i in range(6)])
        assert [r.seed for r in results] == list(range(6)) and all(
            r.png[:8] == PNG_SIGNATURE for r in results
        )
        assert {r.instance for r in results[:4]} == {f.url for f in fleet}  # one idle instance each
        claims = [c for c in log.seen if c[1] == "sd_instances" and c[0] in ("update", "findAndModify")]
        assert claims[0] == ("update", "sd_instances"), log.seen[:12]  # the four idle ones: one bulk write
        assert all(f.max_running == 1 and f.max_concurrent_seen <= 2 for f in fleet)
        assert db.generations.count_documents({"kind": "image", "ok": True}) == 6

        # not while someone waits (they go first), never a down instance, and each claim is a lease held
        db.sd_waiters.insert_one(
            {
                "_id": "other:q1",
                "ticket": 1,
                "want": 1,
                "expires_at": datetime.now(UTC) + timedelta(seconds=30),
            }
        )
        time.sleep(FAST["poll_s"] * 2)
        assert pool.claim_idle(3) == []
        db.sd_waiters.delete_one({"_id": "other:q1"})
        time.sleep(FAST["poll_s"] * 2)
        db.sd_instances.update_one({"_id": fleet[0].url}, {"$set": {"state": "down"}})
        leases = pool.claim_idle(4)
        assert sorted(lease.url for lease in leases) == sorted(f.url for f in fleet[1:])
        held = {d["_id"]: d["holder"] for d in db.sd_instances.find({"holder": {"$ne": None}})}
        assert held == {lease.url: lease.id for lease in leases}
        for lease in leases:
            pool.release(lease, ok=True)
        assert db.sd_instances.count_documents({"holder": {"$ne": None}}) == 0
    finally:
        pool.close()
        client.close()


# ---------------------------------------------------------------------------------------------- affinity
def test_requests_go_to_the_instance_with_their_checkpoint(
    make_provider: Callable[..., SDPoolProvider],
) -> None:
    models = ["ckptA", "ckptB", "ckptC"]
    with (
        FakeSD(name="A", models=models, checkpoint="ckptA") as fa,
        FakeSD(name="B", models=models, checkpoint="ckptB") as fb,
    ):
        provider = make_provider([fa, fb])
        assert provider.pool.refresh_checkpoints() == {fa.url: "ckptA", fb.url: "ckptB"}
        for _ in range(3):
            assert provider.generate(req("b", checkpoint="ckptB")).instance == fb.url
            assert provider.generate(req("a", checkpoint="ckptA")).instance == fa.url
        with ThreadPoolExecutor(2) as ex:
            both = list(
                ex.map(provider.generate, [req("b", checkpoint="ckptB"), req("a", checkpoint="ckptA")])
            )
        assert [r.instance for r in both] == [fb.url, fa.url]
        assert fa.switches == 0 and fb.switches == 0  # no checkpoint was ever reloaded
        # a checkpoint nobody has: one instance switches, and later requests for it follow it there
        c1 = provider.generate(req("c", checkpoint="ckptC"))
        c2 = provider.generate(req("c", checkpoint="ckptC"))
        assert c1.instance == c2.instance and fa.switches + fb.switches == 1


# ---------------------------------------------------------------------------------------------- SAM
def test_segment_with_sam(fake_sd: FakeSD, make_provider: Callable[..., SDPoolProvider]) -> None:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((10, 10, 10), (16, 16, 48, 48))  # a dark object on white
    seg = make_provider([fake_sd], sam=True).segment(png_bytes(img), "drone")
    assert seg.provider == "sdwebui-sam"
    sent = fake_sd.requests[-1]
    assert sent["path"] == "/sam/sam-predict"
    assert sent["json"]["dino_enabled"] is True and sent["json"]["dino_text_prompt"] == "drone"
    assert base64.b64decode(sent["json"]["input_image"]) == png_bytes(img)
    with Image.open(io.BytesIO(seg.mask)) as mask, Image.open(io.BytesIO(seg.cutout)) as cut:
        assert mask.mode == "L" and mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0
        assert (
            cut.mode == "RGB"
            and cut.getpixel((2, 2)) == (255, 255, 255)
            and cut.getpixel((32, 32)) == (10, 10, 10)
        )


def test_segment_without_sam_says_it_is_a_placeholder(
    fake_sd: FakeSD, make_provider: Callable[..., SDPoolProvider]
) -> None:
    seg = make_provider([fake_sd], sam=False).segment(a_png((20, 20, 20)), "drone")
    assert seg.provider.startswith("placeholder-threshold") and "SD_SAM_ENABLED" in seg.provider
    assert not fake_sd.requests  # no instance was used
    assert_png(seg.mask)
    assert_png(seg.cutout)


def test_pool_needs_a_database_and_instances(db: Any) -> None:
    with pytest.raises(ValueError):
        SDInstancePool(None, ["http://127.0.0.1:1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SDInstancePool(db, [])


def test_close_frees_the_leases_this_process_holds(
    fake_sd: FakeSD, db: Any, make_provider: Callable[..., SDPoolProvider]
) -> None:
    """A worker that shuts down while holding an instance frees it at once (not after `lease_s`)."""
    leaving = make_provider([fake_sd], lease_s=60)
    lease = leaving.pool.acquire()
    assert db.sd_instances.find_one({"_id": fake_sd.url})["holder"] == lease.id
    leaving.close()
    assert db.sd_instances.find_one({"_id": fake_sd.url})["holder"] is None
    other = make_provider([fake_sd], lease_s=60)
    result = other.generate(req("right after the restart"))
    assert result.wait_ms < 1000
