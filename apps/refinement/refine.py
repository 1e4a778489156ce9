"""Image refinement on a chosen stimulus image (beyond the original): img2img and inpaint.

Every result is a new *version* linked to its parent image, so each stimulus image
grows a version tree (`refinement_versions`: `_id` = the version's image id, `parent`,
`root` = the stimulus image the tree starts from). The root itself is the stimulus
image (stored in `refinement_stimuli.images`); it is not duplicated. A request that
fails keeps nothing: its images (and its mask) are deleted.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from bson import ObjectId
from PIL import Image, UnidentifiedImageError
from pymongo import ASCENDING
from pymongo.errors import PyMongoError

from agent.types import ImageRequest, ModelError
from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.errors import ApiError
from apps.core.image_refs import IMAGE_NOT_FOUND, read_image
from apps.core.storage import absolute_image_url, decode_base64_image, inspect_image, to_base64

from . import labels as L
from . import pipeline as P
from . import store as S
from .schemas import Img2ImgBody, InpaintBody

log = logging.getLogger(__name__)

MAX_TREE = 2000


class RefineService:
    def __init__(self, svc: Services, base_url: str | None = None) -> None:
        self.svc = svc
        self.db = svc.db
        self.base_url = base_url

    # ------------------------------------------------------------------ lookup
    def node(self, image_id: str) -> dict[str, Any]:
        """Parent info for an image: a version, or a stimulus image (a root). 404 otherwise."""
        version = self.db.refinement_versions.find_one({"_id": image_id})
        if version is not None:
            return {
                "id": image_id,
                "root": version["root"],
                "depth": version["depth"],
                "stimulus_id": version.get("stimulus_id"),
                "prompt": version.get("prompt") or "",
                "negative": version.get("negative_prompt") or "",
                "username": version.get("username"),
                "session": version.get("session"),
            }
        stim = self.db.refinement_stimuli.find_one(
            {"images.id": image_id}, {"images": 1, "username": 1, "session": 1}
        )
        if stim is None:
            raise BusinessException(1, IMAGE_NOT_FOUND, status=404)
        img = next(i for i in stim["images"] if i["id"] == image_id)
        return {
            "id": image_id,
            "root": image_id,
            "depth": 0,
            "stimulus_id": str(stim["_id"]),
            "prompt": img.get("positive") or img.get("prompt") or "",
            "negative": img.get("negative") or "",
            "username": stim.get("username"),
            "session": stim.get("session"),
            "role": img.get("role"),
        }

    # ------------------------------------------------------------------ operations
    def img2img(self, body: Img2ImgBody, username: str | None) -> dict[str, Any]:
        return self._refine("img2img", body, username, mask=None, invert=False)

    def inpaint(self, body: InpaintBody, username: str | None) -> dict[str, Any]:
        try:
            raw = decode_base64_image(body.mask, field="mask")
            inspect_image(
                raw, max_bytes=self.svc.images.max_bytes, max_side=self.svc.images.max_side, field="mask"
            )
            with Image.open(io.BytesIO(raw)) as img:
                mask = img.convert("L")
        except ApiError as exc:
            raise BusinessException(1, f"invalid request: {exc.message}", status=exc.status) from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise BusinessException(1, "invalid request: mask: not a readable image", status=422) from exc
        return self._refine("inpaint", body, username, mask=mask, invert=body.invertMask)

    def _refine(
        self,
        op: str,
        body: Img2ImgBody | InpaintBody,
        username: str | None,
        *,
        mask: Image.Image | None,
        invert: bool,
    ) -> dict[str, Any]:
        parent = self.node(body.imageId)
        owner = username or parent["username"]
        session = body.sessionId or parent["session"]
        _, parent_png = read_image(self.svc, body.imageId)  # the same owner rule as every image input
        with Image.open(io.BytesIO(parent_png)) as img:
            width, height = img.size
        mask_png = None
        if mask is not None:
            if mask.size != (width, height):
                raise BusinessException(
                    1,
                    f"invalid request: mask is {mask.size[0]}x{mask.size[1]} but the image is "
                    f"{width}x{height}",
                    status=422,
                )
            buf = io.BytesIO()
            mask.save(buf, format="PNG")
            mask_png = buf.getvalue()
        opts = P.sd_options(self.svc.settings.PROMPTS_DIR, op)
        strength = body.strength if body.strength is not None else float(opts["denoising_strength"])
        prompt = body.prompt.strip() if body.prompt and body.prompt.strip() else parent["prompt"]
        negative = body.negativePrompt.strip() if body.negativePrompt is not None else parent["negative"]
        batch = str(ObjectId())
        ctx = {"app": L.APP, "user": owner, "session": session, "job": batch, "step": op, "kind": "version"}
        mask_id = None
        try:
            if mask_png is not None:
                mask_id = self.svc.images.save(
                    mask_png, app=L.APP, user=owner, kind="mask", job=batch, session=session
                )
            seeds = [body.seed + i if body.seed >= 0 else -1 for i in range(body.num)]
            requests = [
                ImageRequest(
                    prompt=prompt,
                    negative_prompt=negative,
                    width=width,
                    height=height,
                    steps=int(opts["steps"]),
                    cfg_scale=float(opts["cfg_scale"]),
                    sampler_name=opts.get("sampler_name"),
                    checkpoint=opts.get("checkpoint"),
                    seed=seed,
                    init_image=parent_png,
                    mask=mask_png,
                    inpainting_mask_invert=invert,
                    denoising_strength=strength,
                    extra=dict(opts.get("extra") or {}),
                    label=f"{op} of {body.imageId[:8]}",
                    context=ctx,
                )
                for seed in seeds
            ]
            try:
                results = self.svc.image_provider.generate_many(requests)
            except ApiError as exc:
                raise ModelError(
                    f"the image service returned an unusable image: {exc.message}",
                    provider="images",
                    status=502,
                    kind="image",
                ) from exc
            for res in results:
                if not res.png or not res.image_id:
                    raise ModelError(
                        "the image service returned an empty image",
                        provider=res.provider,
                        status=502,
                        kind="image",
                    )
            at = S.now()
            docs = [
                {
                    "_id": res.image_id,
                    "parent": body.imageId,
                    "root": parent["root"],
                    "depth": parent["depth"] + 1,
                    "stimulus_id": parent["stimulus_id"],
                    "op": op,
                    "prompt": prompt,
                    "negative_prompt": negative,
                    "params": {
                        "strength": strength,
                        "seed": res.seed if res.seed is not None else req.seed,
                        "requested_seed": req.seed,
                        "num": body.num,
                        "width": width,
                        "height": height,
                        **({"mask_image_id": mask_id, "invert_mask": invert} if op == "inpaint" else {}),
                    },
                    "generation_id": res.generation_id,
                    "instance": res.instance,
                    "provider": res.provider,
                    "batch": batch,
                    "username": owner,
                    "session": session,
                    "created_at": at,
                }
                for req, res in zip(requests, results, strict=True)
            ]
            self.db.refinement_versions.insert_many(docs, ordered=True)
        except BaseException:
            self._discard(batch)
            raise
        pngs = {res.image_id: res.png for res in results}
        return {
            "parentId": body.imageId,
            "rootId": parent["root"],
            "versions": [self._public(d, image=to_base64(pngs[d["_id"]])) for d in docs],
        }

    def _discard(self, batch: str) -> None:
        try:
            self.db.refinement_versions.delete_many({"batch": batch})
            for doc in self.db["images.files"].find(
                {"metadata.job": batch, "metadata.app": L.APP}, {"_id": 1}
            ):
                self.svc.images.delete(doc["_id"])
        except PyMongoError as exc:
            log.error("could not clean up refine batch %s: %s", batch, exc)

    # ------------------------------------------------------------------ the tree
    def tree(self, image_id: str) -> tuple[dict[str, Any], str | None]:
        """The whole tree containing `image_id`, from its root (the stimulus image). Returns (tree, owner)."""
        node = self.node(image_id)
        root_id = node["root"]
        root = self.node(root_id) if root_id != image_id else node
        versions = list(
            self.db.refinement_versions.find({"root": root_id}).sort("created_at", ASCENDING).limit(MAX_TREE)
        )
        children: dict[str, list[dict[str, Any]]] = {}
        for v in versions:
            children.setdefault(v["parent"], []).append(v)

        def build(doc: dict[str, Any]) -> dict[str, Any]:
            out = self._public(doc)
            out["children"] = [build(c) for c in children.get(doc["_id"], [])]
            return out

        root_doc = {
            "_id": root_id,
            "parent": None,
            "root": root_id,
            "depth": 0,
            "op": "original",
            "stimulus_id": root["stimulus_id"],
            "prompt": root["prompt"],
            "negative_prompt": root["negative"],
            "params": {"role": root.get("role")},
            "created_at": None,
        }
        return build(root_doc), root["username"]

    def _public(self, doc: dict[str, Any], image: str | None = None) -> dict[str, Any]:
        return {
            "id": doc["_id"],
            "parentId": doc.get("parent"),
            "rootId": doc["root"],
            "stimulusId": doc.get("stimulus_id"),
            "op": doc["op"],
            "depth": doc.get("depth", 0),
            "prompt": doc.get("prompt"),
            "negativePrompt": doc.get("negative_prompt"),
            "params": doc.get("params") or {},
            "imageUrl": absolute_image_url(doc["_id"], self.base_url),
            "image": image,
            "createdAt": S.iso(doc.get("created_at")),
        }
