"""Optional S3 storage of the storybook's pictures, against moto's S3 server on 127.0.0.1.

Skipped when boto3/moto are not installed (`pip install '.[s3]' moto`). Credentials are dummies
and the endpoint is the local moto server: nothing leaves this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.test_storybook import PNG_MAGIC, app_events, openai_settings, read, snapshots, story_responder

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "STORYBOOK_S3_ENDPOINT_URL": endpoint,
        "STORYBOOK_S3_URL_EXPIRES_S": "600",
    }.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    server.stop()


def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_pictures_go_to_s3_with_expiring_urls(
    make_app: Any, fake_openai: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client(s3_endpoint).create_bucket(Bucket="books")
    monkeypatch.setenv("STORYBOOK_S3_BUCKET", "books")
    fake_openai.set_responder(story_responder(fake_openai))
    app = make_app(**openai_settings(fake_openai))
    c = app.test_client()
    book = c.post("/storybook/books", json={"description": "x", "pages": 2}).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "done", kinds[-1]
    svc = app.extensions["services"]
    pictures = [d for k, d in kinds if k in ("page.image", "cover")]
    assert len(pictures) == 3
    for picture in pictures:
        url = picture["url"]
        assert url.startswith(f"{s3_endpoint}/books/storybook/{book['id']}/") and "X-Amz-Expires=600" in url
        got = requests.get(url, timeout=10)
        assert got.status_code == 200 and got.content.startswith(PNG_MAGIC)
        assert got.content == svc.images.load(picture["image_id"])  # the same bytes as the GridFS master copy
        assert (
            requests.get(url.split("?")[0], timeout=10).status_code == 403
        )  # not public without a signature
    listed = client(s3_endpoint).list_objects_v2(Bucket="books")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        f"storybook/{book['id']}/{n}.png" for n in ("cover", "page-1", "page-2")
    ]
    head = client(s3_endpoint).head_object(Bucket="books", Key=f"storybook/{book['id']}/page-1.png")
    assert head["ContentType"] == "image/png"
    # reads sign again, so a stored book never hands out a dead link
    again = c.get(f"/storybook/books/{book['id']}").get_json()
    assert all(p["illustration"].startswith(s3_endpoint) for p in again["pages"])
    final = c.get(f"/storybook/get_final_output?task_id={book['legacy_id']}").get_json()["final_output"]
    assert all(u.startswith(s3_endpoint) for u in final["illustrations"]) and final["cover"].startswith(
        s3_endpoint
    )
    legacy = snapshots(read(c, f"/storybook/get_updates/{book['legacy_id']}")[0])[-1]["data"]
    assert [u.split("?")[0] for u in legacy["illustrations"]] == [
        u.split("?")[0] for u in final["illustrations"]
    ]


def test_a_picture_that_cannot_be_stored_fails_the_book(
    make_app: Any, fake_openai: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORYBOOK_S3_BUCKET", "no-such-bucket")
    fake_openai.set_responder(story_responder(fake_openai))
    c = make_app(**openai_settings(fake_openai)).test_client()
    book = c.post("/storybook/books", json={"description": "x", "pages": 1}).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "failed"
    assert "could not store the picture in S3" in kinds[-1][1]["error"]["message"]
    assert not any(k == "page.image" for k, _ in kinds)  # no dangling link was ever sent


def test_bad_s3_settings_fail_at_start_up(
    make_app: Any, fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORYBOOK_S3_BUCKET", "books")
    monkeypatch.setenv("STORYBOOK_S3_URL_EXPIRES_S", "forever")
    with pytest.raises(ValueError, match="STORYBOOK_S3_URL_EXPIRES_S"):
        make_app(**openai_settings(fake_openai))
