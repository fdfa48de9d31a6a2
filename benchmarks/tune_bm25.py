"""Choose the strong BM25's k1 and b on the development queries, never on the test set.

    .venv/bin/python benchmarks/tune_bm25.py [--corpus PASSAGES_JSONL]     # prints a markdown table

The corpus is the whole packaged one (what `m3tune step ingest` builds) unless a passages file is given.
Each (k1, b) of the grid ranks the development queries (`--dev`, default gold v4's held-out-dev; a file with
any row not tagged held-out-dev is refused, so nothing here can be chosen on the test set) over one analysis
of the corpus. The Arabic index ranks only Arabic queries and the English one only English queries, so each
index's k1 and b are chosen on its own language's development queries: the best mean nDCG@10 wins (ties:
the smaller change from bm25s's defaults). No test figure is printed: `m3tune bench quality` reports them.

The shipped k1 and b (evaluation/bm25.py) were chosen on gold_dev_v3 (seen-side rule-built queries), before
gold v4 existed; that file carries no split tags, so this script no longer reads it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

K1S = (0.3, 0.45, 0.6, 0.9, 1.2, 1.5, 1.8, 2.4)
BS = (0.3, 0.5, 0.65, 0.75, 0.9)


def main() -> None:
    from m3tune.evaluation.bm25 import BM25, DEFAULT_B, DEFAULT_K1
    from m3tune.evaluation.gold import V4_DEV, load_for_selection
    from m3tune.evaluation.metrics import mean, per_query

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="passages.jsonl (default: the packaged corpus)")
    parser.add_argument("--dev", default=V4_DEV, help=f"development gold (default {V4_DEV}); every row must be "
                        "tagged held-out-dev")
    args = parser.parse_args()
    from m3tune.errors import UserError

    try:
        load_for_selection(args.dev)  # refused before any work when it is not a development set
    except UserError as e:
        sys.exit(f"tune_bm25: {e}")
    if args.corpus:
        from m3tune.jsonl import read_jsonl
        from m3tune.records import Passage

        with open(args.corpus, "rb") as f:
            passages = list(read_jsonl(f, Passage, name=args.corpus))
    else:
        from m3tune.corpus.packaged import hadith_passages, quran_passages

        passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    ids = {p.id for p in passages}
    dev = load_for_selection(args.dev, ids)
    t0 = time.perf_counter()
    first = BM25(passages, "arabic", k1=DEFAULT_K1, b=DEFAULT_B)
    print(f"{len(passages):,} passages analyzed in {time.perf_counter() - t0:.0f} s; {len(dev)} development "
          f"queries\n")

    def ranked(k1: float, b: float, queries) -> dict:
        return BM25(passages, "arabic", k1=k1, b=b, like=first).rank(queries, 100)

    def rule(grid: dict) -> tuple[float, float]:
        return max(grid, key=lambda kb: (round(grid[kb], 4), -abs(kb[0] - DEFAULT_K1) - abs(kb[1] - DEFAULT_B)))

    runs = {kb: ranked(*kb, dev) for kb in itertools.product(K1S, BS)}
    chosen = {}
    for language in ("ar", "en"):
        queries = [q for q in dev if q.language == language]
        grid = {kb: mean(per_query(queries, run))["ndcg@10"] for kb, run in runs.items()}
        chosen[language] = best = rule(grid)
        print(f"Development nDCG@10, {language} queries ({len(queries)}; rows k1, columns b):\n")
        print("| k1 \\ b | " + " | ".join(f"{b}" for b in BS) + " |")
        print("|---|" + "---:|" * len(BS))
        for k1 in K1S:
            print(f"| {k1} | " + " | ".join(f"{grid[(k1, b)]:.4f}" for b in BS) + " |")
        print(f"\n{language}: chosen k1 {best[0]}, b {best[1]} (development nDCG@10 {grid[best]:.4f}, defaults "
              f"{grid[(DEFAULT_K1, DEFAULT_B)]:.4f})\n")

    def both(kbs: dict, queries) -> dict[str, float]:
        """Each language's queries ranked at its own (k1, b)."""
        run = {}
        for language, kb in kbs.items():
            run.update(ranked(*kb, [q for q in queries if q.language == language]))
        return per_query(queries, run)

    values = both(chosen, dev)
    categories = sorted({q.category for q in dev})
    print("| on the development set, chosen | " + " | ".join(categories) + " |")
    print("|---|" + "---:|" * len(categories))
    print("| nDCG@10 | " + " | ".join(f"{mean(values, [q.id for q in dev if q.category == c])['ndcg@10']:.4f}"
                                     for c in categories) + " |\n")


if __name__ == "__main__":
    main()
