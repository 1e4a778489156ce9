"""Mounting an app's blueprint: at its prefix, and at `/` too when `ROOT_APP` names it.

The real frontends call root paths such as `/generate` and `/paint/start`, so one app may also
be served at `/` (a second registration under another name; the docs list the prefixed paths).
Apps whose frontends read the seeds' `{success, code, message, data}` envelope say so here, and
their errors use it.
"""

from __future__ import annotations

from flask import Blueprint
from flask_openapi3 import APIBlueprint, OpenAPI

from .envelope import envelope_scope


def mount_app(app: OpenAPI, name: str, bp: APIBlueprint, *, envelope: bool) -> None:
    """Register `bp` (app `name`) at `/<name>`; record it in `APPS_MOUNTED` (shown by /health)."""
    prefix = f"/{name}"
    if envelope:
        envelope_scope(app).add(bp.name, prefix)
    app.register_api(bp, url_prefix=prefix)
    mounted: list[str] = app.config.setdefault("APPS_MOUNTED", [])
    mounted.append(prefix)
    if app.config["SETTINGS"].ROOT_APP == name:
        app.register_blueprint(bp, url_prefix="", name=f"{name}_root")
        if envelope:
            envelope_scope(app).add(f"{name}_root")
        mounted.append(f"/ ({name})")


def mount_extra(app: OpenAPI, name: str, bp: Blueprint) -> None:
    """A plain blueprint of app `name` (e.g. a WebSocket route) at its prefix, and at `/` for ROOT_APP."""
    app.register_blueprint(bp, url_prefix=f"/{name}")
    if app.config["SETTINGS"].ROOT_APP == name:
        app.register_blueprint(bp, url_prefix="", name=f"{bp.name}_root")
