"""One /generate call's inputs and the steps every operation is built from.

`Generation` is the call in flight (what it was given and what it produced, for the record);
`GenerationSteps` wraps the model calls an operation chains: a JSON chat with an exact item
count, the design's main object (cached per task), the SD prompt texts, and txt2img batches
through the shared image provider. The operations themselves are in operations.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from agent.llm import CallContext
from agent.types import ImageRequest, ModelError
from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.storage import absolute_image_url

from . import labels

APP = "ideation"


@dataclass
class Generation:
    """One /generate call in flight: inputs plus what it produced (for the record)."""

    username: str
    task: str
    op: str
    num: int
    texts: list[str]
    current_stage: str | None
    canvas: bytes | None
    canvas_image_id: str | None
    request_id: str = field(default_factory=lambda: str(ObjectId()))
    image_ids: list[str] = field(default_factory=list)
    generation_ids: list[str] = field(default_factory=list)
    texts_out: list[Any] = field(default_factory=list)

    @property
    def user_input(self) -> str:
        # the original's format: each selected text in single quotes, no separator
        return "".join(f"'{t}'" for t in self.texts)


def controlnet_unit(module: str, model: str, image: bytes | None, **overrides: Any) -> dict[str, Any]:
    """A ControlNet unit as the original sends it (research note §3.3); agent/images/sdwebui/client.py base64-encodes `image`."""
    unit: dict[str, Any] = {
        "enabled": True,
        "module": module,
        "model": model,
        "weight": 1.0,
        "resize_mode": 1,
        "processor_res": 512,
        "threshold_a": -1,
        "threshold_b": -1,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": 0,
        "pixel_perfect": False,
        "lowvram": False,
    }
    if image is not None:
        unit["image"] = image
    unit.update(overrides)
    return unit


class GenerationSteps:
    """The model calls operations chain, recording each image and generation on the `Generation`."""

    def __init__(self, svc: Services, base_url: str) -> None:
        self.svc = svc
        self.db = svc.db
        self.settings = svc.settings
        self.base_url = base_url

    def _require_canvas(self, gen: Generation) -> bytes:
        if gen.canvas is None:
            raise BusinessException(1, labels.MSG_IMAGE_MISSING)
        return gen.canvas

    def _ctx(self, gen: Generation, step: str) -> CallContext:
        return CallContext(app=APP, user=gen.username or None, session=gen.request_id, step=step)

    def _chat(
        self,
        gen: Generation,
        template: str,
        variables: dict[str, Any],
        *,
        n: int | None = None,
        array_key: str | None = None,
    ) -> Any:
        schema = None
        if n is not None and array_key is not None:
            schema = json.loads(json.dumps(self.svc.prompts.get(template).schema))
            schema["properties"][array_key]["minItems"] = n
            schema["properties"][array_key]["maxItems"] = n
        result = self.svc.llm.chat(
            template=template, variables=variables, schema=schema, context=self._ctx(gen, template)
        )
        if result.generation_id:
            gen.generation_ids.append(result.generation_id)
        gen.texts_out.append(result.data)
        return result.data

    def mainbody(self, gen: Generation) -> str:
        """The design's main object, from the task (cached per task text)."""
        key = hashlib.sha256(gen.task.encode()).hexdigest()
        cached = self.db.ideation_mainbody.find_one({"_id": key})
        if cached:
            return cached["object"]
        data = self._chat(gen, "ideation/mainbody", {"designTask": gen.task})
        name = str(data.get("object", "")).strip() or "product"
        self.db.ideation_mainbody.update_one(
            {"_id": key},
            {"$set": {"object": name, "task": gen.task, "created_at": datetime.now(UTC)}},
            upsert=True,
        )
        return name

    def _sd_text(self, kind: str, *, negative: bool, mainbody: str = "", extra: str = "") -> str:
        rendered = self.svc.prompts.render(
            "ideation/sd_prompts", {"kind": kind, "negative": negative, "mainbody": mainbody, "extra": extra}
        )
        return rendered.messages[-1]["content"].strip()

    # ------------------------------------------------------------------ images
    def _images(self, gen: Generation, requests: list[ImageRequest]) -> list[bytes]:
        for i, req in enumerate(requests):
            req.context = {
                "app": APP,
                "user": gen.username or None,
                "session": gen.request_id,
                "step": gen.op,
                "index": i,
            }
        results = self.svc.image_provider.generate_many(requests)
        out = []
        for res in results:
            if not res.png:
                raise ModelError(
                    "the image service returned an empty image", kind="image", provider=res.provider
                )
            if res.image_id:
                gen.image_ids.append(res.image_id)
            if res.generation_id:
                gen.generation_ids.append(res.generation_id)
            out.append(res.png)
        return out

    def _urls(self, ids: list[str]) -> dict[str, str]:
        return {str(i): absolute_image_url(image_id, self.base_url) for i, image_id in enumerate(ids)}

    def _txt2img(
        self,
        gen: Generation,
        prompt: str,
        negative: str,
        checkpoint: str,
        controlnet: list[dict[str, Any]] | None = None,
        n: int | None = None,
    ) -> dict[str, str]:
        count = n or gen.num
        reqs = [
            ImageRequest(
                prompt=prompt,
                negative_prompt=negative,
                width=512,
                height=512,
                steps=20,
                cfg_scale=7.0,
                sampler_name="Euler a",
                checkpoint=checkpoint,
                controlnet=list(controlnet or []),
                label=f"{gen.op} {i + 1}/{count}",
            )
            for i in range(count)
        ]
        before = len(gen.image_ids)
        self._images(gen, reqs)
        return self._urls(gen.image_ids[before:])

    def _store(self, gen: Generation, data: bytes, kind: str) -> str:
        image_id = self.svc.images.save(
            data, app=APP, user=gen.username or None, kind=kind, session=gen.request_id, step=gen.op
        )
        gen.image_ids.append(image_id)
        return image_id

    @property
    def ckpt_sketch(self) -> str:
        return self.settings.IDEATION_CHECKPOINT_SKETCH

    @property
    def ckpt_model(self) -> str:
        return self.settings.IDEATION_CHECKPOINT_MODEL

    @property
    def ckpt_control(self) -> str:
        return self.settings.IDEATION_CHECKPOINT_CONTROL
