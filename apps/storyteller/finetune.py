"""LoRA fine-tuning on the liked stories, then an Ollama Modelfile: the feedback loop, closed.

Needs the optional extra `finetune` (torch, transformers, peft); a GPU host in practice, but it
runs (slowly) on CPU. Fixes of the original `finetuner.py`: real epochs (not `max_steps=2`),
complete conversations rendered with `add_generation_prompt=False`, loss on the story only
(the prompt tokens are masked), a held-out split when there is enough data, and training from
the base model on all accumulated data each cycle (no adapter stacked on an adapter).

Output folder:
    adapter/                    PEFT LoRA adapter (+ tokenizer)
    storyteller-adapter.gguf    the adapter for Ollama/llama.cpp: built in for the Llama family
                                (gguf_lora.py), else llama.cpp's convert_lora_to_gguf.py
                                (--llama-cpp / LLAMA_CPP_DIR / PATH)
    Modelfile                   FROM <base>, ADAPTER <gguf or adapter dir>, PARAMETER temperature / num_ctx
    finetune.json               settings, data counts, losses
    README.txt                  the two commands that switch the storyteller to the new model
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE_MODEL = (
    "unsloth/Llama-3.2-3B-Instruct"  # the original's base (ungated copy of Llama 3.2 3B Instruct)
)
# Hugging Face base -> the same model's name in Ollama (the Modelfile's FROM)
OLLAMA_NAMES = {
    "unsloth/llama-3.2-3b-instruct": "llama3.2:3b",
    "meta-llama/llama-3.2-3b-instruct": "llama3.2:3b",
    "unsloth/llama-3.2-1b-instruct": "llama3.2:1b",
    "meta-llama/llama-3.2-1b-instruct": "llama3.2:1b",
    "huggingfacetb/smollm2-135m-instruct": "smollm2:135m",
    "huggingfacetb/smollm2-360m-instruct": "smollm2:360m",
    "huggingfacetb/smollm2-1.7b-instruct": "smollm2:1.7b",
}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# used when the tokenizer has no chat template of its own (ChatML)
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REQUIRED = ("torch", "transformers", "peft", "safetensors")


class FinetuneUnavailable(RuntimeError):
    """The optional `finetune` extra is not installed."""


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


@dataclass
class FinetuneConfig:
    data: Path
    out: Path
    base_model: str = DEFAULT_BASE_MODEL
    epochs: int = 3
    learning_rate: float = 2e-4
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    batch_size: int = 2
    grad_accum: int = 4
    max_seq_len: int = 2048
    eval_fraction: float = 0.1
    warmup_ratio: float = 0.05
    seed: int = 3407
    ollama_from: str | None = None
    temperature: float = 0.8
    num_ctx: int = 8192
    model_name: str = "storyteller-ft"
    llama_cpp: Path | None = None
    threads: int | None = None  # CPU threads for torch (None: torch's default)


@dataclass
class FinetuneResult:
    adapter_dir: Path
    modelfile: Path
    gguf: Path | None
    examples: int
    train_examples: int
    eval_examples: int
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def load_records(path: Path) -> list[list[dict[str, str]]]:
    """Chat conversations from `flask storyteller dataset` output: JSONL (messages) or CSV (Prompt, Story)."""
    conversations: list[list[dict[str, str]]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                prompt, story = (row.get("Prompt") or "").strip(), (row.get("Story") or "").strip()
                if prompt and story:
                    conversations.append(
                        [{"role": "user", "content": prompt}, {"role": "assistant", "content": story}]
                    )
        return conversations
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record.get("messages") if isinstance(record, dict) else None
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{n}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}}")
            conversations.append([{"role": m["role"], "content": str(m["content"])} for m in messages])
    return conversations


def encode(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> dict[str, list[int]] | None:
    """Token ids + labels for one conversation; only the story (assistant turn) is learned.

    The whole conversation is rendered with add_generation_prompt=False (the original's True
    appended an empty assistant header after every finished story); the prompt part is the
    same conversation without the answer, with the generation prompt.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if full.startswith(prompt):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids, labels = prompt_ids + answer_ids, [-100] * len(prompt_ids) + list(answer_ids)
    else:  # an unusual template: learn the whole text rather than guess the boundary
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = list(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": list(ids), "labels": labels}


# --------------------------------------------------------------------------- training


def _target_modules(model: Any) -> list[str] | str:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [m for m in TARGET_MODULES if m in names]
    return found or "all-linear"


def _batches(
    examples: list[dict[str, list[int]]], size: int, pad_id: int, torch: Any
) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = [e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in chunk]
        labels = [e["labels"] + [-100] * (width - len(e["labels"])) for e in chunk]
        mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk]
        out.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(mask),
            }
        )
    return out


def _mean_loss(model: Any, batches: list[dict[str, Any]], device: Any, torch: Any) -> float | None:
    if not batches:
        return None
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            total += float(model(**{k: v.to(device) for k, v in batch.items()}).loss)
    model.train()
    return total / len(batches)


def run_finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    missing = missing_packages()
    if missing:
        raise FinetuneUnavailable(
            f"fine-tuning needs the optional extra: pip install -e '.[finetune]' (missing: {', '.join(missing)})"
        )
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    conversations = load_records(cfg.data)
    if not conversations:
        raise ValueError(
            f"{cfg.data} holds no stories: mark some as 'Good story' and run `flask storyteller dataset`"
        )
    notes: list[str] = []
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        notes.append("the tokenizer had no chat template: ChatML was used")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    model.to(device)

    examples = [e for e in (encode(tokenizer, c, cfg.max_seq_len) for c in conversations) if e is not None]
    random.shuffle(examples)
    n_eval = (
        max(1, round(len(examples) * cfg.eval_fraction))
        if len(examples) >= 10 and cfg.eval_fraction > 0
        else 0
    )
    eval_set, train_set = examples[:n_eval], examples[n_eval:]
    if n_eval == 0:
        notes.append(
            f"{len(examples)} examples: no held-out split (needs 10+); losses are on the training data"
        )

    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=_target_modules(model),
    )
    model = get_peft_model(model, lora)
    model.train()
    pad_id = tokenizer.pad_token_id
    eval_batches = _batches(eval_set or train_set, cfg.batch_size, pad_id, torch)
    loss_before = _mean_loss(model, eval_batches, device, torch)

    steps_per_epoch = math.ceil(math.ceil(len(train_set) / cfg.batch_size) / cfg.grad_accum)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    warmup = int(total_steps * cfg.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    epoch_losses: list[float] = []
    step = 0
    started = time.monotonic()
    for epoch in range(cfg.epochs):
        random.shuffle(train_set)
        batches = _batches(train_set, cfg.batch_size, pad_id, torch)
        running = 0.0
        for i, batch in enumerate(batches):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            (loss / cfg.grad_accum).backward()
            running += float(loss.detach())
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
        epoch_losses.append(running / max(1, len(batches)))
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {epoch_losses[-1]:.4f} ({step} steps, "
            f"{time.monotonic() - started:.0f} s)"
        )
    loss_after = _mean_loss(model, eval_batches, device, torch)

    cfg.out.mkdir(parents=True, exist_ok=True)
    adapter_dir = cfg.out / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    gguf = convert_to_gguf(adapter_dir, cfg, notes, log)
    modelfile = write_modelfile(cfg, gguf, adapter_dir, notes)
    result = FinetuneResult(
        adapter_dir=adapter_dir,
        modelfile=modelfile,
        gguf=gguf,
        examples=len(examples),
        train_examples=len(train_set),
        eval_examples=len(eval_set),
        steps=step,
        epoch_losses=epoch_losses,
        eval_loss_before=loss_before,
        eval_loss_after=loss_after,
        notes=notes,
    )
    manifest = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "result": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()},
    }
    (cfg.out / "finetune.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    return result


# --------------------------------------------------------------------------- Ollama


def find_converter(llama_cpp: Path | None) -> Path | None:
    """llama.cpp's convert_lora_to_gguf.py: --llama-cpp DIR, $LLAMA_CPP_DIR, or on PATH."""
    folders = [p for p in (llama_cpp, os.environ.get("LLAMA_CPP_DIR")) if p]
    for folder in folders:
        candidate = Path(folder) / "convert_lora_to_gguf.py"
        if candidate.is_file():
            return candidate
    found = shutil.which("convert_lora_to_gguf.py") or shutil.which("convert_lora_to_gguf")
    return Path(found) if found else None


def convert_to_gguf(
    adapter_dir: Path, cfg: FinetuneConfig, notes: list[str], log: Callable[[str], None]
) -> Path | None:
    """The adapter as GGUF: llama.cpp's converter when one is named (--llama-cpp / LLAMA_CPP_DIR), else the
    built-in one (Llama family, `gguf` package), else llama.cpp's converter on PATH, else a note."""
    out = cfg.out / "storyteller-adapter.gguf"
    script = find_converter(cfg.llama_cpp)
    named = script is not None and (cfg.llama_cpp is not None or os.environ.get("LLAMA_CPP_DIR"))
    if not named:
        from .gguf_lora import GGUFConversionError, convert_lora_to_gguf

        try:
            convert_lora_to_gguf(adapter_dir, cfg.base_model, out, dtype="f16")
            log(f"adapter converted to GGUF: {out}")
            return out
        except (GGUFConversionError, OSError, KeyError, ValueError) as exc:
            notes.append(f"built-in GGUF conversion not possible: {exc}")
    if script is None:
        notes.append(
            "no GGUF adapter written: the Modelfile points at the PEFT adapter folder, which Ollama "
            "imports for Llama, Mistral and Gemma models; for a GGUF adapter use llama.cpp's "
            "convert_lora_to_gguf.py adapter --outtype f16 --outfile storyteller-adapter.gguf "
            "(or pass --llama-cpp DIR)"
        )
        return None
    cmd = [sys.executable, str(script), str(adapter_dir), "--outtype", "f16", "--outfile", str(out)]
    if Path(cfg.base_model).is_dir():
        cmd += ["--base", cfg.base_model]
    else:
        cmd += ["--base-model-id", cfg.base_model]
    log("converting the adapter to GGUF: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        notes.append(
            "GGUF conversion failed (" + " | ".join(tail) + "); the Modelfile points at the PEFT adapter"
        )
        return None
    return out


def ollama_base(cfg: FinetuneConfig) -> str:
    if cfg.ollama_from:
        return cfg.ollama_from
    return OLLAMA_NAMES.get(cfg.base_model.lower(), cfg.base_model)


def write_modelfile(cfg: FinetuneConfig, gguf: Path | None, adapter_dir: Path, notes: list[str]) -> Path:
    adapter = f"./{gguf.name}" if gguf else f"./{adapter_dir.name}"
    lines = [
        "# StorAIteller fine-tuned storyteller (written by `flask storyteller finetune`)",
        f"# create it:  ollama create {cfg.model_name} -f Modelfile",
        f"FROM {ollama_base(cfg)}",
        f"ADAPTER {adapter}",
        f"PARAMETER temperature {cfg.temperature:g}",
        f"PARAMETER num_ctx {cfg.num_ctx}",
        "",
    ]
    path = cfg.out / "Modelfile"
    path.write_text("\n".join(lines), encoding="utf-8")
    readme = [
        "Fine-tuned storyteller adapter.",
        "",
        f"1. cd {cfg.out} && ollama create {cfg.model_name} -f Modelfile",
        "2. Point the server at it (no code edits), e.g. in .env:",
        "     LLM_PROVIDER=openai",
        "     OPENAI_BASE_URL=http://127.0.0.1:11434/v1",
        f"     STORYTELLER_MODEL={cfg.model_name}",
        "   and restart the server. Other apps keep LLM_MODEL; the storyteller asks for STORYTELLER_MODEL.",
        "",
        "Train each cycle from the base model on all liked stories (this command does), so adapters never stack.",
        *(f"Note: {n}" for n in notes),
        "",
    ]
    (cfg.out / "README.txt").write_text("\n".join(readme), encoding="utf-8")
    return path
