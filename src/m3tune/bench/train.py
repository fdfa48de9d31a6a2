"""Training throughput: m3tune's loop against sentence-transformers' trainer on CPU, and MFU at BGE-M3 size
on a GPU.

CPU (`m3tune bench train`): the same model (default multilingual-e5-small),
the same real Quran and Bukhari pairs (passages of very different lengths),
the same texts (the model's prompts), pooling, batch, steps, Matryoshka dims
and temperature; each contender runs in a fresh process (imports excluded
from its clock; peak memory is the process's max RSS). The peer is SentenceTransformerTrainer with MultipleNegativesRankingLoss
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
import shutil
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


def quran_hadith_examples(passages, rng: random.Random, n: int) -> list[dict]:
    """N Example rows from real verses and Bukhari hadith, so passage lengths vary as in production (a verse
    is ~24 tokens without marks, a hadith ~110, the longest past 512): a verse's query as in quran_examples, a
    hadith's ten words from the middle of its text (past the chain of narrators); the negatives three other
    passages of the same surah or book and one random passage."""
    from m3tune.records import Example

    def group(p) -> str:
        return f"surah {p.meta['surah']}" if p.source == "quran" else f"{p.collection} {p.meta.get('book_number')}"

    groups: dict[str, list] = {}
    for p in passages:
        groups.setdefault(group(p), []).append(p)
    chosen = rng.sample([p for p in passages if len(p.text.split()) >= 10 and len(groups[group(p)]) > 4
                         and (p.source != "quran" or p.translation_en)], n)
    rows = []
    for i, p in enumerate(chosen):
        negs = rng.sample([q for q in groups[group(p)] if q.id != p.id], 3)
        negs += [q for q in rng.sample(passages, 1) if q.id != p.id and q not in negs]
        words = p.text.split()
        if p.source == "quran" and i % 4 == 1:
            query, language, kind = " ".join(p.translation_en.split()[:16]), "en", "question"
        elif p.source == "quran":
            query, language, kind = " ".join(words[:8]), "ar", "exact"
        else:
            query, language, kind = " ".join(words[len(words) // 2:len(words) // 2 + 10]), "ar", "exact"
        rows.append(Example(query=query, pos=[p.text], pos_ids=[p.id], neg=[n.text for n in negs],
                            neg_ids=[n.id for n in negs], query_id=f"{p.id}/{language}", language=language,
                            type=kind, source=p.source).model_dump(mode="json", exclude_none=True))
    return rows


def prepare(root_uri: str, *, n_train: int, n_val: int, seed: int = 7) -> None:
    """Ingest the Quran and Bukhari into ROOT and write combine/train.jsonl and validation.jsonl from them."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.passages import read_passages
    from m3tune.executor import run_step
    from m3tune.jsonl import write_jsonl
    from m3tune.runroot import open_root

    root = open_root(root_uri)
    run_step(root, "ingest", IngestConfig(sources=["quran", "bukhari"]))
    rows = quran_hadith_examples(read_passages(root), random.Random(seed), n_train + n_val)
    for name, part in (("train.jsonl", rows[:n_train]), ("validation.jsonl", rows[n_train:])):
        with write_jsonl(root.child("combine"), name) as w:
            w.write_all(part)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _steady(batch: int, step_seconds: list[float]) -> float:
    """Examples/s over the steps after the first (the first pays for lazy initialisation on either side)."""
    rest = step_seconds[1:] or step_seconds
    return batch * len(rest) / sum(rest)


def run_m3tune(root_uri: str, *, model: str, batch: int, steps: int, dims: list[int], temperature: float,
               max_length: int, negatives: int, workdir: str, options: dict | None = None) -> dict[str, Any]:
    from m3tune.training import loop
    from m3tune.training.config import TrainConfig

    config = TrainConfig(model=model, dims=dims, temperature=temperature, batch_size=batch, gradient_accumulation=1,
                         max_steps=steps, epochs=100, eval_every=10**6, checkpoint_every=10**6, negatives=negatives,
                         query_max_length=max_length, passage_max_length=max_length, learning_rate=1e-4,
                         patience=None, validation_corpus="validation",  # bench.prepare writes no ingest
                         **(options or {}))
    # Like the peer's clock (its model and dataset are built before it), ours starts once the model is
    # loaded; it still covers our validation before and after training and the final checkpoint.
    session = loop.setup(config, root_uri=root_uri, work=Path(workdir))
    if session.step:
        raise RuntimeError(f"{root_uri} holds checkpoints of an earlier run: this one would resume at step "
                           f"{session.step}, not train {steps} steps")
    rss_loaded = _peak_rss_mb()
    t0 = time.perf_counter()
    loop.train(session)
    loop.save(session)
    seconds = time.perf_counter() - t0
    attention = session.accelerator.unwrap_model(session.model).config._attn_implementation
    loop.cleanup(session)
    # each step's time runs from the end of the one before (tokenizing included), validation and saving left out
    step_seconds = [batch / h["examples_per_s"] for h in session.history if h["kind"] == "train"]
    return {"seconds": seconds, "examples_per_s": batch * steps / seconds, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_clock_mb": rss_loaded, "steps_only_examples_per_s": batch * steps / sum(step_seconds),
            "steady_examples_per_s": _steady(batch, step_seconds), "step_seconds": step_seconds,
            "attn_implementation": attention, "length_group": session.length_group}


def run_sentence_transformers(root_uri: str, *, model: str, batch: int, steps: int, dims: list[int],
                              temperature: float, max_length: int, negatives: int, workdir: str,
                              options: dict | None = None) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, \
        SentenceTransformerTrainingArguments
    from transformers import TrainerCallback
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss, \
        MultipleNegativesRankingLoss
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers.training_args import BatchSamplers

    from m3tune.encoder.profiles import profile_of, resolve
    from m3tune.runroot import open_root

    # the texts as m3tune's loop sees them (the model's prompts, marks stripped) and its pooling: the same work
    profile = profile_of(model)
    rows = [json.loads(line) for line in open_root(root_uri).child("combine").read_bytes("train.jsonl").splitlines()]
    rows = [r for r in rows if len(r["neg"]) >= negatives]
    columns = {"anchor": [profile.prepare(r["query"], queries=True) for r in rows],
               "positive": [profile.prepare(r["pos"][0], queries=False) for r in rows]}
    for k in range(negatives):
        columns[f"negative_{k + 1}"] = [profile.prepare(r["neg"][k], queries=False) for r in rows]
    dataset = Dataset.from_dict(columns)
    transformer = Transformer(resolve(model), max_seq_length=max_length)
    st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_word_embedding_dimension(),
                                                           profile.pooling), Normalize()], device="cpu")
    unknown = set(options or {}) - {"freeze_embeddings", "cached"}
    if unknown:
        raise ValueError(f"sentence-transformers contender: options {sorted(unknown)} have no peer counterpart")
    if (options or {}).get("freeze_embeddings"):
        # the recipe's frozen word embeddings, given to the peer too: the trainer optimizes only what needs a
        # gradient, so both sides do the same work (AdamW over 96M embedding rows would be most of the step)
        transformer.auto_model.get_input_embeddings().requires_grad_(False)
    # cached: GradCache (CachedMultipleNegativesRankingLoss), the peer's form for recipes that use GradCache
    inner = (CachedMultipleNegativesRankingLoss(st, scale=1 / temperature, mini_batch_size=int(options["cached"]))
             if (options or {}).get("cached") else MultipleNegativesRankingLoss(st, scale=1 / temperature))
    loss = MatryoshkaLoss(st, inner, matryoshka_dims=dims)
    args = SentenceTransformerTrainingArguments(
        output_dir=workdir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        warmup_ratio=0.1, lr_scheduler_type="cosine", weight_decay=0.01, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", logging_steps=10**6, report_to=[], use_cpu=True, seed=42, dataloader_drop_last=True,
        disable_tqdm=True)
    class StepClock(TrainerCallback):  # each step from the end of the one before, as m3tune's history counts
        def on_train_begin(self, *a, **kw):
            self.times = [time.perf_counter()]

        def on_step_end(self, *a, **kw):
            self.times.append(time.perf_counter())

    clock = StepClock()
    rss_loaded = _peak_rss_mb()
    t0 = time.perf_counter()
    output = SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset, loss=loss,
                                        callbacks=[clock]).train()
    st.save(str(Path(workdir) / "model"))
    seconds = time.perf_counter() - t0
    step_seconds = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {"seconds": seconds, "examples_per_s": batch * steps / seconds, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_clock_mb": rss_loaded,
            "steps_only_examples_per_s": batch * steps / output.metrics["train_runtime"],
            "steady_examples_per_s": _steady(batch, step_seconds), "step_seconds": step_seconds,
            "attn_implementation": st[0].auto_model.config._attn_implementation}


CONTENDERS = {"sentence-transformers": "run_sentence_transformers", "m3tune": "run_m3tune"}


def default_dims(model: str) -> tuple[int, ...]:
    """The model's width, two thirds and one third of it (e5-small: 384/256/128; the tiny model: 32/21/10)."""
    from m3tune.encoder.profiles import resolve
    from m3tune.errors import UserError
    from transformers import AutoConfig

    try:
        hidden = int(AutoConfig.from_pretrained(resolve(model)).hidden_size)
    except OSError as e:
        raise UserError(f"bench train: cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    return (hidden, hidden * 2 // 3, hidden // 3)


def compare_cpu(*, workdir: Path, model: str = "local:e5-small", batch: int = 16, steps: int = 10,
                dims: tuple[int, ...] | None = None, temperature: float = 0.05, max_length: int = 256,
                negatives: int = 3, n_train: int = 1200, n_val: int = 32, rounds: int = 1,
                options: dict | None = None, variants: dict[str, dict] | None = None, threads: int | None = None,
                log=print) -> dict[str, Any]:
    """Both contenders, each in a fresh process, on the same data, ROUNDS times in turn (peer, m3tune, peer, ...:
    on shared cores the load drifts, so their figures alternate): every run's figures and the ratios of the
    medians. OPTIONS: TrainConfig fields for m3tune's run (e.g. {"length_group": 0}); VARIANTS: more m3tune
    runs in the same rotation, by name, each with its own fields (what one change gives). THREADS: torch's
    threads in every process (OMP_NUM_THREADS; default torch's own, one per core)."""
    import os

    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    dims = tuple(dims) if dims else default_dims(model)
    root = str(workdir / "runs" / "bench")
    prepare(root, n_train=n_train, n_val=n_val)
    common = dict(model=model, batch=batch, steps=steps, dims=list(dims), temperature=temperature,
                  max_length=max_length, negatives=negatives)
    settings = dict(common, n_train=n_train, options=options or {}, variants=variants or {}, threads=threads)
    contenders = [(name, function, options if name == "m3tune" else None) for name, function in CONTENDERS.items()]
    contenders += [(f"m3tune {label}", CONTENDERS["m3tune"], {**(options or {}), **fields})
                   for label, fields in (variants or {}).items()]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    for r in range(rounds):
        for n, (name, function, fields) in enumerate(contenders):
            # m3tune's checkpoints from the run before would make this one resume (nothing left to train)
            shutil.rmtree(Path(root) / "train", ignore_errors=True)
            args = dict(common, workdir=str(workdir / f"work-{n}-{r}"), options=fields)
            code = ("import json, sys; from m3tune.bench import train as bench; "
                    f"print('RESULT ' + json.dumps(bench.{function}({root!r}, **json.loads(sys.argv[1]))))")
            out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                                 env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
            runs[name].append(result)
            log(f"round {r + 1} {name}: {result['examples_per_s']:.2f} examples/s, steady "
                f"{result['steady_examples_per_s']:.2f}, peak RSS {result['peak_rss_mb']:,.0f} MB")

    def median(name: str, key: str) -> float:
        values = sorted(x[key] for x in runs[name])
        return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2

    return {"settings": settings, "runs": runs,
            "speed_ratio": median("m3tune", "examples_per_s") / median("sentence-transformers", "examples_per_s"),
            "steady_speed_ratio": median("m3tune", "steady_examples_per_s")
            / median("sentence-transformers", "steady_examples_per_s"),
            "memory_ratio": median("m3tune", "peak_rss_mb") / median("sentence-transformers", "peak_rss_mb")}


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
