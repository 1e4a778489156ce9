"""A fake AUTOMATIC1111 Stable Diffusion WebUI: `/sdapi/v1/*` and the segment-anything extension,
real PNGs, one generation at a time (like the real WebUI), configurable delay and faults.

    with FakeSD(delay=0.2, name="sd0") as sd:
        sd.fail_next(500); sd.dead = True; sd.revive(); sd.hang = True; sd.empty_images_next(2)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from PIL import Image, ImageDraw

from .server import BackgroundServer

_DATA_URL = re.compile(r"^data:[^,]*,")


def _b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(value: str) -> Image.Image:
    raw = base64.b64decode(_DATA_URL.sub("", value))
    return Image.open(io.BytesIO(raw)).convert("RGB")


class FakeSD:
    def __init__(self, delay: float = 0.0, name: str | None = None,
                 models: list[str] | None = None, checkpoint: str | None = None) -> None:
        self.delay = delay
        self.name = name or "fake-sd"
        self.models = models or ["realisticVisionV60B1_v60B1VAE", "v2-1_512-ema-pruned", "v1-5-pruned-emaonly"]
        self.checkpoint = checkpoint or self.models[0]
        self.switch_delay = 0.0
        self.switches = 0
        self.requests: list[dict[str, Any]] = []
        self.count = 0
        self.max_running = 0
        self.max_concurrent_seen = 0
        self._running = 0
        self._inside = 0
        self._gen_lock = threading.Lock()  # the WebUI runs one generation at a time
        self._state = threading.Lock()
        self._fail: list[int] = []
        self._empty = 0
        self._hang = threading.Event()
        self._unhang = threading.Event()
        self._interrupt = threading.Event()
        self._progress = 0.0
        self._dead = False
        self._server = BackgroundServer(self._build())

    # ---- lifecycle
    def start(self) -> FakeSD:
        self._server.start()
        return self

    def stop(self) -> None:
        self._unhang.set()
        self._server.stop()

    def __enter__(self) -> FakeSD:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._server.base

    # ---- faults
    def fail_next(self, status: int = 500, times: int = 1) -> None:
        with self._state:
            self._fail.extend([status] * times)

    def empty_images_next(self, times: int = 1) -> None:
        with self._state:
            self._empty += times

    @property
    def dead(self) -> bool:
        return self._dead

    @dead.setter
    def dead(self, value: bool) -> None:
        if value and not self._dead:
            self._server.close_listener()
        elif not value and self._dead:
            self._server.reopen()
        self._dead = value

    def revive(self) -> None:
        self.dead = False

    @property
    def hang(self) -> bool:
        return self._hang.is_set()

    @hang.setter
    def hang(self, value: bool) -> None:
        if value:
            self._unhang.clear()
            self._hang.set()
        else:
            self._hang.clear()
            self._unhang.set()

    # ---- internals
    def _enter(self) -> dict[str, Any]:
        entry = {"path": request.path, "json": request.get_json(silent=True), "start": time.time(), "end": None}
        with self._state:
            self.requests.append(entry)
            self._inside += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self._inside)
        return entry

    def _leave(self, entry: dict[str, Any]) -> None:
        entry["end"] = time.time()
        with self._state:
            self._inside -= 1

    def _maybe_hang(self) -> None:
        if self._hang.is_set():
            self._unhang.wait()

    def _pop_fault(self) -> int | None:
        with self._state:
            return self._fail.pop(0) if self._fail else None

    def _generate(self, body: dict[str, Any], img2img: bool) -> Response:
        entry = self._enter()
        try:
            self._maybe_hang()
            status = self._pop_fault()
            if status is not None:
                return _json({"error": "InjectedError", "detail": f"injected failure {status}"}, status)
            if img2img and not body.get("init_images"):
                return _json({"detail": [{"loc": ["body", "init_images"], "msg": "field required",
                                          "type": "value_error.missing"}]}, 422)
            with self._gen_lock:
                with self._state:
                    self._running += 1
                    self.max_running = max(self.max_running, self._running)
                try:
                    wanted = (body.get("override_settings") or {}).get("sd_model_checkpoint")
                    if wanted and wanted != self.checkpoint:
                        time.sleep(self.switch_delay)
                        self.checkpoint = wanted
                        self.switches += 1
                    self._interrupt.clear()
                    if self.delay:
                        self._interrupt.wait(self.delay)
                    with self._state:
                        empty = self._empty > 0
                        if empty:
                            self._empty -= 1
                    n = max(1, int(body.get("batch_size") or 1)) * max(1, int(body.get("n_iter") or 1))
                    seed = int(body.get("seed", -1))
                    if seed == -1:
                        seed = int(hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:8], 16)
                    images = [""] * n if empty else [self._image(body, seed + i, img2img) for i in range(n)]
                    with self._state:
                        self.count += 0 if empty else n
                finally:
                    with self._state:
                        self._running -= 1
            info = {"seed": seed, "sd_model_checkpoint": self.checkpoint, "instance": self.name,
                    "mask": bool(body.get("mask")), "img2img": img2img}
            return _json({"images": images, "parameters": body, "info": json.dumps(info)})
        finally:
            self._leave(entry)

    def _image(self, body: dict[str, Any], seed: int, img2img: bool) -> str:
        width, height = int(body.get("width") or 512), int(body.get("height") or 512)
        digest = hashlib.sha256(f"{body.get('prompt', '')}|{seed}".encode()).digest()
        img = Image.new("RGB", (width, height), (digest[0], digest[1], digest[2]))
        if img2img:
            src = _decode(body["init_images"][0]).resize((width, height))
            img = Image.blend(img, src, 0.5)
        draw = ImageDraw.Draw(img)
        draw.text((6, 6), f"{self.name} {self.checkpoint[:20]}", fill=(255, 255, 255))
        draw.text((6, 22), str(body.get("prompt", ""))[:60], fill=(255, 255, 0))
        return _b64png(img)

    def _build(self) -> Flask:
        app = Flask("fake_sd")

        @app.post("/sdapi/v1/txt2img")
        def txt2img() -> Response:
            return self._generate(request.get_json(silent=True) or {}, img2img=False)

        @app.post("/sdapi/v1/img2img")
        def img2img() -> Response:
            return self._generate(request.get_json(silent=True) or {}, img2img=True)

        @app.get("/sdapi/v1/options")
        def get_options() -> Response:
            self._maybe_hang()
            return _json({"sd_model_checkpoint": self.checkpoint, "samples_format": "png"})

        @app.post("/sdapi/v1/options")
        def set_options() -> Response:
            body = request.get_json(silent=True) or {}
            if body.get("sd_model_checkpoint"):
                with self._gen_lock:
                    time.sleep(self.switch_delay)
                    self.checkpoint = body["sd_model_checkpoint"]
                    self.switches += 1
            return _json(None)

        @app.get("/sdapi/v1/sd-models")
        def sd_models() -> Response:
            self._maybe_hang()
            return _json([{"title": m, "model_name": m} for m in self.models])

        @app.get("/sdapi/v1/progress")
        def progress() -> Response:
            self._maybe_hang()
            return _json({"progress": 0.5 if self._running else 0.0, "eta_relative": 0.0,
                          "state": {"job_count": self._inside, "interrupted": self._interrupt.is_set()},
                          "current_image": None})

        @app.post("/sdapi/v1/interrupt")
        def interrupt() -> Response:
            self._interrupt.set()
            return _json(None)

        @app.post("/sam/sam-predict")
        def sam() -> Response:
            entry = self._enter()
            try:
                self._maybe_hang()
                status = self._pop_fault()
                if status is not None:
                    return _json({"detail": f"injected failure {status}"}, status)
                body = request.get_json(silent=True) or {}
                if not body.get("input_image"):
                    return _json({"detail": "input_image required"}, 422)
                src = _decode(body["input_image"])
                gray = src.convert("L")
                mask = gray.point(lambda v: 255 if v < 200 else 0)
                white = Image.new("RGB", src.size, (255, 255, 255))
                masked = Image.composite(src, white, mask)
                blended = Image.blend(src, Image.new("RGB", src.size, (0, 120, 255)), 0.3)
                return _json({"msg": f"fake SAM ({body.get('dino_text_prompt')})",
                              "blended_images": [_b64png(blended)] * 3,
                              "masks": [_b64png(mask.convert("RGB"))] * 3,
                              "masked_images": [_b64png(masked)] * 3})
            finally:
                self._leave(entry)

        return app


def _json(body: Any, status: int = 200) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    return resp
