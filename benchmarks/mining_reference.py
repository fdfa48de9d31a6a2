"""Negatives per query type under each positive-aware reference and threshold, on a finished run's index.

    .venv/bin/python benchmarks/mining_reference.py RUN_ROOT lowest@0.95 median@0.95 median@0.98 ...

Calls `m3tune.mining.mine.mine` with the run's mine-negatives config, only `positive_reference` and
`threshold` overridden; prints what the rule dropped and, per query type, the share of examples left with no
negative, the mean pool size and the mean number of hard negatives. Writes nothing.
"""

import collections
import json
import statistics
import sys

from m3tune.corpus.passages import read_passages
from m3tune.mining.mine import load_queries, mine
from m3tune.runroot import open_root


def main(root_uri: str, variants: list[str]) -> None:
    root = open_root(root_uri)
    config = json.loads(root.child("mine-negatives").read_bytes("_manifest.json"))["config"]
    passages, queries = read_passages(root), load_queries(root)
    for variant in variants:
        reference, threshold = variant.split("@")
        examples, counts, _ = mine(root, queries, passages,
                                   **{**config, "positive_reference": reference, "threshold": float(threshold)})
        dropped = counts["dropped"].get("positive_aware", 0)
        print(f"{variant}: {dropped / counts['candidates']:.0%} of {counts['candidates']:,} candidates dropped as "
              f"too close; hard {counts['hard']:,}, semi-hard {counts['semi_hard']:,}, random {counts['random']:,}")
        kinds = collections.defaultdict(list)
        for e in examples:
            kinds[e.type].append(e.neg_kinds or [])
        for qtype, pools in sorted(kinds.items()):
            sizes = [len(p) for p in pools]
            print(f"  {qtype:10s} {len(pools):5d} examples: {sum(n == 0 for n in sizes) / len(sizes):.0%} with no "
                  f"negative, mean {statistics.mean(sizes):.1f}, hard {statistics.mean(p.count('hard') for p in pools):.1f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
