"""Refinement benchmark: the rapid-divergence request (type 0, 6 images) against its critical path.

    python bench/refinement.py [--chat-delay 0.5] [--sd-delay 1.0] [--instances 4] [--num 6] [--runs 3]

Real servers on 127.0.0.1: the embedded MongoDB, the fake OpenAI server answering every chat
call after `--chat-delay` T seconds, `--instances` fake SD WebUIs each taking `--sd-delay` D seconds
per image (one at a time, like the WebUI), through the shared SD pool. The app serves
`POST /refinement/generate {"appid": 0, "type": 0, "prompts": {"task": ..., "num": 6}}`.

Critical path = the longest chain of text calls feeding the images (products -> scenes -> SD prompts:
3T; the concept texts run beside it) + the image waves (ceil(num / instances) x D). The original ran
all four chat calls one after another with the images between the third and the fourth, i.e.
4T + waves; that order is also *run* here, on the same servers, as the baseline. Prints the
measured times, measured / critical path (target <= 1.1), and the baseline's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.llm import CallContext  # noqa: E402
from agent.types import ImageRequest  # noqa: E402
from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo  # noqa: E402
from tests.fakes.fake_openai import FakeOpenAI  # noqa: E402
from tests.fakes.fake_sd import FakeSD  # noqa: E402

TASK = "设计一款运动辅助产品"


def original_order(app: Any, num: int) -> float:
    """The original's sequence on the same services: 3 chats, the images, then the 4th chat."""
    from apps.refinement.images import sd_options
    from apps.refinement.pipeline import exact_counts

    svc = app.extensions["services"]
    ctx = CallContext(app="refinement-bench", step="baseline")

    def chat(name: str, variables: dict[str, Any], key: str) -> list[str]:
        template = f"refinement/zh/{name}"
        schema = exact_counts(svc.prompts.get(template).schema, {key: num})
        return svc.llm.chat(template=template, variables=variables, schema=schema, context=ctx).data[key]

    start = time.perf_counter()
    products = chat("products", {"stage": "rapid", "task": TASK, "scheme": "", "num": num}, "products")
    scenes = chat("scenes", {"stage": "rapid", "products": products}, "scenes")
    prompts = chat("scene_sd_prompts", {"scenes": scenes}, "prompts")
    opts = sd_options(svc.prompts, "scene")
    svc.image_provider.generate_many(
        [
            ImageRequest(
                prompt=p,
                width=opts["width"],
                height=opts["height"],
                steps=opts["steps"],
                context={"app": "refinement-bench"},
            )
            for p in prompts
        ]
    )
    chat("concept_texts", {"stage": "rapid", "products": products}, "texts")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat-delay", type=float, default=0.5, help="T: seconds per chat call")
    parser.add_argument("--sd-delay", type=float, default=1.0, help="D: seconds per image on one instance")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    t, d, k, n = args.chat_delay, args.sd_delay, args.instances, args.num

    data_dir = Path(tempfile.mkdtemp(prefix="bench-refinement-"))
    mongo = ensure_embedded_mongo(data_dir / "mongo")
    fake = FakeOpenAI().start()
    fleet = [FakeSD(delay=d, name=f"sd{i}").start() for i in range(k)]
    try:
        from app import create_app

        app = create_app(
            {
                "MONGO_URI": mongo.uri,
                "MONGO_DB": "bench_refinement",
                "DATA_DIR": str(data_dir),
                "LLM_PROVIDER": "openai",
                "OPENAI_BASE_URL": fake.url,
                "OPENAI_API_KEY": "k",
                "IMAGE_PROVIDER": "sdwebui",
                "SD_INSTANCES": ",".join(f.url for f in fleet),
                "LOG_LEVEL": "WARNING",
            }
        )
        client = app.test_client()
        body = {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": n}}
        client.post("/refinement/generate", json=body)  # warm-up (pool thread, connections), untimed
        fake.delay = t
        times, last = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            resp = client.post("/refinement/generate", json=body)
            times.append(time.perf_counter() - start)
            env = resp.get_json()
            if resp.status_code != 200 or not env["success"] or len(env["data"]["result"]) != n:
                print(f"request failed: {resp.status_code} {env.get('message')}")
                return 2
            last = env["data"]["requestId"]
        baseline = [original_order(app, n) for _ in range(args.runs)]
        steps = app.extensions["services"].db.refinement_requests.find_one({"_id": last})["steps"]
        app.extensions["services"].close()
        # finalise the app while MongoDB is still up: some clients' __del__ (the rate limiter's storage)
        # would otherwise block the interpreter's exit on a database that is gone
        del app, client
        gc.collect()
    finally:
        fake.stop()
        for f in fleet:
            f.stop()
        stop_embedded_mongo(data_dir / "mongo")

    waves = math.ceil(n / k)
    critical = 3 * t + waves * d
    original = 4 * t + waves * d
    measured = statistics.median(times)
    ratio = measured / critical
    base = statistics.median(baseline)
    print(
        f"refinement bench {dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"(python {platform.python_version()})"
    )
    print(f"type 0, num={n}, {k} SD instances, chat T={t:.2f}s, image D={d:.2f}s, {args.runs} runs")
    print(f"critical path 3T + {waves}D           = {critical:.2f}s")
    print(
        f"measured (median of {args.runs})          = {measured:.2f}s  (min {min(times):.2f}, max {max(times):.2f})"
    )
    print(f"measured / critical path         = {ratio:.3f}  ({'OK' if ratio <= 1.1 else 'OVER'} <= 1.1)")
    print(f"original order 4T + {waves}D (computed) = {original:.2f}s")
    print(f"original order (run, median)     = {base:.2f}s  -> ours is {base / measured:.2f}x faster")
    print("timeline of the last request (ms from start):")
    for s in sorted(steps, key=lambda s: s["started_ms"]):
        print(f"  {s['step']:<18} {s['started_ms']:>8.0f} -> {s['ended_ms']:>8.0f}")
    return 0 if ratio <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
