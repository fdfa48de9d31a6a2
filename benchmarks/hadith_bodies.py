"""Should the dense model read a hadith by its body? The evidence, and the held-out-dev choice (docs/benchmarks.md).

    python benchmarks/hadith_bodies.py runs/quality-cpu runs/quality-cpu-seed1 runs/quality-cpu-seed2

1. Lengths: each hadith of the first root's corpus in the encoder's tokens (e5-small's tokenizer, marks
   stripped and `passage: ` first, as m3tune's profile prepares it): whole, the chain before its body
   (m3tune.corpus.neardup.hadith_body), and the body alone, against the runs' 128-token limit.
2. Held-out-dev only (gold v4 dev, independent rows; `gold.load_for_selection` refuses any other row):
   nDCG@10 of `bilingual:` against `bilingual-body:` for the base and each root's fine-tuned model, alone and
   fused with BM25 by the recipe that root's evaluate chose for its `fused` model on dev (fusion.json), with
   the dense member swapped. No test query is read.

Vectors come from the runs' embeddings cache (EVALUATE's `embeddings_cache`), so only the bodies are encoded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CATEGORIES = ("exact", "thematic", "paraphrase", "cross_lingual")


def lengths(passages, model: str, limit: int) -> list[str]:
    import numpy as np

    from m3tune.corpus.neardup import hadith_body
    from m3tune.encoder.model import load_encoder

    from tokenizers import Tokenizer

    encoder = load_encoder(model, max_length=limit)
    # a copy of the encoder's own tokenizer, untruncated: the whole length is counted
    tokenizer = Tokenizer.from_str(encoder.tokenizer.backend_tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count(text: str, prompt: bool = True) -> int:
        from m3tune.arabic import strip_marks

        return len(tokenizer.encode(encoder.profile.prepare(text, queries=False) if prompt else strip_marks(text),
                                    add_special_tokens=prompt).ids)

    hadith = [p for p in passages if p.source == "hadith"]
    whole = np.array([count(p.text) for p in hadith])
    told = [(p, b) for p in hadith if (b := hadith_body(p)) is not None]
    chain = np.array([count(p.text[:len(p.text) - len(b)], prompt=False) for p, b in told])
    body = np.array([count(b) for _, b in told])
    verses = np.array([count(p.text) for p in passages if p.source == "quran"])
    row = "| {} | {:,} | {:.0f} | {:.0f} | {:.0%} |"
    return ["| text | n | median tokens | p90 | over %d |" % limit, "|---|---:|---:|---:|---:|",
            row.format("hadith, whole", len(whole), np.median(whole), np.percentile(whole, 90), (whole > limit).mean()),
            row.format("hadith with a body: its chain", len(chain), np.median(chain), np.percentile(chain, 90),
                       (chain > limit).mean()),
            row.format("hadith with a body: the body", len(body), np.median(body), np.percentile(body, 90),
                       (body > limit).mean()),
            row.format("verse", len(verses), np.median(verses), np.percentile(verses, 90), (verses > limit).mean()),
            f"\n{len(hadith) - len(told):,} hadith have no body the rule finds (no quotation mark, or under 8 words)."]


def dev_rows(root_path: str, *, base_model: str, max_length: int, cache: str) -> list[tuple[str, dict]]:
    from m3tune.corpus.passages import read_passages
    from m3tune.evaluation import fusion, metrics
    from m3tune.evaluation.gold import load_for_selection
    from m3tune.evaluation.models import EncodeOptions, parse_model, rank_model
    from m3tune.evaluation.step import quote_shares
    from m3tune.storage import open_store

    root = open_store(str(Path(root_path).resolve()))
    passages = read_passages(root)
    dev = load_for_selection("packaged:gold_v4_dev.jsonl", {p.id for p in passages})
    options = EncodeOptions(max_length=max_length, embeddings_cache=cache)
    lexical: dict = {}
    runs = {}
    for text in ("bm25", "bilingual:base", "bilingual-body:base", "bilingual:run:train", "bilingual-body:run:train"):
        spec = parse_model(text, base_model)
        runs[text] = (spec, rank_model(spec, dev, passages, k=100, dims=(), options=options, root=root,
                                       bm25=lexical).runs[None])
    chosen = json.loads(root.child("evaluate").read_bytes("fusion.json"))["fused"]["recipe"]
    languages = {g.id: g.language for g in dev}
    out = [(name, metrics.per_query(dev, run)) for name, (_, run) in runs.items() if name != "bm25"]
    for dense in ("bilingual:run:train", "bilingual-body:run:train"):
        kinds = ["bm25", runs[dense][0].kind]
        recipe = fusion.Recipe.from_json({**chosen, "members": ["bm25", dense], "kinds": kinds})
        shares = quote_shares(dev, runs, ["bm25", dense], kinds, lexical["arabic"])
        fused = fusion.fuse(recipe, [runs["bm25"][1], runs[dense][1]], languages, shares)
        out.append((f"fused: bm25 + {dense}", metrics.per_query(dev, fused)))
    independent = [g for g in dev if g.independent]
    rows = []
    for name, values in out:
        def mean(qs):
            return sum(values[g.id]["ndcg@10"] for g in qs) / len(qs)
        rows.append((name, {"all": mean(independent), "hadith": mean([g for g in independent if g.source == "hadith"]),
                            **{c: mean([g for g in independent if g.category == c]) for c in CATEGORIES}}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", help="run roots of make quality (one per training seed)")
    parser.add_argument("--base-model", default="local:e5-small")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cache", default="runs/embeddings-cache", help="the runs' embeddings cache")
    args = parser.parse_args()
    from m3tune.corpus.passages import read_passages
    from m3tune.storage import open_store

    print("\n".join(lengths(read_passages(open_store(str(Path(args.roots[0]).resolve()))), args.base_model,
                            args.max_length)))
    table: dict[str, list[dict]] = {}
    for root in args.roots:
        for name, row in dev_rows(root, base_model=args.base_model, max_length=args.max_length, cache=args.cache):
            table.setdefault(name, []).append(row)
    columns = ("all", "hadith", *CATEGORIES)
    print(f"\nHeld-out-dev, independent rows, nDCG@10, mean of {len(args.roots)} root(s) (base rows: one model)\n")
    print("| system | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(f"{sum(r[c] for r in rows) / len(rows):.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
