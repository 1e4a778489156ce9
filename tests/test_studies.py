"""Studies end to end against the embedded MongoDB and the fake OpenAI server: prompt variants,
balanced assignment that holds across two app instances (= two workers) and restarts, study
fields on records and jobs, `flask calls`, the export filters, cost and /metrics, the dashboard's
access rules; plus the variant/study checks of `flask prompts check`."""

from __future__ import annotations

import csv
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import json_util
from click.testing import CliRunner

from agent.llm import CallContext
from agent.prompts import PromptError, PromptLibrary
from agent.prompts.cli import prompts_group
from agent.studies import PARTICIPANTS, StudyAssigner, StudyError, check_studies, load_study, parse_study
from tests.test_storybook import openai_settings, read, story_responder

WARM = "Plan a warm, tender picture book"
PRICES = json.dumps({"fake-model": {"input": 1.0, "output": 2.0}})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


TPL = """---
description: {desc}
{extra}samples:
  default: {{topic: cats}}
---
{body}
"""


@pytest.fixture
def lib(tmp_path: Path) -> PromptLibrary:
    write(
        tmp_path / "demo" / "title.j2",
        TPL.format(desc="a title", extra="", body="A title about {{ topic }}."),
    )
    write(
        tmp_path / "demo" / "title.warm.j2",
        TPL.format(desc="warm", extra="", body="A warm title: {{ topic }}."),
    )
    return PromptLibrary(tmp_path)


def test_variants_render_beside_their_template(lib: PromptLibrary) -> None:
    assert lib.names() == ["demo/title"]  # a variant is not a template of its own
    assert lib.names(variants=True) == ["demo/title", "demo/title.warm"]
    assert lib.variants("demo/title") == ["warm"]
    base = lib.render("demo/title", {"topic": "owls"})
    warm = lib.render("demo/title", {"topic": "owls"}, variant="warm")
    assert base.messages[-1]["content"] == "A title about owls." and base.variant is None
    assert warm.messages[-1]["content"] == "A warm title: owls."
    assert warm.name == "demo/title" and warm.variant == "warm" and warm.hash != base.hash
    with pytest.raises(PromptError, match="has no variant 'cold'.*variants: warm"):
        lib.render("demo/title", {"topic": "owls"}, variant="cold")
    assert lib.check() == []


def test_check_finds_broken_variants_and_study_files(lib: PromptLibrary, tmp_path: Path) -> None:
    write(tmp_path / "demo" / "gone.warm.j2", TPL.format(desc="orphan", extra="", body="x {{ topic }}"))
    schema = "response_format: json\nschema: {type: object}\n"
    write(tmp_path / "demo" / "title.json.j2", TPL.format(desc="json", extra=schema, body="{{ topic }}"))
    errors = lib.check()
    assert any("demo/gone.warm: a variant of 'demo/gone', but there is no" in e for e in errors), errors
    assert any("demo/title.json: response_format 'json' differs" in e for e in errors), errors

    study = "description: d\nconditions:\n  a: {}\n  b: {templates: {demo/title: cold, demo/nope: warm}}\n"
    write(tmp_path / "studies" / "pilot.yaml", study)
    problems = check_studies(tmp_path, lib)
    assert len(problems) == 1
    assert "has no variant 'cold'" in problems[0] and "unknown template 'demo/nope'" in problems[0]
    res = CliRunner().invoke(prompts_group, ["--dir", str(tmp_path), "check"])
    assert res.exit_code == 1 and "studies/pilot" in res.output

    with pytest.raises(StudyError, match="unknown key"):
        parse_study("x", tmp_path / "x.yaml", "description: d\nconditions: {a: {}}\ncolour: red\n")
    with pytest.raises(StudyError, match="params.temperature must be a number"):
        parse_study(
            "x", tmp_path / "x.yaml", "description: d\nconditions: {a: {params: {temperature: hot}}}\n"
        )
    with pytest.raises(StudyError, match="assignment must be one of"):
        parse_study("x", tmp_path / "x.yaml", "description: d\nassignment: alphabetic\nconditions: {a: {}}\n")


def test_shipped_example_study_checks_clean() -> None:
    from agent.prompts import default_library

    lib = default_library()
    study = load_study(lib.root, "example", lib)
    assert list(study.conditions) == ["neutral", "warm"] and study.assignment == "balanced"
    assert study.conditions["warm"].templates == {"storybook/plan": "warm", "storyteller/story": "warm"}
    assert check_studies(lib.root, lib) == []
    res = CliRunner().invoke(prompts_group, ["check"])
    assert res.exit_code == 0 and "studies OK" in res.output, res.output


# ------------------------------------------------------------------------------- a study running


@pytest.fixture
def story_fake(fake_openai: Any) -> Any:
    fake_openai.set_responder(story_responder(fake_openai))
    return fake_openai


@pytest.fixture
def study_app(make_app: Any, story_fake: Any) -> Any:
    return make_app(**openai_settings(story_fake), STUDY="example", MODEL_PRICES=PRICES)


def make_book(app: Any, user: str, pages: int = 1) -> dict[str, Any]:
    c = app.test_client()
    resp = c.post(
        "/storybook/books", json={"description": f"{user}'s hedgehog", "pages": pages, "user": user}
    )
    assert resp.status_code == 202, resp.get_json()
    book = resp.get_json()
    events, _ = read(c, book["links"]["events"])
    assert json.loads(events[-1]["data"])["book"]["status"] == "done", events[-1]
    return book


def test_two_participants_two_workers_restart(make_app: Any, story_fake: Any, study_app: Any) -> None:
    worker2 = make_app(**openai_settings(story_fake), STUDY="example", MODEL_PRICES=PRICES)
    db = study_app.extensions["services"].db
    alice = make_book(study_app, "alice")  # first to appear: neutral
    bob = make_book(worker2, "bob")  # second, on the other worker: warm

    people = {d["participant"]: d for d in db[PARTICIPANTS].find({"study": "example"})}
    assert {p: (d["condition"], d["n"], d["kind"]) for p, d in people.items()} == {
        "alice": ("neutral", 1, "user"),
        "bob": ("warm", 2, "user"),
    }
    plans = {r["user"]: r for r in db.generations.find({"template": "storybook/plan"})}
    assert WARM not in plans["alice"]["messages"][-1]["content"] and plans["alice"]["variant"] is None
    assert WARM in plans["bob"]["messages"][-1]["content"] and plans["bob"]["variant"] == "warm"
    assert "warm and affectionate" in plans["bob"]["messages"][0]["content"]  # the variant's system message
    assert plans["bob"]["params"]["temperature"] == 0.9 and plans["alice"]["params"]["temperature"] == 0.7
    sent = [r["json"] for r in story_fake.chat_requests() if not r["json"].get("stream")]
    assert sorted(r["temperature"] for r in sent) == [0.7, 0.9]  # the override reached the model
    for user, cond in (("alice", "neutral"), ("bob", "warm")):
        records = list(db.generations.find({"user": user}))
        assert {r["kind"] for r in records} >= {"chat", "image"}
        assert all(r["study"] == "example" and r["condition"] == cond for r in records)
        chats = [r for r in records if r["kind"] == "chat"]
        assert all(r["cost_usd"] > 0 for r in chats)
    assert db.jobs.find_one({"_id": alice["id"]})["condition"] == "neutral"
    assert db.jobs.find_one({"_id": bob["id"]})["condition"] == "warm"

    # a restart (a fresh app on the same database): nobody changes condition, the round robin goes on
    restarted = make_app(**openai_settings(story_fake), STUDY="example")
    svc = restarted.extensions["services"]
    again = svc.llm.chat(
        template="storybook/plan", sample="default", context=CallContext(app="storybook", user="bob")
    )
    assert WARM in db.generations.find_one({"_id": _oid(again.generation_id)})["messages"][-1]["content"]
    svc.llm.chat(
        [{"role": "user", "content": "hi"}], context=CallContext(app="storyteller", session="s-carol")
    )
    carol = db[PARTICIPANTS].find_one({"participant": "s-carol"})
    assert (carol["condition"], carol["n"], carol["kind"]) == ("neutral", 3, "session")

    # flask study summary / show
    runner = restarted.test_cli_runner()
    out = runner.invoke(args=["study", "summary", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["participants"] == 3
    assert (
        summary["conditions"]["neutral"]["participants"] == 2
        and summary["conditions"]["warm"]["participants"] == 1
    )
    shown = runner.invoke(args=["study", "show"])
    assert "storybook/plan -> storybook/plan.warm.j2" in shown.output and "temperature" in shown.output
    assigned = runner.invoke(args=["study", "assign", "dave"])
    assert assigned.output.strip() == "dave: warm"


def _oid(value: str) -> Any:
    from bson import ObjectId

    return ObjectId(value)


def test_balanced_assignment_is_atomic_across_workers(make_app: Any, story_fake: Any) -> None:
    """40 new participants, each arriving at both workers at once: each gets one number, 20/20."""
    apps = [make_app(**openai_settings(story_fake), STUDY="example") for _ in range(2)]
    db = apps[0].extensions["services"].db
    assigners: list[StudyAssigner] = [a.extensions["services"].extras["study"] for a in apps]
    results: dict[tuple[int, str], str] = {}
    barrier = threading.Barrier(8)

    def hit(worker: int, names: list[str]) -> None:
        barrier.wait()
        for name in names:
            results[(worker, name)] = assigners[worker % 2].assign(name)

    names = [f"p{i:02d}" for i in range(40)]
    threads = [
        threading.Thread(target=hit, args=(w, names[(w // 2) * 10 : (w // 2 + 1) * 10])) for w in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    docs = list(db[PARTICIPANTS].find({"study": "example"}))
    assert len(docs) == 40
    assert sorted(d["n"] for d in docs) == list(range(1, 41))  # no number drawn twice, none skipped
    counts = {c: sum(d["condition"] == c for d in docs) for c in ("neutral", "warm")}
    assert counts == {"neutral": 20, "warm": 20}
    for i, name in enumerate(names):  # threads 2k and 2k+1 (one per worker) both asked for chunk k
        chunk = i // 10
        assert (
            results[(2 * chunk, name)]
            == results[(2 * chunk + 1, name)]
            == next(d["condition"] for d in docs if d["participant"] == name)
        )


def test_unknown_study_or_variant_stops_startup(make_app: Any, story_fake: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown study 'nope'"):
        make_app(**openai_settings(story_fake), STUDY="nope")


# ------------------------------------------------------------------------------- calls, export, metrics


@pytest.fixture
def recorded(study_app: Any, story_fake: Any) -> dict[str, Any]:
    """alice (neutral) and bob (warm) each make a book; one failed call of bob's."""
    alice, bob = make_book(study_app, "alice"), make_book(study_app, "bob")
    svc = study_app.extensions["services"]
    story_fake.fail_next(400, times=1)
    with pytest.raises(Exception, match="400"):
        svc.llm.chat([{"role": "user", "content": "boom"}], context=CallContext(app="storybook", user="bob"))
    return {"alice": alice, "bob": bob, "svc": svc}


def test_flask_calls_filters_json_and_show(study_app: Any, recorded: dict[str, Any]) -> None:
    runner = study_app.test_cli_runner()
    res = runner.invoke(args=["calls", "--json", "-n", "100", "--user", "bob"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert rows and all(r["user"] == "bob" and r["condition"] == "warm" for r in rows)
    times = [datetime.fromisoformat(r["created_at"]) for r in rows]
    assert times == sorted(times, reverse=True) and all(t.tzinfo is not None for t in times)

    failed = [json.loads(x) for x in runner.invoke(args=["calls", "--json", "--failed"]).output.splitlines()]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "400" in failed[0]["error"]["message"]
    neutral = runner.invoke(
        args=["calls", "--json", "-n", "100", "--condition", "neutral"]
    ).output.splitlines()
    assert neutral and all(json.loads(x)["user"] == "alice" for x in neutral)
    plan = runner.invoke(
        args=["calls", "--json", "--template", "storybook/plan", "--app", "storybook"]
    ).output
    assert len(plan.splitlines()) == 2
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert runner.invoke(args=["calls", "--json", "--since", future]).output == ""
    session = recorded["alice"]["id"]
    by_session = runner.invoke(
        args=["calls", "--json", "-n", "100", "--session", session]
    ).output.splitlines()
    assert by_session and all(json.loads(x)["session"] == session for x in by_session)

    table = runner.invoke(args=["calls", "-n", "5"])
    assert table.exit_code == 0 and table.output.splitlines()[0].startswith("time (UTC)")
    bob_plan = next(r for r in rows if r.get("template") == "storybook/plan")
    shown = runner.invoke(args=["calls", "show", bob_plan["_id"]])
    assert shown.exit_code == 0 and "--- prompt" in shown.output and WARM in shown.output
    assert "condition: warm" in shown.output and "--- output" in shown.output
    missing = runner.invoke(args=["calls", "show", "0" * 24])
    assert missing.exit_code != 0 and "no call" in missing.output


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_export_condition_session_until_and_image_rows(
    study_app: Any, recorded: dict[str, Any], tmp_path: Path
) -> None:
    runner = study_app.test_cli_runner()
    out = tmp_path / "warm"
    res = runner.invoke(args=["export", "--app", "storybook", "--condition", "warm", "--out", str(out)])
    assert res.exit_code == 0, res.output
    gens = read_csv(out / "generations.csv")
    assert gens and {g["user"] for g in gens} == {"bob"} and {g["condition"] for g in gens} == {"warm"}
    chats = [g for g in gens if g["kind"] == "chat" and g["status"] == "ok"]
    assert all(int(g["prompt_tokens"]) > 0 and float(g["cost_usd"]) > 0 for g in chats)
    for g in gens:
        assert datetime.fromisoformat(g["created_at"]).tzinfo is not None, g["created_at"]
    jobs = read_csv(out / "jobs.csv")
    assert [j["_id"] for j in jobs] == [recorded["bob"]["id"]] and jobs[0]["condition"] == "warm"
    books = [json_util.loads(x) for x in (out / "storybooks.jsonl").read_text().splitlines()]
    assert [b["_id"] for b in books] == [recorded["bob"]["id"]]
    images = read_csv(out / "images.csv")
    assert len(images) == 2  # one page + the cover
    for row in images:
        assert row["user"] == "bob" and row["condition"] == "warm" and len(row["sha256"]) == 64
        assert row["steps"] and row["seed"] and row["provider"] == "placeholder" and row["file"]
        assert "checkpoint" in row and "sampler" in row and "instance" in row and "template" in row
        assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
        assert (out / row["file"]).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["condition"] == "warm" and manifest["counts"]["images"] == 2

    by_session = tmp_path / "session"
    session = recorded["alice"]["id"]
    res = runner.invoke(args=["export", "--app", "storybook", "--session", session, "--out", str(by_session)])
    assert res.exit_code == 0, res.output
    rows = read_csv(by_session / "generations.csv")
    assert rows and {r["session"] for r in rows} == {session}
    assert [j["_id"] for j in read_csv(by_session / "jobs.csv")] == [session]
    assert {r["session"] for r in read_csv(by_session / "images.csv")} == {session}

    early = tmp_path / "early"
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    res = runner.invoke(args=["export", "--app", "storybook", "--until", past, "--out", str(early)])
    assert res.exit_code == 0 and read_csv(early / "generations.csv") == []
    bad = runner.invoke(args=["export", "--app", "storybook", "--until", "yesterday", "--out", str(early)])
    assert bad.exit_code == 2 and "--until" in bad.output


def test_metrics_have_model_latency_tokens_and_cost(study_app: Any, recorded: dict[str, Any]) -> None:
    text = study_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'model_call_duration_seconds_count{kind="chat",provider="openai",status="ok"}' in text
    assert 'model_call_duration_seconds_bucket{kind="image"' in text
    assert 'model_tokens_total{model="fake-model",provider="openai",type="prompt"}' in text
    cost = [line for line in text.splitlines() if line.startswith("model_cost_usd_total{")]
    assert cost and float(cost[0].rsplit(" ", 1)[1]) > 0


def test_dashboard_access_and_validation(make_app: Any, story_fake: Any) -> None:
    from tests.test_storybook import basic

    app = make_app(
        **openai_settings(story_fake),
        STUDY="example",
        AUTH_MODE="basic",
        BASIC_AUTH_USERNAME="admin",
        BASIC_AUTH_PASSWORD="pw",
    )
    from apps.core.auth import create_user

    create_user(app.extensions["services"].db, "pat", password="pw2")
    c = app.test_client()
    assert c.get("/dashboard/").status_code == 401
    denied = c.get("/dashboard/", headers=basic("pat", "pw2"))
    assert denied.status_code == 403 and "admins only" in denied.get_json()["error"]["message"]
    ok = c.get("/dashboard/", headers=basic("admin", "pw"))
    assert ok.status_code == 200 and ok.mimetype == "text/html" and "example" in ok.get_data(as_text=True)
    bad = c.get("/dashboard/?participants=0", headers=basic("admin", "pw"))
    assert bad.status_code == 422 and bad.get_json()["detail"][0]["loc"][-1] == "participants"
    bad_app = c.get("/dashboard/?app=paint", headers=basic("admin", "pw"))
    assert bad_app.status_code == 422


def test_fixed_and_random_assignment(db: Any, tmp_path: Path) -> None:
    text = "description: d\nassignment: fixed\nparticipants: {zoe: b}\nconditions: {a: {}, b: {}}\n"
    fixed = StudyAssigner(db, parse_study("f", tmp_path / "f.yaml", text))
    assert fixed.assign("zoe") == "b"
    assert [fixed.assign(p) for p in ("u1", "u2", "u3")] == ["a", "b", "a"]  # unlisted: round robin
    assert fixed.for_call("storybook", None, "s9").fields() == {"study": "f", "condition": "b"}
    assert fixed.for_call("storybook", None, None).condition is None  # nobody to assign
    rand = StudyAssigner(db, parse_study("r", tmp_path / "r.yaml", text.replace("fixed", "random")))
    got = {rand.assign(f"x{i}") for i in range(30)}
    assert got == {"a", "b"}
    fresh = StudyAssigner(db, rand.study)  # a restart: the stored answer, not a new draw
    assert all(fresh.assign(f"x{i}") == rand.assign(f"x{i}") for i in range(30))
    with pytest.raises(StudyError, match="participants.zoe names no condition 'c'"):
        parse_study("f", tmp_path / "f.yaml", text.replace("zoe: b", "zoe: c"))


def test_storyteller_sessions_see_their_conditions_prompt(make_app: Any, fake_openai: Any) -> None:
    """Auth off: each storyteller session is a participant; the warm one's shown prompt, the model
    call and its record all use story.warm.j2."""
    from tests.test_storyteller_api import write
    from tests.test_storyteller_support import P

    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k",
                   LLM_MODEL="fake-model", STUDY="example")  # fmt: skip
    db = app.extensions["services"].db
    shown = {}
    for who in ("first", "second"):
        c = app.test_client()
        resp = c.post("/storyteller/setstory/", json=P)
        assert resp.status_code == 200
        session = resp.headers["X-Storyteller-Session"]
        shown[who] = (session, resp.get_json()[0])
        write(c, session)
    warm = "Tell it in a warm, affectionate voice."
    assert warm not in shown["first"][1] and warm in shown["second"][1]
    for who, cond in (("first", "neutral"), ("second", "warm")):
        session = shown[who][0]
        assert db[PARTICIPANTS].find_one({"participant": session})["condition"] == cond
        rec = db.generations.find_one({"session": session, "template": "storyteller/story"})
        assert rec["condition"] == cond and (warm in rec["messages"][-1]["content"]) == (cond == "warm")


def test_export_progress_only_on_a_terminal() -> None:
    import io

    from apps.core.export_rows import Progress

    quiet, shown = io.StringIO(), io.StringIO()
    Progress(False, quiet).update("generations", 5, 10, final=True)
    Progress(True, shown).update("generations", 5, 10, final=True)
    assert quiet.getvalue() == ""
    assert shown.getvalue() == "\r[###############...............] generations 5/10\n"
