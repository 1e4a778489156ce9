"""The fake model servers, tested for real over HTTP: the official openai SDK against FakeOpenAI
(plain, streaming, Azure), `requests` against FakeSD. Fast (a few seconds in all)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
import requests
from PIL import Image

from tests.fakes.fake_openai import FakeOpenAI, count_tokens, example_for, split_pieces
from tests.fakes.fake_sd import FakeSD, model_title
from tests.fakes.pngs import png_bytes

USER = [{"role": "user", "content": "Tell me a story about a brave little toaster"}]


@pytest.fixture
def oa() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def client(oa: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(base_url=oa.url, api_key="test-key", max_retries=0, timeout=10)


@pytest.fixture
def sd() -> Iterator[FakeSD]:
    with FakeSD(name="sd-test") as fake:
        yield fake


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def b64png(width: int, height: int, key: str = "init") -> str:
    return base64.b64encode(png_bytes(width, height, key)).decode()


def sse_events(resp: requests.Response) -> list[str]:
    return [
        line[len("data: ") :] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")
    ]


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn() in a thread; its result or exception lands in the returned dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# ================================================================ FakeOpenAI: chat


def test_chat_completion_shape_default_reply_and_record(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="gpt-test", messages=USER)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "gpt-test"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Fake reply to: " + USER[0]["content"][:40]
    assert resp.choices[0].finish_reason == "stop"
    usage = resp.usage
    assert usage is not None and usage.completion_tokens == count_tokens(resp.choices[0].message.content)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.prompt_tokens > 8
    [rec] = oa.chat_requests()
    assert rec["path"] == "/v1/chat/completions" and rec["method"] == "POST" and rec["time"] > 0
    assert rec["headers"]["authorization"] == "Bearer test-key"
    assert rec["json"]["messages"] == USER and oa.last_chat()["model"] == "gpt-test"


def test_usage_is_deterministic_and_counts_words(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(model="m", messages=USER).usage
    b = client.chat.completions.create(model="m", messages=USER).usage
    longer = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": USER[0]["content"] + " with many more words in it"}]
    ).usage
    assert a == b and longer is not None and a is not None
    assert longer.prompt_tokens == a.prompt_tokens + 6
    assert count_tokens("你好 world!") == 3  # one per CJK character and per word


def test_script_replies_in_order_then_default(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.script(
        "first", {"title": "标题"}, ["a", 1], lambda req: {"model_was": req["model"]}, lambda req: "text"
    )
    texts = [
        client.chat.completions.create(model="m1", messages=USER).choices[0].message.content for _ in range(6)
    ]
    assert texts[0] == "first"
    assert json.loads(texts[1]) == {"title": "标题"} and "标题" in texts[1]  # not ASCII-escaped
    assert json.loads(texts[2]) == ["a", 1]
    assert json.loads(texts[3]) == {"model_was": "m1"}
    assert texts[4] == "text"
    assert texts[5].startswith("Fake reply to: ") and oa.pending_replies == 0


def test_set_responder_replaces_default_and_reset_restores(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.set_responder(lambda req: f"echo {len(req['messages'])}")
    assert client.chat.completions.create(model="m", messages=USER * 2).choices[0].message.content == "echo 2"
    oa.script("scripted wins")
    assert (
        client.chat.completions.create(model="m", messages=USER).choices[0].message.content == "scripted wins"
    )
    oa.reset()
    assert oa.requests == []
    assert (
        client.chat.completions.create(model="m", messages=USER).choices[0].message.content.startswith("Fake")
    )


def test_streaming_with_the_sdk(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.script("Once upon a time, 一只猫 flew.")
    chunks = list(
        client.chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "Once upon a time, 一只猫 flew." and len(pieces) == 8
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == count_tokens("Once upon a time, 一只猫 flew.")


def test_streaming_wire_format(oa: FakeOpenAI) -> None:
    oa.script("two words")
    resp = requests.post(
        oa.url + "/chat/completions",
        json={"model": "m", "messages": USER, "stream": True},
        stream=True,
        timeout=5,
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert [p["choices"][0]["delta"] for p in parsed] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "two"},
        {"content": " words"},
        {},
    ]
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in p for p in parsed)  # no include_usage: no usage chunk
    assert split_pieces(" lead and trail  ") == [" lead", " and", " trail  "]


def test_azure_client_plain_and_streaming(oa: FakeOpenAI) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=oa.base, api_key="azure-key", api_version="2024-10-21", max_retries=0, timeout=10
    )
    oa.script("from azure", "streamed from azure")
    resp = azure.chat.completions.create(model="my-deployment", messages=USER)
    assert resp.choices[0].message.content == "from azure"
    rec = oa.chat_requests()[-1]
    assert rec["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert rec["deployment"] == "my-deployment" and rec["args"]["api-version"] == "2024-10-21"
    assert rec["headers"]["api-key"] == "azure-key"
    stream = azure.chat.completions.create(model="my-deployment", messages=USER, stream=True)
    chunks = list(stream)
    assert chunks[0].choices == []  # Azure's prompt-filter chunk comes first, without choices
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed from azure"


def test_azure_requires_api_key_and_version(oa: FakeOpenAI) -> None:
    path = oa.base + "/openai/deployments/d/chat/completions"
    no_key = requests.post(path, params={"api-version": "2024-10-21"}, json={"messages": USER}, timeout=5)
    assert no_key.status_code == 401 and "api-key" in no_key.json()["error"]["message"]
    no_version = requests.post(path, headers={"api-key": "k"}, json={"messages": USER}, timeout=5)
    assert no_version.status_code == 404
    ok = requests.post(
        path,
        params={"api-version": "2024-10-21"},
        headers={"api-key": "k"},
        json={"messages": USER},
        timeout=5,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["content_filter_results"]


def test_api_key_enforced_when_configured() -> None:
    with FakeOpenAI(api_key="secret") as fake:
        bad = openai.OpenAI(base_url=fake.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="m", messages=USER)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        good = openai.OpenAI(base_url=fake.url, api_key="secret", max_retries=0)
        assert good.chat.completions.create(model="m", messages=USER).choices[0].message.content


def test_bad_chat_requests_get_openai_errors(oa: FakeOpenAI) -> None:
    no_model = requests.post(oa.url + "/chat/completions", json={"messages": USER}, timeout=5)
    assert no_model.status_code == 400
    assert no_model.json()["error"] == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }
    not_json = requests.post(
        oa.url + "/chat/completions", data="{oops", timeout=5, headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and "parse the JSON body" in not_json.json()["error"]["message"]
    unknown = requests.get(oa.url + "/nope", timeout=5)
    assert unknown.status_code == 404 and "error" in unknown.json()


# ================================================================ FakeOpenAI: JSON output

ITEM_SCHEMA = {
    "type": "object",
    "$defs": {
        "Idea": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 12},
                "kind": {"type": "string", "enum": ["story", "poem"]},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "pages": {"type": "integer", "minimum": 3, "maximum": 9},
                "final": {"type": "boolean"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["title", "kind", "score", "pages", "final"],
            "additionalProperties": False,
        }
    },
    "properties": {
        "ideas": {"type": "array", "items": {"$ref": "#/$defs/Idea"}, "minItems": 3, "maxItems": 5},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 4},
            "minItems": 2,
            "uniqueItems": True,
        },
        "summary": {"type": "string", "minLength": 20, "maxLength": 40},
        "none_allowed": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
    },
    "required": ["ideas", "tags", "summary", "none_allowed"],
    "additionalProperties": False,
}


def test_default_reply_validates_against_json_schema(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="m",
        messages=USER,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": ITEM_SCHEMA, "strict": False},
        },
    )
    data = json.loads(resp.choices[0].message.content)
    jsonschema.validate(data, ITEM_SCHEMA)
    assert len(data["ideas"]) == 3 and data["none_allowed"] == [] and len(set(data["tags"])) == 2


def test_json_object_with_schema_and_without(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"object": {"type": "string", "maxLength": 30}},
        "required": ["object"],
    }
    with_schema = client.chat.completions.create(
        model="m", messages=USER, response_format={"type": "json_object", "schema": schema}
    )
    jsonschema.validate(json.loads(with_schema.choices[0].message.content), schema)
    plain = client.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"})
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 3, "uniqueItems": True},
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 30, "multipleOf": 7}},
            "required": ["n"],
        },
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
            ]
        },
        {"type": "object", "minProperties": 2, "additionalProperties": {"type": "number"}},
        {
            "type": "array",
            "prefixItems": [{"type": "integer"}, {"type": "string", "format": "date"}],
            "minItems": 2,
        },
        {
            "type": "object",
            "properties": {
                "when": {"type": "string", "format": "date-time"},
                "k": {"const": 5},
                "maybe": {"type": ["null", "string"]},
            },
            "required": ["when", "k", "maybe"],
        },
        {
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                    },
                    "required": ["name", "children"],
                }
            },
            "$ref": "#/$defs/Node",
        },
    ],
)
def test_example_generator_validates(schema: dict[str, Any]) -> None:
    value = example_for(schema)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


# ================================================================ FakeOpenAI: faults


def test_fail_next_then_recover_without_consuming_script(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.script("after the storm")
    oa.fail_next(500, times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=USER)
        assert info.value.status_code == 500
        assert (
            set(info.value.body) >= {"message", "type", "code"} and info.value.body["type"] == "server_error"
        )
    assert (
        client.chat.completions.create(model="m", messages=USER).choices[0].message.content
        == "after the storm"
    )


def test_429_with_retry_after(oa: FakeOpenAI) -> None:
    oa.fail_next(429, retry_after=2)
    raw = requests.post(oa.url + "/chat/completions", json={"model": "m", "messages": USER}, timeout=5)
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "2"
    assert raw.json()["error"]["code"] == "rate_limit_exceeded"
    oa.fail_next(429, retry_after=0.05)
    retrying = openai.OpenAI(base_url=oa.url, api_key="k", max_retries=1)  # the SDK honours Retry-After
    assert retrying.chat.completions.create(model="m", messages=USER).choices[0].message.content
    assert len(oa.chat_requests()) == 3


def test_fail_next_custom_body_and_endpoint_filter(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.fail_next(502, body="<html>Bad gateway</html>", endpoint="chat")
    assert client.moderations.create(input="hello").results[0].flagged is False  # not hit: chat only
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=USER)
    assert info.value.status_code == 502 and "Bad gateway" in info.value.response.text
    oa.fail_next(418, body={"error": {"message": "teapot", "type": "x", "code": "teapot"}})
    with pytest.raises(openai.APIStatusError) as info2:
        client.moderations.create(input="hello")
    assert info2.value.status_code == 418 and info2.value.body["message"] == "teapot"


def test_delay_and_stream_delay(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.delay = 0.2
    start = time.perf_counter()
    client.chat.completions.create(model="m", messages=USER)
    assert time.perf_counter() - start >= 0.2
    impatient = openai.OpenAI(base_url=oa.url, api_key="k", max_retries=0, timeout=0.05)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="m", messages=USER)
    oa.delay = 0
    oa.stream_delay = 0.05
    oa.script("a b c d")
    arrivals = [
        time.perf_counter() for _ in client.chat.completions.create(model="m", messages=USER, stream=True)
    ]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) == 6 and min(gaps) >= 0.03


def test_hang_next_times_out_then_next_call_answers(oa: FakeOpenAI) -> None:
    oa.hang_next()
    impatient = openai.OpenAI(base_url=oa.url, api_key="k", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="m", messages=USER)
    assert impatient.chat.completions.create(model="m", messages=USER).choices[0].message.content


def test_hang_does_not_block_stop() -> None:
    fake = FakeOpenAI().start()
    fake.hang_next()
    patient = openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0, timeout=20)
    thread, out = in_thread(lambda: patient.chat.completions.create(model="m", messages=USER))
    assert fake.wait_for_requests(1, kind="chat")
    start = time.perf_counter()
    fake.stop()
    assert time.perf_counter() - start < 1.0
    thread.join(5)
    assert not thread.is_alive() and isinstance(out.get("error"), openai.APIError)


def test_drop_stream_after_closes_mid_stream_once(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.script("one two three four five", "one two three four five")
    oa.drop_stream_after(3)  # role chunk + 2 content chunks, then the connection is cut
    got: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="m", messages=USER, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got == ["one", " two"]
    whole = client.chat.completions.create(model="m", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in whole if c.choices) == "one two three four five"


def test_concurrent_chats_are_served_in_parallel(oa: FakeOpenAI) -> None:
    oa.delay = 0.3
    threads = [
        in_thread(
            lambda: requests.post(
                oa.url + "/chat/completions", json={"model": "m", "messages": USER}, timeout=5
            )
        )
        for _ in range(4)
    ]
    start = time.perf_counter()
    for thread, _ in threads:
        thread.join(5)
    assert time.perf_counter() - start < 1.0 and oa.max_in_flight == 4
    assert all(out["result"].status_code == 200 for _, out in threads)


# ================================================================ FakeOpenAI: other endpoints


def test_moderations(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    oa.flag_words = {"kill", "blood bath"}
    flagged = client.moderations.create(input="I will KILL the dragon").results[0]
    assert flagged.flagged and flagged.categories.violence and not flagged.categories.hate
    assert flagged.category_scores.violence > 0.5
    assert client.moderations.create(input="my skills grow").results[0].flagged is False  # whole words only
    both = client.moderations.create(input=["a blood bath", "a bath"])
    assert [r.flagged for r in both.results] == [True, False] and both.id.startswith("modr-")
    assert oa.requests[-1]["path"] == "/v1/moderations" and oa.requests[-1]["json"]["input"][1] == "a bath"


def test_images_b64_and_url(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    resp = client.images.generate(prompt="a red fox", n=2, size="256x128", response_format="b64_json")
    assert len(resp.data) == 2
    imgs = [decode(d.b64_json) for d in resp.data]
    assert all(i.format == "PNG" and i.size == (256, 128) for i in imgs)
    assert resp.data[0].b64_json != resp.data[1].b64_json
    by_url = client.images.generate(prompt="a blue fox", size="64x64", response_format="url")
    got = requests.get(by_url.data[0].url, timeout=5)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64) and by_url.data[0].url.startswith(oa.base)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", size="big")


def test_models_list(oa: FakeOpenAI, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]
    assert client.models.retrieve("fake-model").id == "fake-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_restart_on_same_port_and_wait_for_requests() -> None:
    fake = FakeOpenAI().start()
    port = fake.port
    fake.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/models", timeout=2)
    fake.start()
    try:
        assert fake.port == port and requests.get(fake.url + "/models", timeout=2).status_code == 200
        assert fake.wait_for_requests(1, timeout=1, kind="models")
        assert not fake.wait_for_requests(1, timeout=0.05, kind="chat")
    finally:
        fake.stop()


# ================================================================ FakeSD: generation


def txt2img(sd: FakeSD, **payload: Any) -> requests.Response:
    return requests.post(sd.url + "/sdapi/v1/txt2img", json=payload, timeout=10)


def test_txt2img_real_pngs_of_the_requested_size(sd: FakeSD) -> None:
    resp = txt2img(sd, prompt="a castle", width=320, height=192, seed=42, batch_size=2, n_iter=2)
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["images"]) == 4 and sd.count == 4
    assert not body["images"][0].startswith("data:")
    imgs = [decode(b) for b in body["images"]]
    assert all(i.format == "PNG" and i.size == (320, 192) for i in imgs)
    assert len(set(body["images"])) == 4  # one seed each
    info = json.loads(body["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43, 44, 45] and info["instance"] == "sd-test"
    assert info["sd_model_checkpoint"] == sd.checkpoint
    assert body["parameters"]["prompt"] == "a castle" and body["parameters"]["steps"] == 50  # echo + defaults
    default = txt2img(sd, prompt="a castle").json()
    assert decode(default["images"][0]).size == (512, 512) and json.loads(default["info"])["seed"] >= 0


def test_pixels_depend_on_prompt_and_seed(sd: FakeSD) -> None:
    def image(prompt: str, seed: int) -> str:
        return txt2img(sd, prompt=prompt, seed=seed, width=64, height=64).json()["images"][0]

    assert image("cat", 1) == image("cat", 1)
    assert image("cat", 1) != image("dog", 1) and image("cat", 1) != image("cat", 2)
    assert decode(image("cat", 1)).getpixel((63, 63)) != decode(image("dog", 1)).getpixel((63, 63))


def test_img2img_requires_init_images_and_records_mask(sd: FakeSD) -> None:
    url = sd.url + "/sdapi/v1/img2img"
    missing = requests.post(url, json={"prompt": "x"}, timeout=5)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "init_images"]
    bad = requests.post(url, json={"prompt": "x", "init_images": ["not base64!"]}, timeout=5)
    assert bad.status_code == 500 and bad.json()["detail"] == "Invalid encoded image"
    plain = requests.post(
        url,
        json={
            "prompt": "x",
            "width": 96,
            "height": 64,
            "init_images": ["data:image/png;base64," + b64png(40, 40)],
        },
        timeout=5,
    )
    assert plain.status_code == 200 and decode(plain.json()["images"][0]).size == (96, 64)
    assert plain.json()["parameters"]["init_images"] is None  # like the WebUI: images not echoed
    masked = requests.post(
        url,
        json={
            "prompt": "x",
            "width": 64,
            "height": 64,
            "init_images": [b64png(64, 64)],
            "mask": b64png(64, 64, "mask"),
            "denoising_strength": 0.5,
        },
        timeout=5,
    )
    assert masked.status_code == 200 and json.loads(masked.json()["info"])["mask"] is True
    records = sd.generation_requests()
    assert [r.get("mask") for r in records if r["status"] == 200] == [False, True]
    assert all(r["end"] >= r["start"] for r in records)


def test_controlnet_units_echoed_and_unknown_scripts_refused(sd: FakeSD) -> None:
    units = [{"module": "canny", "model": "control_v11p_sd15_canny", "image": b64png(32, 32), "weight": 0.8}]
    resp = txt2img(sd, prompt="drone", width=64, height=64, alwayson_scripts={"ControlNet": {"args": units}})
    assert resp.status_code == 200
    assert resp.json()["parameters"]["alwayson_scripts"]["ControlNet"]["args"] == units
    assert (
        json.loads(resp.json()["info"])["controlnet_units"] == 1 and sd.requests[-1]["controlnet_units"] == 1
    )
    unknown = txt2img(sd, prompt="drone", alwayson_scripts={"NoSuchScript": {"args": []}})
    assert unknown.status_code == 422 and "NoSuchScript" in unknown.json()["detail"]
    bad_type = txt2img(sd, prompt="drone", width="wide")
    assert bad_type.status_code == 422 and bad_type.json()["detail"][0]["loc"] == ["body", "width"]


def test_checkpoint_override_switch_restore_and_options(sd: FakeSD) -> None:
    first, second = sd.models[0], sd.models[1]
    assert sd.checkpoint == first
    sd.switch_delay = 0.15
    start = time.perf_counter()
    kept = txt2img(
        sd,
        prompt="x",
        width=64,
        height=64,
        override_settings={"sd_model_checkpoint": second},
        override_settings_restore_afterwards=False,
    )
    assert time.perf_counter() - start >= 0.15  # a switch costs switch_delay
    assert json.loads(kept.json()["info"])["sd_model_name"] == second and sd.checkpoint == second
    restored = txt2img(
        sd, prompt="x", width=64, height=64, override_settings={"sd_model_checkpoint": model_title(first)}
    )
    assert json.loads(restored.json()["info"])["sd_model_name"] == first  # used for this image
    assert sd.checkpoint == second  # and switched back afterwards (the WebUI's default)
    assert sd.switch_log == [second, first, second] and sd.switches == 3
    sd.switch_delay = 0
    unknown = txt2img(sd, prompt="x", width=64, height=64, override_settings={"sd_model_checkpoint": "nope"})
    assert json.loads(unknown.json()["info"])["sd_model_name"] == second  # unknown names are ignored
    options = requests.get(sd.url + "/sdapi/v1/options", timeout=5).json()
    assert options["sd_model_checkpoint"] == second
    assert requests.post(sd.url + "/sdapi/v1/options", json={"sd_model_checkpoint": first}, timeout=5).ok
    assert sd.checkpoint == first
    refused = requests.post(sd.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=5)
    assert refused.status_code == 500 and "not found" in refused.json()["errors"]
    models = requests.get(sd.url + "/sdapi/v1/sd-models", timeout=5).json()
    assert [m["model_name"] for m in models] == sd.models and models[0]["title"] == sd.models[0]


def test_real_titles() -> None:
    with FakeSD(models=["a", "b"], real_titles=True) as fake:
        title = requests.get(fake.url + "/sdapi/v1/options", timeout=5).json()["sd_model_checkpoint"]
        assert title == model_title("a") and title.startswith("a.safetensors [")
        assert requests.get(fake.url + "/sdapi/v1/sd-models", timeout=5).json()[1]["title"] == model_title(
            "b"
        )
        resp = txt2img(
            fake,
            prompt="x",
            width=32,
            height=32,
            override_settings={"sd_model_checkpoint": "b"},
            override_settings_restore_afterwards=False,
        )
        assert (
            json.loads(resp.json()["info"])["sd_model_checkpoint"] == model_title("b")
            and fake.checkpoint == "b"
        )


def test_configurable_model_list() -> None:
    with FakeSD(models=["a", "b"]) as fake:
        assert [
            m["model_name"] for m in requests.get(fake.url + "/sdapi/v1/sd-models", timeout=5).json()
        ] == ["a", "b"]
        assert fake.checkpoint == "a" and fake.name == f"fake-sd-{fake.port}"


def test_one_generation_at_a_time_under_concurrent_requests() -> None:
    with FakeSD(delay=5.0, name="busy") as fake:
        threads = [
            in_thread(lambda i=i: txt2img(fake, prompt=f"p{i}", width=32, height=32)) for i in range(4)
        ]
        assert fake.wait_until(lambda: fake.inside == 4)  # one running, three queued
        assert fake.running == 1
        fake.delay = 0.05  # the queued ones take little time; stop the long first one
        assert requests.post(fake.url + "/sdapi/v1/interrupt", timeout=5).json() == {}
        for thread, _ in threads:
            thread.join(5)
        assert all(out["result"].status_code == 200 for _, out in threads)
        assert (
            fake.max_running == 1 and fake.max_concurrent_seen == 4 and fake.count == 4 and fake.inside == 0
        )


def test_progress_and_interrupt_returns_early() -> None:
    with FakeSD(delay=1.0) as fake:
        idle = requests.get(fake.url + "/sdapi/v1/progress", timeout=5).json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        thread, out = in_thread(
            lambda: txt2img(fake, prompt="slow", width=32, height=32, batch_size=3, steps=20)
        )
        assert fake.wait_until_running()
        busy = requests.get(fake.url + "/sdapi/v1/progress", timeout=5).json()
        assert 0 <= busy["progress"] < 1 and busy["eta_relative"] > 1 and busy["state"]["job_count"] == 3
        assert busy["state"]["sampling_steps"] == 20
        start = time.perf_counter()
        requests.post(fake.url + "/sdapi/v1/interrupt", timeout=5)
        thread.join(5)
        assert time.perf_counter() - start < 0.8
        body = out["result"].json()
        assert len(body["images"]) == 1 and json.loads(body["info"])["interrupted"] is True
        assert fake.interrupts == 1 and fake.count == 1


def test_delay_per_image_is_held_under_the_lock() -> None:
    with FakeSD(delay=0.1) as fake:
        start = time.perf_counter()
        assert len(txt2img(fake, prompt="x", width=32, height=32, batch_size=3).json()["images"]) == 3
        assert time.perf_counter() - start >= 0.3


# ================================================================ FakeSD: SAM


def test_sam_predict(sd: FakeSD) -> None:
    url = sd.url + "/sam/sam-predict"
    image = b64png(120, 80, "drone photo")
    resp = requests.post(
        url,
        json={
            "input_image": image,
            "dino_enabled": True,
            "dino_text_prompt": "drone",
            "sam_model_name": "sam_vit_h_4b8939.pth",
        },
        timeout=5,
    )
    assert resp.status_code == 200
    body = resp.json()
    assert "drone" in body["msg"]
    for key in ("blended_images", "masks", "masked_images"):
        assert len(body[key]) == 3 and all(decode(v).size == (120, 80) for v in body[key])
    missing = requests.post(url, json={"dino_enabled": True}, timeout=5)
    assert missing.status_code == 422
    no_prompt = requests.post(url, json={"input_image": image}, timeout=5).json()
    assert "masks" not in no_prompt and "neither" in no_prompt["msg"]
    sd.sam_finds_object = False
    nothing = requests.post(
        url, json={"input_image": image, "dino_enabled": True, "dino_text_prompt": "cow"}, timeout=5
    ).json()
    assert "masks" not in nothing and "cow" in nothing["msg"]


# ================================================================ FakeSD: faults


def test_fail_next_and_empty_images(sd: FakeSD) -> None:
    sd.fail_next(500, times=2)
    for _ in range(2):
        failed = txt2img(sd, prompt="x", width=32, height=32)
        assert failed.status_code == 500 and set(failed.json()) == {"error", "detail", "body", "errors"}
    assert txt2img(sd, prompt="x", width=32, height=32).status_code == 200
    sd.empty_images_next(1)
    assert txt2img(sd, prompt="x", width=32, height=32).json() == {"images": [""]}
    assert decode(txt2img(sd, prompt="x", width=32, height=32).json()["images"][0]).size == (32, 32)
    assert sd.count == 2


def test_dead_refuses_connections_and_revive_reopens_the_same_port(sd: FakeSD) -> None:
    port = sd.port
    sd.dead = True
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(requests.ConnectionError):
        txt2img(sd, prompt="x")
    sd.revive()
    assert not sd.dead and sd.port == port
    assert txt2img(sd, prompt="x", width=32, height=32).status_code == 200


def test_dying_cuts_a_running_generation() -> None:
    with FakeSD(delay=10.0) as fake:
        thread, out = in_thread(lambda: txt2img(fake, prompt="x", width=32, height=32))
        assert fake.wait_until_running()
        start = time.perf_counter()
        fake.dead = True
        thread.join(5)
        assert time.perf_counter() - start < 1.0 and isinstance(out.get("error"), requests.ConnectionError)
        fake.delay = 0
        fake.revive()
        assert txt2img(fake, prompt="y", width=32, height=32).status_code == 200  # the lock was released


def test_hang_until_released(sd: FakeSD) -> None:
    sd.hang = True
    with pytest.raises(requests.ReadTimeout):
        requests.get(sd.url + "/sdapi/v1/options", timeout=0.3)
    thread, out = in_thread(lambda: txt2img(sd, prompt="late", width=32, height=32))
    assert sd.wait_for_requests(1, path="/sdapi/v1/txt2img")
    assert not sd.wait_until(lambda: sd.count > 0, timeout=0.1)  # still hanging
    sd.hang = False
    thread.join(5)
    assert out["result"].status_code == 200 and sd.count == 1


def test_hang_does_not_block_stop_and_unknown_paths() -> None:
    fake = FakeSD().start()
    assert requests.get(fake.url + "/sdapi/v1/nope", timeout=5).json() == {"detail": "Not Found"}
    fake.hang = True
    thread, out = in_thread(lambda: txt2img(fake, prompt="x", width=32, height=32))
    assert fake.wait_for_requests(1, path="/sdapi/v1/txt2img")
    start = time.perf_counter()
    fake.stop()
    assert time.perf_counter() - start < 1.0
    thread.join(5)
    assert not thread.is_alive() and isinstance(out.get("error"), requests.ConnectionError)
