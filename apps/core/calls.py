"""`flask calls`: browse recent model calls (the `generations` records) without a Mongo shell.

    flask calls [-n 20] [--app storybook] [--user alice] [--session S] [--template storybook/plan]
                [--condition warm] [--failed] [--since 2026-11-01] [--json]
    flask calls show ID

The table is for reading in a terminal; `--json` prints one JSON object per line (Extended JSON
dates as ISO text) for `jq` or pandas. `show` prints one call with its rendered prompt and output.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click
from bson import ObjectId
from bson.errors import InvalidId
from flask import Flask
from flask.cli import with_appcontext
from pymongo.database import Database

from .context import services
from .export import parse_since


def calls_query(
    *,
    app: str | None = None,
    user: str | None = None,
    session: str | None = None,
    template: str | None = None,
    condition: str | None = None,
    failed: bool = False,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """The `generations` filter for these options (all optional, combined with AND)."""
    query: dict[str, Any] = {}
    for key, value in (
        ("app", app),
        ("user", user),
        ("session", session),
        ("template", template),
        ("condition", condition),
    ):
        if value:
            query[key] = value
    if failed:
        query["ok"] = False
    if since or until:
        query["created_at"] = {**({"$gte": since} if since else {}), **({"$lt": until} if until else {})}
    return query


def recent_calls(db: Database, query: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Newest first."""
    return list(db.generations.find(query).sort([("created_at", -1), ("_id", -1)]).limit(limit))


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return value


def to_json(doc: dict[str, Any]) -> str:
    """One record as a JSON line: ids as text, dates as ISO 8601 with the zone."""

    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return _iso(value)
        return str(value)

    return json.dumps({k: _iso(v) for k, v in doc.items()}, ensure_ascii=False, default=default)


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def output_preview(doc: dict[str, Any]) -> str:
    if doc.get("error"):
        err = doc["error"]
        return "ERROR " + str(err.get("message") if isinstance(err, dict) else err)
    out = doc.get("output")
    if isinstance(out, dict) and out.get("image_id"):
        return f"image {out['image_id']}"
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)


def table(docs: list[dict[str, Any]]) -> str:
    """A fixed-width table, newest first, one line per call."""
    head = ("time (UTC)", "id", "app", "who", "kind", "template", "cond", "status", "ms", "tok", "output")
    widths = (19, 24, 11, 16, 10, 26, 10, 9, 7, 6, 40)
    rows = [head]
    for d in docs:
        created = d.get("created_at")
        when = created.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if isinstance(created, datetime) else ""
        template = (d.get("template") or "-") + (f".{d['variant']}" if d.get("variant") else "")
        usage = d.get("usage") or {}
        rows.append(
            (
                when,
                str(d["_id"]),
                str(d.get("app") or "-"),
                str(d.get("user") or d.get("session") or "-"),
                str(d.get("kind") or ""),
                template,
                str(d.get("condition") or "-"),
                str(d.get("status") or ""),
                f"{d['latency_ms']:.0f}" if isinstance(d.get("latency_ms"), (int, float)) else "",
                str(usage.get("total_tokens", "")) if isinstance(usage, dict) else "",
                output_preview(d),
            )
        )
    return "\n".join(
        "  ".join(_short(cell, w).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def register_cli(app: Flask) -> None:

    @app.cli.group("calls", invoke_without_command=True)
    @click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
    @click.option("--app", "app_name", default=None)
    @click.option("--user", default=None)
    @click.option("--session", default=None)
    @click.option("--template", default=None, help="e.g. storybook/plan (all its variants)")
    @click.option("--condition", default=None, help="study condition")
    @click.option("--failed", is_flag=True, help="failed calls only")
    @click.option("--since", default=None, help="ISO date or date-time (UTC unless a zone is given)")
    @click.option("--json", "as_json", is_flag=True, help="JSON lines instead of the table")
    @click.pass_context
    @with_appcontext
    def calls(
        ctx: click.Context,
        limit: int,
        app_name: str | None,
        user: str | None,
        session: str | None,
        template: str | None,
        condition: str | None,
        failed: bool,
        since: str | None,
        as_json: bool,
    ) -> None:
        """The last N model calls, newest first."""
        if ctx.invoked_subcommand is not None:
            return
        query = calls_query(
            app=app_name,
            user=user,
            session=session,
            template=template,
            condition=condition,
            failed=failed,
            since=parse_since(since) if since else None,
        )
        docs = recent_calls(services().db, query, limit)
        if as_json:
            for doc in docs:
                click.echo(to_json(doc))
        elif docs:
            click.echo(table(docs))
        else:
            click.echo("no calls match", err=True)

    @calls.command("show")
    @click.argument("call_id")
    @click.option("--json", "as_json", is_flag=True, help="the whole record as one JSON object")
    def show(call_id: str, as_json: bool) -> None:
        """One call: who, what, the rendered prompt and the output (or error)."""
        try:
            oid: Any = ObjectId(call_id)
        except (InvalidId, TypeError):
            oid = call_id
        doc = services().db.generations.find_one({"_id": oid})
        if doc is None:
            raise click.ClickException(f"no call {call_id!r} (ids are listed by `flask calls`)")
        if as_json:
            click.echo(to_json(doc))
            return
        fields = (
            "kind",
            "app",
            "user",
            "session",
            "job",
            "step",
            "template",
            "variant",
            "template_hash",
            "study",
            "condition",
            "provider",
            "model",
            "instance",
            "status",
            "attempts",
            "latency_ms",
            "usage",
            "cost_usd",
            "params",
            "created_at",
        )
        click.echo(f"call {doc['_id']}")
        for key in fields:
            if doc.get(key) not in (None, {}, ""):
                value = doc[key]
                shown = _iso(value) if isinstance(value, datetime) else value
                click.echo(f"  {key}: {shown if isinstance(shown, str) else json.dumps(shown, default=str)}")
        if doc.get("messages"):
            click.echo("--- prompt")
            for msg in doc["messages"]:
                content = msg.get("content")
                text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
                click.echo(f"[{msg.get('role')}]\n{text}")
        elif doc.get("prompt") is not None:
            click.echo("--- prompt")
            prompt = doc["prompt"]
            click.echo(
                prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, indent=2)
            )
        click.echo("--- output")
        out = doc.get("output")
        click.echo(
            out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, indent=2, default=str)
        )
        if doc.get("error"):
            click.echo("--- error")
            click.echo(json.dumps(doc["error"], ensure_ascii=False, indent=2, default=str))
