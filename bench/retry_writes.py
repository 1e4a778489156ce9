"""What retryable writes cost on the embedded database (why its URI turns them off).

    python bench/retry_writes.py [--writes 12000]

Starts the embedded MongoDB and updates one document `--writes` times with `retryWrites=true`, then
the same on another collection with `retryWrites=false`, and prints the time per update for each
thousand, side by side, from one run. secantusdb keeps every retryable write's reply (up to 10,000,
for 30 minutes) and scans that table on each one, so with them the cost grows with the writes made.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def per_thousand(uri: str, collection: str, writes: int) -> list[float]:
    """ms per update for each block of 1,000 updates."""
    from pymongo import MongoClient

    with MongoClient(uri) as client:
        col = client["bench_retry_writes"][collection]
        col.insert_one({"_id": 0, "n": 0})
        blocks, start = [], time.perf_counter()
        for i in range(1, writes + 1):
            col.update_one({"_id": 0}, {"$inc": {"n": 1}})
            if i % 1000 == 0:
                now = time.perf_counter()
                blocks.append(now - start)  # seconds per 1,000 = ms per update
                start = now
        return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=12_000)
    args = parser.parse_args()
    from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo

    with tempfile.TemporaryDirectory(prefix="bench-retry-") as tmpdir:
        mongo = ensure_embedded_mongo(Path(tmpdir) / "mongo")
        try:
            on = per_thousand(mongo.uri.replace("retryWrites=false", "retryWrites=true"), "on", args.writes)
            off = per_thousand(mongo.uri, "off", args.writes)
        finally:
            stop_embedded_mongo(Path(tmpdir) / "mongo")
    print(f"bench/retry_writes.py  {args.writes} updates of one document per setting, embedded secantusdb")
    print(
        f"{'updates':>13} {'retryWrites=true':>18} {'retryWrites=false':>18} {'ratio':>7}   (ms per update)"
    )
    for k, (a, b) in enumerate(zip(on, off, strict=True)):
        print(f"{k * 1000 + 1:>6}-{(k + 1) * 1000:<6} {a:>18.2f} {b:>18.2f} {a / b:>7.1f}")


if __name__ == "__main__":
    main()
