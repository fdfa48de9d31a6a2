"""Benchmark: hard-negative mining, m3tune (exact and Qdrant local backends) against sentence-transformers'
`mine_hard_negatives`, on the same model, corpus, queries, rank range and relative margin.

Same work on both sides: encode the whole corpus (21,176 passages) and the queries with the tiny local
XLM-RoBERTa (CLS pooling, normalised, max 256 tokens), take the candidates at ranks [10, 200), drop those
scored above 0.95 x the positive (m3tune's threshold = ST's relative_margin 0.05), keep 7 per query. m3tune
also applies its Jaccard rule and mixes hard / semi-hard / random negatives. Each contender runs in a fresh
process with an empty embeddings cache, so wall time and peak memory (max RSS) are its own. Run:

    .venv/bin/python benchmarks/bench_mining.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MAX_LENGTH = 256
REPEATS = 3


def prepare(workdir: str) -> str:
    """A run with the corpus and the offline demo's queries; returns its root."""
    from m3tune.executor import run_step
    from m3tune.storage import open_root

    root = open_root(f"{workdir}/runs/bench")
    for step in ("ingest", "generate-queries", "generate-conceptual"):
        run_step(root, step)
    return root.uri


def peer(root_uri: str) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.util import mine_hard_negatives

    from m3tune.encoder.profiles import resolve
    from m3tune.encoder.tiny import TINY
    from m3tune.jsonl import read_records
    from m3tune.records import Passage, Query
    from m3tune.storage import open_root

    root = open_root(root_uri)
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    by_id = {p.id: p for p in passages}
    queries = [q for step in ("generate-queries", "generate-conceptual")
               for q in read_records(root.child(step), "queries.jsonl", Query)]
    t0 = time.perf_counter()
    transformer = models.Transformer(resolve(TINY), max_seq_length=MAX_LENGTH)
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "cls"),
                                         models.Normalize()], device="cpu")
    pairs = Dataset.from_dict({"anchor": [q.query for q in queries],
                               "positive": [by_id[q.positive_ids[0]].text for q in queries]})
    mined = mine_hard_negatives(pairs, model, corpus=[p.text for p in passages], range_min=10, range_max=200,
                                relative_margin=0.05, num_negatives=7, sampling_strategy="top", batch_size=64,
                                output_format="n-tuple", verbose=False)
    seconds = time.perf_counter() - t0
    negatives = sum(1 for row in mined for k, v in row.items() if k.startswith("negative") and v)
    return {"seconds": seconds, "rows": len(mined), "negatives": negatives}


def ours(root_uri: str, backend: str) -> dict:
    import torch  # noqa: F401  imported before the clock starts, as the peer's are
    import transformers  # noqa: F401

    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings, IndexConfig
    from m3tune.mining.mine import MineConfig
    from m3tune.storage import open_root

    root = open_root(root_uri)
    t0 = time.perf_counter()
    run_step(root, "index", IndexConfig(encoder=EncoderSettings(model="local:tiny-xlmr", max_length=MAX_LENGTH,
                                                                batch_size=64), backend=backend), force=True)
    manifest, _ = run_step(root, "mine-negatives", MineConfig(consistency_k=None), force=True)
    seconds = time.perf_counter() - t0
    c = manifest.counts
    return {"seconds": seconds, "rows": c["examples"], "negatives": c["hard"] + c["semi_hard"] + c["random"]}


def one(which: str, root_uri: str) -> None:
    result = peer(root_uri) if which == "sentence-transformers" else ours(root_uri, which)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "M3TUNE_CACHE": f"{workdir}/cache"}
        os.environ.update(env)
        root_uri = prepare(workdir)
        from m3tune.encoder.profiles import resolve
        from m3tune.encoder.tiny import TINY

        resolve(TINY)  # build the tiny model once, outside the timings
        print(f"python {sys.version.split()[0]}, 2 cores; corpus 21,176 passages; tiny local XLM-R, CLS, "
              f"max_length {MAX_LENGTH}\n")
        print("| miner | wall s (best of runs) | all runs s | peak RSS MB | examples | negatives |")
        print("|---|---:|---:|---:|---:|---:|")
        # The peer and the exact backend alternate, REPEATS times each (the machine is shared and noisy: the best
        # of each is the figure, all runs are shown); Qdrant local mode, much slower, runs once.
        runs: dict[str, list[dict]] = {"sentence-transformers": [], "exact": [], "qdrant": []}
        order = [w for i in range(REPEATS) for w in (("sentence-transformers", "exact") if i % 2 == 0
                                                     else ("exact", "sentence-transformers"))] + ["qdrant"]
        for i, which in enumerate(order):
            # a fresh embeddings cache for each: everyone encodes everything
            run_env = {**env, "M3TUNE_CACHE": f"{workdir}/cache-{which}-{i}"}
            subprocess.run([sys.executable, "-c", "from m3tune.encoder.profiles import resolve; resolve(\"local:tiny-xlmr\")"],
                           env=run_env, check=True)
            out = subprocess.run([sys.executable, __file__, "--one", which, root_uri], env=run_env,
                                 capture_output=True, text=True, check=True)
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for which, results in runs.items():
            best = min(results, key=lambda r: r["seconds"])
            label = {"sentence-transformers": "sentence-transformers mine_hard_negatives (peer)",
                     "exact": "m3tune index + mine-negatives, exact", "qdrant": "m3tune index + mine-negatives, Qdrant local"}[which]
            print(f"| {label} | {best['seconds']:.1f} | {', '.join('%.1f' % r['seconds'] for r in results)} | "
                  f"{max(r['peak_rss_mb'] for r in results):,.0f} | {best['rows']:,} | {best['negatives']:,} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], sys.argv[3])
    else:
        main()
