"""Per-query results of several quality runs in one file, and their mean per configuration over training seeds.

    .venv/bin/python benchmarks/seed_mean.py OUT.jsonl CONFIG/SEED=PER_QUERY.jsonl[:MODEL] ...

Each argument names a run (`now/s42`) and its evaluate output (`ROOT/evaluate/per_query.jsonl`), reading the
rows of MODEL (default `run:train`). OUT gets each run's rows under its name and, per CONFIG, rows named
`CONFIG/mean`: each query's nDCG@10 and Recall@10 averaged over that configuration's runs. At 80 CPU steps one
run's category means move by a few hundredths with the training seed alone, so a comparison of single runs
mixes that spread into the bootstrap interval over queries; the means leave less of it in. Compare with
`benchmarks/paired_delta.py OUT OUT ndcg@10 before/mean now/mean`.
"""

import json
import os
import sys
from collections import defaultdict

KEEP = ("query_id", "category", "held_out", "ndcg@10", "recall@10")
METRICS = ("ndcg@10", "recall@10")


def main(out: str, runs: list[str]) -> None:
    rows: list[dict] = []
    by_config: dict[str, list[dict[str, dict]]] = defaultdict(list)
    for spec in runs:
        name, _, path = spec.partition("=")
        path, _, model = path.partition(":")
        if not path or "/" not in name:
            sys.exit(f"{spec!r}: expected CONFIG/SEED=PER_QUERY.jsonl[:MODEL]")
        with open(path, encoding="utf-8") as f:
            got = {r["query_id"]: r for r in map(json.loads, f) if r["model"] == (model or "run:train")}
        if not got:
            sys.exit(f"{path}: no rows for model {model or 'run:train'!r}")
        rows += [{"model": name, **{k: r[k] for k in KEEP}} for r in got.values()]
        by_config[name.split("/")[0]].append(got)
    for config, results in by_config.items():
        if any(set(r) != set(results[0]) for r in results):
            sys.exit(f"{config}: its runs evaluated different queries")
        for qid, first in results[0].items():
            mean = {m: sum(r[qid][m] for r in results) / len(results) for m in METRICS}
            rows.append({"model": f"{config}/mean", **{k: first[k] for k in KEEP if k not in METRICS}, **mean})
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(out + ".tmp", out)
    print(f"{len(rows):,} rows ({len(runs)} runs, {len(by_config)} configurations) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
