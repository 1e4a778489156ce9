"""Storybook page streaming costs a handful of database writes per page, not two per token: deltas are
coalesced into `page.delta` events (pipeline.DELTA_FLUSH_S), yet text still arrives progressively and
the page's final text is byte-identical to what the model wrote. Real fake OpenAI stream, real MongoDB."""

from __future__ import annotations

from typing import Any

from apps.storybook.pipeline import DELTA_FLUSH_S
from tests.fakes.fake_openai import split_pieces
from tests.test_storybook import app_events, openai_settings, read, story_responder

# many word-sized tokens (CJK: one per character), a paragraph break, non-ASCII punctuation
LONG_PAGE = (
    " ".join(f"Benny counts crater {i} — «ok» ✓." for i in range(1, 41))
    + "\n\n"
    + "本尼和他的狗在红色的沙丘上慢慢地走着，抬头看着两个月亮。" * 2
)


def test_a_many_token_page_is_coalesced_but_still_progressive(make_app: Any, fake_openai: Any) -> None:
    base = story_responder(fake_openai)

    def respond(body: dict[str, Any]) -> Any:
        out = base(body)
        return LONG_PAGE if isinstance(out, str) and out.startswith("Benny takes step") else out

    fake_openai.set_responder(respond)
    tokens = len(split_pieces(LONG_PAGE))
    fake_openai.stream_delay = 0.004  # ~1 s of streaming: several flush windows
    assert tokens >= 200 and tokens * fake_openai.stream_delay > 3 * DELTA_FLUSH_S

    app = make_app(**openai_settings(fake_openai))
    c = app.test_client()
    book = c.post("/storybook/books", json={"description": "Benny counts craters", "pages": 1}).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "done", kinds[-1]

    deltas = [d["delta"] for k, d in kinds if k == "page.delta" and d["page"] == 1]
    text = next(d["text"] for k, d in kinds if k == "page.text" and d["page"] == 1)
    # (a) byte-identical: the deltas join to the model's text, and so do the final and stored texts
    assert "".join(deltas) == LONG_PAGE and text == LONG_PAGE
    assert kinds[-1][1]["book"]["pages"][0]["text"] == LONG_PAGE
    # (b) the writes: page.delta events in the job's log in MongoDB, far fewer than tokens
    stored = app.extensions["services"].db.job_events.count_documents(
        {"job": book["id"], "type": "page.delta"}
    )
    assert stored == len(deltas)
    assert stored <= tokens // 8, (stored, tokens)
    # (c) still progressive: the text arrived in several pieces before the page was complete
    assert stored > 1
