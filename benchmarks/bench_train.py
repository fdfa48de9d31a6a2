"""Training throughput on CPU: m3tune's loop against sentence-transformers' trainer
(MultipleNegativesRankingLoss in MatryoshkaLoss), same tiny model, real Quran pairs, batch, steps.

    .venv/bin/python benchmarks/bench_train.py [--batch 32] [--steps 30]

Each contender runs in a fresh process; see m3tune.training.bench for what is
measured. The GPU counterpart is `m3tune bench train --gpu`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from m3tune.training.bench import compare_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import sentence_transformers
    import torch

    with tempfile.TemporaryDirectory(prefix="m3tune-bench-train-") as tmp:
        result = compare_cpu(workdir=Path(tmp), batch=args.batch, steps=args.steps)
    result["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "sentence-transformers": sentence_transformers.__version__}
    print(json.dumps(result, indent=2))
    for name, r in result["results"].items():
        print(f"| {name} | {r['seconds']:.1f} | {r['examples_per_s']:.1f} | {r['steps_only_examples_per_s']:.1f} | "
              f"{r['rss_before_clock_mb']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    print(f"speed ratio (m3tune / peer) {result['speed_ratio']:.2f}x, memory ratio {result['memory_ratio']:.2f}x")


if __name__ == "__main__":
    main()
