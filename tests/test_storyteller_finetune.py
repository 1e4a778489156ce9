"""The fine-tuning loop for real on a tiny randomly initialised Llama made in the test (no download):
dataset -> `flask storyteller finetune` -> LoRA adapter + Modelfile. Skipped only without the `finetune` extra."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from apps.storyteller.finetune import FALLBACK_CHAT_TEMPLATE, encode, load_records, missing_packages

MISSING = missing_packages()
HAS_GGUF = importlib.util.find_spec("gguf") is not None


def test_the_finetune_extra_is_installed() -> None:
    """scripts/test installs it; the tests below use it rather than skip without it."""
    assert not MISSING, f"missing: {', '.join(MISSING)}: pip install -e '.[finetune]'"
    assert HAS_GGUF, "the `gguf` package (finetune extra) is missing"


STORIES = [
    (
        "Write a story about Paolo and aliens.",
        "Paolo looked up. The aliens waved. He waved back, and they were friends.",
    ),
    (
        "Write a story about Mia and a storm.",
        "The storm came at night. Mia lit the lamp, and the ships came home.",
    ),
    ("Write a story about Leo and a dragon.", "Leo met a small dragon. It was cold, so he shared his fire."),
]
SYSTEM = "You are a writer of fiction."


def write_jsonl(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for prompt, story in STORIES:
            fh.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": prompt},
                            {"role": "assistant", "content": story},
                        ]
                    }
                )
                + "\n"
            )
    return path


def _words(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def make_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer built from the stories."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words: set[str] = {"system", "user", "assistant"}
    for prompt, story in STORIES:
        for text in (SYSTEM, prompt, story):
            words.update(_words(text))
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_records_reads_jsonl_and_the_original_csv(tmp_path: Path) -> None:
    convs = load_records(write_jsonl(tmp_path / "d.jsonl"))
    assert len(convs) == 3 and [m["role"] for m in convs[0]] == ["system", "user", "assistant"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('"Prompt","Story"\n"A, prompt","A ""quoted"", story"\n', encoding="utf-8")
    assert load_records(csv_path) == [
        [{"role": "user", "content": "A, prompt"}, {"role": "assistant", "content": 'A "quoted", story'}]
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="assistant"):
        load_records(bad)


def test_encode_learns_only_the_story_and_has_no_trailing_generation_prompt(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "base"))
    messages = load_records(write_jsonl(tmp_path / "d.jsonl"))[0]
    example = encode(tokenizer, messages, 512)
    assert example is not None
    learned = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert tokenizer.convert_ids_to_tokens(learned) == [*_words(messages[-1]["content"]), "<|im_end|>"]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert full.rstrip().endswith(
        "<|im_end|>"
    )  # the original's add_generation_prompt=True appended a header here
    assert example["labels"][0] == -100 and example["labels"][-1] != -100


def test_finetune_cli_trains_a_lora_adapter_and_writes_the_modelfile(make_app: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = make_tiny_model(tmp_path / "tiny-llama")
    data = write_jsonl(tmp_path / "stories.jsonl")
    out = tmp_path / "ft"
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",
        STORYTELLER_MAX_WORDS=1000,
        LOCAL_N_CTX=2048,
    )
    result = app.test_cli_runner().invoke(
        args=[
            "storyteller",
            "finetune",
            "--data",
            str(data),
            "--out",
            str(out),
            "--base-model",
            str(base),
            "--epochs",
            "8",
            "--learning-rate",
            "0.01",
            "--rank",
            "4",
            "--batch-size",
            "1",
            "--grad-accum",
            "1",
            "--ollama-from",
            "llama3.2",
            "--model-name",
            "storyteller-test",
            "--threads",
            "1",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "epoch 8/8" in result.output
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(float(w.abs().sum()) > 0 for w in lora_b)  # B starts at zero: training moved it
    manifest = json.loads((out / "finetune.json").read_text())
    losses = manifest["result"]["epoch_losses"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert manifest["result"]["eval_loss_after"] < manifest["result"]["eval_loss_before"]
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert "FROM llama3.2" in modelfile
    assert "PARAMETER temperature 0.8" in modelfile  # the story template's temperature
    assert "PARAMETER num_ctx 3024" in modelfile  # fits STORYTELLER_MAX_WORDS=1000 (2 tokens/word + prompt)
    adapter_line = next(line for line in modelfile if line.startswith("ADAPTER "))
    target = out / adapter_line.split(" ", 1)[1]
    assert target.exists()
    if HAS_GGUF:  # the built-in converter (Llama family) wrote the adapter Ollama loads
        import gguf

        assert adapter_line == "ADAPTER ./storyteller-adapter.gguf"
        reader = gguf.GGUFReader(str(target))
        fields = {
            name: reader.get_field(name) for name in ("general.type", "adapter.type", "adapter.lora.alpha")
        }
        assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
        assert fields["adapter.lora.alpha"].contents() == 8.0
        assert {t.name for t in reader.tensors} >= {
            "blk.0.attn_q.weight.lora_a",
            "blk.1.ffn_down.weight.lora_b",
        }
    readme = (out / "README.txt").read_text()
    assert (
        "ollama create storyteller-test -f Modelfile" in readme
        and "STORYTELLER_MODEL=storyteller-test" in readme
    )


def test_finetune_cli_without_extra_or_data_fails_clearly(make_app: Any, tmp_path: Path) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = app.test_cli_runner().invoke(
        args=["storyteller", "finetune", "--data", str(empty), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0
    assert ("no stories" in result.output) or ("finetune" in result.output and "extra" in result.output)


def write_base_gguf(hf_dir: Path, out: Path) -> Path:
    """The tiny base model as an f32 GGUF for llama.cpp (q/k permuted like llama.cpp's converter)."""
    import gguf
    import numpy as np
    from transformers import AutoTokenizer, LlamaForCausalLM

    from apps.storyteller.gguf_lora import _permute

    model = LlamaForCausalLM.from_pretrained(hf_dir)
    cfg = model.config
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
        "rope_theta"
    )
    writer.add_rope_freq_base(float(theta or 10000.0))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([tokenizer.convert_ids_to_tokens(i) for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(cfg.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if key.endswith("q_proj.weight"):
            array = _permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            array = _permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_gguf_adapter_gives_llama_cpp_the_same_logits_as_peft(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from apps.storyteller.finetune import FinetuneConfig, run_finetune
    from apps.storyteller.gguf_lora import convert_lora_to_gguf

    base = make_tiny_model(tmp_path / "base")
    cfg = FinetuneConfig(
        data=write_jsonl(tmp_path / "d.jsonl"),
        out=tmp_path / "out",
        base_model=str(base),
        epochs=3,
        learning_rate=0.05,
        rank=4,
        batch_size=1,
        grad_accum=1,
        threads=1,
    )
    result = run_finetune(cfg, log=lambda _: None)
    lora = convert_lora_to_gguf(result.adapter_dir, base, tmp_path / "lora-f32.gguf", dtype="f32")
    base_gguf = write_base_gguf(base, tmp_path / "base.gguf")
    ids = AutoTokenizer.from_pretrained(base)("Paolo looked up . The aliens waved", add_special_tokens=False)[
        "input_ids"
    ]
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(base)(torch.tensor([ids])).logits[0].numpy()
        tuned = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), result.adapter_dir)
        expected = tuned(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected - plain).max() > 0.05  # the adapter changes the model

    def llama_cpp_logits(lora_path: Path | None) -> Any:
        llm = Llama(
            model_path=str(base_gguf),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=64,
            logits_all=True,
            verbose=False,
            n_threads=1,
        )
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)])
        llm.close()
        return out

    assert np.abs(llama_cpp_logits(None) - plain).max() < 1e-3
    assert np.abs(llama_cpp_logits(lora) - expected).max() < 1e-3
