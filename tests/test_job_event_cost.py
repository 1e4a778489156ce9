"""What a job event costs the database: the runner numbers its job's events itself, so one event is one
insert (it used to be a findAndModify on the job for the number, then the insert).

Counted with pymongo's own command monitoring (a real listener on a real client, no patching), over a
whole 2-page storybook on the fake OpenAI server, streamed to its end.
"""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import monitoring

from tests.mongo_commands import CommandLog
from tests.test_storybook import AUTH, CREDS, openai_settings, read, story_fake  # noqa: F401 - a fixture


@pytest.mark.usefixtures("story_fake")  # the fake OpenAI answers with a plan and page texts
def test_one_event_is_one_insert(make_app: Any, fake_openai: Any, db_name: str) -> None:
    counter = CommandLog(db_name)
    monitoring.register(counter)  # applies to clients created from now on: the app's
    app = make_app(**openai_settings(fake_openai), **CREDS, RATE_LIMIT_ENABLED=False)
    c = app.test_client()
    book = c.post("/storybook/books", json={"description": "a fox and a moon", "pages": 2}, headers=AUTH)
    assert book.status_code in (200, 201, 202), book.get_data(as_text=True)
    book_id = book.get_json()["id"]
    events, _ = read(c, f"/storybook/books/{book_id}/events", headers=AUTH)
    counter.active = False
    assert events and '"done"' in events[-1]["data"]

    db = app.extensions["services"].db
    stored = db.job_events.count_documents({"job": book_id})
    job = db.jobs.find_one({"_id": book_id})
    assert job["status"] == "done" and job["seq"] == stored  # the job's number is exact at the end
    seqs = [e["seq"] for e in db.job_events.find({"job": book_id}).sort("seq", 1)]
    assert seqs == list(range(1, stored + 1))  # no gap, no duplicate

    inserts = counter.counts.get(("insert", "job_events"), 0)
    numbering = counter.counts.get(("findAndModify", "jobs"), 0)
    assert inserts == stored  # one insert per event
    # numbering no longer touches the job document: findAndModify on jobs is the claim and the end only
    # (measured before this change: 18 for the same book's 17 events, one per event plus the claim)
    assert numbering <= 2, counter.counts
    print(
        f"\n{stored} events: {(inserts + numbering) / stored:.2f} event-writing commands per event; "
        f"all commands on jobs + job_events: {counter.on('job_events', 'jobs')}"
    )
