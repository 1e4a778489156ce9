"""PEFT LoRA adapter -> GGUF LoRA adapter (what Ollama's `ADAPTER` and llama.cpp's `--lora` load).

llama.cpp's own converter (`convert_lora_to_gguf.py`) lives in its source tree, which is not on
PyPI; this is the same conversion for the Llama family (LlamaForCausalLM, MistralForCausalLM:
Llama 3.x, SmolLM2, Mistral), written with the `gguf` package from PyPI:

- metadata: general.architecture = llama, general.type = adapter, adapter.type = lora,
  adapter.lora.alpha;
- each adapted weight `model.layers.N.self_attn.q_proj` becomes `blk.N.attn_q.weight.lora_a/b`
  (names from gguf's tensor map), A is [rank, in] and B is [out, rank] as PEFT stores them;
- q_proj / k_proj rows are permuted exactly as llama.cpp permutes the base weights for its rope
  layout; since W = B·A, permuting W's rows is permuting B's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


class GGUFConversionError(RuntimeError):
    pass


def _permute(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's `LlamaModel.permute` (rotate-half rope -> interleaved rope), on the rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def base_config(base_model: str | Path) -> dict[str, Any]:
    """The base model's config.json (a local folder, or the Hugging Face cache via transformers)."""
    folder = Path(base_model)
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(base_model)).to_dict()


def convert_lora_to_gguf(adapter_dir: Path, base_model: str | Path, out: Path, *, dtype: str = "f16") -> Path:
    """Write `out` from a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    try:
        import gguf
        import numpy as np
        from safetensors.numpy import load_file
    except ImportError as exc:  # pragma: no cover - part of the finetune extra
        raise GGUFConversionError(
            f"the `gguf` package is needed ({exc}); pip install -e '.[finetune]'"
        ) from exc
    config = base_config(base_model)
    arch_name = (config.get("architectures") or [""])[0]
    if arch_name not in SUPPORTED:
        raise GGUFConversionError(
            f"no built-in GGUF conversion for {arch_name or 'this model'} "
            f"(supported: {', '.join(SUPPORTED)}); use llama.cpp's convert_lora_to_gguf.py"
        )
    lora_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    np_type = np.float16 if dtype == "f16" else np.float32

    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if ".lora_A." in key or ".lora_B." in key:
            which = "a" if ".lora_A." in key else "b"
            base = key.replace("base_model.model.", "", 1).replace(f".lora_{which.upper()}.weight", "")
            pairs.setdefault(base, {})[which] = value
        else:
            raise GGUFConversionError(
                f"unexpected tensor {key!r} in the adapter (only LoRA A/B are converted)"
            )

    writer = gguf.GGUFWriter(str(out), SUPPORTED[arch_name])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_cfg["lora_alpha"]))
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise GGUFConversionError(f"{base}: lora_A or lora_B is missing")
        target = names.get_name(base + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise GGUFConversionError(f"no GGUF name for {base}")
        lora_a = np.asarray(ab["a"], dtype=np.float32)
        lora_b = np.asarray(ab["b"], dtype=np.float32)
        if base.endswith("q_proj"):
            lora_b = _permute(lora_b, n_head, n_head)
        elif base.endswith("k_proj"):
            lora_b = _permute(lora_b, n_head, n_head_kv)
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(lora_a.astype(np_type)))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(lora_b.astype(np_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
