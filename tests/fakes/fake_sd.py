"""A fake AUTOMATIC1111 Stable Diffusion WebUI: `/sdapi/v1/*` and the segment-anything extension.

Real HTTP on 127.0.0.1, real PNGs (Pillow; pixels depend on prompt + seed, the instance name is
drawn on them), ONE generation at a time like the real WebUI (its queue lock), `delay` seconds per
image (the PNGs are encoded after the lock is left, as the WebUI does), checkpoint switching,
progress/interrupt, and faults:

    with FakeSD(delay=0.2, name="sd0") as sd:
        sd.fail_next(500); sd.empty_images_next(2)
        sd.dead = True      # listening socket closed: connection refused (open connections cut)
        sd.revive()         # listening again on the same port
        sd.hang = True      # requests are accepted and never answered until hang = False or stop()
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from PIL import Image, ImageOps

from . import LocalServer
from .pngs import decode_b64, render, to_b64

DEFAULT_MODELS = ["realisticVisionV60B1_v60B1VAE", "v2-1_512-ema-pruned", "v1-5-pruned-emaonly"]
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
SAM_PATH = "/sam/sam-predict"
_INT_FIELDS = ("width", "height", "steps", "batch_size", "n_iter", "seed")
_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "styles": None,
    "seed": -1,
    "subseed": -1,
    "sampler_name": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "override_settings": None,
    "override_settings_restore_afterwards": True,
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}
ALWAYSON_SCRIPTS = {"controlnet", "adetailer", "refiner", "seed", "sampler", "extra options"}


def model_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def model_title(name: str) -> str:
    """What the WebUI calls a checkpoint: `name.safetensors [shorthash]`."""
    return f"{name}.safetensors [{model_hash(name)[:10]}]"


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")


def webui_error(status: int, message: str, error: str = "RuntimeError", detail: str = "") -> Response:
    """The WebUI's API exception body."""
    return _json({"error": error, "detail": detail, "body": "", "errors": message}, status)


def validation_error(loc: list[Any], msg: str, kind: str) -> Response:
    """FastAPI (pydantic v1) 422, as the WebUI answers a malformed body."""
    return _json({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, 422)


class _Job:
    """The generation the WebUI is running right now (for /progress and /interrupt)."""

    def __init__(self, n: int, steps: int, delay: float, epoch: int) -> None:
        self.n, self.steps, self.delay, self.epoch = n, steps, delay, epoch
        self.done = 0
        self.image_started = time.monotonic()
        self.started = time.strftime("%Y%m%d%H%M%S")
        self.interrupted = False


class FakeSD:
    """One fake WebUI instance. All counters and switches are safe to read from tests."""

    def __init__(
        self,
        delay: float = 0.0,
        name: str | None = None,
        *,
        models: list[str] | None = None,
        checkpoint: str | None = None,
        port: int = 0,
        real_titles: bool = False,
    ) -> None:
        self.delay = (
            delay  # seconds per image, slept while holding the generation lock (the PNGs are made after)
        )
        self._name = name
        self.models: list[str] = list(models or DEFAULT_MODELS)  # model names
        # The real WebUI calls a checkpoint "name.safetensors [hash]" in options/info/sd-models titles;
        # by default the fake uses the bare name there (simpler asserts), real_titles=True for the real form.
        self.real_titles = real_titles
        self.checkpoint: str = checkpoint or self.models[0]  # the loaded checkpoint (model name)
        self.switch_delay = 0.0  # seconds a checkpoint switch costs (under the generation lock)
        self.switches = 0
        self.switch_log: list[str] = []  # checkpoints switched to, in order (restores included)
        self.options: dict[str, Any] = {"samples_format": "png", "CLIP_stop_at_last_layers": 1}
        self.alwayson_scripts: set[str] = set(ALWAYSON_SCRIPTS)  # lower-case script titles that exist
        self.sam_delay = 0.0
        self.sam_finds_object = True  # False: GroundingDINO finds nothing (no masks in the answer)
        self.requests: list[dict[str, Any]] = []
        self.count = 0  # images made
        self.interrupts = 0
        self.max_running = 0  # generations running at once (the lock keeps it at 1)
        self.max_concurrent_seen = 0  # generation requests inside at once, queued or running
        self._running = 0
        self._inside = 0
        self._job: _Job | None = None
        self._epoch = 0  # bumped when the instance "dies": its queued and running work is abandoned
        self._fail: list[int] = []
        self._empty = 0
        self._hang = False
        self._dead = False
        self._gen_lock = threading.Lock()  # the WebUI's queue lock: one generation at a time
        self._cv = threading.Condition()  # guards the state above; notified on every change
        self._server = LocalServer(self._build(), port=port)

    # ---- lifecycle
    def start(self) -> FakeSD:
        self._server.start()
        self._dead = False
        return self

    def stop(self) -> None:
        """Returns at once, even with hanging or sleeping handlers (they give up; connections are cut)."""
        self._server.stop()
        self._notify()

    def __enter__(self) -> FakeSD:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeSD({self.url!r}, name={self.name!r})"

    @property
    def url(self) -> str:
        return self._server.base

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def name(self) -> str:
        return self._name or f"fake-sd-{self.port}"

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    def title(self, name: str) -> str:
        """How this instance names checkpoint `name` in options/info/sd-models (see real_titles)."""
        return model_title(name) if self.real_titles else name

    @property
    def running(self) -> int:
        return self._running

    @property
    def inside(self) -> int:
        """Generation requests inside right now (queued or running)."""
        return self._inside

    # ---- faults
    def fail_next(self, status: int = 500, times: int = 1) -> None:
        """The next `times` generation/SAM requests answer `status` with the WebUI's error body."""
        with self._cv:
            self._fail.extend([status] * times)

    def empty_images_next(self, times: int = 1) -> None:
        """The next `times` generations answer 200 `{"images": [""]}` (a broken instance)."""
        with self._cv:
            self._empty += times

    @property
    def dead(self) -> bool:
        return self._dead

    @dead.setter
    def dead(self, value: bool) -> None:
        """True: the listening socket is closed (connection refused), open connections are cut and the
        queued/running work is abandoned. False: listen again on the same port."""
        if value and not self._dead:
            self._dead = True
            self._server.close_listener()
            self._server.abort_connections()  # before waking the work up, so no late answer gets out
            with self._cv:
                self._epoch += 1
                self._cv.notify_all()
        elif not value and self._dead:
            self._server.open_listener()
            self._dead = False

    def revive(self) -> None:
        self.dead = False

    @property
    def hang(self) -> bool:
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        """True: every request is accepted and gets no answer until hang = False (then it proceeds) or stop()."""
        with self._cv:
            self._hang = bool(value)
            self._cv.notify_all()

    def reset(self) -> None:
        """Clear the log, counters and pending faults (keeps delay, models and the loaded checkpoint)."""
        with self._cv:
            self.requests.clear()
            self.count = self.interrupts = self.switches = 0
            self.switch_log.clear()
            self.max_running, self.max_concurrent_seen = self._running, self._inside
            self._fail.clear()
            self._empty = 0
            self._hang = False
            self._cv.notify_all()

    # ---- inspection / synchronisation for tests
    def generation_requests(self) -> list[dict[str, Any]]:
        return [r for r in list(self.requests) if r["path"] in GENERATION_PATHS]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Block until predicate() (re-checked on every state change) or timeout; returns its last value."""
        with self._cv:
            return self._cv.wait_for(predicate, timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0, path: str | None = None) -> bool:
        """Until `n` requests (to `path`, if given) have arrived."""
        return self.wait_until(
            lambda: sum(1 for r in self.requests if path in (None, r["path"])) >= n, timeout
        )

    def wait_until_running(self, timeout: float = 5.0) -> bool:
        """Until a generation holds the lock (e.g. before calling /interrupt)."""
        return self.wait_until(lambda: self._running > 0, timeout)

    # ---- internals
    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _gone(self, epoch: int) -> bool:
        return self._server.stopped or epoch != self._epoch

    def _record(self) -> dict[str, Any]:
        now = time.time()
        body = request.get_json(silent=True) if request.method == "POST" else None
        entry: dict[str, Any] = {
            "path": request.path,
            "method": request.method,
            "json": body,
            "time": now,
            "start": now,
            "end": None,
            "status": None,
            "gen_start": None,  # generations: when the queue lock was taken ...
            "gen_end": None,  # ... and released (the PNGs are encoded after, as the WebUI does)
        }
        with self._cv:
            self.requests.append(entry)
            self._cv.notify_all()
        return entry

    def _finish(self, entry: dict[str, Any], resp: Response) -> Response:
        with self._cv:
            entry["end"] = time.time()
            entry["status"] = resp.status_code
            self._cv.notify_all()
        return resp

    def _wait_hang(self, epoch: int) -> bool:
        """Wait while hanging; True when the server stopped or died meanwhile (give up, no answer)."""
        with self._cv:
            self._cv.wait_for(lambda: not self._hang or self._gone(epoch))
            return self._gone(epoch)

    def _pop_fault(self) -> int | None:
        with self._cv:
            return self._fail.pop(0) if self._fail else None

    def _resolve_checkpoint(self, wanted: str) -> str | None:
        """Model name for a title / model name / file name, None when unknown (as the WebUI's aliases)."""
        for name in self.models:
            if wanted in (
                name,
                model_title(name),
                f"{name}.safetensors",
                f"{name}.ckpt",
                model_hash(name)[:10],
            ):
                return name
        return None

    def _switch(self, name: str, epoch: int) -> None:
        """Load checkpoint `name` (caller holds the generation lock)."""
        if name == self.checkpoint:
            return
        if self.switch_delay:
            with self._cv:
                self._cv.wait_for(lambda: self._gone(epoch), self.switch_delay)
        with self._cv:
            self.checkpoint = name
            self.switches += 1
            self.switch_log.append(name)
            self._cv.notify_all()

    def _sleep_image(self, job: _Job) -> None:
        """One image's worth of `delay`, cut short by /interrupt, stop() or death."""
        with self._cv:
            job.image_started = time.monotonic()
            if job.delay > 0:
                self._cv.wait_for(lambda: job.interrupted or self._gone(job.epoch), job.delay)

    def _validate(self, body: Any, img2img: bool) -> Response | tuple[list[Image.Image], Image.Image | None]:
        if not isinstance(body, dict):
            return validation_error(["body"], "value is not a valid dict", "type_error.dict")
        for key in _INT_FIELDS:
            if body.get(key) is not None:
                try:
                    value = int(body[key])
                    if value != float(body[key]):
                        raise ValueError
                except (TypeError, ValueError):
                    return validation_error(
                        ["body", key], "value is not a valid integer", "type_error.integer"
                    )
        for key in ("width", "height"):
            if body.get(key) is not None and not 8 <= int(body[key]) <= 4096:
                return validation_error(
                    ["body", key], f"{key} must be between 8 and 4096 (fake limit)", "value_error.number"
                )
        scripts = body.get("alwayson_scripts") or {}
        if not isinstance(scripts, dict):
            return validation_error(
                ["body", "alwayson_scripts"], "value is not a valid dict", "type_error.dict"
            )
        for script, value in scripts.items():
            if script.lower() not in self.alwayson_scripts:
                return webui_error(
                    422,
                    f"always on script {script} not found",
                    "HTTPException",
                    f"always on script {script} not found",
                )
            if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
                return webui_error(422, f"always on script {script}: 'args' must be a list", "HTTPException")
        inits: list[Image.Image] = []
        mask = None
        if img2img:
            raw = body.get("init_images")
            if raw is None or raw == []:
                return validation_error(["body", "init_images"], "field required", "value_error.missing")
            if not isinstance(raw, list):
                return validation_error(
                    ["body", "init_images"], "value is not a valid list", "type_error.list"
                )
            try:
                inits = [decode_b64(v) for v in raw]
                mask = decode_b64(body["mask"]) if body.get("mask") else None
            except (ValueError, AttributeError):
                return webui_error(500, "Invalid encoded image", "HTTPException", "Invalid encoded image")
        return inits, mask

    def _generate(self, img2img: bool) -> Response:
        entry = self._record()
        with self._cv:
            epoch = self._epoch
            self._inside += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self._inside)
            self._cv.notify_all()
        try:
            return self._finish(entry, self._generate_inner(entry, img2img, epoch))
        finally:
            with self._cv:
                self._inside -= 1
                self._cv.notify_all()

    def _image(
        self,
        params: dict[str, Any],
        inits: list[Image.Image],
        mask: Image.Image | None,
        used: str,
        seed: int,
        i: int,
    ) -> str:
        """Image i of a generation as base64 PNG (img2img: drawn over its init image, inpaint: masked)."""
        width, height = int(params["width"]), int(params["height"])
        base = inits[i % len(inits)] if inits else None
        img = render(
            width,
            height,
            f"{params['prompt']}|{seed + i}",
            f"{self.name}\n{used}\n{params['prompt'][:60]}",
            base=base,
        )
        if mask is not None and base is not None:  # inpaint: keep the unmasked part
            keep = mask.convert("L").resize((width, height))
            if params.get("inpainting_mask_invert"):
                keep = ImageOps.invert(keep)
            img = Image.composite(img, base.convert("RGB").resize((width, height)), keep)
        return to_b64(img)

    def _generate_inner(self, entry: dict[str, Any], img2img: bool, epoch: int) -> Response:
        if self._wait_hang(epoch):
            return webui_error(503, "instance stopped")
        body = entry["json"]
        checked = self._validate(body, img2img)
        if isinstance(checked, Response):
            return checked
        inits, mask = checked
        scripts = body.get("alwayson_scripts") or {}
        units = next((v.get("args", []) for k, v in scripts.items() if k.lower() == "controlnet"), [])
        entry.update(mask=mask is not None, controlnet_units=len(units))
        status = self._pop_fault()
        if status is not None:
            return webui_error(status, f"injected failure {status}")
        params = {**_DEFAULTS, **body}
        if img2img and not body.get("include_init_images"):
            params["init_images"], params["mask"] = None, None  # the WebUI does not echo the images back
        n = max(1, int(params["batch_size"])) * max(1, int(params["n_iter"]))
        width, height = int(params["width"]), int(params["height"])
        seed = int(params["seed"])
        seed = secrets.randbelow(2**32) if seed == -1 else seed
        made = 0
        with self._gen_lock:
            if self._gone(epoch):
                return webui_error(503, "instance stopped")
            job = _Job(n, int(params["steps"]), self.delay, epoch)
            with self._cv:
                self._running += 1
                self.max_running = max(self.max_running, self._running)
                self._job = job
                empty = self._empty > 0
                self._empty -= 1 if empty else 0
                self._cv.notify_all()
            entry["gen_start"] = time.time()
            try:
                previous = self.checkpoint
                wanted = (params.get("override_settings") or {}).get("sd_model_checkpoint")
                resolved = self._resolve_checkpoint(wanted) if wanted else None  # unknown names are ignored
                if resolved:
                    self._switch(resolved, epoch)
                used = self.checkpoint
                for i in range(n):
                    self._sleep_image(job)
                    if self._gone(epoch):
                        return webui_error(503, "instance stopped")
                    made = i + 1
                    with self._cv:
                        job.done = made
                        self.count += 0 if empty else 1
                        self._cv.notify_all()
                    if job.interrupted:
                        break
                if resolved and params.get("override_settings_restore_afterwards", True):
                    self._switch(previous, epoch)
            finally:
                entry["gen_end"] = time.time()
                with self._cv:
                    self._running -= 1
                    self._job = None
                    self._cv.notify_all()
        # Encoded after the queue lock is released, as the WebUI does (modules/api/api.py encodes the
        # processed images to base64 once `with self.queue_lock` has ended): the next generation runs
        # meanwhile. Drawing the pixels is this fake's stand-in for the sampler's output, so it goes too.
        images = [] if empty else [self._image(params, inits, mask, used, seed, i) for i in range(made)]
        entry.update(checkpoint=used, interrupted=job.interrupted, images=len(images))
        if empty:
            return _json({"images": [""]})
        if not params.get("send_images", True):
            images = []
        info = {
            "prompt": params["prompt"],
            "all_prompts": [params["prompt"]] * n,
            "negative_prompt": params["negative_prompt"],
            "seed": seed,
            "all_seeds": [seed + i for i in range(n)],
            "width": width,
            "height": height,
            "sampler_name": params.get("sampler_name") or "Euler",
            "cfg_scale": params["cfg_scale"],
            "steps": params["steps"],
            "batch_size": params["batch_size"],
            "sd_model_name": used,
            "sd_model_hash": model_hash(used)[:10],
            "sd_model_checkpoint": self.title(used),
            "instance": self.name,
            "denoising_strength": params.get("denoising_strength") if img2img else None,
            "img2img": img2img,
            "mask": mask is not None,
            "controlnet_units": len(units),
            "interrupted": job.interrupted,
            "index_of_first_image": 0,
            "job_timestamp": job.started,
            "infotexts": [
                f"{params['prompt']}\nSteps: {params['steps']}, Seed: {seed + i}, Model: {used}"
                for i in range(len(images))
            ],
            "version": "v1.10.1-fake",
        }
        return _json({"images": images, "parameters": params, "info": json.dumps(info, ensure_ascii=False)})

    def _progress(self) -> dict[str, Any]:
        with self._cv:
            job = self._job
            if job is None:
                state = {
                    "skipped": False,
                    "interrupted": False,
                    "stopping_generation": False,
                    "job": "",
                    "job_count": 0,
                    "job_timestamp": "0",
                    "job_no": 0,
                    "sampling_step": 0,
                    "sampling_steps": 0,
                }
                return {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "state": state,
                    "current_image": None,
                    "textinfo": None,
                }
            frac = min(1.0, (time.monotonic() - job.image_started) / job.delay) if job.delay else 0.0
            frac = 0.0 if job.done >= job.n else frac
            progress = min(1.0, (job.done + frac) / job.n)
            eta = max(0.0, (job.n - job.done - frac) * job.delay)
            state = {
                "skipped": False,
                "interrupted": job.interrupted,
                "stopping_generation": False,
                "job": f"Batch {min(job.done + 1, job.n)} out of {job.n}",
                "job_count": job.n,
                "job_timestamp": job.started,
                "job_no": job.done,
                "sampling_step": int(frac * job.steps),
                "sampling_steps": job.steps,
            }
            return {
                "progress": progress,
                "eta_relative": eta,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }

    def _sam(self) -> Response:
        entry = self._record()
        with self._cv:
            epoch = self._epoch
        if self._wait_hang(epoch):
            return self._finish(entry, webui_error(503, "instance stopped"))
        return self._finish(entry, self._sam_inner(entry["json"], epoch))

    def _sam_inner(self, body: Any, epoch: int) -> Response:
        if not isinstance(body, dict) or not body.get("input_image"):
            return validation_error(["body", "input_image"], "field required", "value_error.missing")
        status = self._pop_fault()
        if status is not None:
            return webui_error(status, f"injected failure {status}")
        try:
            src = decode_b64(body["input_image"]).convert("RGB")
        except ValueError:
            return webui_error(500, "Invalid encoded image", "HTTPException", "Invalid encoded image")
        if self.sam_delay:
            with self._cv:
                self._cv.wait_for(lambda: self._gone(epoch), self.sam_delay)
        if self._gone(epoch):
            return webui_error(503, "instance stopped")
        if not body.get("dino_enabled") and not body.get("sam_positive_points"):
            return _json(
                {
                    "msg": "You neither added point prompts nor enabled GroundingDINO. Segmentation "
                    "cannot be generated."
                }
            )
        if not self.sam_finds_object:
            return _json(
                {
                    "msg": f"GroundingDINO found no box for {body.get('dino_text_prompt')!r}; "
                    "no segmentation generated."
                }
            )
        gray = src.convert("L")
        white = Image.new("RGB", src.size, (255, 255, 255))
        tint = Image.new("RGB", src.size, (30, 144, 255))
        blended, masks, masked = [], [], []
        for threshold in (180, 220, 245):  # three candidates, as SAM returns
            mask = gray.point(lambda v, t=threshold: 255 if v < t else 0)
            if not mask.getbbox():  # nothing darker than the threshold: take the centre
                mask = Image.new("L", src.size, 0)
                w, h = src.size
                mask.paste(255, (w // 4, h // 4, max(w // 4 + 1, 3 * w // 4), max(h // 4 + 1, 3 * h // 4)))
            blended.append(to_b64(Image.composite(Image.blend(src, tint, 0.4), src, mask)))
            masks.append(to_b64(mask.convert("RGB")))
            masked.append(to_b64(Image.composite(src, white, mask)))
        return _json(
            {
                "msg": f"GroundingDINO + Segment Anything ({body.get('sam_model_name', 'sam_vit_h_4b8939.pth')})"
                f" found {body.get('dino_text_prompt')!r}",
                "blended_images": blended,
                "masks": masks,
                "masked_images": masked,
            }
        )

    # ---- routes
    def _build(self) -> Flask:
        app = Flask("fake_sd")

        @app.post("/sdapi/v1/txt2img")
        def txt2img() -> Response:
            return self._generate(img2img=False)

        @app.post("/sdapi/v1/img2img")
        def img2img() -> Response:
            return self._generate(img2img=True)

        @app.post(SAM_PATH)
        def sam() -> Response:
            return self._sam()

        @app.get("/sdapi/v1/options")
        def get_options() -> Response:
            entry = self._record()
            if self._wait_hang(self._epoch):
                return self._finish(entry, webui_error(503, "instance stopped"))
            body = {
                **self.options,
                "sd_model_checkpoint": self.title(self.checkpoint),
                "sd_checkpoint_hash": model_hash(self.checkpoint),
            }
            return self._finish(entry, _json(body))

        @app.post("/sdapi/v1/options")
        def set_options() -> Response:
            entry = self._record()
            epoch = self._epoch
            if self._wait_hang(epoch):
                return self._finish(entry, webui_error(503, "instance stopped"))
            body = entry["json"]
            if not isinstance(body, dict):
                return self._finish(
                    entry, validation_error(["body"], "value is not a valid dict", "type_error.dict")
                )
            wanted = body.get("sd_model_checkpoint")
            if wanted is not None:
                resolved = self._resolve_checkpoint(str(wanted))
                if resolved is None:
                    return self._finish(entry, webui_error(500, f"model {wanted!r} not found"))
                with self._gen_lock:  # a checkpoint load waits for the running generation
                    self._switch(resolved, epoch)
            self.options.update({k: v for k, v in body.items() if k != "sd_model_checkpoint"})
            return self._finish(entry, _json(None))

        @app.get("/sdapi/v1/sd-models")
        def sd_models() -> Response:
            entry = self._record()
            if self._wait_hang(self._epoch):
                return self._finish(entry, webui_error(503, "instance stopped"))
            return self._finish(
                entry,
                _json(
                    [
                        {
                            "title": self.title(m),
                            "model_name": m,
                            "hash": model_hash(m)[:10],
                            "sha256": model_hash(m),
                            "filename": f"/models/Stable-diffusion/{m}.safetensors",
                            "config": None,
                        }
                        for m in self.models
                    ]
                ),
            )

        @app.get("/sdapi/v1/progress")
        def progress() -> Response:
            entry = self._record()
            if self._wait_hang(self._epoch):
                return self._finish(entry, webui_error(503, "instance stopped"))
            return self._finish(entry, _json(self._progress()))

        @app.post("/sdapi/v1/interrupt")
        def interrupt() -> Response:
            entry = self._record()
            if self._wait_hang(self._epoch):
                return self._finish(entry, webui_error(503, "instance stopped"))
            with self._cv:
                if self._job is not None:
                    self._job.interrupted = True
                    self.interrupts += 1
                self._cv.notify_all()
            return self._finish(entry, _json({}))

        @app.get("/internal/ping")
        def ping() -> Response:
            entry = self._record()
            if self._wait_hang(self._epoch):
                return self._finish(entry, webui_error(503, "instance stopped"))
            return self._finish(entry, _json({}))

        @app.errorhandler(404)
        def not_found(_: Exception) -> Response:
            return _json({"detail": "Not Found"}, 404)

        @app.errorhandler(405)
        def not_allowed(_: Exception) -> Response:
            return _json({"detail": "Method Not Allowed"}, 405)

        return app
