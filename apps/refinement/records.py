"""What a /generate run stores and answers: the request line, the stimulus documents, the reply's creatives.

Stored documents carry image ids; the reply carries the images themselves as raw base64 PNG
(the original contract), so the two are built from the same `Stimulus` here.
"""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from agent.types import ModelError
from apps.core.envelope import BusinessException
from apps.core.errors import ApiError
from apps.core.storage import to_base64

from . import labels, store
from .attribution import Who
from .pipeline import Stimulus
from .schemas import GenerateRequest

Sketches = list[tuple[str, bytes] | None]  # per sketch slot: (image id, PNG bytes), None where none was sent


def input_record(body: GenerateRequest, sketches: Sketches | None) -> dict[str, Any]:
    """The request as stored: sketches replaced by their image ids (None: not stored)."""
    data = body.prompts.model_dump(exclude_none=True)
    if body.type == labels.TYPE_DEEP and data.pop("designImage", None) is not None:
        data["designImageId"] = sketches[0][0] if sketches and sketches[0] else None
    for i, scheme in enumerate(data.get("schemes") or []):
        if scheme.pop("designImage", None) is not None:
            sketch = sketches[i] if sketches and i < len(sketches) else None
            scheme["designImageId"] = sketch[0] if sketch else None
    return data


def stimulus_doc(
    st: Stimulus,
    request_id: str,
    body: GenerateRequest,
    who: Who,
    language: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": str(ObjectId()),
        "request_id": request_id,
        "username": who.username,
        "session": who.session,
        "attribution": who.attribution,
        "gen_type": body.type,
        "stage": labels.TYPE_STAGES[body.type],
        "index": st.index,
        "creative_type": st.creative_type,
        "display_type": st.display_type,
        "items": st.items,
        "images": [
            {
                "id": g.id,
                "role": g.role,
                "prompt": g.prompt,
                "positive": g.positive,
                "negative": g.negative,
                "width": g.width,
                "height": g.height,
                "generation_id": g.generation_id,
                "instance": g.instance,
                "templates": g.templates,
            }
            for g in st.images
        ],
        "texts": st.texts,
        "result": st.result,
        "provenance": provenance,
        "language": language,
        "created_at": store.now(),
        **st.extra,
    }
    if body.type == labels.TYPE_DEEP:
        doc["scheme_id"] = getattr(body.prompts, "schemeId", None)
    return doc


def _public_item(stored: dict[str, Any], pngs: dict[str, bytes]) -> dict[str, Any]:
    combos = stored.get("combinations")
    image_id = stored.get("image_id")
    return {
        "type": stored["type"],
        "text": stored.get("text"),
        "image": to_base64(pngs[image_id]) if image_id else None,
        "combinations": [_public_item(c, pngs) for c in combos] if combos is not None else None,
    }


def creative(st: Stimulus) -> dict[str, Any]:
    """The original's Creative: {type, displayType, items}; images as raw base64 (no data: prefix)."""
    pngs = {g.id: g.png for g in st.images}
    return {
        "type": st.creative_type,
        "displayType": st.display_type,
        "items": [_public_item(i, pngs) for i in st.items],
    }


def error_summary(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ModelError):
        return {"type": "model", **exc.to_dict()}
    if isinstance(exc, BusinessException):
        return {"type": "business", "message": exc.message, "status": exc.status}
    if isinstance(exc, ApiError):
        return {"type": "api", "message": exc.message, "status": exc.status}
    return {"type": type(exc).__name__, "message": str(exc)[:500]}
