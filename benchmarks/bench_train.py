"""Training throughput on CPU: m3tune's loop against sentence-transformers' trainer (MultipleNegativesRankingLoss
in MatryoshkaLoss), same model, real Quran and Bukhari pairs, texts, batch, lengths, steps and dims.

    .venv/bin/python benchmarks/bench_train.py [--model local:e5-small] [--batch 16] [--steps 10]
        [--max-length 256] [--rounds 2] [--threads 1] [--option length_group=0]
        [--variant length_group=0]

Each contender runs in a fresh process, in turn, ROUNDS times; see m3tune.bench.train for what is
measured. The GPU counterpart is `m3tune bench train --gpu`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from m3tune.bench.train import compare_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="local:e5-small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both processes")
    parser.add_argument("--option", action="append", default=[], metavar="FIELD=JSON",
                        help="a TrainConfig field for m3tune's run, e.g. length_group=0")
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=JSON[,FIELD=JSON]",
                        help="one more m3tune run in the rotation with these fields, e.g. freeze_embeddings=true")
    args = parser.parse_args()
    import sentence_transformers
    import torch

    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    variants = {v: {k: json.loads(x) for k, x in (f.split("=", 1) for f in v.split(","))} for v in args.variant}
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="m3tune-bench-train-") as tmp:
        result = compare_cpu(workdir=Path(tmp), model=args.model, batch=args.batch, steps=args.steps,
                             max_length=args.max_length, rounds=args.rounds, options=options,
                             variants=variants, threads=args.threads)
    result["started"] = started
    result["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "sentence-transformers": sentence_transformers.__version__}
    print(json.dumps(result, indent=2))
    for name, runs in result["runs"].items():
        for r in runs:
            print(f"| {name} | {r['seconds']:.1f} | {r['examples_per_s']:.2f} | {r['steady_examples_per_s']:.2f} | "
                  f"{r['rss_before_clock_mb']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    print(f"speed ratio (m3tune / peer, medians) {result['speed_ratio']:.2f}x, steps after the first "
          f"{result['steady_speed_ratio']:.2f}x, memory ratio {result['memory_ratio']:.2f}x")


if __name__ == "__main__":
    main()
