"""SD pool benchmark: the shared MongoDB-leased pool vs a faithful model of the originals' per-process pool.

    python bench/pool.py                                  # everything (about 13 minutes)
    python bench/pool.py --quick                          # smaller run of everything (about 4 minutes)
    python bench/pool.py --scenario ideation [--quick]    # StepIdeator's new sketches (about 9 / 2 minutes)
    python bench/pool.py --scenario refinement [--quick]  # InsPilot's rapid divergence (about 4 / 2 minutes)

The refinement scenario (InsPilot's type 0: 3 chats, M images, 1 chat, at M = 2, 4, 6; ours
per SD_QUEUE_DEPTH vs the original's pool model) is described in bench/pool_refinement.py; what
follows is the ideation scenario.

What runs:
- K fake SD WebUI instances (tests/fakes/fake_sd.py: real HTTP servers that run one
  generation at a time and queue the rest, like the WebUI; `--delay` D s per image,
  default 1 s, the figure of the issue's measurement of the originals; real SD takes 5-20 s);
- an embedded MongoDB (secantusdb, what the server uses when MONGO_URI is unset);
- our pool, by default (`--via gunicorn`), in the real server: `gunicorn -w 4` on this
  repository (embedded MongoDB, fake OpenAI for the one cached product-name call), C
  clients POSTing StepIdeator's "new sketches" button (`/ideation/generate`, currentNum=M:
  M txt2img images through the pool, each stored in GridFS and recorded), on a new
  connection each time so the kernel picks the worker. `--via processes` instead runs 4
  bare worker processes that call the image provider's `generate_many` as an app does
  (no HTTP; what the first version of this benchmark measured);
- C client threads in this process, each in a closed loop: send one request of M images
  (512x512 through the server; 64x64 with `--via processes`), wait, repeat. The original's
  model runs in the 4 worker processes, each request to a worker chosen at random (as the
  kernel hands connections to whichever gunicorn worker accepts).

Measured per scenario, after a 1 s warm-up, over `--seconds` seconds:
- images/s from the instances' side: a generation occupies its instance for the D seconds
  before the fake leaves its queue lock (`gen_end`; it encodes the PNG after that, as the
  WebUI does, while the next generation runs); that busy time is clipped to the window, so
  images at the edges count fractionally.
  ratio = images/s / ideal, ideal = K/D ((K-1)/D with one instance dead or hung);
- per-instance share of that work; max queue depth per instance: the most generation
  requests an instance ever held at once (FakeSD.max_concurrent_seen; 1 = no queueing
  inside the WebUI);
- from the clients' side: request latency (p50, max), empty images, errors, requests
  still unanswered long after the window (stuck).

Baseline ("original"): `OriginalPool` below models the seeds' pool: one per process, a
Semaphore(K) plus a FIFO Queue of all K URLs, `requests.post` with no timeout, any
failure returns an empty image; each request fans out with a fresh ThreadPoolExecutor.
It runs through the same harness in the same run.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import logging
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import gunicorn_argv  # noqa: E402

WORKERS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SIDE = 64


# ---------------------------------------------------------------------------------------------- the original
class OriginalPool:
    """The seeds' `SDInstancePool` (InsPilot-api / StepIdeator-API agent/sd.py), as the research notes describe it.

    Module singleton per process: Semaphore(len(instances)) + Queue of instance URLs; a
    caller blocks until one is free, takes the one idle longest, posts with NO timeout,
    turns any failure into image "" and puts the URL back in `finally`. Nothing is shared
    between processes.
    """

    def __init__(
        self, urls: list[str], width: int = IMAGE_SIDE, height: int = IMAGE_SIDE, steps: int = 20
    ) -> None:
        import requests

        self._requests = requests
        self.width, self.height, self.steps = width, height, steps
        self.sem = threading.Semaphore(len(urls))
        self.instances: queue.Queue[str] = queue.Queue()
        for url in urls:
            self.instances.put(url)

    def text2image(self, task: dict[str, Any]) -> dict[str, Any]:
        self.sem.acquire()
        url = self.instances.get()
        try:
            payload = {
                "prompt": task["prompt"],
                "negative_prompt": "",
                "width": self.width,
                "height": self.height,
                "steps": self.steps,
            }
            resp = self._requests.post(url + "/sdapi/v1/txt2img", json=payload)  # no timeout, as the original
            resp.raise_for_status()
            image = resp.json()["images"][0]
        except Exception:  # noqa: BLE001 - the original logged and returned an empty image
            image = ""
        finally:
            self.instances.put(url)
            self.sem.release()
        return {"index": task["index"], "image": image}

    def generate_many(self, prompts: list[str]) -> list[bytes]:
        tasks = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
        with ThreadPoolExecutor() as ex:  # a fresh executor per request, default size, as the original
            results = list(ex.map(self.text2image, tasks))
        return [base64.b64decode(r["image"]) if r["image"] else b"" for r in results]


# ---------------------------------------------------------------------------------------------- worker processes
def _build(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(generate_many(prompts) -> list[bytes], close()) for this worker process."""
    if spec["impl"] == "original":
        if spec.get("chat_url"):
            return _original_refinement(spec)
        pool = OriginalPool(spec["urls"])
        return pool.generate_many, lambda: None
    from pymongo import MongoClient

    from agent.images.sdwebui.pool import SDInstancePool
    from agent.images.sdwebui.provider import SDPoolProvider
    from agent.types import ImageRequest

    client: MongoClient = MongoClient(spec["mongo_uri"], tz_aware=True)
    provider = SDPoolProvider(
        SDInstancePool(
            client[spec["db"]],
            spec["urls"],
            timeout_s=spec["timeout_s"],
            wait_timeout_s=60.0,
            lease_s=30.0,
            max_attempts=3,
        )
    )

    def run(prompts: list[str]) -> list[bytes]:
        reqs = [ImageRequest(prompt=p, width=IMAGE_SIDE, height=IMAGE_SIDE) for p in prompts]
        return [r.png for r in provider.generate_many(reqs)]

    def close() -> None:
        provider.close()
        client.close()

    return run, close


def _original_refinement(spec: dict[str, Any]) -> tuple[Any, Any]:
    """InsPilot-api's type 0 request in one worker: 3 chats in sequence, the M images through its pool, 1 chat.

    The chats are real HTTP calls to the fake OpenAI (`/v1/chat/completions`, content irrelevant);
    the images go through `OriginalPool` at the refinement app's scene size. Any failed chat raises,
    so the request counts as an error."""
    import requests

    pool = OriginalPool(spec["urls"], spec["width"], spec["height"], spec["steps"])
    local = threading.local()

    def chat(step: str) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        body = {
            "model": spec["model"],
            "messages": [{"role": "user", "content": f"rapid divergence: {step}"}],
        }
        session.post(spec["chat_url"], json=body, timeout=120).raise_for_status()

    def run(prompts: list[str]) -> list[bytes]:
        for step in ("products", "scenes", "scene_sd_prompts"):
            chat(step)
        images = pool.generate_many(prompts)
        chat("concept_texts")
        return images

    return run, lambda: None


def _serve(run: Any, job_id: int, prompts: list[str], res_q: Any) -> None:
    """One HTTP request's worth of work in a worker: M images via generate_many."""
    error = None
    try:
        images = run(prompts)
    except Exception as exc:  # noqa: BLE001 - counted and reported
        images, error = [], f"{type(exc).__name__}: {exc}"[:200]
    res_q.put(("result", job_id, (len(images), sum(1 for png in images if png[:8] != PNG_SIGNATURE), error)))


def worker_main(idx: int, cmd_q: Any, res_q: Any) -> None:
    """A stand-in for one gunicorn gthread worker: a thread per request, one image provider per process."""
    logging.basicConfig(level=logging.ERROR)
    while True:
        spec = cmd_q.get()
        if spec is None:
            return
        run, close = _build(spec)
        res_q.put(("ready", idx, None))
        with ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="request"
        ) as threads:  # gunicorn.conf threads
            while True:
                msg = cmd_q.get()
                if msg[0] == "end":
                    break
                _, job_id, prompts = msg
                threads.submit(_serve, run, job_id, prompts, res_q)
        close()
        res_q.put(("done", idx, None))


# ---------------------------------------------------------------------------------------------- the harness
class Harness:
    """K fakes per scenario, 4 long-lived worker processes, C client threads here.

    Each client request goes to a worker chosen at random, as the kernel hands a gunicorn
    worker whichever connection it accepts: two requests may land on one worker while
    another idles, which is exactly what the originals' per-process pools could not see.
    """

    def __init__(
        self, mongo_uri: str, delay: float, seconds: float, warmup: float = 1.0, seed: int = 7
    ) -> None:
        self.mongo_uri = mongo_uri
        self.delay = delay
        self.seconds = seconds
        self.warmup = warmup
        self.seed = seed
        ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(WORKERS)]
        self.procs = [
            ctx.Process(target=worker_main, args=(i, self.cmd_qs[i], self.res_q), daemon=True)
            for i in range(WORKERS)
        ]
        for p in self.procs:
            p.start()
        self.n = 0
        self._control: queue.Queue[tuple[str, int]] = queue.Queue()
        self._waiting: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        threading.Thread(target=self._dispatch, name="results", daemon=True).start()

    def _dispatch(self) -> None:
        while True:
            try:
                kind, key, data = self.res_q.get()
            except (EOFError, OSError):
                return
            if kind == "result":
                event, box = self._waiting.pop(key)
                box.append(data)
                event.set()
            else:
                self._control.put((kind, key))

    def close(self) -> None:
        if getattr(self, "openai", None) is not None:
            self.openai.stop()
        for q in self.cmd_qs:
            q.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()

    def _collect(self, kind: str, timeout: float) -> None:
        got: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(got) < WORKERS:
            msg, idx = self._control.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg == kind:
                got.add(idx)

    def _request(self, worker: int, prompts: list[str]) -> tuple[int, int, str | None]:
        with self._jobs_lock:
            self._jobs += 1
            job_id = self._jobs
        event, box = threading.Event(), []
        self._waiting[job_id] = (event, box)
        self.cmd_qs[worker].put(("job", job_id, prompts))
        event.wait()
        return box[0]

    def _client(self, cid: int, m: int, t_start: float, t_stop: float, out: list[dict[str, Any]]) -> None:
        import random

        rng = random.Random(self.seed * 1000 + self.n * 100 + cid)
        time.sleep(max(0.0, t_start - time.time()))
        n = 0
        while time.time() < t_stop:
            worker = rng.randrange(WORKERS)
            start = time.time()
            images, empty, error = self._request(
                worker, [f"client {cid} request {n} image {i}" for i in range(m)]
            )
            out.append(
                {
                    "client": cid,
                    "worker": worker,
                    "start": start,
                    "end": time.time(),
                    "images": images,
                    "empty": empty,
                    "error": error,
                }
            )
            n += 1

    def run(
        self, impl: str, k: int, m: int, c: int, fault: str | None = None, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        from tests.fakes.fake_sd import FakeSD

        self.n += 1
        fakes = [FakeSD(delay=self.delay, name=f"sd{i}").start() for i in range(k)]
        if fault == "dead":
            fakes[0].dead = True
        elif fault == "hung":
            fakes[0].hang = True
        spec = {
            "impl": impl,
            "urls": [f.url for f in fakes],
            "mongo_uri": self.mongo_uri,
            "db": f"bench_pool_{os.getpid()}_{self.n}",
            "timeout_s": timeout_s,
        }
        for q in self.cmd_qs:
            q.put(spec)
        self._collect("ready", 60)
        t_start = time.time() + 0.2
        t_stop = t_start + self.warmup + self.seconds
        records: list[dict[str, Any]] = []
        clients = [
            threading.Thread(target=self._client, args=(cid, m, t_start, t_stop, records), daemon=True)
            for cid in range(c)
        ]
        t_start += self.warmup  # measure the steady state: connections are open, the queue has formed
        grace = self._drive(clients, fakes, fault, t_stop, timeout_s)
        for q in self.cmd_qs:
            q.put(("end",))
        self._collect("done", 120)
        for f in fakes:
            f.stop()
        try:
            from pymongo import MongoClient

            with MongoClient(self.mongo_uri) as client:
                client.drop_database(spec["db"])
        except Exception:  # noqa: BLE001 - cleanup only
            pass
        return self._measure(impl, k, m, c, fault, fakes, records, t_start, t_stop, grace, timeout_s)

    # ------------------------------------------------------------------ the real server over HTTP
    def run_http(
        self, k: int, m: int, c: int, fault: str | None = None, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """The same scenario against the real server: `gunicorn -w 4` on this repository, C clients each
        POSTing StepIdeator's "new sketch" (`/ideation/generate`, currentNum=M: M txt2img images through
        the pool, stored in GridFS and recorded) on a new connection each time, so the kernel picks the
        worker as it would for browsers behind a proxy."""
        import requests

        from tests.fakes.fake_openai import FakeOpenAI
        from tests.fakes.fake_sd import FakeSD

        self.n += 1
        if getattr(self, "openai", None) is None:
            self.openai = FakeOpenAI().start()  # the product-name call (once per scenario, cached)
        fakes = [FakeSD(delay=self.delay, name=f"sd{i}").start() for i in range(k)]
        db = f"bench_pool_http_{os.getpid()}_{self.n}"
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MONGO_URI": self.mongo_uri,
            "MONGO_DB": db,
            "DATA_DIR": str(Path(tempfile.gettempdir()) / f"bench-pool-data-{os.getpid()}"),
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": self.openai.url,
            "OPENAI_API_KEY": "k",
            "LLM_MODEL": "fake-model",
            "IMAGE_PROVIDER": "sdwebui",
            "SD_INSTANCES": ",".join(f.url for f in fakes),
            "SD_TIMEOUT_S": str(timeout_s),
            "SD_WAIT_TIMEOUT_S": "60",
            "RATE_LIMIT_ENABLED": "false",
            "LOG_LEVEL": "ERROR",
            "GUNICORN_THREADS": "32",
        }
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            gunicorn_argv(port, WORKERS),
            cwd=str(ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                _wait_http(base, proc)
            except RuntimeError as exc:  # say why: the server's own last words
                log.seek(0)
                raise RuntimeError(f"{exc}\n{log.read().decode('utf-8', 'replace')[-3000:]}") from None
            for _ in range(WORKERS):  # warm every worker's pool and the cached product name
                requests.post(
                    f"{base}/ideation/generate",
                    json=_sketch_body(1),
                    timeout=120,
                    headers={"Connection": "close"},
                )
            if fault == "dead":
                fakes[0].dead = True
            elif fault == "hung":
                fakes[0].hang = True
            t_start = time.time() + 0.2
            t_stop = t_start + self.warmup + self.seconds
            records: list[dict[str, Any]] = []
            go = t_start  # the clients start here; the measurement starts a warm-up later

            def client(cid: int) -> None:
                time.sleep(max(0.0, go - time.time()))
                while time.time() < t_stop:
                    start = time.time()
                    error, images = None, 0
                    try:
                        resp = requests.post(
                            f"{base}/ideation/generate",
                            json=_sketch_body(m),
                            timeout=300,
                            headers={"Connection": "close"},
                        )
                        body = resp.json()
                        if body.get("success"):
                            images = sum(1 for url in body["data"].values() if str(url).endswith(".png"))
                        else:
                            error = f"{resp.status_code} {body.get('message')}"[:200]
                    except (requests.RequestException, ValueError) as exc:
                        error = f"{type(exc).__name__}: {exc}"[:200]
                    records.append(
                        {
                            "client": cid,
                            "worker": -1,
                            "start": start,
                            "end": time.time(),
                            "images": images,
                            "empty": (m - images) if error is None else 0,
                            "error": error,
                        }
                    )

            clients = [threading.Thread(target=client, args=(cid,), daemon=True) for cid in range(c)]
            t_start += self.warmup
            grace = self._drive(clients, fakes, fault, t_stop, timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            for f in fakes:
                f.stop()
            try:
                from pymongo import MongoClient

                with MongoClient(self.mongo_uri) as mongo:
                    mongo.drop_database(db)
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        return self._measure("pool", k, m, c, fault, fakes, records, t_start, t_stop, grace, timeout_s)

    def _drive(
        self,
        clients: list[threading.Thread],
        fakes: list[Any],
        fault: str | None,
        t_stop: float,
        timeout_s: float,
    ) -> float | None:
        """Run the client threads to the end of the window; returns the hung scenario's grace period.

        A hung WebUI never answers; after the grace period we let it go so the run can end and count
        the requests that were still stuck (the original would have waited forever)."""
        for t in clients:
            t.start()
        grace = timeout_s + 3 * self.delay + 2.0 if fault == "hung" else None
        if grace is not None:
            time.sleep(max(0.0, t_stop + grace - time.time()))
            fakes[0].hang = False
        for t in clients:
            t.join()
        return grace

    def _measure(
        self,
        impl: str,
        k: int,
        m: int,
        c: int,
        fault: str | None,
        fakes: list[Any],
        records: list[dict[str, Any]],
        t_start: float,
        t_stop: float,
        grace: float | None,
        timeout_s: float,
    ) -> dict[str, Any]:
        d = self.delay
        window = t_stop - t_start
        busy = []
        for f in fakes:
            total = 0.0
            for entry in list(f.requests):
                if not entry["path"].endswith("/txt2img") or entry.get("end") is None:
                    continue
                end = entry.get("gen_end") or entry["end"]  # when the fake left its queue lock
                lo, hi = max(end - d, t_start), min(end, t_stop)
                total += max(0.0, hi - lo)
            busy.append(total)
        # idle gap on an instance between one answer and the next request arriving (inside the window)
        gaps = []
        for f in fakes:
            entries = sorted(  # generations only (not the /progress looks of held-back calls, or probes)
                (e for e in f.requests if e["path"].endswith("/txt2img") and e.get("end") is not None),
                key=lambda e: e["start"],
            )
            gaps += [
                b["start"] - a["end"]
                for a, b in zip(entries, entries[1:], strict=False)
                if t_start < a["end"] < t_stop
            ]
        images_per_s = sum(busy) / d / window
        healthy = k - (1 if fault else 0)
        ideal = healthy / d
        share = [b / sum(busy) if sum(busy) else 0.0 for b in busy]
        lat = sorted(r["end"] - r["start"] for r in records if r["error"] is None)
        stuck = 0 if grace is None else sum(1 for r in records if r["end"] > t_stop + grace)
        return {
            "impl": impl,
            "k": k,
            "m": m,
            "c": c,
            "fault": fault,
            "images_per_s": images_per_s,
            "ideal": ideal,
            "ratio": images_per_s / ideal,
            "share": share,
            "depth": [f.max_concurrent_seen for f in fakes],
            "requests": len(records),
            "images": sum(r["images"] for r in records),
            "empty": sum(r["empty"] for r in records),
            "errors": sum(1 for r in records if r["error"]),
            "first_error": next((r["error"] for r in records if r["error"]), None),
            "p50": statistics.median(lat) if lat else float("nan"),
            "max_latency": max(lat) if lat else float("nan"),
            "stuck": stuck,
            "timeout_s": timeout_s,
            "gap_ms": statistics.median(gaps) * 1000 if gaps else float("nan"),
            "gap_p90_ms": sorted(gaps)[int(len(gaps) * 0.9)] * 1000 if gaps else float("nan"),
        }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        try:
            if requests.get(f"{base}/ping", timeout=1).ok:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("gunicorn did not answer /ping")


def _sketch_body(m: int) -> dict[str, Any]:
    """StepIdeator's "generate new sketches" button with M images (the request its frontend sends)."""
    stage = "草图的辅助生成"
    return {
        "username": "bench",
        "designTask": "设计一款适用于丘陵果园的农业植保无人机",
        "currentNum": m,
        "currentAIStage": stage,
        "currentStage": "草图的环境",
        "selectedTexts": [],
        "selectedCanvasRecords": [],
        "selectedButtonInfo": {"buttonText": "生成全新草图", "aiStage": stage},
    }


# ---------------------------------------------------------------------------------------------- reporting
def _share(row: dict[str, Any]) -> str:
    return "/".join(f"{s * 100:.0f}" for s in row["share"])


def _depth(row: dict[str, Any]) -> int:
    return max(row["depth"])


def _lat(row: dict[str, Any]) -> str:
    return f"{row['p50']:.2f}/{row['max_latency']:.2f}"


def _ideation(args: argparse.Namespace, harness: Harness, k: int, delay: float) -> None:
    """The ideation scenarios (throughput, one dead, one hung) and their targets."""
    ms = [2, 6] if args.quick else [2, 3, 4, 6]
    cs = [4] if args.quick else [1, 4, 8]
    hung_timeout = max(4 * delay, 2.0)

    def pool_run(k: int, m: int, c: int, fault: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
        if args.via == "gunicorn":
            return harness.run_http(k, m, c, fault=fault, timeout_s=timeout_s)
        return harness.run("pool", k, m, c, fault=fault, timeout_s=timeout_s)

    rows: list[tuple[dict[str, Any], dict[str, Any]]] = []
    dead_rows: list[tuple[dict[str, Any], dict[str, Any]]] = []
    hung_rows: list[dict[str, Any]] = []
    print("\n## Throughput (ideal = K/D = %.1f images/s)\n" % (k / delay))
    print(
        "| K | M | C | pool img/s | pool ratio | pool share % | pool max depth | pool idle gap p50/p90 ms | "
        "pool latency p50/max s | original img/s | original ratio | original share % | original max depth | "
        "original latency p50/max s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in ms:
        for c in cs:
            ours = pool_run(k, m, c)
            orig = harness.run("original", k, m, c)
            rows.append((ours, orig))
            print(
                f"| {k} | {m} | {c} | {ours['images_per_s']:.2f} | {ours['ratio']:.3f} | {_share(ours)} | "
                f"{_depth(ours)} | {ours['gap_ms']:.0f}/{ours['gap_p90_ms']:.0f} | {_lat(ours)} | "
                f"{orig['images_per_s']:.2f} | {orig['ratio']:.3f} | "
                f"{_share(orig)} | {_depth(orig)} | {_lat(orig)} |",
                flush=True,
            )
            for row in (ours, orig):
                if row["errors"] or row["empty"]:
                    print(
                        f"|   ! {row['impl']}: {row['errors']} errors, {row['empty']} empty images "
                        f"({row['first_error']}) |",
                        flush=True,
                    )
    c_dead = 4 if args.quick else 8
    print(
        f"\n## One instance dead (connection refused), C={c_dead}; ideal = (K-1)/D = {(k - 1) / delay:.1f}\n"
    )
    print(
        "| K | M | C | pool img/s | pool ratio | pool empty | pool errors | pool max depth | "
        "original ratio | original empty | original max depth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in ms:
        ours = pool_run(k, m, c_dead, fault="dead")
        orig = harness.run("original", k, m, c_dead, fault="dead")
        dead_rows.append((ours, orig))
        print(
            f"| {k} | {m} | {c_dead} | {ours['images_per_s']:.2f} | {ours['ratio']:.3f} | {ours['empty']} | "
            f"{ours['errors']} | {_depth(ours)} | {orig['ratio']:.3f} | {orig['empty']} of {orig['images']} | "
            f"{_depth(orig)} |",
            flush=True,
        )
    print(
        f"\n## One instance hung (accepts, never answers), C=4; pool SD_TIMEOUT_S={hung_timeout:g} s; "
        f"ideal = (K-1)/D = {(k - 1) / delay:.1f}\n"
    )
    print(
        "| impl | K | M | C | img/s | ratio | requests answered | errors | p50 latency s | max latency s | "
        "stuck (unanswered > timeout + 3D + 2 s after the window) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    hung_ms = [2] if args.quick else [2, 4]
    for m in hung_ms:
        for impl in ("pool", "original"):
            row = (
                pool_run(k, m, 4, fault="hung", timeout_s=hung_timeout)
                if impl == "pool"
                else harness.run(impl, k, m, 4, fault="hung", timeout_s=hung_timeout)
            )
            hung_rows.append(row)
            done = row["requests"] - row["stuck"]
            print(
                f"| {impl} | {k} | {m} | 4 | {row['images_per_s']:.2f} | {row['ratio']:.3f} | {done} | "
                f"{row['errors']} | {row['p50']:.2f} | {row['max_latency']:.2f} | {row['stuck']} |",
                flush=True,
            )

    print("\n## Targets")
    at_load = [ours for ours, _ in rows if ours["c"] >= 4]
    worst = min(at_load, key=lambda r: r["ratio"]) if at_load else None
    if worst:
        print(
            f"- >= 0.95 of ideal at C >= 4 for every M: worst {worst['ratio']:.3f} (M={worst['m']}, C={worst['c']}) "
            f"-> {'met' if worst['ratio'] >= 0.95 else 'MISSED'}"
        )
    depth = max(_depth(ours) for ours, _ in rows + dead_rows) if rows else 0
    print(
        f"- requests inside one instance at once <= 2 (one running, at most one queued behind it; SD_QUEUE_DEPTH=2) "
        f"(pool, every scenario): max {depth} -> {'met' if depth <= 2 else 'MISSED'}"
    )
    if dead_rows:
        wd = min(ours["ratio"] for ours, _ in dead_rows)
        empties = sum(ours["empty"] for ours, _ in dead_rows)
        print(
            f"- one dead: >= 0.95 of (K-1)/D: worst {wd:.3f} -> {'met' if wd >= 0.95 else 'MISSED'}; "
            f"empty images {empties} -> {'met' if empties == 0 else 'MISSED'}"
        )
    pool_hung = [r for r in hung_rows if r["impl"] == "pool"]
    if pool_hung:
        ml = max(r["max_latency"] for r in pool_hung)
        stuck = sum(r["stuck"] + r["errors"] for r in pool_hung)
        print(
            f"- one hung: pool max request latency {ml:.2f} s with SD_TIMEOUT_S={hung_timeout:g} s (+ queue wait and "
            f"the retry), {stuck} stuck/failed requests -> {'met' if stuck == 0 else 'MISSED'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer scenarios, shorter windows (about 2 minutes)")
    ap.add_argument("--delay", type=float, default=None, help="seconds per image on each fake instance (1.0)")
    ap.add_argument("--seconds", type=float, default=None, help="measurement window per scenario")
    ap.add_argument(
        "--via",
        choices=["gunicorn", "processes"],
        default="gunicorn",
        help="our pool through the real server (gunicorn -w 4, HTTP, /ideation/generate; default) or "
        "through 4 bare worker processes calling the image provider",
    )
    ap.add_argument(
        "--scenario",
        choices=["ideation", "refinement", "all"],
        default="all",
        help="ideation: StepIdeator's new sketches (throughput, one dead, one hung); refinement: InsPilot's "
        "rapid divergence (type 0: 3 chats, M images, 1 chat) at M = 2, 4, 6; all: both (default)",
    )
    ap.add_argument(
        "--chat-delay", type=float, default=None, help="refinement: seconds per chat on the fake OpenAI (0.2)"
    )
    ap.add_argument(
        "--requests", type=int, default=None, help="refinement: requests per client (4; --quick 2)"
    )
    ap.add_argument(
        "--fakes-in",
        choices=["processes", "threads"],
        default="processes",
        help="refinement: a process per fake SD, as real WebUIs are (default), or all in the bench's "
        "process, sharing one interpreter lock (how it ran until 2026-12-02)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="refinement: CPU priority of everything but the fakes (both servers, the database, the clients; "
        "e.g. 19: the fakes, standing in for WebUIs on GPU hosts of their own, go first); 0: all alike (default)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    delay = args.delay or 1.0
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    k = 4

    from apps.core.embedded_mongo import ensure_embedded_mongo, redact_uri, stop_embedded_mongo

    tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    mongo = ensure_embedded_mongo(tmp)
    command = (
        "python bench/pool.py"
        + (f" --scenario {args.scenario}" if args.scenario != "all" else "")
        + (" --quick" if args.quick else "")
        + (f" --delay {args.delay}" if args.delay else "")
        + (f" --seconds {args.seconds}" if args.seconds else "")
        + (f" --via {args.via}" if args.via != "gunicorn" else "")
        + (f" --chat-delay {args.chat_delay}" if args.chat_delay is not None else "")
        + (f" --requests {args.requests}" if args.requests else "")
        + (f" --fakes-in {args.fakes_in}" if args.fakes_in != "processes" else "")
        + (f" --nice {args.nice}" if args.nice else "")
    )
    print(f"# SD pool benchmark — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — `{command}`")
    if args.scenario != "refinement":
        ours_how = (
            f"the server under `gunicorn -w {WORKERS}`, clients POSTing /ideation/generate (new sketches, "
            f"currentNum=M) on a new connection each"
            if args.via == "gunicorn"
            else f"{WORKERS} worker processes calling the image provider (no HTTP), each request to a random worker"
        )
        print(
            f"# K={k} fake instances, D={delay:g} s/image, window {seconds:g} s per scenario after a 1 s warm-up; "
            f"pool: {ours_how}; original: its model in {WORKERS} worker processes, each request to a random one"
        )
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start, embedded MongoDB (secantusdb) at {redact_uri(mongo.uri)}"
    )
    harness = Harness(mongo.uri, delay, seconds)
    started = time.monotonic()
    try:
        if args.scenario in ("ideation", "all"):
            _ideation(args, harness, k, delay)
        if args.scenario in ("refinement", "all"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import pool_refinement

            pool_refinement.run(
                sys.modules[__name__],
                harness,
                k=k,
                delay=delay,
                chat_delay=0.2 if args.chat_delay is None else args.chat_delay,
                requests_per_client=args.requests or (2 if args.quick else 4),
                ms=[2, 6] if args.quick else [2, 4, 6],
                fakes_in=args.fakes_in,
                nice=args.nice,
                db_pid=mongo.pid,
            )
    finally:
        harness.close()
        stop_embedded_mongo(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(total {time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
