"""`flask prompts list | show | render | run | check`: try templates without the UI.

Designers use this to see what a template turns into (with its samples or their own
values) and to check every template before a study. It works inside Flask's CLI
(the app's PROMPTS_DIR) and standalone: `python -m agent.prompts.cli check`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml
from flask import current_app, has_app_context
from flask.cli import ScriptInfo

from agent.call_context import CallContext
from agent.studies import check_studies, study_names
from agent.types import ModelError

from .library import PromptError, PromptLibrary, Template, default_library, library_for

_ROOT_KEY = "prompts.root"


def _library(ctx: click.Context) -> PromptLibrary:
    """--dir, else the app's PROMPTS_DIR (inside `flask`), else $PROMPTS_DIR / <project>/settings."""
    root = ctx.meta.get(_ROOT_KEY)
    if root:
        return library_for(root)
    if has_app_context() and current_app.config.get("PROMPTS_DIR"):
        return library_for(current_app.config["PROMPTS_DIR"])
    return default_library()


def _name(name: str) -> str:
    return name[: -len(".j2")] if name.endswith(".j2") else name


def _vars(pairs: tuple[str, ...]) -> dict[str, Any]:
    """key=value pairs; a value that reads as JSON (3, true, ["a","b"]) becomes that, else it is text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: write key=value", param_hint="--var")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _template(lib: PromptLibrary, name: str) -> Template:
    try:
        return lib.get(_name(name))
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc


def _variables(lib: PromptLibrary, name: str, sample: str | None, pairs: tuple[str, ...]) -> tuple[str, dict]:
    """The sample's variables (the first sample unless --sample) overlaid with --var values."""
    tpl = _template(lib, name)
    sample = sample or tpl.default_sample
    if sample not in tpl.samples:
        raise click.ClickException(
            f"template {tpl.name!r} has no sample {sample!r}; samples: {', '.join(tpl.samples)}"
        )
    return sample, {**tpl.samples[sample], **_vars(pairs)}


@click.group("prompts")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="templates folder (default: the app's PROMPTS_DIR, else ./settings)",
)
@click.pass_context
def prompts_group(ctx: click.Context, root: Path | None) -> None:
    """Prompt templates in settings/ (see settings/README.md)."""
    if root is not None:
        ctx.meta[_ROOT_KEY] = root  # meta is shared with the subcommand's context
    info = ctx.find_object(ScriptInfo)
    if info is not None and not has_app_context():
        # `flask` pushes an app context for app commands; test runners and plain groups may not
        ctx.with_resource(info.load_app().app_context())


@prompts_group.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """Every template: name, version hash, description."""
    lib = _library(ctx)
    names = lib.names()
    width = max((len(n) for n in names), default=10)
    for name in names:
        try:
            tpl = lib.get(name)
            click.echo(f"{name:<{width}}  {tpl.hash}  {tpl.description}")
        except PromptError as exc:
            click.echo(f"{name:<{width}}  {'BROKEN':<12}  {exc}")
    if not names:
        click.echo(f"no templates in {lib.root}")


@prompts_group.command("show")
@click.argument("name")
@click.pass_context
def show_cmd(ctx: click.Context, name: str) -> None:
    """What one template says: front matter summary, then the body."""
    tpl = _template(_library(ctx), name)
    lines = [
        f"name:            {tpl.name}",
        f"file:            {tpl.path}",
        f"hash:            {tpl.hash}",
        f"description:     {tpl.description}",
    ]
    if tpl.version_note:
        lines.append(f"version_note:    {tpl.version_note}")
    if tpl.language:
        lines.append(f"language:        {tpl.language}")
    lines += [
        f"params:          {json.dumps(tpl.params, ensure_ascii=False)}",
        f"response_format: {tpl.response_format}",
        f"variables:       {', '.join(tpl.variables) or '(none)'}",
        f"samples:         {', '.join(tpl.samples)} (default: {tpl.default_sample})",
    ]
    click.echo("\n".join(lines))
    if tpl.schema is not None:
        click.echo("--- schema")
        click.echo(yaml.safe_dump(tpl.schema, allow_unicode=True, sort_keys=False).rstrip())
    if tpl.system is not None:
        click.echo("--- system")
        click.echo(tpl.system.rstrip())
    click.echo("--- body (user message)")
    click.echo(tpl.body.strip("\n"))


@prompts_group.command("render")
@click.argument("name")
@click.option("--sample", default=None, help="start from this sample's variables (default: the first sample)")
@click.option(
    "--var", "pairs", multiple=True, metavar="KEY=VALUE", help="set/override a variable; repeatable"
)
@click.option("--json", "as_json", is_flag=True, help="print the whole rendered prompt as JSON")
@click.pass_context
def render_cmd(
    ctx: click.Context, name: str, sample: str | None, pairs: tuple[str, ...], as_json: bool
) -> None:
    """Show the messages a template turns into, without calling a model."""
    lib = _library(ctx)
    sample, variables = _variables(lib, name, sample, pairs)
    try:
        rendered = lib.render(_name(name), variables)
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": rendered.name,
                    "hash": rendered.hash,
                    "sample": sample,
                    "messages": rendered.messages,
                    "params": rendered.params,
                    "response_format": rendered.response_format,
                    "schema": rendered.schema,
                },
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    click.echo(f"# {rendered.name} (hash {rendered.hash}, sample {sample})")
    for msg in rendered.messages:
        click.echo(f"--- {msg['role']}")
        click.echo(msg["content"])
    click.echo(
        f"--- params {json.dumps(rendered.params, ensure_ascii=False)}, "
        f"response_format {rendered.response_format}"
    )


@prompts_group.command("run")
@click.argument("name")
@click.option("--sample", default=None, help="start from this sample's variables (default: the first sample)")
@click.option(
    "--var", "pairs", multiple=True, metavar="KEY=VALUE", help="set/override a variable; repeatable"
)
@click.pass_context
def run_cmd(ctx: click.Context, name: str, sample: str | None, pairs: tuple[str, ...]) -> None:
    """Render a template and send it to the configured model; print the reply."""
    lib = _library(ctx)
    _, variables = _variables(lib, name, sample, pairs)
    try:
        lib.render(_name(name), variables)  # template problems are reported before any model call
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc

    try:
        result = current_app.extensions["services"].llm.chat(
            template=_name(name),
            variables=variables,
            context=CallContext(app=_name(name).split("/")[0], user="prompts-cli", step="prompts run"),
        )
    except PromptError as exc:
        raise click.ClickException(str(exc)) from exc
    except ModelError as exc:
        raise click.ClickException(
            f"the model call failed ({exc.provider or 'model'}): {exc.message}"
        ) from exc
    if getattr(result, "data", None) is not None:
        click.echo(json.dumps(result.data, ensure_ascii=False, indent=2))
    else:
        click.echo(result.text)
    model = getattr(result, "model", "")
    click.echo(
        f"--- provider {result.provider}{f', model {model}' if model else ''}, "
        f"{getattr(result, 'latency_ms', 0.0):.0f} ms"
    )


@prompts_group.command("check")
@click.pass_context
def check_cmd(ctx: click.Context) -> None:
    """Render every template, variant and sample, and check the study files; exit 1 on any problem."""
    lib = _library(ctx)
    names = lib.names(variants=True)
    errors = lib.check() + check_studies(lib.root, lib)
    if errors:
        for err in errors:
            click.echo(f"ERROR {err}", err=True)
        broken = {e.split(" ", 1)[0].rstrip(":") for e in errors}
        click.echo(f"{len(broken)} of {len(names)} templates have problems", err=True)
        ctx.exit(1)
    studies = study_names(lib.root)
    click.echo(f"{len(names)} templates OK" + (f", {len(studies)} studies OK" if studies else ""))


def register_cli(app: Any) -> None:
    """Add `flask prompts ...` to an app's CLI."""
    app.cli.add_command(prompts_group)


if __name__ == "__main__":
    prompts_group()
