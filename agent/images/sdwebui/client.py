"""Client for one AUTOMATIC1111 Stable Diffusion WebUI instance (`/sdapi/v1/*`, SAM extension).

The originals called the WebUI with no timeout at all, so a hung instance stalled
every worker for good, and turned any failure into an empty image. Here every call
has a connect and a read timeout, every failure becomes an `SDError` (a
`ModelError(kind="image")` that says whether it is worth retrying elsewhere and
what kind of fault it was, which the pool uses for health), and
`decode_first_image` never returns empty bytes.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
from typing import Any

import httpx

from agent.images.png import to_png
from agent.types import ImageRequest, ModelError

PROVIDER = "sdwebui"
TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
SAM_PREDICT = "/sam/sam-predict"

_DATA_URL = re.compile(r"^data:[^,]*,")
_RETRYABLE_4XX = {408, 409, 423, 425, 429}


class SDError(ModelError):
    """A failed WebUI call. `failure` tells the pool what it says about the instance:

    - "connect": nothing is listening (refused / unreachable) -> mark down at once
    - "timeout": no answer within the timeout (hung or overloaded) -> mark down at once
    - "server": 5xx or an unreadable answer -> down after 2 in a row
    - "empty": 200 but no usable image -> down after 2 in a row
    - "client": the request itself was refused (4xx); not the instance's fault, not retried
    """

    def __init__(
        self, message: str, *, failure: str, instance: str, status: int | None = None, retryable: bool = True
    ) -> None:
        super().__init__(message, provider=PROVIDER, status=status, retryable=retryable, kind="image")
        self.failure = failure
        self.instance = instance


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(value: str) -> bytes:
    """Decode base64 with or without a `data:image/...;base64,` prefix (the WebUI accepts both)."""
    return base64.b64decode(_DATA_URL.sub("", value.strip()), validate=True)


def _encode_bytes(value: Any) -> Any:
    """ControlNet units may carry images as bytes; the WebUI wants base64 strings."""
    if isinstance(value, bytes | bytearray):
        return b64encode(bytes(value))
    if isinstance(value, dict):
        return {k: _encode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode_bytes(v) for v in value]
    return value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` wins at the leaves, so `{"override_settings": {...}}` adds to, not replaces, ours."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_payload(req: ImageRequest) -> tuple[str, dict[str, Any]]:
    """(endpoint path, WebUI JSON payload) for one ImageRequest; img2img when it has an init image."""
    payload: dict[str, Any] = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "seed": req.seed,
        "batch_size": 1,
        "n_iter": 1,
    }
    if req.sampler_name:
        payload["sampler_name"] = req.sampler_name
    if req.checkpoint:
        # keep the checkpoint loaded afterwards: switching back and forth costs a model load each time
        payload["override_settings"] = {"sd_model_checkpoint": req.checkpoint}
        payload["override_settings_restore_afterwards"] = False
    endpoint = TXT2IMG
    if req.init_image is not None:
        endpoint = IMG2IMG
        payload["init_images"] = [b64encode(req.init_image)]
        payload["denoising_strength"] = req.denoising_strength
        if req.mask is not None:
            payload["mask"] = b64encode(req.mask)
            payload["inpainting_mask_invert"] = 1 if req.inpainting_mask_invert else 0
    if req.controlnet:
        payload["alwayson_scripts"] = {
            "controlnet": {"args": [_encode_bytes(dict(u)) for u in req.controlnet]}
        }
    if req.extra:
        payload = _deep_merge(payload, _encode_bytes(req.extra))
    return endpoint, payload


def decode_image_value(value: Any, *, instance: str = "", what: str = "image") -> bytes:
    """One base64 image string from a WebUI answer -> PNG bytes, or SDError(failure="empty")."""
    if not isinstance(value, str) or not value.strip():
        raise SDError(
            f"the SD instance {instance} returned an empty {what}", failure="empty", instance=instance
        )
    try:
        raw = b64decode(value)
    except (binascii.Error, ValueError) as exc:
        raise SDError(
            f"the SD instance {instance} returned an {what} that is not base64: {exc}",
            failure="empty",
            instance=instance,
        ) from exc
    if not raw:
        raise SDError(
            f"the SD instance {instance} returned an empty {what}", failure="empty", instance=instance
        )
    try:
        return to_png(raw)
    except ValueError as exc:
        raise SDError(
            f"the SD instance {instance} returned an undecodable {what}: {exc}",
            failure="empty",
            instance=instance,
        ) from exc


def decode_first_image(response: Any, instance: str = "") -> bytes:
    """PNG bytes of `response["images"][0]`; raises SDError (kind="image") instead of returning b""."""
    images = response.get("images") if isinstance(response, dict) else None
    if not isinstance(images, list) or not images:
        raise SDError(f"the SD instance {instance} returned no image", failure="empty", instance=instance)
    return decode_image_value(images[0], instance=instance)


def parse_info(response: Any) -> dict[str, Any]:
    """The WebUI's `info` (a JSON string) as a dict; {} when absent or unreadable."""
    info = response.get("info") if isinstance(response, dict) else None
    if isinstance(info, dict):
        return info
    if isinstance(info, str):
        try:
            parsed = json.loads(info)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


class SDClient:
    """One WebUI instance. Every call has a connect timeout and a read timeout (no call waits forever).

    Thread-safe (httpx.Client); one client per instance is shared by all threads of a process.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 180.0,
        *,
        connect_timeout_s: float = 5.0,
        ping_timeout_s: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.ping_timeout_s = ping_timeout_s
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=self._timeout(timeout_s),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

    def _timeout(self, read_s: float) -> httpx.Timeout:
        return httpx.Timeout(
            connect=min(self.connect_timeout_s, read_s), read=read_s, write=read_s, pool=read_s
        )

    def with_timeout(self, timeout_s: float) -> SDClient:
        """The same client (same connections) with another read timeout for generations: a caller queued
        behind a running image in the WebUI waits for both. Close only the original."""
        view = copy.copy(self)
        view.timeout_s = timeout_s
        return view

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"SDClient({self.base_url!r})"

    # ---- transport
    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        url = self.base_url + path
        try:
            resp = self._http.request(
                method,
                path,
                json=json_body,
                params=params,
                timeout=self._timeout(timeout_s or self.timeout_s),
            )
        except httpx.TimeoutException as exc:
            what = "connect" if isinstance(exc, httpx.ConnectTimeout) else "answer"
            raise SDError(
                f"SD instance {self.base_url} did not {what} within "
                f"{timeout_s or self.timeout_s:g} s ({method} {path})",
                failure="timeout",
                instance=self.base_url,
            ) from exc
        except httpx.TransportError as exc:  # refused, reset, unreachable, protocol errors
            failure = "connect" if isinstance(exc, httpx.ConnectError) else "server"
            raise SDError(
                f"cannot reach SD instance {self.base_url} ({method} {path}): {exc}",
                failure=failure,
                instance=self.base_url,
            ) from exc
        if resp.status_code >= 400:
            detail = resp.text[:300].strip()
            retryable = resp.status_code >= 500 or resp.status_code in _RETRYABLE_4XX
            raise SDError(
                f"SD instance {self.base_url} answered {resp.status_code} to {method} {path}: {detail}",
                failure="server" if retryable else "client",
                instance=self.base_url,
                status=resp.status_code,
                retryable=retryable,
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise SDError(
                f"SD instance {self.base_url} answered {method} {url} with something that is not JSON",
                failure="server",
                instance=self.base_url,
                status=resp.status_code,
            ) from exc

    # ---- API
    def txt2img(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", TXT2IMG, json_body=payload) or {}

    def img2img(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", IMG2IMG, json_body=payload) or {}

    def post(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST to a generation endpoint returned by `build_payload`."""
        return self._call("POST", endpoint, json_body=payload) or {}

    def options(self) -> dict[str, Any]:
        return self._call("GET", "/sdapi/v1/options", timeout_s=min(self.timeout_s, 30.0)) or {}

    def set_options(self, options: dict[str, Any]) -> None:
        """E.g. {"sd_model_checkpoint": name}; a checkpoint switch can take as long as a generation."""
        self._call("POST", "/sdapi/v1/options", json_body=options)

    def sd_models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/sdapi/v1/sd-models", timeout_s=min(self.timeout_s, 30.0)) or []

    def progress(self, timeout_s: float | None = None) -> dict[str, Any]:
        return (
            self._call(
                "GET",
                "/sdapi/v1/progress",
                params={"skip_current_image": "true"},
                timeout_s=timeout_s or min(self.timeout_s, 30.0),
            )
            or {}
        )

    def interrupt(self, timeout_s: float | None = None) -> None:
        self._call("POST", "/sdapi/v1/interrupt", timeout_s=timeout_s or min(self.timeout_s, 10.0))

    def sam_predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", SAM_PREDICT, json_body=payload) or {}

    def ping(self, timeout_s: float | None = None) -> bool:
        """Cheap health probe: does `/sdapi/v1/progress` answer within a short timeout?

        A busy WebUI still answers it (progress is served beside the generation), a hung or
        dead one does not.
        """
        try:
            self._call(
                "GET",
                "/sdapi/v1/progress",
                params={"skip_current_image": "true"},
                timeout_s=timeout_s or self.ping_timeout_s,
            )
        except SDError:
            return False
        return True
