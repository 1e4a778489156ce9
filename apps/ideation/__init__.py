"""The ideation app (docs/ideation.md): StepIdeator's step-by-step design assistant."""

from __future__ import annotations

from flask_openapi3 import OpenAPI

from apps.core.context import Services
from apps.core.mount import mount_app

from . import routes
from .service import APP, EXPORTED, LEASED, create_indexes


def init_app(app: OpenAPI, services: Services) -> None:
    """Blueprint (errors in the seeds' envelope), indexes, export collections, leased records."""
    mount_app(app, APP, routes.bp, envelope=True)
    create_indexes(services.db)
    for name in EXPORTED:
        services.exports.add(name, APP, "username")
    services.jobs.lease_collection(LEASED)
