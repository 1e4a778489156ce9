"""Wires the active study (STUDY), the price table and the model metrics into one app; `flask study`.

One place hooks every common write path, so apps need no study code: the LLM front door renders
the participant's variants and applies the condition's params, each generation record (chat,
stream, moderation, image) gets `study`, `condition` and `cost_usd`, and each job gets `study` and
`condition`. A study file that names unknown templates or variants stops the start-up with the
list of problems: a study must not run half-configured.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import click
from flask import Flask

from agent.prices import cost, parse_prices
from agent.studies import (
    PARTICIPANTS,
    StudyAssigner,
    StudyError,
    create_study_indexes,
    load_study,
    study_names,
)

from .calls import register_cli as register_calls
from .context import Services, services
from .dashboard import init_dashboard
from .model_metrics import observe_record

log = logging.getLogger(__name__)


def _recorders(svc: Services) -> list[Any]:
    """Every GenerationRecorder in use (the LLM's and the image provider's), without duplicates."""
    found = [getattr(svc.llm, "recorder", None), getattr(svc.image_provider, "recorder", None)]
    out: list[Any] = []
    for rec in found:
        if rec is not None and hasattr(rec, "annotators") and all(rec is not r for r in out):
            out.append(rec)
    return out


def init_studies(app: Flask, svc: Services) -> None:
    """Activate STUDY (if set), cost per call, model metrics, `/dashboard/` and the CLI commands."""
    settings = svc.settings
    prices = parse_prices(settings.MODEL_PRICES)
    assigner: StudyAssigner | None = None
    if settings.STUDY:
        try:
            study = load_study(settings.PROMPTS_DIR, settings.STUDY, svc.prompts)
        except StudyError as exc:
            raise ValueError(f"STUDY={settings.STUDY}: {exc}") from exc
        create_study_indexes(svc.db)
        assigner = StudyAssigner(svc.db, study)
        svc.llm.study = assigner
        svc.jobs.annotate = lambda app_name, owner, job_id: assigner.for_call(
            app_name, owner, job_id
        ).fields()
        log.info(
            "study %s active: conditions %s (%s)", study.name, ", ".join(study.conditions), study.assignment
        )
    svc.extras["study"] = assigner
    svc.extras["prices"] = prices

    def add_cost(doc: dict[str, Any]) -> dict[str, Any]:
        value = cost(prices, doc.get("model"), doc.get("usage"))
        return {"cost_usd": value} if value is not None else {}

    for rec in _recorders(svc):
        if assigner is not None:
            rec.annotators.append(assigner.annotate)
        if prices:
            rec.annotators.append(add_cost)
        rec.observers.append(observe_record)

    init_dashboard(app)
    register_calls(app)
    register_cli(app)


def _assigner(name: str | None) -> StudyAssigner:
    svc = services()
    active = svc.extras.get("study")
    if name is None and active is not None:
        return active
    name = name or svc.settings.STUDY
    if not name:
        known = ", ".join(study_names(svc.settings.PROMPTS_DIR)) or "none"
        raise click.UsageError(f"no study: set STUDY or pass --study (studies: {known})")
    try:
        study = load_study(svc.settings.PROMPTS_DIR, name, svc.prompts)
    except StudyError as exc:
        raise click.ClickException(str(exc)) from exc
    create_study_indexes(svc.db)
    return StudyAssigner(svc.db, study)


def register_cli(app: Flask) -> None:
    @app.cli.group("study")
    def study_group() -> None:
        """Look at the active study (STUDY) or another one (--study): conditions and participants."""

    @study_group.command("show")
    @click.option("--study", "name", default=None, help="default: the active STUDY")
    def show(name: str | None) -> None:
        """The study's description, assignment and conditions (variants + params)."""
        study = _assigner(name).study
        click.echo(f"study: {study.name}  ({study.path})")
        click.echo(f"description: {study.description}")
        click.echo(f"assignment: {study.assignment}")
        for cond in study.conditions.values():
            click.echo(f"condition {cond.name}:")
            for tname, variant in cond.templates.items():
                click.echo(f"  {tname} -> {tname}.{variant}.j2")
            if cond.params:
                click.echo(f"  params: {json.dumps(cond.params)}")
            if not cond.templates and not cond.params:
                click.echo("  (the templates as they are)")

    @study_group.command("assign")
    @click.argument("participant")
    @click.option("--study", "name", default=None, help="default: the active STUDY")
    @click.option("--kind", type=click.Choice(["user", "session"]), default="user")
    @click.option("--app", "app_name", default=None, help="the app the participant uses (shown in summaries)")
    def assign(participant: str, name: str | None, kind: str, app_name: str | None) -> None:
        """Assign PARTICIPANT now (before their first call), or show the condition they already have."""
        assigner = _assigner(name)
        click.echo(f"{participant}: {assigner.assign(participant, kind=kind, app=app_name)}")

    @study_group.command("summary")
    @click.option("--study", "name", default=None, help="default: the active STUDY")
    @click.option("--json", "as_json", is_flag=True, help="one JSON object")
    def summary(name: str | None, as_json: bool) -> None:
        """Participants per condition and app; calls, failures and cost per condition."""
        assigner = _assigner(name)
        db = services().db
        out: dict[str, Any] = {"study": assigner.study.name, "conditions": assigner.summary()}
        rows = db.generations.aggregate(
            [
                {"$match": {"study": assigner.study.name}},
                {
                    "$group": {
                        "_id": "$condition",
                        "calls": {"$sum": 1},
                        "failed": {"$sum": {"$cond": [{"$eq": ["$ok", False]}, 1, 0]}},
                        "cost_usd": {"$sum": {"$ifNull": ["$cost_usd", 0]}},
                    }
                },
            ]
        )
        for row in rows:
            entry = out["conditions"].setdefault(str(row["_id"]), {"participants": 0, "apps": {}})
            entry.update(calls=row["calls"], failed=row["failed"], cost_usd=round(row["cost_usd"], 6))
        out["participants"] = db[PARTICIPANTS].count_documents({"study": assigner.study.name})
        if as_json:
            click.echo(json.dumps(out, ensure_ascii=False))
            return
        click.echo(f"study {out['study']}: {out['participants']} participant(s)")
        for cname, entry in out["conditions"].items():
            apps = ", ".join(f"{a} {n}" for a, n in sorted(entry["apps"].items())) or "-"
            click.echo(
                f"  {cname}: {entry['participants']} participant(s) ({apps}); "
                f"{entry.get('calls', 0)} call(s), {entry.get('failed', 0)} failed, "
                f"${entry.get('cost_usd', 0):.4f}"
            )


def study_render(
    svc: Services,
    template: str,
    variables: dict[str, Any],
    *,
    app: str | None,
    user: str | None,
    session: str | None,
) -> Any:
    """Render as the LLM front door would for this participant (their condition's variant), for apps
    that show or store a prompt before the call (storyteller's prompt panel and its rewrites)."""
    assigner = svc.extras.get("study")
    variant = assigner.for_call(app, user, session).variant(template) if assigner is not None else None
    if variant is None:
        return svc.prompts.render(template, variables)
    return svc.prompts.render(template, variables, variant=variant)
