"""How far the int8 encoder (`dtype: int8`) is from the fp32 one on real text: encode a seeded sample of a
run's passages and queries with both (ONNX Runtime on CPU, the same export, one quantized), then report the
time of each, the cosine of each text's two vectors, the overlap of each query's top 10 and top 200 passages,
and the difference of the query-passage scores.

    PYTHONPATH=src .venv/bin/python benchmarks/int8_agreement.py RUN [--model local:e5-small]
        [--passages 1500] [--queries 300] [--max-length 128]

RUN: a run root with ingest's passages.jsonl and generate-queries' queries.jsonl (e.g. a quality run).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--model", default="local:e5-small")
    parser.add_argument("--passages", type=int, default=1500)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    from m3tune.encoder.model import Encoder
    from m3tune.jsonl import read_records
    from m3tune.records import Passage, Query
    from m3tune.runroot import open_root

    root = open_root(args.run)
    passages = [p.text for p in read_records(root.child("ingest"), "passages.jsonl", Passage)]
    queries = [q.query for q in read_records(root.child("generate-queries"), "queries.jsonl", Query)]
    passages = random.Random(0).sample(passages, min(args.passages, len(passages)))
    queries = random.Random(1).sample(queries, min(args.queries, len(queries)))
    vectors = {}
    for dtype in ("fp32", "int8"):
        encoder = Encoder(args.model, dtype=dtype, max_length=args.max_length, batch_size=64)
        t0 = time.perf_counter()
        vectors[dtype] = encoder.encode(passages), encoder.encode(queries, queries=True)
        print(f"{dtype}: {len(passages):,} passages + {len(queries):,} queries in {time.perf_counter() - t0:.1f} s")
    (p32, q32), (p8, q8) = vectors["fp32"], vectors["int8"]
    cp, cq = (p32 * p8).sum(1), (q32 * q8).sum(1)
    print(f"cosine int8 / fp32: passages min {cp.min():.4f} mean {cp.mean():.4f}; queries min {cq.min():.4f} "
          f"mean {cq.mean():.4f}")
    s32, s8 = q32 @ p32.T, q8 @ p8.T
    for k in (10, 200):
        a, b = np.argsort(-s32, axis=1)[:, :k], np.argsort(-s8, axis=1)[:, :k]
        print(f"top {k}: shared with fp32's {np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]):.3f}")
    print(f"query-passage scores: mean |difference| {np.abs(s32 - s8).mean():.4f}, max {np.abs(s32 - s8).max():.4f}")


if __name__ == "__main__":
    main()
