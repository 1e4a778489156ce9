"""The operations of StepIdeator's buttons, one method per dispatch entry (labels.resolve_operation).

Each takes the `Generation` of one /generate call and returns the original's `data` shape:
design briefs (shape A), sketches, white models and renderings (shapes B to D).
"""

from __future__ import annotations

import json
from typing import Any

from agent.types import ImageRequest
from apps.core.envelope import BusinessException

from . import labels
from .generation import Generation, GenerationSteps, controlnet_unit
from .multiview import run_multiview_tool


class Operations(GenerationSteps):
    """The button operations over the shared generation steps."""

    def run(self, gen: Generation) -> Any:
        """Run the operation `gen.op` names (e.g. `sketch.extend` -> `op_sketch_extend`)."""
        return getattr(self, "op_" + gen.op.replace(".", "_"))(gen)

    # ------------------------------------------------------------------ design brief (shape A)
    def _numbered_json(self, gen: Generation, template: str, array_key: str) -> dict[str, str]:
        """`gen.num` JSON items of `template` (its `array_key` array), each as a JSON string keyed "0".."""
        data = self._chat(
            gen,
            template,
            {"designTask": gen.task, "userInput": gen.user_input, "n": gen.num},
            n=gen.num,
            array_key=array_key,
        )
        return {str(i): json.dumps(item, ensure_ascii=False) for i, item in enumerate(data[array_key])}

    def op_brief_new(self, gen: Generation) -> dict[str, str]:
        return self._numbered_json(gen, "ideation/brief_new", "briefs")

    def op_brief_reference(self, gen: Generation) -> dict[str, str]:
        return self._numbered_json(gen, "ideation/brief_reference", "products")

    def op_brief_extend(self, gen: Generation) -> dict[str, str]:
        if not gen.texts:
            raise BusinessException(1, labels.MSG_TEXTS_MISSING)
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
        unit = controlnet_unit("pidinet_scribble", "control_v11p_sd15_scribble", canvas)
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
                raise BusinessException(1, labels.MSG_IMAGE_OR_TEXT_MISSING)
            extra = ", ".join(gen.texts)
            return self._txt2img(
                gen,
                self._sd_text("sketch", negative=False, mainbody=body, extra=extra),
                self._sd_text("sketch", negative=True),
                self.ckpt_sketch,
            )
        cut = self.svc.image_provider.segment(gen.canvas, body)
        self._store(gen, cut.cutout, "cutout")
        unit = controlnet_unit(
            "lineart", "control_v11p_sd15_lineart", cut.cutout, resize_mode="Crop and Resize"
        )
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
        if gen.current_stage == labels.STAGE_SKETCH:
            unit = controlnet_unit(
                "lineart_standard",
                "control_v11p_sd15_lineart",
                gen.canvas,
                processor_res=64,
                threshold_a=64,
                threshold_b=64,
                pixel_perfect=True,
            )
            return self._txt2img(gen, pos, neg, self.ckpt_sketch, [unit])
        if gen.current_stage == labels.STAGE_RENDERING:
            unit = controlnet_unit(
                "depth",
                "control_v11f1p_sd15_depth",
                gen.canvas,
                processor_res=64,
                threshold_a=64,
                threshold_b=64,
            )
            return self._txt2img(gen, pos, neg, self.ckpt_control, [unit])
        raise BusinessException(1, labels.MSG_WRONG_STAGE)

    def op_model_multiview(self, gen: Generation) -> list[dict[str, str]]:
        command = self.settings.IDEATION_MULTIVIEW_CMD
        if not command:
            raise BusinessException(
                1,
                "多角度拓展未配置：set IDEATION_MULTIVIEW_CMD to a multi-view tool (argv with {input} {output})",
                status=503,
            )
        if gen.canvas is None and not gen.texts:
            raise BusinessException(1, labels.MSG_IMAGE_OR_TEXT_MISSING)
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
        views = run_multiview_tool(command, cut.cutout, self.settings.IDEATION_MULTIVIEW_TIMEOUT_S)
        ids = [self._store(gen, png, "multiview") for png in views]
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
        unit = controlnet_unit(
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
        if gen.current_stage not in (labels.STAGE_SKETCH, labels.STAGE_MODEL):
            raise BusinessException(1, labels.MSG_WRONG_STAGE)
        unit = controlnet_unit(
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
