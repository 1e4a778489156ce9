"""Embedded LLM benchmark: in-process llama.cpp vs the same model behind llama.cpp's OpenAI-compatible server.

    python bench/llm.py [--tokens 200] [--runs 3]

Measures, on this machine, for the `local` provider in this process (LOCAL_LLM_MODE=inprocess) and for
`python -m llama_cpp.server` on 127.0.0.1 called with the `openai` SDK (what LOCAL_LLM_MODE=server and
LLM_PROVIDER=openai + OPENAI_BASE_URL do): load time, time to first token, tokens/s of a 200-token
completion, resident memory; then prints both side by side with the ratios server/inprocess.
Both routes get the same prompts, seeds and sampling settings, so they generate the same tokens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.llm.providers.local import LocalProvider  # noqa: E402
from agent.llm.providers.local_server import (  # noqa: E402
    ensure_local_llm_server,
    local_llm_server_state,
    stop_local_llm_server,
)
from agent.llm.providers.model_files import resolve_model_path  # noqa: E402

SYSTEM = "You are a children's book author. Write vivid, simple sentences."
SUBJECTS = [
    "a brave little fox",
    "a lighthouse keeper's cat",
    "a robot who learns to paint",
    "two friends building a raft",
    "a snowman who wants to see summer",
]
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory (VmRSS) of a process in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def messages(i: int) -> list[dict[str, str]]:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Write a long story about {subject}. Use at least 300 words."},
    ]


def timed(deltas: Any) -> dict[str, float]:
    """Drain a delta iterator; time to first delta, total time, delta count."""
    start = time.perf_counter()
    first = None
    n = 0
    for delta in deltas:
        if not delta:
            continue
        if first is None:
            first = time.perf_counter() - start
        n += 1
    total = time.perf_counter() - start
    first = first if first is not None else total
    return {"ttft": first, "total": total, "deltas": n}


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    med = statistics.median
    return {
        "ttft_ms": med(r["ttft"] for r in runs) * 1000,
        "total_s": med(r["total"] for r in runs),
        "tokens": med(r["tokens"] for r in runs),
        "decode_tps": med(
            (r["tokens"] - 1) / (r["total"] - r["ttft"]) for r in runs if r["total"] > r["ttft"]
        ),
        "e2e_tps": med(r["tokens"] / r["total"] for r in runs),
    }


class InProcess:
    """The `local` provider in this process (LOCAL_LLM_MODE=inprocess)."""

    def __init__(self, tokens: int, threads: int) -> None:
        self.tokens = tokens
        self.rss_before = rss_mb()
        self.provider = LocalProvider(n_threads=threads, default_max_tokens=tokens)
        self.load_s = self.provider.load()
        self.provider.complete(messages(99), params={"max_tokens": 8, "seed": 0})  # warm-up

    def run(self, i: int) -> dict[str, float]:
        r = timed(
            self.provider.stream(messages(i), params={"max_tokens": self.tokens, "seed": i, **SAMPLING})
        )
        r["tokens"] = self.provider.last_usage.get("completion_tokens", r["deltas"])
        return r

    def memory(self) -> dict[str, float]:
        return {"rss_mb": rss_mb(), "rss_model_mb": rss_mb() - self.rss_before}


class ServerRoute:
    """llama.cpp's OpenAI-compatible server on 127.0.0.1 (LOCAL_LLM_MODE=server), called with the openai SDK."""

    def __init__(self, tokens: int, threads: int, state_dir: Path) -> None:
        import openai

        self.tokens = tokens
        start = time.perf_counter()
        base_url = ensure_local_llm_server(None, 2048, state_dir, threads)
        self.load_s = time.perf_counter() - start
        state = local_llm_server_state(state_dir) or {}
        self.pid = int(state["pid"])
        self.client = openai.OpenAI(
            base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=300
        )
        self.model = resolve_model_path(None).name
        list(self._call(99, 8, 0))  # warm-up

    def _call(self, i: int, max_tokens: int, seed: int) -> Any:
        extra = {k: SAMPLING[k] for k in ("top_k", "min_p", "repeat_penalty")}
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=messages(i),
            max_tokens=max_tokens,
            seed=seed,
            stream=True,
            temperature=SAMPLING["temperature"],
            top_p=SAMPLING["top_p"],
            extra_body=extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def run(self, i: int) -> dict[str, float]:
        r = timed(self._call(i, self.tokens, i))
        r["tokens"] = r["deltas"]  # llama.cpp's server sends one chunk per token
        return r

    def memory(self) -> dict[str, float]:
        return {"rss_mb": rss_mb(self.pid), "rss_model_mb": rss_mb(self.pid)}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each timed completion")
    parser.add_argument("--runs", type=int, default=5, help="timed completions per route (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import llama_cpp

    path = resolve_model_path(None)
    print(
        f"# bench/llm.py  {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}  `python bench/llm.py "
        f"--tokens {args.tokens} --runs {args.runs}`"
    )
    print(
        f"# machine: {os.cpu_count()} cores ({cpu_name()}), Python {platform.python_version()}, "
        f"llama-cpp-python {llama_cpp.__version__}, threads={args.threads}"
    )
    print(f"# model: {path.name} ({path.stat().st_size / 1e6:.0f} MB), n_ctx=2048, sampling {SAMPLING}")
    print(
        f"# each route: 1 warm-up call, then {args.runs} streamed completions of up to {args.tokens} tokens "
        "(different prompts, same seeds on both routes); medians"
    )

    import openai  # noqa: F401 - imported before the memory baseline, like llama_cpp

    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        try:
            routes = {
                "inprocess": InProcess(args.tokens, args.threads),
                "server": ServerRoute(args.tokens, args.threads, Path(tmp)),
            }
            # interleaved, so a burst of other load on the machine hits both routes alike
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in routes}
            for i in range(args.runs):
                for name, route in routes.items():
                    runs[name].append(route.run(i))
            inproc = {
                **summarise(runs["inprocess"]),
                **routes["inprocess"].memory(),
                "load_s": routes["inprocess"].load_s,
            }
            server = {
                **summarise(runs["server"]),
                **routes["server"].memory(),
                "load_s": routes["server"].load_s,
            }
        finally:
            stop_local_llm_server(tmp)
    spread = {
        name: [round((r["tokens"] - 1) / (r["total"] - r["ttft"])) for r in rs] for name, rs in runs.items()
    }

    rows = [
        ("load (s)", "load_s", "{:.2f}"),
        ("time to first token (ms)", "ttft_ms", "{:.0f}"),
        ("completion tokens", "tokens", "{:.0f}"),
        ("completion time (s)", "total_s", "{:.2f}"),
        ("decode tokens/s (after 1st token)", "decode_tps", "{:.1f}"),
        ("end-to-end tokens/s", "e2e_tps", "{:.1f}"),
        ("RSS of the model holder (MB)", "rss_mb", "{:.0f}"),
        ("RSS added by the model (MB)", "rss_model_mb", "{:.0f}"),
    ]
    print()
    print(f"| {'metric':36} | {'inprocess':>10} | {'server+openai':>13} | {'server/inprocess':>16} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 15}|{'-' * 18}|")
    for label, key, fmt in rows:
        a, b = inproc[key], server[key]
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"| {label:36} | {fmt.format(a):>10} | {fmt.format(b):>13} | {ratio:>16} |")
    print()
    print(f"decode tokens/s of each run: {spread}; load average before {load_before}, after {loadavg()}")
    print(
        "notes: inprocess 'load' = Llama() in this process; server 'load' = process start until its port "
        "accepts (python imports + model load)."
    )
    print(
        f"       inprocess RSS = this whole process ({inproc['rss_mb']:.0f} MB, of which the model and its "
        f"context added {inproc['rss_model_mb']:.0f} MB); server RSS = the llama_cpp.server process; the "
        "calling process holds no model."
    )
    for workers in (2, 4):
        print(
            f"       model memory with {workers} gunicorn workers: inprocess ~{workers * inproc['rss_model_mb']:.0f} "
            f"MB (one copy each), server ~{server['rss_mb']:.0f} MB (one per host, calls queue on it)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
