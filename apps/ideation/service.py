"""StepIdeator's step-by-step ideation operations, one method per dispatch entry.

Fixes over the original: each request uses *its own* uploaded sketch (stored per user in
GridFS) instead of one shared file; the product's name comes from the design task
(template `ideation/mainbody`, cached per task) instead of a hard-coded "agricultural
drone"; checkpoints are routed through the pool's model affinity; a failed generation is an
error, never a 0-byte image; everything a participant did or saw is stored.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo.database import Database

from agent.llm import CallContext
from agent.types import ImageRequest, ModelError
from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.image_refs import read_image_ref
from apps.core.jobs import holding, lease_fields
from apps.core.storage import (
    absolute_image_url,
    absolute_image_urls,
    decode_base64_image,
    relative_image_urls,
)

from . import labels as L
from .attribution import claim_uploads, participant_of

APP = "ideation"

EXPORTED = ("ideation_requests", "ideation_users", "ideation_time_records")  # by "username"
# a request is stored `working` while it runs in its worker; if that worker dies, the reaper fails it
LEASED = "ideation_requests"


def create_indexes(db: Database) -> None:
    db.ideation_requests.create_index([("username", 1), ("created_at", -1)])
    db.ideation_users.create_index("username", unique=True)
    db.ideation_time_records.create_index([("username", 1), ("received_at", -1)])
    # attribution.py: find a browser's latest named request, and its ownerless uploads
    db.ideation_requests.create_index([("client_key", 1), ("created_at", -1)])
    db.ideation_time_records.create_index([("client_key", 1), ("received_at", -1)])
    db["images.files"].create_index([("metadata.client_key", 1), ("uploadDate", -1)])
    db.ideation_mainbody.create_index("created_at")


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


# ControlNet units of the original (research note §3.3); `image` bytes are base64-encoded by agent/sd.py
def _unit(module: str, model: str, image: bytes | None, **overrides: Any) -> dict[str, Any]:
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


class IdeationService:
    def __init__(self, svc: Services, base_url: str) -> None:
        self.svc = svc
        self.db = svc.db
        self.settings = svc.settings
        self.base_url = base_url

    # ------------------------------------------------------------------ entry point
    def generate(self, body: Any, username: str, client: str | None = None) -> Any:
        info = body.selectedButtonInfo
        op = L.resolve_operation(info.aiStage, info.buttonText)
        if op is None:
            raise BusinessException(1, L.MSG_INVALID_TASK)
        task = (body.designTask or "").strip()
        if not task:
            raise BusinessException(1, L.MSG_TASK_MISSING)
        num = body.currentNum
        if num == 0:
            raise BusinessException(1, L.MSG_NUM_MISSING)
        limit = self.settings.IDEATION_MAX_NUM
        if num > limit:
            raise BusinessException(1, f"currentNum must be between 1 and {limit}", status=422)
        if op in ("brief.extend", "sketch.reference"):
            num = 1  # the UI forces 1 for these buttons
        if client and self.settings.AUTH_MODE == "none":
            claim_uploads(self.db, APP, client, username)
        canvas, canvas_id = self._canvas(body.selectedCanvasRecords or [], username)
        gen = Generation(
            username=username,
            task=task,
            op=op,
            num=num,
            texts=list(body.selectedTexts or []),
            current_stage=L.resolve_stage(body.currentStage),
            canvas=canvas,
            canvas_image_id=canvas_id,
        )
        started = time.perf_counter()
        record = {
            "_id": gen.request_id,
            "username": username,
            "op": op,
            "buttonText": info.buttonText,
            "aiStage": info.aiStage,
            "currentAIStage": body.currentAIStage,
            "currentStage": body.currentStage,
            "designTask": task,
            "num": num,
            "selectedTexts": gen.texts,
            "canvas_image_id": canvas_id,
            "created_at": datetime.now(UTC),
            "status": "working",
            "client_key": client,
            **lease_fields(self.svc.jobs),
        }
        self.db.ideation_requests.insert_one(record)
        try:
            with holding(self.svc.jobs, "ideation_requests", gen.request_id):
                data = getattr(self, "op_" + op.replace(".", "_"))(gen)
        except BusinessException as exc:
            if exc.status < 500:  # refused (wrong stage, missing canvas...): it leaves nothing behind
                self._discard(gen, new_canvas=canvas_id is not None and not self._is_reference(body))
                raise
            self._failed(gen, exc, started)
            raise
        except ModelError as exc:
            self._failed(gen, exc, started)
            raise
        self.db.ideation_requests.update_one(
            {"_id": gen.request_id},
            {
                "$set": {
                    # stored with server-relative image URLs: the Host header this answer used is the client's
                    "status": "done",
                    "data": relative_image_urls(data, self.base_url),
                    "image_ids": gen.image_ids,
                    "texts": gen.texts_out,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                },
                "$unset": {"lease_until": ""},
            },
        )
        return data

    @staticmethod
    def _is_reference(body: Any) -> bool:
        records = body.selectedCanvasRecords or []
        return bool(records) and isinstance(records[0], str) and not records[0].startswith("data:")

    def _discard(self, gen: Generation, *, new_canvas: bool) -> None:
        """Undo a refused request: its record and the images it stored (not a canvas it only referenced)."""
        self.db.ideation_requests.delete_one({"_id": gen.request_id})
        for image_id in [
            *gen.image_ids,
            *([gen.canvas_image_id] if new_canvas and gen.canvas_image_id else []),
        ]:
            self.svc.images.delete(image_id)

    def _failed(self, gen: Generation, exc: Exception, started: float) -> None:
        self.db.ideation_requests.update_one(
            {"_id": gen.request_id},
            {
                "$set": {
                    "status": "failed",
                    "error": getattr(exc, "message", str(exc)),
                    "image_ids": gen.image_ids,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                },
                "$unset": {"lease_until": ""},
            },
        )

    # ------------------------------------------------------------------ inputs
    def _canvas(self, records: list[str], username: str) -> tuple[bytes | None, str | None]:
        """The selected canvas: an uploaded image's URL (resolved to *that* upload) or a data URL."""
        if not records:
            return None, None
        ref = records[0]
        if not isinstance(ref, str) or not ref.strip():
            raise BusinessException(1, L.MSG_IMAGE_MISSING)
        found = read_image_ref(self.svc, ref)  # the caller's own image (or admin), else a plain 404
        if found is not None:
            return found[1], found[0].id
        if ref.startswith("data:image"):
            data = decode_base64_image(ref, field="selectedCanvasRecords[0]")
            image_id = self.svc.images.save(data, app=APP, user=username or None, kind="canvas")
            return data, image_id
        raise BusinessException(
            1, "selectedCanvasRecords[0] must be a URL returned by /upload or a data URL", status=422
        )

    def _require_canvas(self, gen: Generation) -> bytes:
        if gen.canvas is None:
            raise BusinessException(1, L.MSG_IMAGE_MISSING)
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

    # ------------------------------------------------------------------ design brief (shape A)
    def op_brief_new(self, gen: Generation) -> dict[str, str]:
        data = self._chat(
            gen,
            "ideation/brief_new",
            {"designTask": gen.task, "userInput": gen.user_input, "n": gen.num},
            n=gen.num,
            array_key="briefs",
        )
        return {str(i): json.dumps(b, ensure_ascii=False) for i, b in enumerate(data["briefs"])}

    def op_brief_reference(self, gen: Generation) -> dict[str, str]:
        data = self._chat(
            gen,
            "ideation/brief_reference",
            {"designTask": gen.task, "userInput": gen.user_input, "n": gen.num},
            n=gen.num,
            array_key="products",
        )
        return {str(i): json.dumps(p, ensure_ascii=False) for i, p in enumerate(data["products"])}

    def op_brief_extend(self, gen: Generation) -> dict[str, str]:
        if not gen.texts:
            raise BusinessException(1, L.MSG_TEXTS_MISSING)
        data = self._chat(gen, "ideation/brief_extend", {"designTask": gen.task, "userInput": gen.user_input})
        return {"0": json.dumps(data, ensure_ascii=False)}

    # ------------------------------------------------------------------ sketch (shape B / C)
    def op_sketch_new(self, gen: Generation) -> dict[str, str]:
        body = self.mainbody(gen)
        return self._txt2img(
            gen,
            self._sd_text("sketch", negative=False, mainbody=body),
            self._sd_text("sketch", negative=True),
            self.ckpt_sketch,
        )

    def op_sketch_reference(self, gen: Generation) -> list[dict[str, str]]:
        body = self.mainbody(gen)
        advice = self._chat(
            gen, "ideation/sketch_advice", {"designTask": gen.task, "userInput": gen.user_input}
        )
        sd = self._chat(
            gen,
            "ideation/sketch_sd_prompt",
            {"description": json.dumps(advice.get("外观造型", advice), ensure_ascii=False)},
        )
        urls = self._txt2img(
            gen,
            self._sd_text("sketch", negative=False, mainbody=body, extra=sd["prompt"]),
            self._sd_text("sketch", negative=True),
            self.ckpt_sketch,
        )
        return [{"0": json.dumps(advice, ensure_ascii=False)}, urls]

    def op_sketch_extend(self, gen: Generation) -> dict[str, str]:
        canvas = self._require_canvas(gen)
        body = self.mainbody(gen)
        unit = _unit("pidinet_scribble", "control_v11p_sd15_scribble", canvas)
        return self._txt2img(
            gen,
            self._sd_text("sketch", negative=False, mainbody=body),
            self._sd_text("sketch", negative=True),
            self.ckpt_sketch,
            [unit],
        )

    def op_sketch_convert(self, gen: Generation) -> dict[str, str]:
        body = self.mainbody(gen)
        if gen.canvas is None:
            if not gen.texts:
                raise BusinessException(1, L.MSG_IMAGE_OR_TEXT_MISSING)
            extra = ", ".join(gen.texts)
            return self._txt2img(
                gen,
                self._sd_text("sketch", negative=False, mainbody=body, extra=extra),
                self._sd_text("sketch", negative=True),
                self.ckpt_sketch,
            )
        cut = self.svc.image_provider.segment(gen.canvas, body)
        self._store(gen, cut.cutout, "cutout")
        unit = _unit("lineart", "control_v11p_sd15_lineart", cut.cutout, resize_mode="Crop and Resize")
        return self._txt2img(
            gen,
            self._sd_text("sketch", negative=False, mainbody=""),
            self._sd_text("sketch", negative=True),
            self.ckpt_sketch,
            [unit],
        )

    # ------------------------------------------------------------------ white model (shape B / D)
    def op_model_new(self, gen: Generation) -> dict[str, str]:
        body = self.mainbody(gen)
        return self._txt2img(
            gen,
            self._sd_text("model", negative=False, mainbody=body),
            self._sd_text("model", negative=True),
            self.ckpt_model,
        )

    def op_model_convert(self, gen: Generation) -> dict[str, str]:
        if gen.canvas is None:
            return self.op_model_new(gen)
        pos, neg = self._sd_text("model", negative=False), self._sd_text("model", negative=True)
        if gen.current_stage == L.STAGE_SKETCH:
            unit = _unit(
                "lineart_standard",
                "control_v11p_sd15_lineart",
                gen.canvas,
                processor_res=64,
                threshold_a=64,
                threshold_b=64,
                pixel_perfect=True,
            )
            return self._txt2img(gen, pos, neg, self.ckpt_sketch, [unit])
        if gen.current_stage == L.STAGE_RENDERING:
            unit = _unit(
                "depth",
                "control_v11f1p_sd15_depth",
                gen.canvas,
                processor_res=64,
                threshold_a=64,
                threshold_b=64,
            )
            return self._txt2img(gen, pos, neg, self.ckpt_control, [unit])
        raise BusinessException(1, L.MSG_WRONG_STAGE)

    def op_model_multiview(self, gen: Generation) -> list[dict[str, str]]:
        command = self.settings.IDEATION_MULTIVIEW_CMD
        if not command:
            raise BusinessException(
                1,
                "多角度拓展未配置：set IDEATION_MULTIVIEW_CMD to a multi-view tool (argv with {input} {output})",
                status=503,
            )
        if gen.canvas is None and not gen.texts:
            raise BusinessException(1, L.MSG_IMAGE_OR_TEXT_MISSING)
        body = self.mainbody(gen)
        source = gen.canvas
        if source is None:
            source = self._images(
                gen,
                [
                    ImageRequest(
                        prompt=self._sd_text(
                            "model", negative=False, mainbody=body, extra=", ".join(gen.texts)
                        ),
                        negative_prompt=self._sd_text("model", negative=True),
                        checkpoint=self.ckpt_model,
                    )
                ],
            )[0]
        cut = self.svc.image_provider.segment(source, body)
        with tempfile.TemporaryDirectory(prefix="multiview-") as tmp:
            src = Path(tmp) / "input.png"
            out = Path(tmp) / "out"
            out.mkdir()
            src.write_bytes(cut.cutout)
            argv = [
                part.replace("{input}", str(src)).replace("{output}", str(out))
                for part in shlex.split(command)
            ]
            try:
                proc = subprocess.run(
                    argv, capture_output=True, timeout=self.settings.IDEATION_MULTIVIEW_TIMEOUT_S, check=False
                )  # an argv list, never a shell string
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ModelError(
                    f"multi-view tool failed to run: {exc}", provider="multiview", kind="image"
                ) from exc
            if proc.returncode != 0:
                tail = proc.stderr.decode(errors="replace")[-300:]
                raise ModelError(
                    f"multi-view tool exited with {proc.returncode}: {tail}",
                    provider="multiview",
                    kind="image",
                )
            views = sorted(out.glob("*.png"))[:6]
            if not views:
                raise ModelError("multi-view tool produced no PNG views", provider="multiview", kind="image")
            ids = [self._store(gen, p.read_bytes(), "multiview") for p in views]
        return [self._urls(ids)]

    # ------------------------------------------------------------------ scene & rendering (shape B)
    def _scene_prompt(self, gen: Generation) -> str:
        data = self._chat(gen, "ideation/scene_prompt", {"designTask": gen.task})
        return str(data["prompt"])

    def op_rendering_new(self, gen: Generation) -> dict[str, str]:
        scene = self._scene_prompt(gen)
        return self._txt2img(
            gen,
            self._sd_text("scene", negative=False, extra=scene),
            self._sd_text("scene", negative=True),
            self.ckpt_model,
        )

    def op_rendering_reference(self, gen: Generation) -> dict[str, str]:
        body = self.mainbody(gen)
        reqs = [
            ImageRequest(
                prompt=self._sd_text("product", negative=False, mainbody=body),
                negative_prompt=self._sd_text("product", negative=True),
                checkpoint=self.ckpt_model,
                sampler_name="Euler a",
                label=f"reference {i + 1}",
            )
            for i in range(gen.num)
        ]
        images = self._images(gen, reqs)
        ids = [
            self._store(gen, self.svc.image_provider.segment(png, body).cutout, "cutout") for png in images
        ]
        return self._urls(ids)

    def op_rendering_extend(self, gen: Generation) -> dict[str, str]:
        canvas = self._require_canvas(gen)
        body = self.mainbody(gen)
        scene = self._scene_prompt(gen)
        cut = self.svc.image_provider.segment(canvas, body)
        unit = _unit(
            "inpaint_only",
            "control_v11p_sd15_inpaint",
            None,
            pixel_perfect=True,
            threshold_a=64,
            threshold_b=64,
        )
        reqs = [
            ImageRequest(
                prompt=scene,
                negative_prompt="",
                width=512,
                height=512,
                steps=30,
                cfg_scale=7.0,
                sampler_name="DPM++ 2M Karras",
                checkpoint=self.ckpt_sketch,
                init_image=canvas,
                mask=cut.mask,
                inpainting_mask_invert=True,
                denoising_strength=0.75,
                controlnet=[unit],
                extra={
                    "inpainting_fill": 1,
                    "inpaint_full_res": False,
                    "inpaint_full_res_padding": 32,
                    "mask_blur": 4,
                    "resize_mode": 0,
                },
                label=f"scene {i + 1}",
            )
            for i in range(gen.num)
        ]
        before = len(gen.image_ids)
        self._images(gen, reqs)
        return self._urls(gen.image_ids[before:])

    def op_rendering_convert(self, gen: Generation) -> dict[str, str]:
        canvas = self._require_canvas(gen)
        if gen.current_stage not in (L.STAGE_SKETCH, L.STAGE_MODEL):
            raise BusinessException(1, L.MSG_WRONG_STAGE)
        unit = _unit(
            "lineart_standard",
            "control_v11p_sd15_lineart",
            canvas,
            processor_res=64,
            threshold_a=64,
            threshold_b=64,
        )
        return self._txt2img(
            gen,
            self._sd_text("product", negative=False),
            self._sd_text("product", negative=True),
            self.ckpt_control,
            [unit],
        )

    # ------------------------------------------------------------------ uploads, timings, state
    def upload(
        self,
        data: bytes,
        filename: str,
        username: str | None,
        kind: str,
        *,
        source: str | None = None,
        client: str | None = None,
    ) -> str:
        """Store an upload; with no stated owner (auth off, no `username`) link it by `client` (attribution.py)."""
        if not username and client and self.settings.AUTH_MODE == "none":
            username = participant_of(self.db, client)
            source = "client" if username else None
        image_id = self.svc.images.save(
            data,
            app=APP,
            user=username or None,
            kind=kind,
            filename=filename,
            user_source=source if username else None,
            client_key=client,
        )
        return absolute_image_url(image_id, self.base_url)

    def time_record(self, body: Any, client: str | None = None) -> None:
        doc = body.model_dump()
        doc["received_at"] = datetime.now(UTC)
        doc["client_key"] = client
        self.db.ideation_time_records.insert_one(doc)
        if client and self.settings.AUTH_MODE == "none":
            claim_uploads(self.db, APP, client, body.username)

    def paint_start(self, username: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        self.db.ideation_users.update_one(
            {"username": username},
            {
                "$setOnInsert": {
                    "username": username,
                    "designTask": "",
                    "currentStage": L.STAGE_NOT_READY,
                    "designBriefSchemes": [],
                    "sketchSchemes": [],
                    "modelImageSchemes": [],
                    "renderingSchemes": [],
                    "created_at": now,
                },
                "$set": {"last_seen_at": now},
            },
            upsert=True,
        )
        return _public_user(self.db.ideation_users.find_one({"username": username}) or {})

    def user_state(self, username: str) -> dict[str, Any] | None:
        """The saved workspace, read only (a GET must not count as a visit)."""
        doc = self.db.ideation_users.find_one({"username": username})
        return _public_user(doc) if doc is not None else None

    STAGE_FIELDS = {
        L.STAGE_BRIEF: "designBriefSchemes",
        L.STAGE_SKETCH: "sketchSchemes",
        L.STAGE_MODEL: "modelImageSchemes",
        L.STAGE_RENDERING: "renderingSchemes",
    }

    def paint_save(self, username: str, data: dict[str, Any]) -> None:
        schemes = data.get("designSchemes") or {}
        if not isinstance(schemes, dict):
            raise BusinessException(1, "data.designSchemes must be an object keyed by stage", status=422)
        update: dict[str, Any] = {"saved_at": datetime.now(UTC)}
        for stage, field_name in self.STAGE_FIELDS.items():
            value = schemes.get(stage)
            if value is not None:
                if not isinstance(value, list):
                    raise BusinessException(1, f"data.designSchemes[{stage}] must be a list", status=422)
                update[field_name] = value
        for key in ("designTask", "currentStage"):
            if isinstance(data.get(key), str):
                update[key] = data[key]
        result = self.db.ideation_users.update_one({"username": username}, {"$set": update})
        if result.matched_count == 0:
            raise BusinessException(1, "用户不存在", status=404)

    def history(self, username: str, limit: int) -> dict[str, Any]:
        requests = []
        for doc in self.db.ideation_requests.find({"username": username}).sort("created_at", -1).limit(limit):
            requests.append(
                {
                    "id": doc["_id"],
                    "op": doc.get("op"),
                    "buttonText": doc.get("buttonText"),
                    "aiStage": doc.get("aiStage"),
                    "designTask": doc.get("designTask"),
                    "num": doc.get("num"),
                    "status": doc.get("status"),
                    "error": doc.get("error"),
                    "data": absolute_image_urls(doc.get("data"), self.base_url),
                    "images": [absolute_image_url(i, self.base_url) for i in doc.get("image_ids", [])],
                    "canvas": absolute_image_url(doc["canvas_image_id"], self.base_url)
                    if doc.get("canvas_image_id")
                    else None,
                    "created_at": doc["created_at"].isoformat() if doc.get("created_at") else None,
                    "latency_ms": doc.get("latency_ms"),
                }
            )
        timings = [
            {k: v for k, v in t.items() if k != "_id"} | {"received_at": t["received_at"].isoformat()}
            for t in self.db.ideation_time_records.find({"username": username})
            .sort("received_at", -1)
            .limit(limit)
        ]
        return {"username": username, "requests": requests, "timeRecords": timings}


def _public_user(doc: dict[str, Any]) -> dict[str, Any]:
    """A user document as JSON: string id, ISO dates."""
    doc["_id"] = str(doc.get("_id"))
    for key in ("created_at", "last_seen_at", "saved_at"):
        if isinstance(doc.get(key), datetime):
            doc[key] = doc[key].isoformat()
    return doc
