"""Storybook pipeline benchmark: how close a book comes to its critical path, and how early page 1 is done.

    python bench/storybook.py                      # N=10 pages, K=4 SD instances, T_c=0.5 s, T_i=1.0 s
    python bench/storybook.py --pages 10 --instances 4 --tc 0.5 --ti 1.0 --sweep

Real pieces, fake latencies: the app (create_app) on the embedded MongoDB, a FakeOpenAI whose every
chat call takes T_c (`delay`), K FakeSD WebUIs that take T_i per picture, shared through the real SD
pool (`SDPoolProvider`, MongoDB leases). Moderation is the local keyword screen (instant), so only chat
calls cost T_c. Times are the server-side timestamps of the book's events (`job_events.at`) measured
from the job's creation.

Printed per configuration:
  (a) total / critical-path bound. Our DAG: plan (1 call) -> {N streamed page calls in sequence} in
      parallel with {N+1 pictures on K instances, all submitted when the plan exists}, so the bound is
      T_c + max(N*T_c, ceil((N+1)/K)*T_i). Also shown against the issue's looser formula
      (N+1)*T_c + ceil((N+1)/K)*T_i (the whole text chain, then the pictures). Target <= 1.10.
  (b) time to page 1 complete (text and picture) / total. Target <= 0.35 for N=10, K=4. No schedule
      can beat (T_c + T_i) / (T_c + max(N*T_c, ceil((N+1)/K)*T_i)); that floor is printed too.
  (c) the original's sequential order (3 chat calls, then each picture in turn, no cover), computed:
      total 3*T_c + N*T_i, page 1 complete at 3*T_c + T_i.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo  # noqa: E402
from tests.fakes.fake_openai import FakeOpenAI  # noqa: E402
from tests.fakes.fake_sd import FakeSD  # noqa: E402


def responder(fake: FakeOpenAI) -> Any:
    """A plan with N pages for the JSON call; a short page text for each streamed page call."""

    def respond(body: dict[str, Any]) -> Any:
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        if schema and "pages" in (schema.get("properties") or {}):
            n = schema["properties"]["pages"]["minItems"]
            return {
                "title": "Benny Goes to Mars",
                "characters": [{"name": "Benny", "appearance": "a small boy"}],
                "style": "watercolor",
                "setting": "Mars",
                "pages": [
                    {"summary": f"step {i}", "scene": f"boy on mars, scene {i}"} for i in range(1, n + 1)
                ],
            }
        text = str((body.get("messages") or [{}])[-1].get("content", ""))
        match = re.search(r"write the text of page (\d+)", text)
        return (
            f"Benny takes step {match.group(1) if match else '?'} across the red dust and waves at the moons."
        )

    return respond


def run_book(mongo_uri: str, data_dir: Path, n: int, k: int, tc: float, ti: float) -> dict[str, float]:
    from app import create_app

    fake = FakeOpenAI().start()
    fake.delay = tc
    fake.set_responder(responder(fake))
    fleet = [FakeSD(delay=ti, name=f"sd{i}").start() for i in range(k)]
    app = create_app(
        {
            "MONGO_URI": mongo_uri,
            "MONGO_DB": "bench_" + secrets.token_hex(4),
            "DATA_DIR": str(data_dir),
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": fake.url,
            "OPENAI_API_KEY": "k",
            "SD_INSTANCES": ",".join(f.url for f in fleet),
            "MODERATION": "local",
            "SSE_POLL_S": 0.05,
            "RATE_LIMIT_ENABLED": False,
            "LOG_LEVEL": "WARNING",
            "STORYBOOK_MAX_PAGES": max(20, n),
        }
    )
    svc = app.extensions["services"]
    try:
        c = app.test_client()
        resp = c.post("/storybook/books", json={"description": "Benny goes to Mars", "pages": n})
        assert resp.status_code == 202, resp.get_json()
        book_id = resp.get_json()["id"]
        c.get(f"/storybook/books/{book_id}/events").get_data()  # the stream ends with the book
        job = svc.db.jobs.find_one({"_id": book_id})
        if job["status"] != "done":
            raise RuntimeError(f"the book ended {job['status']}: {job.get('error')}")
        t0 = job["created_at"]
        events = list(svc.db.job_events.find({"job": book_id}).sort("seq", 1))

        def at(kind: str, page: int | None = None) -> float:
            for e in events:
                if e["type"] == kind and (page is None or (e.get("data") or {}).get("page") == page):
                    return (e["at"] - t0).total_seconds()
            raise KeyError((kind, page))

        return {
            "total": at("done"),
            "page1": max(at("page.text", 1), at("page.image", 1)),
            "plan": at("book.plan"),
            "last_text": at("page.text", n),
            "last_picture": max(at("page.image", i) for i in range(1, n + 1)),
            "cover": at("cover"),
        }
    finally:
        svc.client.drop_database(svc.settings.MONGO_DB)
        svc.close()
        fake.stop()
        for sd in fleet:
            sd.stop()


def figures(n: int, k: int, tc: float, ti: float, measured: dict[str, float]) -> dict[str, float]:
    rounds = math.ceil((n + 1) / k)
    bound_cp = tc + max(n * tc, rounds * ti)
    bound_issue = (n + 1) * tc + rounds * ti
    seq_total = 3 * tc + n * ti
    seq_page1 = 3 * tc + ti
    return {
        "a": measured["total"] / bound_cp,
        "a_issue": measured["total"] / bound_issue,
        "b": measured["page1"] / measured["total"],
        "b_floor": (tc + max(tc, ti)) / bound_cp,
        "bound_cp": bound_cp,
        "bound_issue": bound_issue,
        "seq_total": seq_total,
        "seq_page1": seq_page1,
        "seq_a": seq_total / (3 * tc + math.ceil(n / k) * ti),
        "seq_b": seq_page1 / seq_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", "-n", type=int, default=10)
    parser.add_argument("--instances", "-k", type=int, default=4)
    parser.add_argument("--tc", type=float, default=0.5, help="seconds per chat call")
    parser.add_argument("--ti", type=float, default=1.0, help="seconds per picture")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="also T_c/T_i = 0.5/0.5, 0.25/1.0 and 0.5/2.0")
    args = parser.parse_args()
    configs = [(args.tc, args.ti)]
    if args.sweep:
        configs += [c for c in [(0.5, 0.5), (0.25, 1.0), (0.5, 2.0)] if c not in configs]
    n, k = args.pages, args.instances
    print(
        f"# storybook bench {dt.datetime.now().isoformat(timespec='seconds')}  N={n} pages, K={k} SD instances, "
        f"command: python bench/storybook.py {' '.join(sys.argv[1:])}"
    )
    data_dir = Path(tempfile.mkdtemp(prefix="storybook-bench-"))
    server = ensure_embedded_mongo(data_dir)
    try:
        header = (
            f"{'T_c':>5} {'T_i':>5} | {'total':>6} {'page1':>6} {'bound':>6} | {'(a)':>5} {'(a)iss':>6} "
            f"{'(b)':>5} {'b-floor':>7} | {'orig total':>10} {'orig p1':>7} {'orig(a)':>7} {'orig(b)':>7}"
        )
        print(header)
        print("-" * len(header))
        for tc, ti in configs:
            for _ in range(args.runs):
                start = time.perf_counter()
                measured = run_book(server.uri, data_dir, n, k, tc, ti)
                f = figures(n, k, tc, ti, measured)
                print(
                    f"{tc:5.2f} {ti:5.2f} | {measured['total']:6.2f} {measured['page1']:6.2f} {f['bound_cp']:6.2f} | "
                    f"{f['a']:5.2f} {f['a_issue']:6.2f} {f['b']:5.2f} {f['b_floor']:7.2f} | "
                    f"{f['seq_total']:10.2f} {f['seq_page1']:7.2f} {f['seq_a']:7.2f} {f['seq_b']:7.2f}"
                    f"   (plan {measured['plan']:.2f}, last text {measured['last_text']:.2f}, last picture "
                    f"{measured['last_picture']:.2f}, cover {measured['cover']:.2f}; wall {time.perf_counter() - start:.1f}s)"
                )
        print(
            "targets: (a) <= 1.10, (b) <= 0.35 for N=10, K=4. (a) = total / [T_c + max(N*T_c, ceil((N+1)/K)*T_i)];"
            " (a)iss = total / [(N+1)*T_c + ceil((N+1)/K)*T_i]; orig = the original's sequential order, computed."
        )
    finally:
        stop_embedded_mongo(data_dir)


if __name__ == "__main__":
    main()
