"""Image providers: placeholder, the recording wrapper (GridFS + `generations`), OpenAI images against FakeOpenAI."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from bson import ObjectId
from PIL import Image

from agent.images import PlaceholderImageProvider, png_bytes
from agent.images.openai_provider import OpenAIImageProvider, supported_size
from agent.images.recording import RecordingImageProvider
from agent.types import ImageRequest, ModelError
from config import load_settings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def size_of(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as img:
        return img.size


# ---------------------------------------------------------------------------------------------- placeholder
def test_placeholder_is_honest_and_sized() -> None:
    provider = PlaceholderImageProvider()
    a = provider.generate(ImageRequest(prompt="a fox in the snow", width=320, height=200, label="page 1"))
    b = provider.generate(ImageRequest(prompt="a lighthouse at night", width=320, height=200))
    assert a.provider == "placeholder" and a.info["placeholder"] is True and a.instance is None
    assert size_of(a.png) == (320, 200)
    assert a.png != b.png  # the card shows (and is coloured by) its prompt
    again = provider.generate(ImageRequest(prompt="a fox in the snow", width=320, height=200, label="page 1"))
    assert again.png == a.png  # deterministic: same prompt, seed and label -> same card
    with Image.open(io.BytesIO(a.png)) as img:
        assert len(img.convert("RGB").getcolors(1 << 16) or []) > 2  # drawn text, not a flat colour
    assert "placeholder" in provider.health()["note"]
    init = png_bytes(Image.new("RGB", (100, 100), (0, 0, 255)))
    edited = provider.generate(ImageRequest(prompt="blue", width=128, height=128, init_image=init))
    assert size_of(edited.png) == (128, 128)


def test_placeholder_segment_thresholds_dark_pixels() -> None:
    img = Image.new("RGB", (40, 40), (255, 255, 255))
    img.paste((0, 0, 0), (10, 10, 30, 30))
    seg = PlaceholderImageProvider().segment(png_bytes(img), "thing")
    assert seg.provider == "placeholder-threshold"
    with Image.open(io.BytesIO(seg.mask)) as mask:
        assert mask.getpixel((20, 20)) == 255 and mask.getpixel((2, 2)) == 0
    with pytest.raises(ModelError):
        PlaceholderImageProvider().segment(b"not an image", "thing")


# ---------------------------------------------------------------------------------------------- recording
def test_recording_provider_stores_images_and_records_generations(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k")
    svc = app.extensions["services"]
    assert isinstance(svc.image_provider, RecordingImageProvider) and svc.image_provider.name == "placeholder"
    unit = {"module": "lineart", "model": "control_v11p_sd15_lineart", "image": b"raw bytes"}
    requests = [
        ImageRequest(
            prompt=f"card {i}",
            width=96,
            height=64,
            controlnet=[unit] if i == 0 else [],
            context={"app": "storybook", "user": "ann", "session": "s1", "job": "j1", "step": f"page-{i}"},
        )
        for i in range(3)
    ]
    results = svc.image_provider.generate_many(requests)
    assert [size_of(r.png) for r in results] == [(96, 64)] * 3
    for i, r in enumerate(results):
        assert r.image_id and r.generation_id
        assert svc.images.load(r.image_id) == r.png
        meta = svc.images.info(r.image_id).metadata
        assert meta["app"] == "storybook" and meta["user"] == "ann" and meta["prompt"] == f"card {i}"
        rec = svc.db.generations.find_one({"_id": ObjectId(r.generation_id)})
        assert rec["kind"] == "image" and rec["provider"] == "placeholder" and rec["ok"] is True
        assert (rec["app"], rec["user"], rec["session"], rec["job"]) == ("storybook", "ann", "s1", "j1")
        assert rec["step"] == f"page-{i}" and meta["step"] == f"page-{i}"
        assert rec["prompt"]["prompt"] == f"card {i}" and rec["params"]["width"] == 96
        assert rec["output"]["image_id"] == r.image_id and rec["output"]["bytes"] == len(r.png)
        assert rec["attempts"] == 1
    first = svc.db.generations.find_one({"_id": ObjectId(results[0].generation_id)})
    assert first["params"]["controlnet"] == [{"module": "lineart", "model": "control_v11p_sd15_lineart"}]
    assert svc.db.generations.count_documents({"kind": "image", "app": "storybook"}) == 3


def test_failed_image_generation_is_recorded_too(make_app: Any, fake_openai: Any, fake_sd: Any) -> None:
    fake_sd.dead = True
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        IMAGE_PROVIDER="sdwebui",
        SD_INSTANCES=fake_sd.url,
        SD_MAX_ATTEMPTS=1,
        SD_WAIT_TIMEOUT_S=0.5,
    )
    svc = app.extensions["services"]
    with pytest.raises(ModelError) as err:
        svc.image_provider.generate(ImageRequest(prompt="lost?", context={"app": "ideation", "user": "bo"}))
    assert err.value.kind == "image"
    rec = svc.db.generations.find_one({"app": "ideation", "user": "bo"})
    assert rec["ok"] is False and rec["error"]["kind"] == "image" and rec["prompt"]["prompt"] == "lost?"
    assert svc.db.images.files.count_documents({}) == 0  # nothing stored for a failure


# ---------------------------------------------------------------------------------------------- openai images
def test_size_mapping() -> None:
    assert supported_size("gpt-image-1", 512, 512) == (1024, 1024)
    assert supported_size("gpt-image-1", 1024, 576) == (1536, 1024)
    assert supported_size("dall-e-3", 512, 900) == (1024, 1792)
    assert supported_size("dall-e-2", 500, 500) == (512, 512)
    assert supported_size("dall-e-2", 300, 250) == (256, 256)


def image_calls(fake: Any) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r["path"].endswith("/images/generations")]


def provider_for(fake: Any, model: str = "gpt-image-1", **kw: Any) -> OpenAIImageProvider:
    client = openai.OpenAI(
        base_url=fake.url, api_key="test-key", max_retries=kw.pop("max_retries", 0), timeout=10
    )
    return OpenAIImageProvider(client, model, **kw)


def test_openai_images_b64(fake_openai: Any) -> None:
    provider = provider_for(fake_openai)
    result = provider.generate(
        ImageRequest(prompt="a paper boat", negative_prompt="text, watermark", width=512, height=512)
    )
    assert result.provider == "openai" and result.instance == "gpt-image-1"
    assert size_of(result.png) == (512, 512)  # native 1024x1024, resized to what was asked
    assert result.info["native_size"] == "1024x1024"
    sent = image_calls(fake_openai)[-1]
    assert sent["path"] == "/v1/images/generations"
    assert sent["json"]["model"] == "gpt-image-1" and sent["json"]["size"] == "1024x1024"
    assert (
        "response_format" not in sent["json"]
    )  # gpt-image models always answer b64 and reject the parameter
    assert (
        sent["json"]["prompt"].startswith("a paper boat")
        and "Avoid: text, watermark" in sent["json"]["prompt"]
    )
    assert sent["headers"]["authorization"] == "Bearer test-key"
    other = provider.generate(ImageRequest(prompt="a paper plane", width=512, height=512))
    assert other.png != result.png
    many = provider.generate_many([ImageRequest(prompt=f"n{i}", width=256, height=256) for i in range(3)])
    assert [size_of(r.png) for r in many] == [(256, 256)] * 3


def test_openai_inpainting_goes_to_images_edit_with_an_alpha_mask(fake_openai: Any) -> None:
    """An init image + SD-style mask (white = regenerate) becomes a multipart images.edit call whose
    mask is transparent exactly where SD would regenerate; `inpainting_mask_invert` flips it."""
    provider = provider_for(fake_openai)
    init = png_bytes(Image.new("RGB", (512, 512), (200, 30, 30)))
    sd_mask = Image.new("L", (512, 512), 0)
    sd_mask.paste(255, (0, 0, 256, 512))  # regenerate the left half
    for invert in (False, True):
        result = provider.generate(
            ImageRequest(
                prompt="a red chair",
                width=512,
                height=512,
                init_image=init,
                mask=png_bytes(sd_mask),
                inpainting_mask_invert=invert,
            )
        )
        assert size_of(result.png) == (512, 512)
        sent = [r for r in fake_openai.requests if r["path"].endswith("/images/edits")][-1]
        assert sent["form"]["model"] == "gpt-image-1" and sent["form"]["size"] == "1024x1024"
        assert sent["form"]["prompt"].startswith("a red chair")
        with Image.open(io.BytesIO(sent["files"]["image"])) as img:
            assert img.size == (1024, 1024) and img.convert("RGB").getpixel((500, 500)) == (200, 30, 30)
        with Image.open(io.BytesIO(sent["files"]["mask"])) as mask:
            alpha = mask.convert("RGBA").getchannel("A")
            left, right = alpha.getpixel((100, 500)), alpha.getpixel((900, 500))
        assert (left, right) == ((255, 0) if invert else (0, 255)), (invert, left, right)
    # an edit without a mask sends the image alone
    provider.generate(ImageRequest(prompt="variation", width=256, height=256, init_image=init))
    sent = [r for r in fake_openai.requests if r["path"].endswith("/images/edits")][-1]
    assert "mask" not in sent["files"]


def test_dalle_asks_for_b64_and_url_answers_are_downloaded_only_locally(fake_openai: Any) -> None:
    dalle = provider_for(fake_openai, model="dall-e-3")
    result = dalle.generate(ImageRequest(prompt="tall tower", width=512, height=900))
    sent = image_calls(fake_openai)[-1]["json"]
    assert sent["response_format"] == "b64_json" and sent["size"] == "1024x1792"
    assert size_of(result.png) == (512, 900)
    by_url = provider_for(fake_openai, model="dall-e-2", response_format="url")
    got = by_url.generate(ImageRequest(prompt="via url", width=512, height=512))
    assert size_of(got.png) == (512, 512) and image_calls(fake_openai)[-1]["json"]["response_format"] == "url"
    assert fake_openai.requests[-1]["path"].startswith("/files/")  # downloaded from the (local) fake
    with pytest.raises(ModelError) as err:  # a remote URL is refused without being fetched
        by_url._bytes(SimpleNamespace(b64_json=None, url="https://images.example.com/x.png"))
    assert "images.example.com" in err.value.message and err.value.kind == "image"


def test_openai_image_errors_are_model_errors(fake_openai: Any) -> None:
    provider = provider_for(fake_openai)
    fake_openai.fail_next(400, body={"error": {"message": "Your request was rejected by the safety system"}})
    with pytest.raises(ModelError) as bad:
        provider.generate(ImageRequest(prompt="x"))
    assert bad.value.kind == "image" and bad.value.status == 400 and not bad.value.retryable
    assert "safety system" in bad.value.message
    fake_openai.fail_next(500)
    with pytest.raises(ModelError) as err:
        provider.generate(ImageRequest(prompt="x"))
    assert err.value.status == 500 and err.value.retryable
    retrying = provider_for(fake_openai, max_retries=1)
    fake_openai.fail_next(500)
    assert (
        retrying.generate(ImageRequest(prompt="second time lucky", width=256, height=256)).png[:8]
        == PNG_SIGNATURE
    )
    seg = provider.segment(png_bytes(Image.new("RGB", (8, 8))), "drone")
    assert seg.provider.startswith("placeholder-threshold") and "cannot segment" in seg.provider


def test_openai_images_from_settings_openai_and_azure(fake_openai: Any) -> None:
    plain = OpenAIImageProvider.from_settings(
        load_settings(
            {"OPENAI_BASE_URL": fake_openai.url, "OPENAI_API_KEY": "k", "IMAGE_PROVIDER": "openai"},
            use_env=False,
        )
    )
    assert plain.name == "openai" and plain.model == "gpt-image-1"
    assert size_of(plain.generate(ImageRequest(prompt="plain", width=256, height=256)).png) == (256, 256)
    azure = OpenAIImageProvider.from_settings(
        load_settings(
            {
                "LLM_PROVIDER": "azure",
                "AZURE_OPENAI_ENDPOINT": fake_openai.base,
                "AZURE_OPENAI_API_KEY": "az",
                "AZURE_OPENAI_DEPLOYMENT": "chat",
                "OPENAI_IMAGE_MODEL": "my-image-deployment",
                "IMAGE_PROVIDER": "openai",
            },
            use_env=False,
        )
    )
    result = azure.generate(ImageRequest(prompt="on azure", width=256, height=256))
    assert azure.name == "azure" and result.provider == "azure"
    sent = image_calls(fake_openai)[-1]
    assert sent["path"] == "/openai/deployments/my-image-deployment/images/generations"
    assert sent["args"]["api-version"] and sent["headers"]["api-key"] == "az"


def test_app_with_openai_images_records_them(make_app: Any, fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", IMAGE_PROVIDER="openai"
    )
    svc = app.extensions["services"]
    (result,) = svc.image_provider.generate_many(
        [ImageRequest(prompt="recorded", width=128, height=128, context={"app": "storyteller"})]
    )
    assert result.provider == "openai" and svc.images.load(result.image_id) == result.png
    rec = svc.db.generations.find_one({"_id": ObjectId(result.generation_id)})
    assert rec["provider"] == "openai" and rec["instance"] == "gpt-image-1" and rec["ok"]
    assert app.test_client().get("/health").get_json()["images"]["provider"] == "openai"
