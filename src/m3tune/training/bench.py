"""Training throughput: m3tune's loop against sentence-transformers' trainer on CPU, and MFU at BGE-M3 size
on a GPU.

CPU (`m3tune bench train`): the same tiny model, the same real Quran pairs,
batch, steps, Matryoshka dims and temperature; each contender runs in a
fresh process (imports excluded from its clock; peak memory is the process's
max RSS). The peer is SentenceTransformerTrainer with MultipleNegativesRankingLoss
(scale = 1 / temperature, its hard-negative columns) wrapped in MatryoshkaLoss,
and the no-duplicates batch sampler.

GPU (`m3tune bench train --gpu`): the full BGE-M3 architecture (XLM-RoBERTa
large, 24 layers, 1024 wide, 250,002-token vocabulary) with random weights —
nothing can be downloaded — trained for a few steps on random token ids at
sequence length 512 in bf16: tokens/second, and model FLOPs utilisation
(6 x non-embedding parameters + 12 x layers x width x sequence per token,
against the card's dense bf16 peak).
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# dense bf16 peak, TFLOP/s, by device name fragment (vendor datasheets)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def quran_examples(passages, rng: random.Random, n: int) -> list[dict]:
    """N Example rows from real verses: the query is the English translation (every 4th) or the first
    eight Arabic words; the negatives three other verses of the same surah and one random verse."""
    from m3tune.records import Example

    by_surah: dict[str, list] = {}
    for p in passages:
        by_surah.setdefault(p.id.split(":")[1], []).append(p)
    chosen = rng.sample([p for p in passages if p.translation_en and len(p.text.split()) >= 10
                         and len(by_surah[p.id.split(":")[1]]) > 4], n)
    rows = []
    for i, p in enumerate(chosen):
        negs = rng.sample([q for q in by_surah[p.id.split(":")[1]] if q.id != p.id], 3)
        negs += [q for q in rng.sample(passages, 1) if q.id != p.id and q not in negs]
        if i % 4 == 1:
            query, language, kind = " ".join(p.translation_en.split()[:16]), "en", "question"
        else:
            query, language, kind = " ".join(p.text.split()[:8]), "ar", "exact"
        rows.append(Example(query=query, pos=[p.text], pos_ids=[p.id], neg=[n.text for n in negs],
                            neg_ids=[n.id for n in negs], query_id=f"{p.id}/{language}", language=language,
                            type=kind, source="quran").model_dump(mode="json", exclude_none=True))
    return rows


def prepare(root_uri: str, *, n_train: int, n_val: int, seed: int = 7) -> None:
    """Ingest the Quran into ROOT and write combine/train.jsonl and validation.jsonl from it."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.passages import read_passages
    from m3tune.executor import run_step
    from m3tune.jsonl import write_jsonl
    from m3tune.storage import open_root

    root = open_root(root_uri)
    run_step(root, "ingest", IngestConfig(sources=["quran"]))
    rows = quran_examples(read_passages(root), random.Random(seed), n_train + n_val)
    for name, part in (("train.jsonl", rows[:n_train]), ("validation.jsonl", rows[n_train:])):
        with write_jsonl(root.child("combine"), name) as w:
            w.write_all(part)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_m3tune(root_uri: str, *, model: str, batch: int, steps: int, dims: list[int], temperature: float,
               max_length: int, negatives: int, workdir: str) -> dict[str, Any]:
    from m3tune.training import loop
    from m3tune.training.config import TrainConfig

    config = TrainConfig(model=model, dims=dims, temperature=temperature, batch_size=batch, gradient_accumulation=1,
                         max_steps=steps, epochs=100, eval_every=10**6, checkpoint_every=10**6, negatives=negatives,
                         query_max_length=max_length, passage_max_length=max_length, learning_rate=1e-4,
                         patience=None, validation_corpus="validation")  # bench.prepare writes no ingest
    # Like the peer's clock (its model and dataset are built before it), ours starts once the model is
    # loaded; it still covers our validation before and after training and the final checkpoint.
    session = loop.setup(config, root_uri=root_uri, work=Path(workdir))
    rss_loaded = _peak_rss_mb()
    t0 = time.perf_counter()
    loop.train(session)
    loop.save(session)
    seconds = time.perf_counter() - t0
    loop.cleanup(session)
    step_seconds = sum(batch / h["examples_per_s"] for h in session.history if h["kind"] == "train")
    return {"seconds": seconds, "examples_per_s": batch * steps / seconds, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_clock_mb": rss_loaded, "steps_only_examples_per_s": batch * steps / step_seconds}


def run_sentence_transformers(root_uri: str, *, model: str, batch: int, steps: int, dims: list[int],
                              temperature: float, max_length: int, negatives: int, workdir: str) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, \
        SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers.training_args import BatchSamplers

    from m3tune.encoder.profiles import resolve
    from m3tune.storage import open_root

    rows = [json.loads(line) for line in open_root(root_uri).child("combine").read_bytes("train.jsonl").splitlines()]
    rows = [r for r in rows if len(r["neg"]) >= negatives]
    columns = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
    for k in range(negatives):
        columns[f"negative_{k + 1}"] = [r["neg"][k] for r in rows]
    dataset = Dataset.from_dict(columns)
    transformer = Transformer(resolve(model), max_seq_length=max_length)
    st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_word_embedding_dimension(), "cls"),
                                      Normalize()], device="cpu")
    loss = MatryoshkaLoss(st, MultipleNegativesRankingLoss(st, scale=1 / temperature), matryoshka_dims=dims)
    args = SentenceTransformerTrainingArguments(
        output_dir=workdir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        warmup_ratio=0.1, lr_scheduler_type="cosine", weight_decay=0.01, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", logging_steps=10**6, report_to=[], use_cpu=True, seed=42, dataloader_drop_last=True,
        disable_tqdm=True)
    rss_loaded = _peak_rss_mb()
    t0 = time.perf_counter()
    output = SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset, loss=loss).train()
    st.save(str(Path(workdir) / "model"))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples_per_s": batch * steps / seconds, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_clock_mb": rss_loaded,
            "steps_only_examples_per_s": batch * steps / output.metrics["train_runtime"]}


def compare_cpu(*, workdir: Path, model: str = "local:tiny-xlmr", batch: int = 32, steps: int = 30,
                dims: tuple[int, ...] = (32, 16, 8), temperature: float = 0.05, max_length: int = 64,
                negatives: int = 3, n_train: int = 1200, n_val: int = 32) -> dict[str, Any]:
    """Both contenders, each in a fresh process, on the same data: their figures and the ratios."""
    root = str(workdir / "runs" / "bench")
    prepare(root, n_train=n_train, n_val=n_val)
    common = dict(model=model, batch=batch, steps=steps, dims=list(dims), temperature=temperature,
                  max_length=max_length, negatives=negatives)
    results = {}
    for name in ("sentence-transformers", "m3tune"):
        args = dict(common, workdir=str(workdir / f"work-{name}"))
        code = ("import json, sys; from m3tune.training import bench; "
                f"print('RESULT ' + json.dumps(bench.{'run_m3tune' if name == 'm3tune' else 'run_sentence_transformers'}"
                f"({root!r}, **json.loads(sys.argv[1]))))")
        out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    ours, peer = results["m3tune"], results["sentence-transformers"]
    return {"settings": dict(common, n_train=n_train), "results": results,
            "speed_ratio": ours["examples_per_s"] / peer["examples_per_s"],
            "memory_ratio": ours["peak_rss_mb"] / peer["peak_rss_mb"]}


def gpu_throughput(*, batch: int = 8, seq: int = 512, steps: int = 10, warmup: int = 3,
                   gradient_checkpointing: bool = False, peak_tflops: float | None = None) -> dict[str, Any]:
    """Train steps of a random-weight BGE-M3-sized encoder on BATCH queries + BATCH passages of SEQ tokens."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from m3tune.training.loss import encode, matryoshka_info_nce

    if not torch.cuda.is_available():
        from m3tune.errors import UserError

        raise UserError("bench train --gpu needs a CUDA device; without one, `m3tune bench train` compares on CPU")
    device = torch.device("cuda")
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = XLMRobertaModel(config, add_pooling_layer=False).to(device).train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def tokens():
        ids = torch.randint(5, 250000, (batch, seq), device=device, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    keys = torch.arange(batch, device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, p = encode(model, tokens()), encode(model, tokens())
        loss, _ = matryoshka_info_nce(q, p, pos_keys=keys[:, None], col_keys=keys,
                                      col_valid=torch.ones(batch, dtype=torch.bool, device=device),
                                      dims=[1024, 512, 256, 128], weights=[1, 1, 1, 1], temperature=0.02,
                                      cross_device=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = 2 * batch * seq * steps / seconds
    flops_per_token = 6 * (params - embedding) + 12 * config.num_hidden_layers * config.hidden_size * seq
    name = torch.cuda.get_device_name()
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return {"device": name, "parameters": params, "batch": f"{batch} queries + {batch} passages", "seq": seq,
            "gradient_checkpointing": gradient_checkpointing, "tokens_per_s": tokens_per_s,
            "model_tflops": tokens_per_s * flops_per_token / 1e12, "peak_tflops": peak,
            "mfu": tokens_per_s * flops_per_token / (peak * 1e12) if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
