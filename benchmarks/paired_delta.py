"""The fine-tuned model of two quality runs, query by query: mean change of a metric per category.

    .venv/bin/python benchmarks/paired_delta.py BEFORE/evaluate/per_query.jsonl AFTER/evaluate/per_query.jsonl [ndcg@10 [MODEL_BEFORE [MODEL_AFTER]]]

MODEL_BEFORE and MODEL_AFTER (default `run:train` both) pair two models instead, e.g. `bm25-plain bm25` with the
same file twice.

Both runs must have evaluated the same gold set. Pairs each query's `run:train` score, on the held-out part and
on all, and prints the mean change with a bootstrap 95% interval (5,000 resamples, seed 0).
"""

import json
import random
import sys


def load(path: str, model: str) -> dict[str, dict]:
    with open(path, encoding="utf-8") as f:
        rows = {r["query_id"]: r for r in map(json.loads, f) if r["model"] == model}
    if not rows:
        sys.exit(f"{path}: no query evaluated for model {model!r}")
    return rows


def main(before_path: str, after_path: str, metric: str = "ndcg@10", before_model: str = "run:train",
         after_model: str | None = None) -> None:
    before, after = load(before_path, before_model), load(after_path, after_model or before_model)
    if set(before) != set(after):
        sys.exit("the two runs evaluated different gold queries: no pairing")
    for part in ("held_out", "all"):
        deltas: dict[str, list[float]] = {}
        for qid, row in before.items():
            if part == "held_out" and not row["held_out"]:
                continue
            for key in (row["category"], "ALL"):
                deltas.setdefault(key, []).append(after[qid][metric] - row[metric])
        rng = random.Random(0)
        for category, d in sorted(deltas.items()):
            means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(5000))
            print(f"{part:8s} {category:13s} n={len(d):3d} {metric} {sum(d) / len(d):+.3f} "
                  f"[{means[124]:+.3f}, {means[4874]:+.3f}]")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5, 6):
        sys.exit(__doc__)
    main(*sys.argv[1:])
