"""The refinement scenario of bench/pool.py: InsPilot's rapid divergence through our pool and the original's.

    python bench/pool.py --scenario refinement            # M = 2, 4, 6, 4 clients x 4 requests
    python bench/pool.py --scenario refinement --quick    # M = 2, 6, 4 clients x 2 requests

Not run on its own: bench/pool.py imports it and hands it its harness (the 4 worker processes
the original's model runs in) and its helpers (`gunicorn_argv`, `_free_port`, `_wait_http`).

What runs, in one run and on the same fakes:
- K fake SD WebUIs at D s per image (one generation at a time, the rest queue inside, like the
  WebUI), each in a process of its own as real WebUIs are (`fake_sd_process.py`; `--fakes-in threads`
  runs them in this process, as until 2026-12-02), and one fake OpenAI answering every chat after T s;
- ours: the real server, `gunicorn -w 4 -k gthread --threads 8` on this repository (embedded MongoDB,
  LLM_PROVIDER=openai on the fake, SD_INSTANCES the fakes), once per SD_QUEUE_DEPTH value (1 and 2,
  passed in the environment; a server that does not know the setting ignores it and the columns
  then agree); C clients POST `/refinement/generate` type 0 with num=M (what InsPilot's frontend
  sends), each on a new connection so the kernel picks the worker, from client processes (reading
  a reply of M base64 images in this process would take the GIL from the fakes, which run here);
- the original (InsPilot-api): in the harness's 4 worker processes, each request to a random one,
  3 chats in sequence over HTTP to the same fake OpenAI, then the M images through `OriginalPool`
  (a per-process Semaphore(K) + FIFO of the K URLs, a fresh ThreadPoolExecutor per request) at the
  app's scene size, then 1 chat;
- C closed-loop clients, R requests each;
- CPU priority (`--nice N`): real WebUIs run on GPU hosts of their own, but here the fakes share 2 cores
  with what is measured; `--nice 19` runs everything but the fakes (both servers, the embedded database,
  the clients and the original's worker processes) at that nice level, so the fakes go first. Default 0:
  all alike. Measured 2026-12-02 (docs/pool.md): with our processes at nice 19 the fakes' hand-off from
  one generation to the next took 1.3-1.6 ms on average instead of 2.9 ms, but M=4 stayed a toss-up.

Measured per run, from the instances' side: images/s over the span from the first image's start to
the last one's end (a generation of n images occupies its instance for the n*D s before the fake
leaves its queue lock, `gen_end`; like the WebUI it encodes the PNGs after that), as a share of the
ideal K/D; max queue depth per instance (FakeSD.max_concurrent_seen: generations inside an instance
at once, running or queued, so 2 = one running + one waiting) and max running (FakeSD.max_running, 1 = never two at once). From the
clients' side: requests ok (ours: success, M creatives, every image a PNG; the original: M non-empty
images, every chat 200) and latency p50/max. Where an instance's time went besides sampling (worst
instance, ms summed over the run): hand-off, from one generation leaving the fake's queue lock to the
next one, already waiting inside, taking it; overrun, a generation holding the lock past its n*D.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

TASK = "设计一款运动辅助产品"
PNG_B64 = "iVBORw0KGgo"  # base64 of the PNG signature's first 8 bytes
CLIENTS = 4
DEPTHS = (1, 2)
THREADS = 8  # gunicorn --threads, as the measurement


def _body(m: int) -> dict[str, Any]:
    """InsPilot's rapid divergence button with M stimuli (tests/test_refinement.py R3)."""
    return {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": m}}


def _reply_ok(resp: Any, m: int) -> str | None:
    """None when the reply is a full type 0 answer; else why not."""
    try:
        env = resp.json()
    except ValueError:
        return f"{resp.status_code} not JSON"
    if resp.status_code != 200 or not env.get("success"):
        return f"{resp.status_code} {env.get('message')}"[:200]
    result = (env.get("data") or {}).get("result") or []
    if len(result) != m:
        return f"{len(result)} creatives of {m}"
    images = [
        it.get("image") for c in result for it in c.get("items", []) if str(it.get("type")).endswith("Image")
    ]
    if len(images) < m or not all(isinstance(i, str) and i.startswith(PNG_B64) for i in images):
        return f"{sum(1 for i in images if isinstance(i, str) and i.startswith(PNG_B64))} PNGs of {m}"
    return None


# ---------------------------------------------------------------------------------------------- ours
def send_type0(base: str, m: int) -> tuple[str | None, float, float]:
    """POST one type 0 request on a new connection; (why not ok or None, start, end). Runs in a client process:
    reading a reply (M base64 images) must not take the GIL from the fakes in the bench's process, just as
    the original's requests run in the harness's worker processes."""
    import requests

    start = time.time()
    try:
        resp = requests.post(
            f"{base}/refinement/generate", json=_body(m), timeout=600, headers={"Connection": "close"}
        )
        error = _reply_ok(resp, m)
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    return error, start, time.time()


class Server:
    """The real server under gunicorn on the shared fakes, with SD_QUEUE_DEPTH=depth in its environment."""

    def __init__(
        self,
        bench: ModuleType,
        mongo_uri: str,
        sd_urls: list[str],
        openai_url: str,
        depth: int,
        senders: ProcessPoolExecutor,
        nice: int = 0,
    ) -> None:
        self.depth = depth
        self.senders = senders
        self.db = f"bench_pool_refinement_{os.getpid()}_{depth}"
        self.mongo_uri = mongo_uri
        port = bench._free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(bench.ROOT),
            "MONGO_URI": mongo_uri,
            "MONGO_DB": self.db,
            "DATA_DIR": str(Path(tempfile.gettempdir()) / f"bench-pool-refinement-{os.getpid()}-{depth}"),
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": openai_url,
            "OPENAI_API_KEY": "k",
            "LLM_MODEL": "fake-model",
            "IMAGE_PROVIDER": "sdwebui",
            "SD_INSTANCES": ",".join(sd_urls),
            "SD_QUEUE_DEPTH": str(depth),
            "SD_TIMEOUT_S": "60",
            "SD_WAIT_TIMEOUT_S": "120",
            "RATE_LIMIT_ENABLED": "false",
            "LOG_LEVEL": "ERROR",
            "GUNICORN_THREADS": str(THREADS),
        }
        self.data_dir = Path(env["DATA_DIR"])
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            bench.gunicorn_argv(port, bench.WORKERS),
            cwd=str(bench.ROOT),
            preexec_fn=(lambda: os.nice(nice)) if nice else None,  # the workers and their threads inherit it
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{port}"
        self.bench = bench

    def ready(self) -> None:
        """Up, and every worker warmed (pool, database connections): 2 x workers type 0 requests at once."""
        self.bench._wait_http(self.base, self.proc)
        with ThreadPoolExecutor(2 * self.bench.WORKERS) as ex:
            errors = [e for e in ex.map(lambda _: self.post(1)[0], range(2 * self.bench.WORKERS)) if e]
        if errors:
            raise RuntimeError(f"warm-up of SD_QUEUE_DEPTH={self.depth} failed: {errors[0]}\n{self.tail()}")

    def post(self, m: int) -> tuple[str | None, float, float]:
        """One type 0 request, sent from a client process (`send_type0`)."""
        return self.senders.submit(send_type0, self.base, m).result()

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-2000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        try:
            from pymongo import MongoClient

            with MongoClient(self.mongo_uri) as mongo:
                mongo.drop_database(self.db)
        except Exception:  # noqa: BLE001 - cleanup only
            pass


def lower_priority(pid: int, nice: int) -> None:
    """Every thread of a running process (and so the threads and children it starts later) at `nice`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def server_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes and, for a gunicorn master, its workers
    (`bench/load.py`'s readers)."""
    from load import cpu_s, worker_pids

    return sum(cpu_s(pid) + sum(cpu_s(w) for w in worker_pids(pid)) for pid in pids)


def _closed_loop(send: Any, clients: int, requests_per_client: int) -> list[dict[str, Any]]:
    """C client threads, each sending R requests one after another; send(cid, n) -> (error, start, end)."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(cid: int) -> None:
        for n in range(requests_per_client):
            error, start, end = send(cid, n)
            with lock:
                records.append({"client": cid, "start": start, "end": end, "error": error})

    threads = [threading.Thread(target=client, args=(cid,), daemon=True) for cid in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


# ---------------------------------------------------------------------------------------------- the original
class Original:
    """The original's model in the harness's worker processes (bench/pool.py `_original_refinement`)."""

    def __init__(
        self, bench: ModuleType, harness: Any, sd_urls: list[str], openai_url: str, seed: int = 7
    ) -> None:
        from agent.prompts import PromptLibrary
        from apps.refinement.images import sd_options

        opts = sd_options(PromptLibrary(bench.ROOT / "settings"), "scene")
        self.bench, self.harness, self.seed = bench, harness, seed
        self.spec = {
            "impl": "original",
            "urls": sd_urls,
            "chat_url": openai_url + "/chat/completions",
            "model": "fake-model",
            "width": int(opts["width"]),
            "height": int(opts["height"]),
            "steps": int(opts["steps"]),
        }

    def run(self, m: int, clients: int, requests_per_client: int, warm: Any) -> list[dict[str, Any]]:
        h = self.harness
        for q in h.cmd_qs:
            q.put(self.spec)
        h._collect("ready", 60)
        try:
            for worker in range(self.bench.WORKERS):  # one request per worker first, as ours is warmed
                h._request(worker, ["warm-up"])
            warm()

            def send(cid: int, n: int) -> tuple[str | None, float, float]:
                worker = random.Random(self.seed * 1000 + m * 100 + cid * 10 + n).randrange(
                    self.bench.WORKERS
                )
                start = time.time()
                images, empty, error = h._request(
                    worker, [f"client {cid} request {n} scene {i}" for i in range(m)]
                )
                if error is None and (images != m or empty):
                    error = f"{images - empty} images of {m}"
                return error, start, time.time()

            return _closed_loop(send, clients, requests_per_client)
        finally:
            for q in h.cmd_qs:
                q.put(("end",))
            h._collect("done", 120)


# ---------------------------------------------------------------------------------------------- measuring
def _images_in(entry: dict[str, Any]) -> int:
    """How many images a txt2img request asked for (batch_size x n_iter)."""
    body = entry.get("json") or {}
    return max(1, int(body.get("batch_size") or 1)) * max(1, int(body.get("n_iter") or 1))


def _measure(fakes: list[Any], records: list[dict[str, Any]], k: int, d: float) -> dict[str, Any]:
    logs = [list(f.requests) for f in fakes]  # one read per fake (over a pipe for a fake in a process)
    spans: list[tuple[float, float]] = []
    images = 0
    for log in logs:
        for e in log:
            if not e["path"].endswith("/txt2img") or e.get("end") is None or e.get("status") != 200:
                continue
            n = _images_in(e)
            images += n
            end = e.get("gen_end") or e["end"]  # the instance's side: its sampling ended here
            spans.append((end - n * d, end))
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else float("nan")
    losses = _instance_losses(logs, d)
    worst = max(losses, key=lambda x: sum(x.values()), default={})
    per_s = images / span if spans and span > 0 else 0.0
    lat = sorted(r["end"] - r["start"] for r in records)
    return {
        "images": images,
        "span": span,
        "images_per_s": per_s,
        "ratio": per_s / (k / d),
        "depth": [f.max_concurrent_seen for f in fakes],
        "running": max(f.max_running for f in fakes),
        "ok": sum(1 for r in records if r["error"] is None),
        "requests": len(records),
        "first_error": next((r["error"] for r in records if r["error"]), None),
        "p50": statistics.median(lat) if lat else float("nan"),
        "max_latency": max(lat) if lat else float("nan"),
        "handoff_ms": max((x["handoff"] for x in losses), default=float("nan")),
        "overrun_ms": max((x["overrun"] for x in losses), default=float("nan")),
        "worst_loss": worst,
    }


def _instance_losses(logs: list[list[dict[str, Any]]], d: float) -> list[dict[str, float]]:
    """Where each instance's time went besides sampling, in ms summed over the run: lead, from the first
    image's start (on any instance) to this instance's first; hand-off, from one generation leaving the
    fake's queue lock to the next one, already waiting inside, taking it; idle, the same gap when nothing
    was waiting yet; overrun, a generation holding the lock longer than its n*D (its sleep woke late).
    The span is the worst instance's n*D plus these (and its tail, when it ran out of work first)."""
    gens_of = [
        sorted(
            (e for e in log if e["path"].endswith("/txt2img") and e.get("gen_start") and e.get("gen_end")),
            key=lambda e: e["gen_start"],
        )
        for log in logs
    ]
    starts = [g[0]["gen_start"] for g in gens_of if g]
    first = min(starts) if starts else 0.0
    losses = []
    for gens in gens_of:
        pairs = list(zip(gens, gens[1:], strict=False))
        losses.append(
            {
                "lead": (gens[0]["gen_start"] - first) * 1000 if gens else 0.0,
                "handoff": sum(b["gen_start"] - a["gen_end"] for a, b in pairs if b["start"] < a["gen_end"])
                * 1000,
                "idle": sum(b["gen_start"] - a["gen_end"] for a, b in pairs if b["start"] >= a["gen_end"])
                * 1000,
                "overrun": sum(max(0.0, e["gen_end"] - e["gen_start"] - _images_in(e) * d) for e in gens)
                * 1000,
            }
        )
    return losses


def _warm(fakes: list[Any], harness: Any, cpu_box: list[float]) -> None:
    """After the original's warm-up: fresh fakes, and its workers' CPU so far (the run's CPU starts here)."""
    _reset(fakes)
    cpu_box.append(server_cpu_s([p.pid for p in harness.procs]))


def _reset(fakes: list[Any]) -> None:
    for f in fakes:
        f.reset()


# ---------------------------------------------------------------------------------------------- the scenario
def run(
    bench: ModuleType,
    harness: Any,
    *,
    k: int,
    delay: float,
    chat_delay: float,
    requests_per_client: int,
    ms: list[int],
    clients: int = CLIENTS,
    fakes_in: str = "processes",
    nice: int = 0,
    db_pid: int | None = None,
) -> list[dict[str, Any]]:
    """Run the scenario, print its tables and targets (markdown); returns one row per M. `fakes_in`:
    "processes" (a process per fake SD, as real WebUIs are; `fake_sd_process.py`) or "threads" (all in
    this process, sharing its interpreter lock: how it ran until 2026-12-02). `nice`: the CPU priority of
    everything but the fakes (both servers, the database `db_pid`, the clients): the fakes stand in for
    WebUIs on GPU hosts of their own, so here they go first on the shared cores; 0 runs all alike (as
    until 2026-12-02)."""
    from fake_sd_process import FakeSDProcess

    from tests.fakes.fake_openai import FakeOpenAI
    from tests.fakes.fake_sd import FakeSD

    openai = FakeOpenAI().start()
    openai.delay = chat_delay
    make_fake = FakeSDProcess if fakes_in == "processes" else FakeSD
    fakes: list[Any] = [make_fake(delay=delay, name=f"sd{i}").start() for i in range(k)]
    urls = [f.url for f in fakes]
    servers: dict[int, Server] = {}
    rows: list[dict[str, Any]] = []
    print(
        f"\n## Refinement: InsPilot's rapid divergence (type 0: 3 chats in sequence, M images, 1 chat); "
        f"K={k} fake SD at D={delay:g} s/image, fake OpenAI at T={chat_delay:g} s/chat, "
        f"{clients} clients x {requests_per_client} requests, the fake SDs in {fakes_in}; "
        f"ideal = K/D = {k / delay:.1f} images/s; "
        + (
            f"everything but the fakes (both servers, the database, the clients) at nice {nice}, the fakes at 0 "
            f"(they stand in for WebUIs on GPU hosts of their own)\n"
            if nice
            else "everything at the same CPU priority\n"
        )
    )
    print(
        f"# ours: the server under `gunicorn -w {bench.WORKERS} -k gthread --threads {THREADS}`, POST "
        f"/refinement/generate on a new connection each, one server per SD_QUEUE_DEPTH value; original: "
        f"InsPilot-api's sequence and pool model in {bench.WORKERS} worker processes, each request to a random one; "
        f"images/s over the span from the first image's start to the last one's end",
        flush=True,
    )
    if nice:
        for pid in [p.pid for p in harness.procs] + ([db_pid] if db_pid else []):
            lower_priority(pid, nice)
    senders = ProcessPoolExecutor(
        max(clients, 2 * bench.WORKERS),
        mp_context=mp.get_context("spawn"),
        initializer=os.nice if nice else None,
        initargs=(nice,) if nice else (),
    )
    try:
        for depth in DEPTHS:
            servers[depth] = Server(bench, harness.mongo_uri, urls, openai.url, depth, senders, nice)
        for server in servers.values():
            server.ready()
        original = Original(bench, harness, urls, openai.url)
        for m in ms:
            row: dict[str, Any] = {"m": m}
            for depth, server in servers.items():
                _reset(fakes)
                before = (server_cpu_s([server.proc.pid]), server_cpu_s([db_pid]) if db_pid else 0.0)
                records = _closed_loop(lambda cid, n, s=server, m=m: s.post(m), clients, requests_per_client)
                row[depth] = _measure(fakes, records, k, delay)
                row[depth]["cpu"] = (
                    server_cpu_s([server.proc.pid]) - before[0],
                    server_cpu_s([db_pid]) - before[1] if db_pid else None,
                )
            start_cpu: list[float] = []
            records = original.run(
                m, clients, requests_per_client, warm=lambda box=start_cpu: _warm(fakes, harness, box)
            )
            row["original"] = _measure(fakes, records, k, delay)
            row["original"]["cpu"] = (server_cpu_s([p.pid for p in harness.procs]) - start_cpu[-1], None)
            rows.append(row)
            if m == ms[0]:
                _print_header()
            _print_row(row)
    finally:
        for server in servers.values():
            server.stop()
        senders.shutdown()
        for f in fakes:
            f.stop()
        openai.stop()
    _print_details(rows)
    _print_targets(rows)
    return rows


def _cols() -> list[Any]:
    return [*DEPTHS, "original"]


def _label(col: Any) -> str:
    return f"ours SD_QUEUE_DEPTH={col}" if col != "original" else "the original (InsPilot-api)"


def _print_header() -> None:
    cols = _cols()
    print()
    print(
        "| M | "
        + " | ".join(f"{_label(c)} img/s (share of K/D)" for c in cols)
        + " | queue depth "
        + " / ".join(f"d={c}" if c != "original" else "original" for c in cols)
        + " | requests ok "
        + " / ".join(f"d={c}" if c != "original" else "original" for c in cols)
        + " |"
    )
    print("|---" * (len(cols) + 3) + "|")


def _print_row(row: dict[str, Any]) -> None:
    cols = _cols()
    cells = [f"{row[c]['images_per_s']:.2f} ({row[c]['ratio']:.3f})" for c in cols]
    depth = " / ".join(str(max(row[c]["depth"])) for c in cols)
    ok = " / ".join(f"{row[c]['ok']}/{row[c]['requests']}" for c in cols)
    print(f"| {row['m']} | " + " | ".join(cells) + f" | {depth} | {ok} |", flush=True)
    for c in cols:
        if row[c]["first_error"]:
            print(f"|   ! {_label(c)}: first error: {row[c]['first_error']} |", flush=True)


def _print_details(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| M | impl | images | span s | img/s | share of K/D | max depth per instance | max running | "
        "requests ok | latency p50/max s | hand-off / overrun ms (most of any instance) | "
        "lead / hand-off / idle / overrun ms (the instance that lost most) | CPU s: server / its database |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for c in _cols():
            r = row[c]
            print(
                f"| {row['m']} | {_label(c)} | {r['images']} | {r['span']:.2f} | {r['images_per_s']:.2f} | "
                f"{r['ratio']:.3f} | {'/'.join(map(str, r['depth']))} | {r['running']} | "
                f"{r['ok']}/{r['requests']} | {r['p50']:.2f}/{r['max_latency']:.2f} | "
                f"{r['handoff_ms']:.0f} / {r['overrun_ms']:.0f} | "
                + " / ".join(
                    f"{r['worst_loss'].get(k, float('nan')):.0f}"
                    for k in ("lead", "handoff", "idle", "overrun")
                )
                + f" | {r['cpu'][0]:.2f} / "
                + ("none" if r["cpu"][1] is None else f"{r['cpu'][1]:.2f}")
                + " |"
            )


def _print_targets(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    main = max(DEPTHS)  # the default, SD_QUEUE_DEPTH=2

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"\n## Targets (refinement; ours = SD_QUEUE_DEPTH={main}, the default)")
    behind = [r["m"] for r in rows if r[main]["images_per_s"] < r["original"]["images_per_s"]]
    print(
        "- ours >= the original's pool model at every M: "
        + ", ".join(f"M={r['m']} {r[main]['ratio']:.3f} vs {r['original']['ratio']:.3f}" for r in rows)
        + f" -> {verdict(not behind)}"
    )
    big = [r for r in rows if r["m"] >= 4]
    if big:
        worst = min(big, key=lambda r: r[main]["ratio"])
        print(
            f"- >= 0.95 of K/D at M = 4 and 6: worst {worst[main]['ratio']:.3f} (M={worst['m']}) "
            f"-> {verdict(worst[main]['ratio'] >= 0.95)}"
        )
    bad = sum(r[c]["requests"] - r[c]["ok"] for r in rows for c in DEPTHS)
    total = sum(r[c]["requests"] for r in rows for c in DEPTHS)
    print(f"- every request ok (ours, every depth): {total - bad}/{total} -> {verdict(bad == 0)}")
    running = max(r[c]["running"] for r in rows for c in DEPTHS)
    print(
        f"- no instance ever runs two generations at once (ours): max running {running} -> {verdict(running <= 1)}"
    )
    for c in DEPTHS:
        depth = max(max(r[c]["depth"]) for r in rows)
        print(
            f"- at most {c - 1} waiting behind the running one with SD_QUEUE_DEPTH={c}: max depth {depth} "
            f"-> {verdict(depth <= c)}"
        )
