"""The untrained reference of a unified run: MODEL with the sparse and ColBERT heads `train` creates for it
(`unified: true` on a base without BGE-M3's heads: seeded with the run's SEED), written as the folder `train`
would export, so `evaluate` scores the heads before training with `sparse:OUT` / `m3:OUT`.

    .venv/bin/python benchmarks/fresh_heads.py runs/e5-small-fresh-heads [--model local:e5-small]
        [--seed 42] [--max-length 128]

configs/quality-cpu-unified.yaml evaluates it beside the trained heads (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the folder to write (replaced if it exists)")
    parser.add_argument("--model", default="local:e5-small", help="the base model (default local:e5-small)")
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed (train's default 42)")
    parser.add_argument("--max-length", type=int, default=128, help="the run's passage_max_length (default 128)")
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer

    from m3tune.encoder.profiles import profile_of, resolve
    from m3tune.encoder import heads
    from m3tune.training import export

    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    hidden = int(encoder.config.hidden_size)
    sparse, colbert, source = heads.load_or_create(path, hidden, seed=args.seed)
    if source == "loaded":
        raise SystemExit(f"{args.model} has its own heads: it is its own untrained reference")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    heads.UnifiedModel(encoder, sparse, colbert, vocabulary=heads.vocabulary_digest(tokenizer)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    profile = replace(profile_of(args.model), heads=("dense", "sparse", "colbert"))
    export.write_sentence_transformers_files(tmp, hidden=hidden, max_seq_length=args.max_length, profile=profile)
    export.copy_notice(path, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{out}: {args.model} with fresh heads (seed {args.seed})")


if __name__ == "__main__":
    main()
