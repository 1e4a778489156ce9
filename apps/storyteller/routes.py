"""HTTP routes of the storyteller app (thin: validate, call the service, shape the reply)."""

from __future__ import annotations

from flask_openapi3 import APIBlueprint, Tag

bp = APIBlueprint("storyteller", __name__, abp_tags=[Tag(name="storyteller")])
