"""Load benchmark: the four apps under `gunicorn -w 4` against the same run with one worker.

    python bench/load.py [--workers 4] [--clients 100] [--requests 10000] [--subscribers 200]

Everything runs on this machine: the embedded MongoDB, the fake OpenAI server (realistic delays:
0.8 s per answer, 30 ms between streamed tokens), two fake SD WebUI instances (1 s per image), the
server under test (`gunicorn -c gunicorn.conf.py`), and the clients (separate processes, so the
load generator's GIL does not inflate the server's latencies; keep-alive connections on http.client,
about 1 ms of CPU less per GET than requests, because on two cores the clients' CPU is taken from
the server: the report prints what they used). Per worker count it measures:

1. mixed load: `--clients` concurrent clients send `--requests` reads (the non-generation GET
   endpoints found in /openapi.json: jobs, books, histories, sessions, images, /auth/me) while
   background clients keep the generation endpoints of all four apps busy (storybook books,
   storyteller SSE stories, ideation and refinement workspaces): requests/s, p50/p99 latency;
2. resident memory of every worker after a warm-up, then after each half of the reads
   (growth between the halves should be ~0: no leak per request);
3. fan-out: `--subscribers` concurrent SSE subscribers on one job that emits an event every
   50 ms: every subscriber must get every event; p50/p99 delivery lag (event written -> received).

Then it prints both runs side by side with the ratios. Rate limiting stays on (with limits too high
to trigger) so its cost is part of the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.servers import gunicorn_argv  # noqa: E402

TARGET_P99_MS = 50.0


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"gunicorn did not listen on {port}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(master: int) -> list[int]:
    return sorted(int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split())


# ---------------------------------------------------------------- client processes


class _KeepAlive:
    """One client's keep-alive HTTP/1.1 connection, on http.client: ~1 ms less CPU per GET than requests
    (1.96 vs 0.72 ms for a stdlib server and its client in one process, on this machine), CPU that on
    two cores the server under test gets back.
    A connection the server closed while idle is reopened once, as requests/urllib3 do for a GET."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> int:
        """GET path, read the whole body; returns the status."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp.status
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _client_proc(base: str, urls: list[str], n: int, threads: int, out: Any, think_s: float = 0.0) -> None:
    """One client process: `threads` keep-alive clients share `n` GETs, each pausing `think_s` (±50 %)
    after every answer, like a person or a polling page (0: back to back); sends back latencies (s)."""
    lat: list[float] = []
    lat_urls: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def client(offset: int) -> None:
        conn = _KeepAlive(base)
        mine: list[float] = []
        mine_urls: list[str] = []
        rng = random.Random(offset)
        if think_s:
            time.sleep(rng.uniform(0, think_s))  # clients start spread out, not in lock-step
        for i in counter:
            path = urls[(i + offset) % len(urls)]
            start = time.perf_counter()
            try:
                status: int | None = conn.get(path)
            except (OSError, http.client.HTTPException) as exc:
                status = None
                conn.close()
                with lock:
                    errors.append(type(exc).__name__)
            mine.append(time.perf_counter() - start)
            mine_urls.append(base + path)
            if status is not None and status >= 400:
                with lock:
                    errors.append(f"{status} {path}")
            if think_s:
                time.sleep(think_s * rng.uniform(0.5, 1.5))
        conn.close()
        with lock:
            lat.extend(mine)
            lat_urls.extend(mine_urls)

    pool = [threading.Thread(target=client, args=(k * 7,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put({"lat": lat, "urls": lat_urls, "errors": errors})


def run_reads(
    base: str, urls: list[str], n: int, clients: int, procs: int = 4, think_s: float = 0.0
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    per_proc = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    children = [
        ctx.Process(target=_client_proc, args=(base, urls, shares[i], per_proc[i], queue, think_s))
        for i in range(procs)
    ]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for c in children:
        c.start()
    results = [queue.get(timeout=600) for _ in children]
    elapsed = time.perf_counter() - start
    for c in children:
        c.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the joined client processes' CPU
    clients_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    lat = [x for r in results for x in r["lat"]]
    by_route: dict[str, list[float]] = {}
    for r in results:
        for x, url in zip(r["lat"], r["urls"], strict=True):
            by_route.setdefault(_route(base, url), []).append(x)
    slowest = sorted(((pct(v, 99) * 1000, k) for k, v in by_route.items()), reverse=True)[:3]
    errors = [e for r in results for e in r["errors"]]
    return {
        "n": len(lat),
        "seconds": elapsed,
        "rps": len(lat) / elapsed,
        "p50_ms": pct(lat, 50) * 1000,
        "p99_ms": pct(lat, 99) * 1000,
        "errors": len(errors),
        "error_examples": errors[:5],
        "slowest_p99": [(round(ms, 1), route) for ms, route in slowest],
        "clients_cores": clients_cpu / elapsed,
    }


def _route(base: str, url: str) -> str:
    """/jobs/<id>-style route of a read URL (ids and queries dropped), for the per-route figures."""
    path = url.removeprefix(base).split("?")[0]
    return "/".join("{id}" if len(part) >= 16 else part for part in path.split("/"))


# ---------------------------------------------------------------- generation load (background)


class GenerationLoad:
    """A few clients that keep all four apps' model paths busy while the reads are measured."""

    def __init__(self, base: str, paths: set[str], clients: int = 4) -> None:
        self.base, self.paths = base, paths
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _count(self, what: str, ok: bool) -> None:
        with self.lock:
            key = f"{what} {'ok' if ok else 'err'}"
            self.counts[key] = self.counts.get(key, 0) + 1

    def _loop(self, i: int) -> None:
        s = requests.Session()
        k = 0
        while not self.stop.is_set():
            k += 1
            try:
                which = (i + k) % 4
                if which == 0 and "/storybook/books" in self.paths:
                    r = s.post(
                        f"{self.base}/storybook/books",
                        json={"description": f"bench book {i}-{k}", "pages": 2},
                        timeout=30,
                    )
                    ok = r.status_code == 202
                    if ok:  # follow it to the end: one book at a time per client, whatever the worker count
                        with s.get(self.base + r.json()["links"]["events"], stream=True, timeout=120) as st:
                            ok = "event: done" in st.text
                    self._count("storybook.book", ok)
                elif which == 1 and "/storyteller/api/settings" in self.paths:
                    r = s.post(
                        f"{self.base}/storyteller/api/settings",
                        json={
                            "maincharacter": "Ada",
                            "keywords": "lighthouse, storm",
                            "genre": "Adventure",
                            "registro": "Casual",
                            "childsafe": True,
                            "maxnowords": 120,
                            "twist": False,
                        },
                        timeout=30,
                    )
                    ok = r.status_code == 200
                    if ok and "/storyteller/stream" in self.paths:
                        session = r.json()["session"]
                        with s.get(
                            f"{self.base}/storyteller/stream",
                            params={"session": session, "action": "next"},
                            stream=True,
                            timeout=60,
                        ) as st:
                            body = st.text
                        ok = st.status_code == 200 and "event: done" in body
                    self._count("storyteller.story", ok)
                elif which == 2 and "/ideation/paint/start" in self.paths:
                    r = s.post(f"{self.base}/ideation/paint/start", json={"username": f"gen{i}"}, timeout=30)
                    self._count("ideation.start", r.status_code == 200)
                elif which == 3 and "/refinement/paint/start" in self.paths:
                    r = s.post(
                        f"{self.base}/refinement/paint/start", json={"username": f"gen{i}"}, timeout=30
                    )
                    self._count("refinement.start", r.status_code == 200)
            except requests.RequestException:
                self._count("request", False)
            self.stop.wait(0.5)

    def __enter__(self) -> GenerationLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


# ---------------------------------------------------------------- SSE fan-out


def sse_fanout(
    base: str, mongo_uri: str, db_name: str, subscribers: int, events: int = 40, interval: float = 0.05
) -> dict[str, Any]:
    from pymongo import MongoClient

    from apps.core.jobs import JobManager

    client: MongoClient = MongoClient(mongo_uri, tz_aware=True)
    jobs = JobManager(client[db_name], workers=1, lease_s=30)
    jobs.start()
    go = threading.Event()
    connected = threading.Semaphore(0)

    def runner(ctx: Any) -> dict:
        go.wait(120)
        for i in range(events):
            ctx.event("tick", {"i": i, "t": time.time()})
            time.sleep(interval)
        return {"n": events}

    job_id = jobs.submit(kind="bench", app="core", runner=runner)
    lags: list[float] = []
    complete = 0
    connect_ms: list[float] = []
    lock = threading.Lock()

    def subscribe() -> None:
        nonlocal complete
        start = time.perf_counter()
        got, mine = 0, []
        try:
            with requests.get(f"{base}/jobs/{job_id}/events", stream=True, timeout=120) as resp:
                first = True
                for line in resp.iter_lines(decode_unicode=True):
                    if first:
                        with lock:
                            connect_ms.append((time.perf_counter() - start) * 1000)
                        connected.release()
                        first = False
                    if line and line.startswith("data:") and '"tick"' in line:
                        now = time.time()
                        data = json.loads(line[5:])["data"]
                        mine.append(now - data["t"])
                        got += 1
                    if line == "event: done":
                        break
        except requests.RequestException:
            pass
        with lock:
            lags.extend(mine)
            complete += got == events

    threads = [threading.Thread(target=subscribe, daemon=True) for _ in range(subscribers)]
    for t in threads:
        t.start()
    for _ in range(subscribers):  # every subscriber has its stream open before the first event
        if not connected.acquire(timeout=60):
            break
    go.set()
    for t in threads:
        t.join(180)
    jobs.shutdown(grace_s=5)
    client.close()
    return {
        "subscribers": subscribers,
        "complete": complete,
        "events": events,
        "lag_p50_ms": pct(lags, 50) * 1000,
        "lag_p99_ms": pct(lags, 99) * 1000,
        "connect_p99_ms": pct(connect_ms, 99) * 1000,
    }


# ---------------------------------------------------------------- one run


def seed(base: str, paths: set[str], get_paths: set[str]) -> tuple[list[str], dict[str, Any]]:
    """Create the data the reads need; returns the read URLs (from /openapi.json) and the seeds."""
    s = requests.Session()
    seeds: dict[str, Any] = {"username": "bench"}
    book = s.post(
        f"{base}/storybook/books",
        json={"description": "the bench fox", "pages": 2, "user": "bench"},
        timeout=30,
    ).json()
    seeds["job_id"] = seeds["book_id"] = book["id"]
    deadline = time.monotonic() + 120
    while s.get(f"{base}/jobs/{book['id']}", timeout=30).json()["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, "seed book did not finish"
        time.sleep(0.2)
    full = s.get(f"{base}/storybook/books/{book['id']}", timeout=30).json()
    pictures = [p["illustration"] for p in full.get("pages", []) if p.get("illustration")]
    if pictures:
        seeds["image_id"] = pictures[0].rsplit("/", 1)[1].removesuffix(".png")
    for app_name in ("ideation", "refinement"):
        if f"/{app_name}/paint/start" in paths:
            s.post(f"{base}/{app_name}/paint/start", json={"username": "bench"}, timeout=30)
    if "/storyteller/api/settings" in paths:
        r = s.post(
            f"{base}/storyteller/api/settings",
            json={
                "maincharacter": "Ada",
                "keywords": "fox",
                "genre": "Adventure",
                "registro": "Casual",
                "childsafe": True,
                "maxnowords": 100,
                "twist": False,
            },
            timeout=30,
        )
        seeds["session"] = r.json()["session"]
    urls = []
    for path in sorted(get_paths):
        if (
            path.endswith(("/events", "/stream"))
            or "get_updates" in path
            or "get_storybook" in path
            or path in ("/health",)
        ):
            continue  # streams, and the legacy GET that starts a book
        url = path.replace("{image_id}.png", f"{seeds.get('image_id', 'x')}.png")
        for key in ("job_id", "book_id", "username"):
            url = url.replace("{" + key + "}", str(seeds[key]))
        if "{" in url or "image_id" in path and "image_id" not in seeds:
            continue
        if path.startswith("/storyteller/api/") and path.endswith(("/session", "/versions")):
            url += f"?session={seeds['session']}"
        elif path == "/storybook/books":
            url += "?user=bench"
        urls.append(url)
    return urls, seeds


def one_run(
    workers: int,
    args: argparse.Namespace,
    fakes: dict[str, Any],
    mongo_uri: str,
    tmp: Path,
    mongo_pid: int | None,
) -> dict[str, Any]:
    port = free_port()
    db_name = f"bench_{workers}_{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MONGO_URI": mongo_uri,
        "MONGO_DB": db_name,
        "DATA_DIR": str(tmp / "data"),
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fakes["openai"].url,
        "OPENAI_API_KEY": "k",
        "LLM_MODEL": "fake-model",
        "IMAGE_PROVIDER": "sdwebui",
        "SD_INSTANCES": ",".join(f.url for f in fakes["sd"]),
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_DEFAULT": "1000000/minute",
        "RATE_LIMIT_GENERATE": "100000/minute",
        "RATE_LIMIT_ENABLED": "true" if args.rate_limit == "on" else "false",
        "GUNICORN_THREADS": str(max(64, (args.subscribers + args.clients) // workers + 32)),
        "GRACEFUL_TIMEOUT": "3",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / f"prom-{workers}"),
    }
    log = open(tmp / f"gunicorn-{workers}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        gunicorn_argv(port, workers),
        cwd=str(ROOT),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_port(port, proc)
        paths_doc = requests.get(f"{base}/openapi.json", timeout=30).json()["paths"]
        paths = set(paths_doc)
        get_paths = {p for p, ops in paths_doc.items() if "get" in ops}
        urls, _ = seed(base, paths, get_paths)
        urls = [u for u in urls if u.split("?")[0].rstrip("/") != ""]
        out: dict[str, Any] = {"workers": workers, "endpoints": urls}
        run_reads(base, urls, min(1000, args.requests), args.clients)  # warm-up
        pids = worker_pids(proc.pid)
        rss0 = [rss_mb(p) for p in pids]
        half = args.requests // 2
        with GenerationLoad(base, paths) as gen:
            # first the clients at a person's pace (before the back-to-back phase leaves a backlog of
            # generation jobs behind), then back to back, then the floor: the cheapest route, back to back
            out["paced"] = run_reads(
                base, urls, args.clients * args.paced_requests, args.clients, think_s=args.think_ms / 1000
            )
            cpu0 = (cpu_s(mongo_pid) if mongo_pid else 0.0, sum(cpu_s(p) for p in pids))
            first = run_reads(base, urls, half, args.clients)
            rss1 = [rss_mb(p) for p in pids]
            second = run_reads(base, urls, args.requests - half, args.clients)
            rss2 = [rss_mb(p) for p in pids]
            cpu1 = (cpu_s(mongo_pid) if mongo_pid else float("nan"), sum(cpu_s(p) for p in pids))
            out["ping"] = run_reads(base, ["/ping"], min(5000, args.requests), args.clients)
        wall = first["seconds"] + second["seconds"]
        out["cpu_share"] = {"mongodb": (cpu1[0] - cpu0[0]) / wall, "workers": (cpu1[1] - cpu0[1]) / wall}
        lat_n = first["n"] + second["n"]
        out["reads"] = {
            "n": lat_n,
            "rps": lat_n / (first["seconds"] + second["seconds"]),
            "p50_ms": (first["p50_ms"] + second["p50_ms"]) / 2,  # halves are the same size
            "p99_ms": max(first["p99_ms"], second["p99_ms"]),
            "errors": first["errors"] + second["errors"],
            "slowest_p99": second["slowest_p99"],
            "error_examples": first["error_examples"] + second["error_examples"],
        }
        out["generation"] = dict(sorted(gen.counts.items()))
        out["rss_mb"] = {
            "warm": rss0,
            "after_half": rss1,
            "after_all": rss2,
            "per_worker": statistics.mean(rss2),
            "growth_second_half_mb": statistics.mean(b - a for a, b in zip(rss1, rss2, strict=True)),
        }
        out["sse"] = sse_fanout(base, mongo_uri, db_name, args.subscribers)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        from pymongo import MongoClient

        with MongoClient(mongo_uri) as c:
            c.drop_database(db_name)


def report(runs: dict[int, dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    multi, single = runs[args.workers], runs[1]
    rows = [
        ("reads: requests/s", "rps", lambda r: r["reads"]["rps"]),
        ("reads: p50 latency (ms)", "p50", lambda r: r["reads"]["p50_ms"]),
        ("reads: p99 latency (ms)", "p99", lambda r: r["reads"]["p99_ms"]),
        ("reads: errors", "err", lambda r: r["reads"]["errors"]),
        (f"paced reads (think {args.think_ms:.0f} ms): requests/s", "prps", lambda r: r["paced"]["rps"]),
        ("paced reads: p50 latency (ms)", "pp50", lambda r: r["paced"]["p50_ms"]),
        ("paced reads: p99 latency (ms)", "pp99", lambda r: r["paced"]["p99_ms"]),
        ("paced reads: errors", "perr", lambda r: r["paced"]["errors"]),
        (
            "paced reads: CPU of the clients (cores)",
            "pcli",
            lambda r: r["paced"]["clients_cores"],
        ),
        ("floor, GET /ping back to back: requests/s", "frps", lambda r: r["ping"]["rps"]),
        ("floor, GET /ping back to back: p99 (ms)", "fp99", lambda r: r["ping"]["p99_ms"]),
        ("memory per worker after all reads (MB)", "rss", lambda r: r["rss_mb"]["per_worker"]),
        ("memory growth in the 2nd half (MB/worker)", "grow", lambda r: r["rss_mb"]["growth_second_half_mb"]),
        (f"SSE: subscribers with every event (of {args.subscribers})", "sse", lambda r: r["sse"]["complete"]),
        ("SSE: delivery lag p50 (ms)", "lag50", lambda r: r["sse"]["lag_p50_ms"]),
        ("SSE: delivery lag p99 (ms)", "lag99", lambda r: r["sse"]["lag_p99_ms"]),
        ("CPU during reads: embedded MongoDB (cores)", "cpudb", lambda r: r["cpu_share"]["mongodb"]),
        ("CPU during reads: all gunicorn workers (cores)", "cpuw", lambda r: r["cpu_share"]["workers"]),
    ]
    lines = [
        f"bench/load.py  {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}  "
        f"{platform.platform()}  {os.cpu_count()} cores  python {platform.python_version()}",
        f"command: python bench/load.py --workers {args.workers} --clients {args.clients} "
        f"--requests {args.requests} --subscribers {args.subscribers} --rate-limit {args.rate_limit} "
        f"--think-ms {args.think_ms:g} --paced-requests {args.paced_requests}"
        f"   ({elapsed:.0f} s)",
        f"read endpoints ({len(multi['endpoints'])}): {', '.join(sorted({u.split('?')[0] for u in multi['endpoints']}))}",
        f"generation load -w {args.workers}: {multi['generation']}",
        "",
        f"{'metric':<52} {'-w 1':>10} {'-w ' + str(args.workers):>10} {'ratio':>8}",
    ]
    for label, _, get in rows:
        a, b = get(single), get(multi)
        ratio = b / a if a else float("nan")
        digits = 2 if "CPU" in label else 1
        lines.append(f"{label:<52} {a:>10.{digits}f} {b:>10.{digits}f} {ratio:>8.2f}")
    lines.append("")
    for what, key in ((f"paced (think {args.think_ms:.0f} ms)", "paced"), ("back to back", "reads")):
        p99 = multi[key]["p99_ms"]
        lines.append(
            f"target p99 < {TARGET_P99_MS:.0f} ms at {args.clients} clients, {what}, -w {args.workers}: "
            f"{'met' if p99 < TARGET_P99_MS else 'NOT met'} ({p99:.1f} ms)"
        )
    floor = multi["ping"]
    lines.append(
        f"closed-loop bound: {args.clients} clients back to back wait >= clients / throughput; with "
        f"GET /ping (no database) at {floor['rps']:.0f} requests/s that is "
        f"{args.clients / floor['rps'] * 1000:.0f} ms per request on this machine"
    )
    for run in (single, multi):
        lines.append(
            f"slowest routes by p99 (ms), -w {run['workers']}: paced {run['paced']['slowest_p99']}; "
            f"back to back {run['reads'].get('slowest_p99')}"
        )
    for run in (single, multi):
        if run["reads"]["error_examples"]:
            lines.append(f"errors (-w {run['workers']}): {run['reads']['error_examples']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument(
        "--think-ms",
        type=float,
        default=1000.0,
        help="paced phase: each client's pause between requests (a person, a polling page)",
    )
    parser.add_argument("--paced-requests", type=int, default=20, help="paced phase: requests per client")
    parser.add_argument(
        "--rate-limit",
        choices=["on", "off"],
        default="on",
        help="on: limits too high to trigger, so their cost is measured",
    )
    parser.add_argument(
        "--mongo-uri",
        default=None,
        help="benchmark against this MongoDB instead of the embedded one (a database per run "
        "is created and dropped)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()

    from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo
    from tests.fakes.fake_openai import FakeOpenAI
    from tests.fakes.fake_sd import FakeSD
    from tests.test_storybook import story_responder

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmpdir:
        tmp = Path(tmpdir)
        mongo = None if args.mongo_uri else ensure_embedded_mongo(tmp / "mongo")
        mongo_uri = args.mongo_uri or mongo.uri  # type: ignore[union-attr]
        openai = FakeOpenAI().start()
        openai.delay, openai.stream_delay = 0.8, 0.03
        # book plans with the asked-for pages and distinct page texts (the bare default reply makes
        # every book fail at its first page, so the background book load never got past it)
        openai.set_responder(story_responder(openai))
        sd = [FakeSD(delay=1.0, name=f"sd{i}").start() for i in range(2)]
        runs: dict[int, dict[str, Any]] = {}
        try:
            for workers in (1, args.workers):
                print(f"running with -w {workers} ...", file=sys.stderr, flush=True)
                runs[workers] = one_run(
                    workers, args, {"openai": openai, "sd": sd}, mongo_uri, tmp, mongo.pid if mongo else None
                )
        finally:
            openai.stop()
            for fake in sd:
                fake.stop()
            if mongo is not None:
                stop_embedded_mongo(tmp / "mongo")
    text = report(runs, args, time.monotonic() - started)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=2, default=str))


if __name__ == "__main__":
    main()
