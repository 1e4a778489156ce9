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
from pymongo.errors import PyMongoError

from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.errors import ApiError
from apps.core.image_refs import IMAGE_NOT_FOUND, read_image
from apps.core.storage import decode_base64_image, inspect_image, to_base64

from . import labels, store, views
from .attribution import Caller
from .images import generate_images, image_request, sd_options
from .schemas import Img2ImgBody, InpaintBody

log = logging.getLogger(__name__)

MAX_TREE = 2000


class VersionService:
    """Version trees of stimulus images: img2img / inpaint children and the tree they form."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.db = svc.db

    # ------------------------------------------------------------------ lookup
    def node(self, image_id: str) -> dict[str, Any]:
        """Parent info for an image: a version, or a stimulus image (a root). 404 otherwise."""
        version = store.find_version(self.db, image_id)
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
        stim = store.stimulus_with_image(self.db, image_id)
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

    def _parent(self, image_id: str, caller: Caller) -> dict[str, Any]:
        """The image to refine, if the caller may see it (the same 404 as a missing image otherwise)."""
        parent = self.node(image_id)
        caller.check_owner(parent["username"], IMAGE_NOT_FOUND)
        return parent

    # ------------------------------------------------------------------ operations
    def img2img(self, body: Img2ImgBody, caller: Caller) -> dict[str, Any]:
        parent = self._parent(body.imageId, caller)
        return self._refine("img2img", body, parent, caller, mask=None, invert=False)

    def inpaint(self, body: InpaintBody, caller: Caller) -> dict[str, Any]:
        parent = self._parent(body.imageId, caller)
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
        return self._refine("inpaint", body, parent, caller, mask=mask, invert=body.invertMask)

    def _refine(
        self,
        op: str,
        body: Img2ImgBody | InpaintBody,
        parent: dict[str, Any],
        caller: Caller,
        *,
        mask: Image.Image | None,
        invert: bool,
    ) -> dict[str, Any]:
        owner = caller.auth_user or body.username or parent["username"]
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
        opts = sd_options(self.svc.prompts, op)
        strength = body.strength if body.strength is not None else float(opts["denoising_strength"])
        prompt = body.prompt.strip() if body.prompt and body.prompt.strip() else parent["prompt"]
        negative = body.negativePrompt.strip() if body.negativePrompt is not None else parent["negative"]
        batch = str(ObjectId())
        ctx = {
            "app": labels.APP,
            "user": owner,
            "session": session,
            "job": batch,
            "step": op,
            "kind": "version",
        }
        mask_id = None
        try:
            if mask_png is not None:
                mask_id = self.svc.images.save(
                    mask_png, app=labels.APP, user=owner, kind="mask", job=batch, session=session
                )
            seeds = [body.seed + i if body.seed >= 0 else -1 for i in range(body.num)]
            requests = [
                image_request(
                    opts,
                    prompt=prompt,
                    negative_prompt=negative,
                    width=width,
                    height=height,
                    seed=seed,
                    init_image=parent_png,
                    mask=mask_png,
                    inpainting_mask_invert=invert,
                    denoising_strength=strength,
                    label=f"{op} of {body.imageId[:8]}",
                    context=ctx,
                )
                for seed in seeds
            ]
            results = generate_images(self.svc, requests)
            at = store.now()
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
            store.insert_versions(self.db, docs)
        except BaseException:
            self._discard(batch)
            raise
        pngs = {res.image_id: res.png for res in results}
        return {
            "parentId": body.imageId,
            "rootId": parent["root"],
            "versions": [
                views.public_version(d, caller.base_url, image=to_base64(pngs[d["_id"]])) for d in docs
            ],
        }

    def _discard(self, batch: str) -> None:
        try:
            store.delete_batch(self.db, batch)
            for image_id in store.job_image_ids(self.db, batch):
                self.svc.images.delete(image_id)
        except PyMongoError as exc:
            log.error("could not clean up refine batch %s: %s", batch, exc)

    # ------------------------------------------------------------------ the tree
    def tree(self, image_id: str, caller: Caller) -> dict[str, Any]:
        """The whole tree containing `image_id`, from its root (the stimulus image)."""
        node = self.node(image_id)
        root_id = node["root"]
        root = self.node(root_id) if root_id != image_id else node
        versions = store.tree_versions(self.db, root_id, MAX_TREE)
        caller.check_owner(root["username"], IMAGE_NOT_FOUND)
        children: dict[str, list[dict[str, Any]]] = {}
        for v in versions:
            children.setdefault(v["parent"], []).append(v)

        def build(doc: dict[str, Any]) -> dict[str, Any]:
            out = views.public_version(doc, caller.base_url)
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
        return build(root_doc)
