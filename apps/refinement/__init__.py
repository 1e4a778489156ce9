"""The refinement app: InsPilot (working title Refinity), the design-stimulus workflow (docs/refinement.md)."""

from __future__ import annotations

from flask_openapi3 import OpenAPI

from apps.core.context import Services
from apps.core.mount import mount_app

from . import routes
from .labels import APP
from .store import EXPORT_COLLECTIONS, create_indexes


def init_app(app: OpenAPI, services: Services) -> None:
    """Blueprint (errors in the seeds' envelope), indexes, export collections."""
    mount_app(app, APP, routes.bp, envelope=True)
    create_indexes(services.db)
    for name in EXPORT_COLLECTIONS:
        services.exports.add(name, APP, "username")
