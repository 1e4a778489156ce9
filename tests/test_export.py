"""`flask export` end to end through the app's CLI runner: one app's (and one user's) generation
records, jobs (+ their events) and images land in OUT as JSONL, CSV and files; another app's and
another user's do not."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bson import json_util

from agent.llm import CallContext
from tests.fakes.pngs import png_bytes


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json_util.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def study(openai_app: Any) -> dict[str, Any]:
    """storybook/alice, storybook/bob and ideation/alice each get a generation, a finished job and an image."""
    svc = openai_app.extensions["services"]
    made: dict[str, Any] = {}
    for app_name, user in (("storybook", "alice"), ("storybook", "bob"), ("ideation", "alice")):
        key = f"{app_name}/{user}"
        result = svc.llm.chat(
            [{"role": "user", "content": f"a title for {key}"}],
            context=CallContext(app=app_name, user=user, session="s1", step="title"),
        )
        done = threading.Event()

        def runner(ctx: Any, done: threading.Event = done) -> dict[str, Any]:
            ctx.event("page", {"n": 1})
            done.set()
            return {"ok": True}

        job_id = svc.jobs.submit(kind="book", app=app_name, runner=runner, owner=user, input={"k": key})
        assert done.wait(10)
        png = png_bytes(48, 32, key, key)
        image_id = svc.images.save(png, app=app_name, user=user, job=job_id)
        made[key] = {"generation": result.generation_id, "job": job_id, "image": image_id, "png": png}
    _wait_jobs_finished(svc, [m["job"] for m in made.values()])
    return made


def _wait_jobs_finished(svc: Any, job_ids: list[str]) -> None:
    for _ in range(200):
        if all(svc.jobs.get(j)["status"] == "done" for j in job_ids):
            return
        threading.Event().wait(0.02)
    raise AssertionError("jobs did not finish")


def test_export_one_user_of_one_app(openai_app: Any, study: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "export"
    res = openai_app.test_cli_runner().invoke(
        args=["export", "--app", "storybook", "--user", "alice", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    mine = study["storybook/alice"]

    gens = read_jsonl(out / "generations.jsonl")
    assert [str(g["_id"]) for g in gens] == [mine["generation"]]
    assert (
        gens[0]["app"] == "storybook" and gens[0]["user"] == "alice" and gens[0]["output"].startswith("Fake")
    )
    jobs = read_jsonl(out / "jobs.jsonl")
    assert [j["_id"] for j in jobs] == [mine["job"]] and jobs[0]["result"] == {"ok": True}
    events = read_jsonl(out / "job_events.jsonl")
    assert events and {e["job"] for e in events} == {mine["job"]}
    assert any(e["type"] == "page" for e in events)

    images = read_jsonl(out / "images.jsonl")
    assert [i["_id"] for i in images] == [mine["image"]]
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [f"{mine['image']}.png"]
    assert (out / "images" / files[0]).read_bytes() == mine["png"]
    assert images[0]["file"] == f"images/{files[0]}"

    rows = read_csv(out / "generations.csv")
    assert len(rows) == 1 and rows[0]["user"] == "alice" and rows[0]["_id"] == mine["generation"]
    assert json.loads(rows[0]["messages"])[0]["content"] == "a title for storybook/alice"
    assert rows[0]["created_at"].startswith("20") and "T" in rows[0]["created_at"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["app"] == "storybook" and manifest["user"] == "alice"
    expected = {"generations": 1, "jobs": 1, "job_events": len(events), "images": 1}
    assert {k: manifest["counts"][k] for k in expected} == expected  # (+ the app's own collections)
    assert "generations: 1" in res.output and "images: 1" in res.output

    everything = (
        (out / "generations.jsonl").read_text()
        + (out / "jobs.jsonl").read_text()
        + (out / "images.jsonl").read_text()
    )
    for other in ("storybook/bob", "ideation/alice"):
        for field in ("generation", "job", "image"):
            assert study[other][field] not in everything, (other, field)


def test_export_whole_app_and_since(openai_app: Any, study: dict[str, Any], tmp_path: Path) -> None:
    runner = openai_app.test_cli_runner()
    res = runner.invoke(args=["export", "--app", "storybook", "--out", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    users = sorted(g["user"] for g in read_jsonl(tmp_path / "all" / "generations.jsonl"))
    assert users == ["alice", "bob"]
    assert len(list((tmp_path / "all" / "images").iterdir())) == 2
    assert study["ideation/alice"]["job"] not in (tmp_path / "all" / "jobs.jsonl").read_text()

    res = runner.invoke(
        args=["export", "--app", "storybook", "--since", "2999-01-01", "--out", str(tmp_path / "future")]
    )
    assert res.exit_code == 0, res.output
    assert read_jsonl(tmp_path / "future" / "generations.jsonl") == []
    assert list((tmp_path / "future" / "images").iterdir()) == []
    res = runner.invoke(
        args=[
            "export",
            "--app",
            "storybook",
            "--since",
            "2000-01-01T00:00+08:00",
            "--out",
            str(tmp_path / "past"),
        ]
    )
    assert res.exit_code == 0 and len(read_jsonl(tmp_path / "past" / "generations.jsonl")) == 2


def test_export_rejects_bad_arguments(openai_app: Any, tmp_path: Path) -> None:
    runner = openai_app.test_cli_runner()
    res = runner.invoke(
        args=["export", "--app", "storybook", "--since", "last tuesday", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "not an ISO date" in res.output
    res = runner.invoke(args=["export", "--app", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "storybook" in res.output


def test_app_registered_collection_is_exported(
    openai_app: Any, tmp_path: Path, make_app: Callable[..., Any]
) -> None:
    svc = openai_app.extensions["services"]
    db = svc.db
    svc.exports.add("storybook_test_books", "storybook", "user")
    try:
        db.storybook_test_books.insert_many([{"user": "alice", "title": "A"}, {"user": "bob", "title": "B"}])
        runner = openai_app.test_cli_runner()
        res = runner.invoke(
            args=["export", "--app", "storybook", "--user", "alice", "--out", str(tmp_path / "s")]
        )
        assert res.exit_code == 0, res.output
        assert [b["title"] for b in read_jsonl(tmp_path / "s" / "storybook_test_books.jsonl")] == ["A"]
        res = runner.invoke(args=["export", "--app", "ideation", "--out", str(tmp_path / "i")])
        assert res.exit_code == 0 and not (tmp_path / "i" / "storybook_test_books.jsonl").exists()
    finally:
        db.storybook_test_books.drop()
