"""HTTP routes of the ideation app (thin: validate, call the service, shape the reply)."""

from __future__ import annotations

from flask_openapi3 import APIBlueprint, Tag

bp = APIBlueprint("ideation", __name__, abp_tags=[Tag(name="ideation")])
