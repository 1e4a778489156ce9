"""`flask prompts list | show | render | run | check`: try templates without the UI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from flask import current_app, has_app_context

from agent.prompts import PromptError, PromptLibrary, default_library


def _library() -> PromptLibrary:
    if has_app_context() and current_app.config.get("PROMPTS_DIR"):
        return PromptLibrary(Path(current_app.config["PROMPTS_DIR"]))
    return default_library()


def _vars(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r}: use key=value", param_hint="--var")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)  # numbers, lists, booleans
        except json.JSONDecodeError:
            out[key] = value
    return out


@click.group("prompts")
def prompts_group() -> None:
    """Prompt templates in settings/ (see settings/README.md)."""


@prompts_group.command("list")
def list_cmd() -> None:
    """Every template with its description and version hash."""
    lib = _library()
    for name in lib.names():
        try:
            t = lib.get(name)
            click.echo(f"{name:40} {t.hash}  {t.description}")
        except PromptError as exc:
            click.echo(f"{name:40} ERROR  {exc}")


@prompts_group.command("show")
@click.argument("name")
def show_cmd(name: str) -> None:
    """Front matter summary and body of one template."""
    try:
        t = _library().get(name)
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"name: {t.name}\nfile: {t.path}\nhash: {t.hash}\ndescription: {t.description}")
    click.echo(f"params: {json.dumps(t.params, ensure_ascii=False)}\nresponse_format: {t.response_format}")
    click.echo(f"samples: {', '.join(t.samples)}")
    if t.system:
        click.echo(f"--- system\n{t.system}")
    click.echo(f"--- body\n{t.body}")


@prompts_group.command("render")
@click.argument("name")
@click.option("--sample", default=None, help="start from this sample's variables (default: the first sample)")
@click.option("--var", "pairs", multiple=True, help="key=value (JSON values allowed); repeatable")
@click.option("--json", "as_json", is_flag=True, help="print the messages as JSON")
def render_cmd(name: str, sample: str | None, pairs: tuple[str, ...], as_json: bool) -> None:
    """Render a template with a sample and/or variables."""
    lib = _library()
    try:
        if sample is None and not pairs:
            sample = next(iter(lib.get(name).samples))
        rendered = lib.render(name, _vars(pairs), sample=sample)
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"name": rendered.name, "hash": rendered.hash, "messages": rendered.messages,
                               "params": rendered.params}, ensure_ascii=False, indent=2))
        return
    for msg in rendered.messages:
        click.echo(f"--- {msg['role']}\n{msg['content']}")


@prompts_group.command("run")
@click.argument("name")
@click.option("--sample", default=None)
@click.option("--var", "pairs", multiple=True)
def run_cmd(name: str, sample: str | None, pairs: tuple[str, ...]) -> None:
    """Render a template and call the configured model."""
    try:
        from agent.llm import get_llm
    except ImportError as exc:
        click.echo(f"the model layer is not available: {exc}", err=True)
        sys.exit(2)
    lib = _library()
    try:
        if sample is None and not pairs:
            sample = next(iter(lib.get(name).samples))
        result = get_llm().chat(template=name, variables=_vars(pairs), sample=sample)
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(result.text if result.data is None else json.dumps(result.data, ensure_ascii=False, indent=2))
    click.echo(f"--- provider {result.provider}, model {result.model}, {result.latency_ms:.0f} ms", err=True)


@prompts_group.command("check")
def check_cmd() -> None:
    """Render every template with every sample; exit non-zero on any error."""
    lib = _library()
    errors = lib.check()
    for err in errors:
        click.echo(f"ERROR {err}", err=True)
    if errors:
        sys.exit(1)
    click.echo(f"{len(lib.names())} templates OK")


def register(app: Any) -> None:
    app.cli.add_command(prompts_group)


if __name__ == "__main__":
    prompts_group()
