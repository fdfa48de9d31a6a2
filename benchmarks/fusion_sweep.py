"""The dev sweep of evaluate's fusion: models, as a markdown table (docs/benchmarks.md).

    python benchmarks/fusion_sweep.py runs/quality-cpu runs/quality-cpu-seed1 runs/quality-cpu-seed2 [--model fused]

Each row is one normalization (and quote-route threshold): its held-out-dev nDCG@10 (each language under
its own best weights) in each run root, the weights it chose there, and which one each root chose. Only
held-out-dev figures: the choice is made on them, and fusion.json holds no test figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", help="run roots whose evaluate/fusion.json to read")
    parser.add_argument("--model", default="fused", help="the fusion: model's name (default: fused)")
    args = parser.parse_args()
    sweeps = []
    for root in args.roots:
        path = Path(root) / "evaluate" / "fusion.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (has evaluate run with a fusion: model?)")
        data = json.loads(path.read_text(encoding="utf-8"))
        if args.model not in data:
            raise SystemExit(f"{path}: no fusion model {args.model!r} (has: {', '.join(data)})")
        sweeps.append(data[args.model])
    first = sweeps[0]
    chosen_on = first["recipe"]["chosen_on"]
    print(f"Dev set: {chosen_on.get('path')} ({chosen_on.get('rows', 'all')} rows, {chosen_on.get('queries')} "
          f"queries: {first['sweep']['queries']}); grid step {first['sweep']['step']}, depth {first['sweep']['depth']}")
    print()
    print("| normalization | " + " | ".join(f"dev nDCG@10 ({Path(r).name})" for r in args.roots)
          + " | weights ar / en (first root) |")
    print("|---|" + "---:|" * len(args.roots) + "---|")
    for name, row in first["sweep"]["normalizations"].items():
        cells = []
        for s in sweeps:
            v = s["sweep"]["normalizations"][name]
            chosen = s["sweep"]["chosen"]
            label = chosen["normalization"] + (f" + quote route at {chosen['quote_share']}"
                                               if chosen.get("quote_share") is not None else "")
            cells.append(f"{'**' if label == name else ''}{v['dev_mean']:.4f}{'**' if label == name else ''}")
        w = row["weights"]
        print(f"| {name} | " + " | ".join(cells) + f" | {w.get('ar')} / {w.get('en')} |")
    print()
    print("Bold: the root's choice. Chosen recipes:")
    for root, s in zip(args.roots, sweeps):
        r = s["recipe"]
        print(f"- {Path(root).name}: {r['normalization']}, quote route "
              f"{'off' if r.get('quote_share') is None else 'at ' + str(r['quote_share'])}, weights "
              f"(bm25, dense) {json.dumps(r['weights'])}")


if __name__ == "__main__":
    main()
