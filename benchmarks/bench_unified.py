"""The cost of a unified BGE-M3 step (dense + sparse + ColBERT, self-distillation) against a dense-only step.

    PYTHONPATH=src python benchmarks/bench_unified.py --model local:e5-small --batch-size 8 --steps 5

Each variant runs in a fresh process on the same real Quran batches (m3tune.bench.train's pairs): the
training loop's own pieces (collate, encode / encode_unified, matryoshka_info_nce / unified_info_nce,
backward, fused AdamW), one warm-up step, then STEPS timed steps; peak memory is the process's max RSS
(CPU) or torch's peak allocation (CUDA). The variants run in the order dense, unified, unified, dense.
Prints one JSON line per run and a markdown table of the means.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(variant: str, args) -> dict:
    import random

    import torch
    from transformers import AutoModel, AutoTokenizer

    from m3tune.encoder.model import FastTokenize
    from m3tune.encoder.profiles import profile_of, resolve
    from m3tune.encoder import heads
    from m3tune.training.data import collate, read_examples
    from m3tune.training.loss import Unified, encode, encode_unified, matryoshka_info_nce, unified_info_nce
    from m3tune.runroot import open_root

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    hidden = int(model.config.hidden_size)
    dims = [d for d in (hidden, hidden // 2, hidden // 4) if d >= 8]
    profile = profile_of(args.model)
    if variant == "unified":
        sparse, colbert, _ = heads.load_or_create(path, hidden, seed=0)
        model = heads.UnifiedModel(model, sparse, colbert)
        settings = Unified(temperatures=(0.02,) * 3, special_ids=tuple(heads.special_ids(tokenizer)))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    examples = read_examples(open_root(args.root).child("combine"), "train.jsonl")
    fast = FastTokenize(tokenizer)
    rng = random.Random(0)
    times, tokens = [], 0
    for step in range(args.steps + 1):
        idx = rng.sample(range(len(examples)), args.batch_size)
        b = collate([examples[i] for i in idx], idx, fast, negatives=args.negatives, seed=0, epoch=step,
                    query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
                    profile=profile)
        q_tok = {k: v.to(device) for k, v in b.queries.items()}
        p_tok = {k: v.to(device) for k, v in b.passages.items()}
        keys = dict(pos_keys=b.pos_keys.to(device), col_keys=b.col_keys.to(device), col_valid=b.col_valid.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if variant == "unified":
            loss, _ = unified_info_nce(encode_unified(model, q_tok, profile.pooling),
                                       encode_unified(model, p_tok, profile.pooling), q_tokens=q_tok, p_tokens=p_tok,
                                       **keys, dims=dims, weights=[1.0] * len(dims), settings=settings,
                                       cross_device=False)
        else:
            loss, _ = matryoshka_info_nce(encode(model, q_tok, profile.pooling), encode(model, p_tok, profile.pooling),
                                          **keys, dims=dims, weights=[1.0] * len(dims), temperature=0.02,
                                          cross_device=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
            tokens += int(b.queries["attention_mask"].sum() + b.passages["attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "model": args.model, "device": str(device), "threads": torch.get_num_threads(),
            "batch": args.batch_size, "texts_per_step": args.batch_size * (2 + args.negatives),
            "s_per_step": sum(times) / len(times), "tokens_per_s": tokens / sum(times), "peak_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="local:e5-small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--query-max-length", type=int, default=32)
    parser.add_argument("--passage-max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=["dense", "unified"], help="run one variant here (internal)")
    parser.add_argument("--root", help="a run root holding combine/train.jsonl (internal)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args)))
        return
    from m3tune.bench.train import prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "root")
        prepare(root, n_train=256, n_val=8)
        runs = []
        # A B B A: a machine whose load drifts during the runs weighs on both variants alike
        for variant in ("dense", "unified", "unified", "dense"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--root", root],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    rows = []
    for variant in ("dense", "unified"):
        mine = [r for r in runs if r["variant"] == variant]
        rows.append({"variant": variant, **{k: sum(r[k] for r in mine) / len(mine)
                                            for k in ("s_per_step", "tokens_per_s")},
                     "peak_mb": max(r["peak_mb"] for r in mine)})
    print("\n| step (mean of 2 runs) | s/step | tokens/s | peak memory (MB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} |")
    d, u = rows
    print(f"\nunified / dense: time x{u['s_per_step'] / d['s_per_step']:.2f}, peak memory "
          f"x{u['peak_mb'] / d['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
