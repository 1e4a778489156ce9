"""The fine-tuning dataset: liked stories as chat records, written as JSONL or the original's CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .store import StoryStore


def dataset_records(store: StoryStore, *, user: str | None = None, since: Any = None) -> list[dict[str, Any]]:
    """Liked stories as chat records: system (writer role), user (the story prompt used), assistant (story)."""
    out = []
    for fb in store.positive_feedback(user=user, since=since):
        prompt = fb.get("prompt") or ""
        story = fb.get("story") or ""
        if not prompt.strip() or not story.strip():
            continue
        messages = []
        if fb.get("system"):
            messages.append({"role": "system", "content": fb["system"]})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": story}]
        out.append({"messages": messages, "id": fb["_id"], "version": fb["version"]})
    return out


def write_dataset(records: list[dict[str, Any]], out: Path, fmt: str) -> int:
    """JSONL chat records, or the original's `Prompt,Story` CSV (quoted; header first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(out, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps({"messages": rec["messages"]}, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
            writer.writerow(["Prompt", "Story"])
            for rec in records:
                msgs = rec["messages"]
                system = next((m["content"] for m in msgs if m["role"] == "system"), "")
                user = next(m["content"] for m in msgs if m["role"] == "user")
                story = next(m["content"] for m in msgs if m["role"] == "assistant")
                writer.writerow([f"{system.strip()}\n\n{user}" if system else user, story])
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (jsonl or csv)")
    return len(records)
