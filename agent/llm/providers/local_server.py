"""One llama.cpp server (`python -m llama_cpp.server`) per host, shared by every worker (LOCAL_LLM_MODE=server).

Started once under a file lock and found by every process through a state file (agent.host_process);
gunicorn's master starts it (`on_starting`), providers in server mode call `ensure_local_llm_server`
lazily too. Needs `llama-cpp-python[server]`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.host_process import HostProcess, child_env, free_port
from agent.llm.providers.local_model import thread_count
from agent.llm.providers.local_selftest import require_selftest
from agent.llm.providers.model_files import CHAT_FORMATS, PROVIDER, resolve_model_path, resolve_state_dir
from agent.types import ModelError

log = logging.getLogger(__name__)

SERVER_EXTRA_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
# a TCP connect, not an HTTP probe: every llama_cpp.server route (even /v1/models) waits for the
# model lock, so an HTTP probe would call a busy server dead
PROBE_TIMEOUT_S = 0.5


def _host(folder: Path) -> HostProcess:
    return HostProcess(folder, name="server", marker=b"llama_cpp.server")


def local_llm_server_state(state_dir: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The shared server's state ({pid, port, base_url, model, n_ctx, ...}) if it is running, else None."""
    host = _host(resolve_state_dir(state_dir))
    state = host.read_state()
    return state if host.alive(state, PROBE_TIMEOUT_S) else None


def _check_server_extra() -> None:
    missing = [m for m in SERVER_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing or importlib.util.find_spec("llama_cpp") is None:
        raise ModelError(
            "LOCAL_LLM_MODE=server needs llama.cpp's server: `pip install 'llama-cpp-python[server]"
            f">=0.3.36,<0.4'` (missing: {', '.join(missing) or 'llama_cpp'}); or use "
            "LOCAL_LLM_MODE=inprocess",
            provider=PROVIDER,
        )


def _command(path: Path, port: int, n_ctx: int, threads: int) -> list[str]:
    return [
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


def ensure_local_llm_server(
    model_path: str | os.PathLike[str] | None = None,
    n_ctx: int = 2048,
    state_dir: str | os.PathLike[str] | None = None,
    n_threads: int | None = None,
    timeout_s: float = 60.0,
) -> str:
    """Base URL (http://127.0.0.1:PORT) of this host's llama.cpp server, starting it if none is alive.

    Safe to call from every process: a file lock makes sure only one starts it; the others read the
    state file. A live server for another model or context size is replaced.
    """
    path = resolve_model_path(model_path)
    host = _host(resolve_state_dir(state_dir))
    threads = thread_count(n_threads)
    require_selftest(path, host.folder)
    with host.locked():
        state = host.read_state()
        if host.alive(state, PROBE_TIMEOUT_S):
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
            host.stop_pid(int(state["pid"]))
        _check_server_extra()
        port = free_port()
        log_path = host.folder / "server.log"
        start = time.perf_counter()
        # own session: a Ctrl-C to gunicorn's group does not kill it mid-request; stop_* does
        proc = host.spawn(_command(path, port, n_ctx, threads), log_path, env=child_env())
        if not host.wait_listening(proc, port, timeout_s, probe_timeout=0.2):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-800:]
                raise ModelError(
                    f"the local LLM server exited with code {proc.returncode} while starting "
                    f"(log {log_path}): {tail}",
                    provider=PROVIDER,
                )
            host.stop_pid(proc.pid)
            raise ModelError(
                f"the local LLM server did not open port {port} within {timeout_s:.0f} s (log {log_path})",
                provider=PROVIDER,
                retryable=True,
            )
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
        host.write_state(state)
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
    host = _host(resolve_state_dir(state_dir))
    if not host.folder.exists():
        return False
    with host.locked():
        state = host.read_state()
        stopped = False
        if state and host.running(int(state["pid"])):
            host.stop_pid(int(state["pid"]))
            stopped = True
        host.clear_state()
        return stopped
