"""Benchmark: publish's upload (points/s) against a plain `upload_points` loop, and the alias switch's time.

The same N random unit vectors of D dims with publish's payload shape (passage id, source, collection,
an Arabic text of ~200 characters, an English one) go into a fresh collection each time:

- `m3tune`: what the publish step runs, `publish.upload.present_ids` (the resume check) then
  `publish.upload.upload` (batches of 256, PARALLEL requests in flight on a server, retries);
- `upload_points`: qdrant-client's `upload_points` over the same points, batch 256, `parallel=1`
  (its parallel mode forks worker processes; the comparison is against the plain loop).

Three Qdrants: local mode (qdrant-client's in-process engine, on disk); and the loopback REST server of
the tests (tests/qdrant_server.py: that engine behind Qdrant's REST endpoints on 127.0.0.1), without and
with 5 ms added per request, standing in for a network round trip. No real Qdrant server runs here; the
loopback one serialises its engine with one lock, so a real server's gain from parallel requests (it
indexes on several cores) is larger than this one's.

The alias switch: `update_collection_aliases` (delete + create, one call) between two collections, timed
SWITCHES times, median and max.

    .venv/bin/python benchmarks/bench_publish.py                     # 21,176 points (the corpus), 256 dims
    .venv/bin/python benchmarks/bench_publish.py --points 5000 --dim 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def data(n: int, dim: int):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    payloads = [{"passage_id": f"bukhari:{i}", "source": "hadith", "collection": "bukhari",
                 "text": "حدثنا الحميدي عبد الله بن الزبير قال حدثنا سفيان " * 4, "translation_en": "Narrated " * 20}
                for i in range(n)]
    return vectors, payloads


def timed_m3tune(prod, name: str, vectors, payloads, parallel: int) -> float:
    from m3tune.publish import upload

    prod.create(name, size=vectors.shape[1], record={"alias": "bench"})
    t0 = time.perf_counter()
    there = upload.present_ids(prod, name)
    upload.upload(prod, name, vectors, payloads, [i for i in range(len(vectors)) if i not in there],
                  batch_size=256, parallel=parallel, max_retries=3, backoff=1.0)
    seconds = time.perf_counter() - t0
    assert prod.count(name) == len(vectors)
    return seconds


def timed_upload_points(prod, name: str, vectors, payloads) -> float:
    from qdrant_client import models

    prod.client.create_collection(name, vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                          distance=models.Distance.DOT))
    t0 = time.perf_counter()
    prod.client.upload_points(name, points=(models.PointStruct(id=i, vector=v.tolist(), payload=p)
                                            for i, (v, p) in enumerate(zip(vectors, payloads))),
                              batch_size=256, parallel=1, wait=True)
    seconds = time.perf_counter() - t0
    assert prod.count(name) == len(vectors)
    return seconds


def switch_times(prod, switches: int) -> list[float]:
    prod.create("switch-a", size=4, record={"alias": "bench"})
    prod.create("switch-b", size=4, record={"alias": "bench"})
    now = None
    times = []
    for i in range(switches):
        to = "switch-a" if i % 2 == 0 else "switch-b"
        times.append(prod.switch("bench-alias", to, expected=now))
        now = to
    return times


def main() -> None:
    from m3tune.publish.production import Production
    from qdrant_server import QdrantRestServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=21_176)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--switches", type=int, default=50)
    args = parser.parse_args()
    vectors, payloads = data(args.points, args.dim)
    rows = []
    for label, latency in (("local mode", None), ("loopback REST", 0.0), ("loopback REST + 5 ms", 0.005)):
        with tempfile.TemporaryDirectory() as folder:
            server = QdrantRestServer(latency=latency).__enter__() if latency is not None else None
            prod = Production(url=server.url) if server else Production(path=folder)
            try:
                ours = timed_m3tune(prod, "m3tune", vectors, payloads, args.parallel)
                plain = timed_upload_points(prod, "plain", vectors, payloads)
                switches = switch_times(prod, args.switches)
            finally:
                prod.close()
                if server:
                    server.__exit__(None, None, None)
        rows.append((label, args.points / ours, args.points / plain, statistics.median(switches), max(switches)))
        print(f"{label}: m3tune {args.points / ours:,.0f} points/s, upload_points {args.points / plain:,.0f} "
              f"points/s; switch median {statistics.median(switches) * 1000:.2f} ms, max {max(switches) * 1000:.2f} ms",
              flush=True)
    print(f"\n{args.points:,} points of {args.dim} dims, batch 256, m3tune parallel {args.parallel} (a server only)\n")
    print("| Qdrant | m3tune upload (points/s) | upload_points loop (points/s) | alias switch median / max (ms) |")
    print("|---|---|---|---|")
    for label, ours, plain, median, worst in rows:
        print(f"| {label} | {ours:,.0f} | {plain:,.0f} | {median * 1000:.2f} / {worst * 1000:.2f} |")


if __name__ == "__main__":
    main()
