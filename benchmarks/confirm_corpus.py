"""A quality run's corpus plus every passage a second gold file cites, to evaluate that run's models on it.

    .venv/bin/python benchmarks/confirm_corpus.py RUN_ROOT FULL_PASSAGES_JSONL GOLD_JSONL OUT_JSONL

`m3tune bench quality` searches every Quran verse, a seeded sample of hadith and every hadith the test set cites
(m3tune.bench.quality.subset_passages). A gold set written later (`gold_confirm_v3.jsonl`) cites hadith that sample may
lack, and `m3tune evaluate` refuses a relevant id missing from the corpus. Re-drawing the sample with the new ids
would change the run's corpus, so this adds the missing passages to it instead, in the full corpus' order.
FULL_PASSAGES_JSONL is a full ingest (`m3tune step ingest --root R`: R/ingest/passages.jsonl).
"""

import json
import os
import sys


def main(root: str, full: str, gold: str, out: str) -> None:
    with open(f"{root}/ingest/passages.jsonl", encoding="utf-8") as f:
        have = {json.loads(line)["id"] for line in f}
    with open(gold, encoding="utf-8") as f:
        cited = {pid for line in f for pid in json.loads(line)["relevant_ids"]}
    added, kept = 0, 0
    with open(full, encoding="utf-8") as f, open(out + ".tmp", "w", encoding="utf-8") as w:
        for line in f:
            pid = json.loads(line)["id"]
            if pid in have or pid in cited:
                w.write(line)
                kept += 1
                added += pid not in have
    if kept != len(have) + added or added != len(cited - have):
        os.remove(out + ".tmp")
        sys.exit(f"{full} lacks passages the run or {gold} names: not the full ingest of the same corpus")
    os.replace(out + ".tmp", out)
    print(f"{kept:,} passages ({len(have):,} of the run, {added} more cited by {gold}) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
