"""The storybook app (docs/storybook.md): a picture book from an idea and a page count."""

from __future__ import annotations

from flask_openapi3 import OpenAPI

from apps.core.context import Services
from apps.core.mount import mount_app

from . import routes
from .pipeline import APP, COLLECTION
from .s3 import s3_images
from .service import create_indexes


def init_app(app: OpenAPI, services: Services) -> None:
    """Blueprint, indexes, export collection, and the optional S3 client (a bad S3 configuration
    fails at start-up rather than in a book)."""
    mount_app(app, APP, routes.bp, envelope=False)
    create_indexes(services.db)
    services.exports.add(COLLECTION, APP, "owner")
    s3_images(services)
