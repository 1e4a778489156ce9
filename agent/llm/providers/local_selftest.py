"""Prove that the embedded model generates on this CPU before anyone relies on it.

A llama.cpp built for another CPU dies with SIGILL on the first token (ggml's AMX or AVX-512
kernels inside a VM that advertises them), and a signal cannot be caught in the process that
loads the model. So the probe runs one short completion in a *child* process: a crash, a hang or
garbage costs the child, and the caller gets a one-line reason and remedy instead of a dead
gunicorn worker.

The result is kept in `<state_dir>/selftest.json` under a key made of the llama.cpp library, the
model file and this CPU's flags, so gunicorn's master runs it once per start and workers, `/health`
and the CLI read it; a rebuilt library, another model or another CPU runs it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.host_process import child_env
from agent.llm.providers.model_files import PROVIDER, resolve_model_path, resolve_state_dir
from agent.types import ModelError

log = logging.getLogger(__name__)

PROBE_PROMPT = "Once upon a time"
PROBE_TOKENS = 8
DEFAULT_TIMEOUT_S = 90.0
REBUILD = "run scripts/install-llama.sh (a portable build) and restart"

# Runs in the child: only llama_cpp and the standard library, no project code.
_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, tokens = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
llm = Llama(model_path=path, n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False, seed=1)
loaded = time.perf_counter()
out = llm.create_completion(sys.argv[3], max_tokens=tokens, temperature=0.0)
done = time.perf_counter()
print(json.dumps({"text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"],
                  "load_s": loaded - start, "generate_s": done - loaded}))
"""


@dataclass
class SelfTest:
    """What the probe found. `reason` and `remedy` are one line each, for /health and the log."""

    ok: bool
    key: str
    reason: str | None = None
    remedy: str | None = None
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    checked_at: float = 0.0

    def summary(self) -> str:
        if self.ok:
            return (
                f"embedded model self-test ok: {self.tokens} tokens in {self.seconds:.2f} s ({self.text!r})"
            )
        return f"embedded model self-test FAILED: {self.reason}; remedy: {self.remedy}"


def _library_file() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    for candidate in sorted((folder / "lib").glob("libllama*")) + sorted(folder.glob("libllama*")):
        return candidate
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def probe_key(model_path: Path) -> str:
    """Changes when the library, the model or the CPU changes."""
    parts = [_cpu_flags(), str(sys.executable)]
    for path in (_library_file(), model_path):
        if path is None:
            parts.append("-")
            continue
        try:
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:missing")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _looks_like_text(text: str) -> bool:
    letters = sum(ch.isalpha() for ch in text)
    return letters >= 2 and "\ufffd" not in text


def run_selftest(model_path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> SelfTest:
    """One short completion in a child process; never raises, never lets a crash reach the caller."""
    key = probe_key(model_path)
    start = time.perf_counter()
    if importlib.util.find_spec("llama_cpp") is None:
        return SelfTest(False, key, "llama-cpp-python is not installed", REBUILD, checked_at=time.time())
    cmd = [sys.executable, "-c", _CHILD, str(model_path), str(PROBE_TOKENS), PROBE_PROMPT]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env(), stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return SelfTest(
            False,
            key,
            f"the model did not answer an {PROBE_TOKENS}-token probe within {timeout_s:.0f} s (hang)",
            f"check the CPU load and LOCAL_THREADS; {REBUILD}",
            seconds=timeout_s,
            checked_at=time.time(),
        )
    seconds = time.perf_counter() - start
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        why = (
            "llama.cpp was compiled for another CPU (illegal instruction)"
            if name == "SIGILL"
            else "llama.cpp crashed"
        )
        return SelfTest(
            False,
            key,
            f"the model process died with {name}: {why}",
            REBUILD,
            seconds=seconds,
            checked_at=time.time(),
        )
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return SelfTest(
            False,
            key,
            f"the model process exited with code {proc.returncode}: {tail[0][:200]}",
            "check LOCAL_MODEL_PATH (a chat GGUF file) or " + REBUILD,
            seconds=seconds,
            checked_at=time.time(),
        )
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        text, tokens = str(found["text"]), int(found["tokens"])
    except (ValueError, KeyError, IndexError) as exc:
        return SelfTest(
            False,
            key,
            f"the model probe printed no result ({exc})",
            REBUILD,
            seconds=seconds,
            checked_at=time.time(),
        )
    if tokens < 1 or not _looks_like_text(text):
        return SelfTest(
            False,
            key,
            f"the model produced garbage: {text[:60]!r}",
            "point LOCAL_MODEL_PATH at a working chat GGUF or " + REBUILD,
            text=text,
            tokens=tokens,
            seconds=seconds,
            checked_at=time.time(),
        )
    return SelfTest(True, key, text=text, tokens=tokens, seconds=round(seconds, 3), checked_at=time.time())


_MEMO: dict[str, SelfTest] = {}
_MEMO_LOCK = threading.Lock()


def _read(state_dir: Path, key: str) -> SelfTest | None:
    try:
        found = json.loads((state_dir / "selftest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("key") != key:
        return None
    try:
        return SelfTest(**found)
    except TypeError:
        return None


def _write(state_dir: Path, result: SelfTest) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f"selftest.json.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, state_dir / "selftest.json")


def selftest(
    model_path: Path, state_dir: Path, *, fresh: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SelfTest:
    """The self-test for this library + model + CPU: from memory, from `state_dir`, or run now.

    Concurrent callers in one process wait for one probe; `fresh=True` runs it again (the master
    at every start).
    """
    key = probe_key(model_path)
    with _MEMO_LOCK:
        if not fresh:
            found = _MEMO.get(key) or _read(state_dir, key)
            if found is not None:
                _MEMO[key] = found
                return found
        result = run_selftest(model_path, timeout_s)
        _MEMO[key] = result
        try:
            _write(state_dir, result)
        except OSError as exc:
            log.warning("cannot keep the self-test result in %s: %s", state_dir, exc)
        (log.info if result.ok else log.error)(result.summary())
        return result


def forget() -> None:
    """Drop the in-process memo (tests)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def as_health(result: SelfTest | None) -> dict[str, Any]:
    if result is None:
        return {"selftest": "not run"}
    out: dict[str, Any] = {"selftest": "ok" if result.ok else "failed", "selftest_s": result.seconds}
    if not result.ok:
        out.update(error=result.reason, remedy=result.remedy)
    return out


def require_selftest(path: Path, state_dir: str | os.PathLike[str] | None) -> None:
    """Raise a clear, non-retryable ModelError unless the child-process probe generated text.

    Loading a model that crashes on this CPU would take this process down with SIGILL; the probe
    finds that out in a child instead, once per library/model/CPU.
    """
    result = selftest(path, resolve_state_dir(state_dir))
    if not result.ok:
        raise ModelError(f"{result.reason}; remedy: {result.remedy}", provider=PROVIDER, retryable=False)


def main() -> int:
    """`python -m agent.llm.providers.local_selftest`: probe the default (or LOCAL_MODEL_PATH) model now."""
    try:
        path = resolve_model_path()
    except ModelError as exc:
        print(f"embedded model self-test FAILED: {exc.message}", file=sys.stderr)
        return 1
    result = run_selftest(path)
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
