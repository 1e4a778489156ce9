"""`flask storyteller dataset | finetune`: the liked stories -> training data -> a LoRA adapter + Modelfile."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from flask import Flask

from apps.core.context import services

from .dataset import dataset_records, write_dataset
from .store import StoryStore
from .story_prompt import STORY_TEMPLATE


def register_cli(app: Flask) -> None:
    if "storyteller" in app.cli.commands:
        return

    @app.cli.group("storyteller")
    def storyteller() -> None:
        """StorAIteller: export liked stories and fine-tune the story model on them."""

    @storyteller.command("dataset")
    @click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output file")
    @click.option(
        "--format",
        "fmt",
        type=click.Choice(["jsonl", "csv"]),
        default=None,
        help="jsonl (chat messages) or csv (the original's Prompt,Story); default: from the file suffix",
    )
    @click.option("--user", default=None, help="only this user's feedback")
    @click.option("--since", default=None, help="ISO date, e.g. 2026-11-01")
    def dataset(out: Path, fmt: str | None, user: str | None, since: str | None) -> None:
        """Write the positive-feedback stories (the exact prompt and story shown) as training data."""
        fmt = fmt or ("csv" if out.suffix.lower() == ".csv" else "jsonl")
        since_dt = datetime.fromisoformat(since).replace(tzinfo=UTC) if since else None
        records = dataset_records(StoryStore(services().db), user=user, since=since_dt)
        n = write_dataset(records, out, fmt)
        click.echo(f"{n} stories written to {out} ({fmt})")

    @storyteller.command("finetune")
    @click.option(
        "--data",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="a file written by `flask storyteller dataset` (.jsonl or .csv)",
    )
    @click.option(
        "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="output folder"
    )
    @click.option("--base-model", default=None, help="Hugging Face name or local folder of the base model")
    @click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 1000))
    @click.option("--learning-rate", default=2e-4, show_default=True, type=float)
    @click.option("--rank", default=16, show_default=True, type=click.IntRange(1, 1024), help="LoRA rank")
    @click.option("--batch-size", default=2, show_default=True, type=click.IntRange(1, 1024))
    @click.option("--grad-accum", default=4, show_default=True, type=click.IntRange(1, 1024))
    @click.option("--max-seq-len", default=2048, show_default=True, type=click.IntRange(16, 131072))
    @click.option("--eval-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 0.5))
    @click.option("--ollama-from", default=None, help="the base model's name in Ollama (Modelfile FROM)")
    @click.option(
        "--model-name",
        default="storyteller-ft",
        show_default=True,
        help="the Ollama model name to create (then set STORYTELLER_MODEL to it)",
    )
    @click.option(
        "--llama-cpp",
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help="llama.cpp checkout with convert_lora_to_gguf.py (or LLAMA_CPP_DIR)",
    )
    @click.option("--threads", default=None, type=click.IntRange(1, 512), help="CPU threads for torch")
    @click.option(
        "--temperature",
        default=None,
        type=float,
        help="Modelfile temperature (default: the story template's)",
    )
    @click.option(
        "--num-ctx",
        default=None,
        type=click.IntRange(256, 1_000_000),
        help="Modelfile num_ctx (default: fits STORYTELLER_MAX_WORDS)",
    )
    def finetune(
        data: Path,
        out: Path,
        base_model: str | None,
        epochs: int,
        learning_rate: float,
        rank: int,
        batch_size: int,
        grad_accum: int,
        max_seq_len: int,
        eval_fraction: float,
        ollama_from: str | None,
        model_name: str,
        llama_cpp: Path | None,
        threads: int | None,
        temperature: float | None,
        num_ctx: int | None,
    ) -> None:
        """Train a LoRA adapter on DATA and write an Ollama Modelfile (needs the `finetune` extra)."""
        from .finetune import DEFAULT_BASE_MODEL, FinetuneConfig, FinetuneUnavailable, run_finetune

        svc = services()
        if temperature is None:
            temperature = float(svc.prompts.get(STORY_TEMPLATE).params.get("temperature", 0.8))
        if num_ctx is None:
            # a story of STORYTELLER_MAX_WORDS words (~2 tokens each) plus its prompt
            num_ctx = max(svc.settings.LOCAL_N_CTX, 2 * svc.settings.STORYTELLER_MAX_WORDS + 1024)
        cfg = FinetuneConfig(
            data=data,
            out=out,
            base_model=base_model or DEFAULT_BASE_MODEL,
            epochs=epochs,
            learning_rate=learning_rate,
            rank=rank,
            alpha=2 * rank,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_seq_len=max_seq_len,
            eval_fraction=eval_fraction,
            ollama_from=ollama_from,
            temperature=temperature,
            num_ctx=num_ctx,
            model_name=model_name,
            llama_cpp=llama_cpp,
            threads=threads,
        )
        try:
            result = run_finetune(cfg, log=click.echo)
        except FinetuneUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"adapter: {result.adapter_dir}")
        click.echo(f"gguf: {result.gguf or '(not converted; see README.txt)'}")
        click.echo(f"Modelfile: {result.modelfile}")
        for note in result.notes:
            click.echo(f"note: {note}")
        click.echo(
            f"next: cd {out} && ollama create {model_name} -f Modelfile; then set STORYTELLER_MODEL={model_name}"
        )
