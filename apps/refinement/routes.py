"""HTTP routes of the refinement app (thin: validate, call the service, shape the reply)."""

from __future__ import annotations

from flask_openapi3 import APIBlueprint, Tag

bp = APIBlueprint("refinement", __name__, abp_tags=[Tag(name="refinement")])
