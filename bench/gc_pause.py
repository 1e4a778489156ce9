"""The cyclic GC's full passes in a built app, before and after `gc.freeze()` (apps/core/worker_gc.py).

    python bench/gc_pause.py [--requests 1500]

Builds the app on the embedded MongoDB (fake-free: only read routes are called), sends the same mix of
read requests through the test client twice, once before and once after freezing the start-up heap,
and prints each generation's collection count and longest pause in one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

URLS = ["/auth/me", "/storybook/books?user=x", "/refinement/users/x/sessions", "/ideation/users/x/history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()

    from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo
    from apps.core.worker_gc import freeze_startup_heap

    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmpdir:
        tmp = Path(tmpdir)
        mongo = ensure_embedded_mongo(tmp / "mongo")
        os.environ.update(
            MONGO_URI=mongo.uri,
            LLM_PROVIDER="openai",
            OPENAI_BASE_URL="http://127.0.0.1:9/v1",  # never called: read routes only
            OPENAI_API_KEY="k",
            DATA_DIR=str(tmp / "data"),
            LOG_LEVEL="WARNING",
            RATE_LIMIT_ENABLED="false",
        )
        from app import create_app

        app = create_app()
        client = app.test_client()
        for url in [*URLS, "/openapi.json"]:
            client.get(url)  # lazily built parts exist before the measurement, as in a warm worker
        pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        started: dict[str, float] = {}

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started["t"] = time.perf_counter()
            else:
                pauses[info["generation"]].append((time.perf_counter() - started["t"]) * 1000)

        def run() -> str:
            for values in pauses.values():
                values.clear()
            for i in range(args.requests):
                client.get(URLS[i % len(URLS)])
            return "  ".join(
                f"gen{g}: {len(v)} passes, longest {max(v, default=0):.1f} ms" for g, v in pauses.items()
            )

        gc.callbacks.append(on_gc)
        try:
            objects = len(gc.get_objects())
            print(
                f"bench/gc_pause.py  {args.requests} read requests per phase  {objects} tracked objects at start"
            )
            print(f"before gc.freeze(): {run()}")
            print(f"gc.freeze() after one full pass: {freeze_startup_heap():.0f} ms")
            print(f"after gc.freeze():  {run()}")
        finally:
            gc.callbacks.remove(on_gc)
            app.extensions["services"].close()
            stop_embedded_mongo(tmp / "mongo")


if __name__ == "__main__":
    main()
