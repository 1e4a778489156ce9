"""The storyteller app (docs/storyteller.md): interactive story writing and its fine-tuning data."""

from __future__ import annotations

from flask_openapi3 import OpenAPI

from apps.core.context import Services
from apps.core.mount import mount_app, mount_extra

from . import cli, routes
from .service import APP
from .store import EXPORTED, create_indexes


def init_app(app: OpenAPI, services: Services) -> None:
    """Blueprint, the WebSocket route, indexes, export collections, stream tokens and the CLI."""
    mount_app(app, APP, routes.bp, envelope=False)
    mount_extra(app, APP, routes.websocket_blueprint(app))
    create_indexes(services.db)
    for name in EXPORTED:
        services.exports.add(name, APP, "user")
    routes.init_streams()
    cli.register_cli(app)
