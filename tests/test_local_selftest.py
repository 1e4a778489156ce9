"""The embedded model's self-test: real tokens on this CPU, and a crash, hang or garbage said in one line.

The faults are real: a `sitecustomize.py` on the child's PYTHONPATH makes the probe process die with
SIGILL (what a llama.cpp built for another CPU does), sleep, or print garbage. The test process and
the app stay up and report it.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.llm.providers import local_selftest
from agent.llm.providers.local import LocalProvider
from agent.llm.providers.local_selftest import run_selftest, selftest
from agent.llm.providers.model_files import resolve_model_path
from agent.types import ModelError

FAULTS = {
    "sigill": "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n",
    "hang": "import time\ntime.sleep(60)\n",
    "garbage": (
        "import builtins, json\n_print = builtins.print\n"
        "builtins.print = lambda *a, **k: _print(json.dumps({'text': '\\ufffd\\ufffd', 'tokens': 8}))\n"
    ),
}


@pytest.fixture
def fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """fault(kind): the next probe child runs a sitecustomize that injects that fault."""

    def inject(kind: str) -> None:
        folder = tmp_path / f"fault-{kind}"
        folder.mkdir()
        (folder / "sitecustomize.py").write_text(FAULTS[kind])
        monkeypatch.setenv("PYTHONPATH", str(folder))
        local_selftest.forget()

    yield inject
    local_selftest.forget()


def test_the_default_model_generates_real_tokens_on_this_cpu() -> None:
    result = run_selftest(resolve_model_path())
    assert result.ok, result.summary()
    assert result.tokens >= 1 and sum(ch.isalpha() for ch in result.text) >= 2


def test_installed_llama_cpp_has_no_avx512_or_amx_code() -> None:
    """A native build on this AVX-512 machine would die with SIGILL on an AVX2-only (or AMX-trapping) CPU."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the instruction check is for x86-64 builds")
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    cpu = sorted(lib.glob("libggml-cpu*.so*"))
    assert cpu, f"no libggml-cpu in {lib}"
    assert shutil.which("objdump"), "objdump (binutils) is needed to check the build"
    listing = subprocess.run(
        ["objdump", "-d", str(cpu[0])], capture_output=True, text=True, check=True
    ).stdout
    assert "%ymm" in listing  # AVX2 kernels are there
    assert "%zmm" not in listing, "AVX-512 code: llama.cpp was built natively; run scripts/install-llama.sh"
    assert "%tmm" not in listing, "AMX code: llama.cpp was built natively; run scripts/install-llama.sh"


@pytest.mark.parametrize(
    ("kind", "says"),
    [("sigill", "SIGILL"), ("garbage", "garbage")],
)
def test_a_broken_model_is_reported_not_fatal(
    kind: str, says: str, fault: Callable[[str], None], tmp_path: Path
) -> None:
    fault(kind)
    provider = LocalProvider(state_dir=str(tmp_path / "state"), n_ctx=320)
    health = provider.health()
    assert health["ok"] is False and health["selftest"] == "failed"
    assert says in health["error"] and health["remedy"]
    # a model call fails with the same reason instead of loading a model that would kill this process
    with pytest.raises(ModelError) as info:
        provider.complete([{"role": "user", "content": "hi"}], params={"max_tokens": 4})
    assert says in info.value.message and info.value.retryable is False


def test_a_hanging_model_is_reported(fault: Callable[[str], None], tmp_path: Path) -> None:
    fault("hang")
    result = selftest(resolve_model_path(), tmp_path / "state", timeout_s=3)
    assert result.ok is False and "hang" in (result.reason or "")


def test_result_is_kept_for_other_processes_and_rerun_when_fresh(
    fault: Callable[[str], None], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    ok = selftest(resolve_model_path(), state, fresh=True)
    assert ok.ok and (state / "selftest.json").exists()
    fault("sigill")  # also forgets this process's memo: the next read comes from the file
    assert selftest(resolve_model_path(), state).ok is True  # what the master found, read by a worker
    again = selftest(resolve_model_path(), state, fresh=True)  # the master at its next start
    assert again.ok is False and "SIGILL" in (again.reason or "")


def test_health_of_an_app_with_a_crashing_model_is_not_ok(
    make_app: Callable[..., Any], fault: Callable[[str], None]
) -> None:
    fault("sigill")
    app = make_app(LLM_PROVIDER="local", LOCAL_N_CTX=352)
    body = app.test_client().get("/health").get_json()
    assert body["status"] != "ok"
    assert body["model"]["ok"] is False and "SIGILL" in body["model"]["error"]
