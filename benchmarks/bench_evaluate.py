"""Benchmark: dense evaluation over the full corpus with the tiny encoder on CPU, and a full compare-all.

1. Dense: the tiny local XLM-RoBERTa (max 256 tokens, batch 64, as the demo) over the whole corpus
   (21,176 passages) and the packaged gold set: corpus encoding (empty embeddings cache), then
   queries/second for what a query costs (encode + exact search at full size and at 2 Matryoshka
   sizes), measured on the gold queries repeated to 850.
2. Compare-all on the demo models: base (tiny), bm25 and hybrid:base, plus a fine-tuned model folder
   when one is given (`--tuned PATH`), everything through `run_evaluation` as the step runs it: once
   with an empty embeddings cache (cold) and once again (warm: nothing re-encoded).

    .venv/bin/python benchmarks/bench_evaluate.py --corpus runs/demo-tiny/ingest/passages.jsonl [--tuned runs/X/train/model]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="runs/demo-tiny/ingest/passages.jsonl")
    parser.add_argument("--tuned", default=None, help="a fine-tuned model folder to add to the comparison")
    args = parser.parse_args()

    from m3tune.encoder.model import load_encoder
    from m3tune.evaluation.gold import load_gold
    from m3tune.evaluation.models import dense_rank
    from m3tune.evaluation.step import EvaluateConfig, run_evaluation
    from m3tune.jsonl import read_jsonl
    from m3tune.records import GoldQuery, Passage

    with open(args.corpus, "rb") as f:
        passages = list(read_jsonl(f, Passage, name=args.corpus))
    gold = load_gold(None, {p.id for p in passages})
    encoder = load_encoder("local:tiny-xlmr", max_length=256, batch_size=64)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        cold = dense_rank(encoder, gold, passages, k=100, dims=[16, 8], cache_uri=cache)
        wall = time.perf_counter() - t0
        many = [GoldQuery(**{**g.model_dump(), "id": f"{g.id}#{i}", "query": f"{g.query} {i}"})
                for i in range(10) for g in gold]  # distinct texts: none comes from the cache
        t1 = time.perf_counter()
        warm = dense_rank(encoder, many, passages, k=100, dims=[16, 8], cache_uri=cache)
        per_query = time.perf_counter() - t1
    print(json.dumps({"passages": len(passages), "corpus_encode_s": round(cold.seconds["encode_passages"], 2),
                      "first_run_wall_s": round(wall, 2), "queries": len(many),
                      "query_encode_s": round(warm.seconds["encode_queries"], 3),
                      "search_s_3_sizes": round(warm.seconds["search"], 3),
                      "queries_per_second": round(len(many) / per_query, 1)}))

    models = ["base", "bm25", "hybrid:base"] + ([f"tuned={args.tuned}"] if args.tuned else [])
    with tempfile.TemporaryDirectory() as cache:
        config = EvaluateConfig(base_model="local:tiny-xlmr", max_length=256, batch_size=64, models=models,
                                dims=[32, 16, 8], embeddings_cache=cache)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            files = run_evaluation(passages, config)
            seconds = time.perf_counter() - t0
            results = json.loads(files["results.json"])
            print(json.dumps({"compare_all": label, "models": models, "seconds": round(seconds, 2),
                              "per_model_s": {m["name"]: m["seconds"]["total"] for m in results["models"]},
                              "recall@10": {m["name"]: round(m["overall"]["recall@10"], 3) for m in results["models"]}}))
    if not args.tuned:
        print("no fine-tuned model given (--tuned PATH): compare-all timed on base, bm25 and hybrid only")


if __name__ == "__main__":
    main()
