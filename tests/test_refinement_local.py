"""Refinement on the embedded local model (no keys, no servers): the first run a new user makes."""

from __future__ import annotations

from typing import Any

from tests.test_refinement import assert_png_b64, ok


def test_first_run_rapid_divergence_on_the_local_model(make_app: Any, db: Any) -> None:
    app = make_app(LLM_PROVIDER="local")
    body = {
        "appid": 0,
        "type": 0,
        "prompts": {"task": "design a lamp for reading in bed", "num": 2, "language": "en"},
    }
    data = ok(app.test_client(), "/generate", body)
    assert data["count"] == 2
    texts = [creative["items"][1]["text"] for creative in data["result"]]
    assert all(isinstance(t, str) and t.strip() and not t.startswith("fake") for t in texts), texts
    for creative in data["result"]:
        assert_png_b64(creative["items"][0]["image"])  # the placeholder image provider
    gens = list(db.generations.find({"app": "refinement", "kind": "chat"}))
    assert len(gens) == 4 and all(g["provider"] == "local" and g["ok"] for g in gens)
    stored = db.refinement_stimuli.find_one({"_id": data["stimulusIds"][0]})
    assert stored["texts"]["product"] and stored["texts"]["concept"] == texts[0]
