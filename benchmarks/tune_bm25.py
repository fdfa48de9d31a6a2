"""Choose the strong BM25's k1 and b on the development queries, never on the test set.

    .venv/bin/python benchmarks/tune_bm25.py [--corpus PASSAGES_JSONL]     # prints a markdown table

The corpus is the whole packaged one (what `m3tune step ingest` builds) unless a passages file is given.
Each (k1, b) of the grid ranks the development queries (`gold_dev_v3.jsonl`, rule-built from passages no
test query uses) over one analysis of the corpus, and the best mean nDCG@10 wins (ties: the smaller
change from bm25s's defaults). The test set's figures at the chosen and at the default values are printed
after the choice, for the record; they play no part in it.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

K1S = (0.3, 0.45, 0.6, 0.9, 1.2, 1.5, 1.8, 2.4)
BS = (0.3, 0.5, 0.65, 0.75, 0.9)
DEV = Path(__file__).resolve().parents[1] / "src" / "m3tune" / "evaluation" / "data" / "gold_dev_v3.jsonl"


def main() -> None:
    from m3tune.evaluation.bm25 import BM25, DEFAULT_B, DEFAULT_K1
    from m3tune.evaluation.gold import load_gold
    from m3tune.evaluation.metrics import mean, per_query

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="passages.jsonl (default: the packaged corpus)")
    args = parser.parse_args()
    if args.corpus:
        from m3tune.jsonl import read_jsonl
        from m3tune.records import Passage

        with open(args.corpus, "rb") as f:
            passages = list(read_jsonl(f, Passage, name=args.corpus))
    else:
        from m3tune.corpus.packaged import hadith_passages, quran_passages

        passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    ids = {p.id for p in passages}
    dev, test = load_gold(str(DEV), ids), load_gold(None, ids)
    t0 = time.perf_counter()
    first = BM25(passages, "arabic", k1=DEFAULT_K1, b=DEFAULT_B)
    print(f"{len(passages):,} passages analyzed in {time.perf_counter() - t0:.0f} s; {len(dev)} development "
          f"queries, {len(test)} test queries\n")

    def score(k1: float, b: float, queries) -> dict[str, float]:
        index = BM25(passages, "arabic", k1=k1, b=b, like=first)
        return mean(per_query(queries, index.rank(queries, 100)))

    grid = {(k1, b): score(k1, b, dev) for k1, b in itertools.product(K1S, BS)}
    print("Development nDCG@10 (rows k1, columns b):\n")
    print("| k1 \\ b | " + " | ".join(f"{b}" for b in BS) + " |")
    print("|---|" + "---:|" * len(BS))
    for k1 in K1S:
        print(f"| {k1} | " + " | ".join(f"{grid[(k1, b)]['ndcg@10']:.4f}" for b in BS) + " |")
    best = max(grid, key=lambda kb: (round(grid[kb]["ndcg@10"], 4), -abs(kb[0] - DEFAULT_K1) - abs(kb[1] - DEFAULT_B)))
    print(f"\nchosen: k1 {best[0]}, b {best[1]} (development nDCG@10 {grid[best]['ndcg@10']:.4f}, defaults "
          f"{grid[(DEFAULT_K1, DEFAULT_B)]['ndcg@10']:.4f})\n")
    chosen = BM25(passages, "arabic", k1=best[0], b=best[1], like=first)
    values = per_query(dev, chosen.rank(dev, 100))
    print("| on the development set, chosen | " + " | ".join(sorted({q.category for q in dev})) + " |")
    print("|---|" + "---:|" * len({q.category for q in dev}))
    print("| nDCG@10 | " + " | ".join(f"{mean(values, [q.id for q in dev if q.category == c])['ndcg@10']:.4f}"
                                     for c in sorted({q.category for q in dev})) + " |\n")
    print("| on the test set | nDCG@10 | Recall@10 | MRR@10 |\n|---|---:|---:|---:|")
    for label, (k1, b) in (("bm25s defaults (1.5, 0.75)", (DEFAULT_K1, DEFAULT_B)), (f"chosen {best}", best)):
        m = score(k1, b, test)
        print(f"| {label} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} | {m['mrr@10']:.4f} |")


if __name__ == "__main__":
    main()
