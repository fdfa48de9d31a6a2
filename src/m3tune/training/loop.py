"""The training recipe, readable top to bottom: setup / train / save / cleanup.

The same file runs in one process (the `train` step calls `run`), and in
many under a launcher, each process the same code:

    python -m m3tune.training.loop --root ROOT --config config.json --workdir DIR
    torchrun --nproc_per_node 8 -m m3tune.training.loop --root ROOT --config config.json --workdir DIR
    accelerate launch -m m3tune.training.loop --root ROOT --config config.json --workdir DIR

Accelerate reads the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR,
...), wraps the model for DDP or DeepSpeed, and handles mixed precision and
gradient accumulation; everything else is here in plain sight. Every
process reads the data from the run root and walks the same seeded batch
plan, taking its slice of each global batch. Checkpoints go to
ROOT/train/checkpoints/ (latest.json last), so a pod restarted on another
machine resumes at the same step with the same data order. The main process
writes the model folder and metrics.jsonl to WORKDIR/out for the step to
publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from m3tune.errors import BadInput, ConfigError, UserError
from m3tune.storage import download_folder, local_path, upload_folder

log = logging.getLogger("m3tune.train")

CHECKPOINTS = "checkpoints"
LATEST = "checkpoints/latest.json"
BEST = "best"
STATE = "trainer_state.json"
RESULT = "out/result.json"  # under WORKDIR, written by the global rank 0 only
ERRORS = "errors"  # under WORKDIR: rank-N.json, the one-line UserError of a launched process, for the step


class NonFiniteLoss(BadInput):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


def run(*, root_uri: str, config: dict[str, Any], workdir: str) -> dict[str, Any] | None:
    """Train; on the main process return the result (what `out/result.json` holds), elsewhere None."""
    from m3tune.training.config import TrainConfig

    from m3tune.training.step import claim_workdir

    cfg = TrainConfig.model_validate(config)
    # run directly (python -m m3tune.training.loop --workdir DIR) as well as by the step: DIR is checked either way
    work = claim_workdir(Path(workdir))
    s = setup(cfg, root_uri=root_uri, work=work)
    try:
        train(s)
        return save(s)
    finally:
        cleanup(s)


# ---------------------------------------------------------------------------------------------- setup

class Session:
    """Everything the loop holds: built once in setup, read by train and save."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _digest(folder, name: str) -> str:
    """FOLDER/NAME's sha256: the one its step's manifest recorded (no second read), else computed."""
    from m3tune.manifest import read_manifest
    from m3tune.storage import file_digest

    manifest = read_manifest(folder)
    written = manifest.outputs.get(name) if manifest else None
    return written.sha256 if written else file_digest(folder, name)


def _on_cuda() -> bool:
    """Whether Accelerate will put this process on a CUDA device (the step forces CPU with ACCELERATE_USE_CPU)."""
    import os

    import torch

    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def _precision(cfg) -> str:
    """mixed_precision as given, else bf16 on a CUDA device that has it (fp32 weights stay: autocast)."""
    import torch

    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    return "bf16" if _on_cuda() and torch.cuda.is_bf16_supported() else "no"


def setup(cfg, *, root_uri: str, work: Path) -> Session:
    from dataclasses import replace

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed
    from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    from m3tune.encoder.model import FastTokenize
    from m3tune.encoder.profiles import profile_of, resolve
    from m3tune.runroot import open_root
    from m3tune.training import engine
    from m3tune.training.config import check_deepspeed
    from m3tune.training.data import global_batches, read_examples

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    plugin, stage = None, None
    world_asked = engine.requested_world()
    if cfg.deepspeed:
        # checked again here: `accelerate launch m3tune step train` reaches this without the step's check
        ds = check_deepspeed(cfg.deepspeed, batch_size=cfg.batch_size, gradient_accumulation=cfg.gradient_accumulation,
                             world=world_asked)
        stage = int(ds["zero_optimization"]["stage"])
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size  # we feed tensors, not a prepared DataLoader
        ds.pop("train_batch_size", None)
        plugin = DeepSpeedPlugin(hf_ds_config=ds, gradient_accumulation_steps=cfg.gradient_accumulation,
                                 gradient_clipping=cfg.max_grad_norm)
    precision = _precision(cfg)
    # A launched process names its backend: without CUDA Accelerate finds none under DeepSpeed, and every
    # process then trains alone as rank 0 of 1 on rank 0's slice of the data.
    handlers = [InitProcessGroupKwargs(backend="nccl" if _on_cuda() else "gloo")] if "LOCAL_RANK" in os.environ \
        else []
    # The scheduler is stepped once per optimizer step by us; Accelerate's default would step it once per process.
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                              deepspeed_plugin=plugin, step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
    set_seed(cfg.seed)
    root = open_root(root_uri)
    out = root.child("train")
    combine = root.child("combine")
    train_examples = read_examples(combine, "train.jsonl")
    val_examples = read_examples(combine, "validation.jsonl")
    valset, data_key = _validation_data(cfg, root, combine, val_examples)

    path = resolve(cfg.model)
    # How texts are prompted and pooled, here and in the exported model: the base model's profile, or the
    # config's fields where given (the e5 family: mean pooling and query: / passage:).
    profile = profile_of(cfg.model, pooling=cfg.pooling,
                         query_prompt=cfg.query_prompt, passage_prompt=cfg.passage_prompt, strip_marks=cfg.strip_marks)
    from m3tune.encoder.model import check_max_length, load_config

    base_config = load_config(cfg.model, path)  # an unknown model type or auto_map: one line naming config.json
    check_max_length(cfg.model, base_config, cfg.query_max_length, "--query-max-length")
    check_max_length(cfg.model, base_config, cfg.passage_max_length, "--passage-max-length")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:  # BGE-M3 takes the CLS hidden state; an unused pooler would break DDP's gradient reduction
            model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load model {cfg.model!r}: {str(e).splitlines()[0]}") from None
    hidden = int(model.config.hidden_size)
    too_wide = [d for d in cfg.dims if d > hidden]
    if too_wide:
        raise ConfigError(f"train: dims {too_wide} exceed the hidden size {hidden} of {cfg.model}; "
                          f"give dims <= {hidden} (e.g. --dim {hidden} --dim {hidden // 2})")
    dims = sorted(cfg.dims, reverse=True)
    weights = cfg.dim_weights or [1.0] * len(cfg.dims)
    weights = [weights[cfg.dims.index(d)] for d in dims]
    unified, heads_source = None, None
    if cfg.unified:
        model, unified, heads_source = _unified_model(cfg, model, tokenizer, path)
        profile = replace(profile, heads=("dense", "sparse", "colbert"))
    if cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else _on_cuda()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk, memory_line = _memory_plan(cfg, model, precision=precision, checkpointing=checkpointing)
    # measured (docs/benchmarks.md): groups of 16 made e5-small (384 wide) 1.3x faster, the 32-wide test model
    # 1.3x slower (its step is per-pass overhead, not padded tokens)
    length_group = cfg.length_group if cfg.length_group is not None else (16 if hidden >= 256 else 0)

    # The epoch plans (a few ms per thousand examples) fix the number of steps for the schedule up front.
    world = accelerator.num_processes
    global_batch = cfg.batch_size * world
    n_epochs = math.ceil(cfg.epochs)
    plans = [global_batches(train_examples, global_batch, seed=cfg.seed, epoch=e, max_drop_share=cfg.max_drop_share)
             for e in range(n_epochs)]
    steps_in = [len(p) // cfg.gradient_accumulation for p in plans]
    if cfg.epochs != n_epochs:
        steps_in[-1] = int(steps_in[-1] * (cfg.epochs - (n_epochs - 1)))
    total_steps = sum(steps_in) if cfg.max_steps is None else min(cfg.max_steps, sum(steps_in))
    if total_steps < 1:
        raise UserError(f"train.jsonl has {len(train_examples)} examples: not one optimizer step of "
                        f"{global_batch} x {cfg.gradient_accumulation} examples; lower --batch-size or "
                        "--gradient-accumulation")

    # Checkpoints resume only a run on the same path: the same data and every config field that changes the
    # weights. The cosine schedule's length (horizon) is the one fixed when the run started.
    key = _resume_key(cfg, data_key, precision=precision, world=world, zero_stage=stage)
    latest = _check_resumable(out, key, restart=cfg.restart, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    horizon = latest["horizon"] if latest else total_steps
    if total_steps > horizon:
        raise ConfigError(f"train: max_steps {cfg.max_steps} goes past the {horizon} steps of the schedule this "
                          f"run started with (its cosine reached 0 there); give max_steps <= {horizon}, or "
                          "--restart to start over")

    # The fused kernel (CPU and CUDA) updates all tensors in one pass: on the tiny model's 8M-row embedding
    # the per-tensor default took a quarter of each step.
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * horizon), horizon)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ran = engine.facts(accelerator, model)
    wrong = engine.unhonoured(ran, zero_stage=stage, world=world_asked, precision=precision,
                              checkpointing=checkpointing)
    if wrong:  # before step 1: a run that is not what was asked must not look like one that is
        raise UserError(f"train: not trained as asked: {'; '.join(wrong)}")

    s = Session(cfg=cfg, accelerator=accelerator, model=model, tokenizer=tokenizer,
                fast_tokenize=FastTokenize(tokenizer), optimizer=optimizer,
                scheduler=scheduler, root=root, out=out, work=work, train_examples=train_examples, valset=valset,
                plans=plans, steps_in=steps_in, total_steps=total_steps, horizon=horizon, dims=dims,
                weights=weights, hidden=hidden, profile=profile, precision=precision, checkpointing=checkpointing,
                chunk=chunk, length_group=length_group, memory_line=memory_line, base_path=path, key=key,
                digest=_key_digest(key), step=0, unified=unified, heads_source=heads_source,
                history=[], best=None, bad_evals=0, before=None, stopped_early=False, started=time.time(),
                examples_seen=0, ran=ran, shards=[])
    if latest:
        _resume(s, latest)
    if accelerator.is_main_process:
        log.info("train: %d examples, %d validation queries over %d passages; %d steps of %d x %d x %d examples "
                 "(%d processes)%s", len(train_examples), len(valset.queries), len(valset.corpus_keys), total_steps,
                 cfg.batch_size, world, cfg.gradient_accumulation, world,
                 f"; resumed at step {s.step}" if s.step else "")
        log.info("train: %s", memory_line)
    return s


def _unified_model(cfg, model, tokenizer, path: str):
    """(the encoder with BGE-M3's sparse and ColBERT heads as one module, the unified loss's settings, "loaded"
    or "fresh"): the tokenizer is checked against the heads' vocabulary before any training."""
    from m3tune.encoder import heads
    from m3tune.training.loss import Unified

    folder = heads.locate(path)
    heads.check_vocabulary(tokenizer, embedding_rows=model.get_input_embeddings().num_embeddings, folder=folder,
                           model=cfg.model)
    sparse, colbert, source = heads.load_or_create(folder, int(model.config.hidden_size), seed=cfg.seed)
    log.info("train: unified: %s sparse and ColBERT heads%s", source, f" from {folder}" if source == "loaded" else "")
    settings = Unified(ensemble_weights=tuple(cfg.ensemble_weights), loss_weights=tuple(cfg.head_loss_weights),
                       temperatures=(cfg.temperature, cfg.sparse_temperature or cfg.temperature,
                                     cfg.colbert_temperature or cfg.temperature),
                       self_distill=cfg.self_distill, special_ids=tuple(heads.special_ids(tokenizer)),
                       colbert_gather_bytes=cfg.colbert_gather_mb << 20)
    wrapped = heads.UnifiedModel(model, sparse, colbert, vocabulary=heads.vocabulary_digest(tokenizer))
    return wrapped, settings, source


def _validation_data(cfg, root, combine, val_examples):
    """The validation set (queries with every positive; the corpus they search) and the digests of what it
    was built from. With validation_corpus all, the corpus is the validation positives plus a seeded sample
    of the run's ingest corpus without the held-out partition (the one combine used), so validation never
    sees a test passage and a query must find its passages among thousands, as in production."""
    import random

    from m3tune.jsonl import read_jsonl
    from m3tune.records import Example
    from m3tune.training.data import validation_set

    with combine.open_read("validation.jsonl") as f:  # the type of each query, for per-type metrics
        types = [ex.type or "unknown" for ex in read_jsonl(f, Example, name=combine.uri_of("validation.jsonl"))]
    data = {f"combine/{name}": _digest(combine, name) for name in ("train.jsonl", "validation.jsonl")}
    if cfg.validation_corpus == "validation":
        return validation_set(val_examples, types=types), data
    from m3tune.corpus import heldout
    from m3tune.corpus.passages import read_passages
    from m3tune.manifest import read_manifest

    manifest = read_manifest(combine)
    held_uri = manifest.config.get("held_out", "packaged") if manifest else "packaged"
    held = heldout.load(held_uri)
    if read_manifest(root.child("ingest")) is None:
        from m3tune.errors import UserError

        raise UserError(f"train: validation_corpus 'all' searches the corpus ingested in {root.uri}, and ingest has "
                        "not finished there; run ingest, or set train.validation_corpus: validation")
    # a near-duplicate of a positive (a twin, the same body under another chain) is no wrong answer: it is left
    # out of the sample rather than counted against the model
    positives = {k for ex in val_examples for k in ex.masked_keys}
    candidates = [p for p in read_passages(root) if p.id not in held and p.id not in positives]
    n = cfg.validation_corpus_sample
    sample = random.Random(f"{cfg.seed}:validation-corpus").sample(candidates, n) if 0 < n < len(candidates) \
        else candidates
    data["ingest/passages.jsonl"] = _digest(root.child("ingest"), "passages.jsonl")
    data["held-out list"] = heldout.digest(held_uri) or "none"
    return validation_set(val_examples, {p.id: p.text for p in sample}, types=types, with_negatives=False), data


def _memory_plan(cfg, model, *, precision: str, checkpointing: bool) -> tuple[int, str]:
    """(GradCache chunk, 0 = none; the memory estimate's line). The chunk is the config's, or on CUDA sized
    from the free memory (m3tune.training.memory); on CPU there is no chunking unless asked."""
    from m3tune.training import memory

    # ZeRO-3 partitions the weights as they load (zero.Init): numel() is 0 there, ds_numel the real count
    count = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    frozen = sum(count(p) for p in model.parameters() if not p.requires_grad)
    c = model.config
    per_text = memory.per_text_bytes(tokens=cfg.passage_max_length, hidden=int(c.hidden_size),
                                     layers=int(c.num_hidden_layers), heads=int(c.num_attention_heads),
                                     half=precision != "no", checkpointing=checkpointing)
    static = memory.static_bytes(trainable, frozen)
    texts = cfg.batch_size * (2 + cfg.negatives)  # queries, positives, negative slots
    free = None
    if cfg.gradcache_chunk is not None:
        chunk = cfg.gradcache_chunk
    elif _on_cuda() and not cfg.deepspeed:
        import torch

        free, _ = torch.cuda.mem_get_info()
        chunk = memory.gradcache_chunk_for(free, static=static, per_text=per_text, texts=texts)
    else:
        chunk = 0
    if _on_cuda():
        import torch

        free = free if free is not None else torch.cuda.mem_get_info()[0]
    est = memory.Estimate(static, per_text, texts, chunk if 0 < chunk < texts else texts)
    return chunk, memory.describe(est, free_bytes=free, precision=precision, checkpointing=checkpointing,
                                  tokens=cfg.passage_max_length)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and LayerNorm weights (as BERT-style recipes do)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if not n.endswith("bias")}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- train

def train(s: Session) -> None:
    import torch

    from m3tune.training.lengths import encode_by_length
    from m3tune.training.loss import encode, encode_unified, gradcache_backward, matryoshka_info_nce, unified_info_nce

    cfg, acc = s.cfg, s.accelerator
    if s.stopped_early:  # resumed after the early stop: nothing left to train
        return
    if s.before is None:
        with _explain_oom(s, "during the validation before training"):
            s.before = _validate(s, record=False)
    s.model.train()
    rank, world = acc.process_index, acc.num_processes
    window, window_t = [], time.time()
    step = s.step
    for epoch, plan in enumerate(s.plans):
        first_step = sum(s.steps_in[:epoch])
        if step >= first_step + s.steps_in[epoch]:
            continue  # an epoch finished before a restart
        micro = (step - first_step) * cfg.gradient_accumulation  # same data order after a restart
        batches = _micro_batches(s, epoch, plan, micro, rank)
        while step < min(first_step + s.steps_in[epoch], s.total_steps):
            grad_norm = None
            with _explain_oom(s, f"at step {step + 1}"):
                for _ in range(cfg.gradient_accumulation):
                    batch = next(batches)
                    q_tok = {k: v.to(acc.device) for k, v in batch.queries.items()}
                    p_tok = {k: v.to(acc.device) for k, v in batch.passages.items()}
                    keys = dict(pos_keys=batch.pos_keys.to(acc.device), col_keys=batch.col_keys.to(acc.device),
                                col_valid=batch.col_valid.to(acc.device))

                    def loss_fn(q, p):
                        if s.unified:  # q, p: encode_unified's (dense, sparse weights, multi-vectors)
                            return unified_info_nce(q, p, q_tokens=q_tok, p_tokens=p_tok, **keys, dims=s.dims,
                                                    weights=s.weights, settings=s.unified,
                                                    cross_device=cfg.cross_device_negatives)
                        return matryoshka_info_nce(q, p, **keys, dims=s.dims, weights=s.weights,
                                                   temperature=cfg.temperature,
                                                   cross_device=cfg.cross_device_negatives)

                    def checked_backward(loss):
                        _check_finite(s, loss, step + 1)
                        acc.backward(loss)

                    with acc.accumulate(s.model), acc.autocast():
                        if s.chunk:
                            loss, per_dim = gradcache_backward(
                                s.model, q_tok, p_tok, chunk=s.chunk, loss_fn=loss_fn, backward=checked_backward,
                                no_sync=lambda: acc.no_sync(s.model), sync=acc.sync_gradients,
                                pooling=s.profile.pooling, unified=s.unified is not None)
                        else:
                            pooling, group = s.profile.pooling, s.length_group
                            embed = encode_unified if s.unified else encode
                            q, p = (encode_by_length(s.model, t, pooling, group=group, encode=embed)
                                    for t in (q_tok, p_tok))
                            loss, per_dim = loss_fn(q, p)
                            checked_backward(loss)
                        if acc.sync_gradients:
                            # the norm before clipping (DeepSpeed: its engine's global norm; None before its step)
                            grad_norm = acc.clip_grad_norm_(s.model.parameters(), cfg.max_grad_norm)
                        s.optimizer.step()
                        s.optimizer.zero_grad()
                    tokens = (batch.queries["attention_mask"].sum() + batch.passages["attention_mask"].sum()).float()
                    window.append(torch.cat([loss.detach().float().reshape(1),
                                             torch.stack([per_dim[d] for d in s.dims]).float(),
                                             tokens.to(acc.device).reshape(1)]))
            s.scheduler.step()
            step += 1
            s.step = step
            s.examples_seen += cfg.batch_size * world * cfg.gradient_accumulation
            # One all-reduce per optimizer step: the global batch's mean losses (as one process would see
            # them) and its real (unpadded) tokens.
            summed = acc.reduce(torch.stack(window).sum(0), reduction="sum").tolist()
            n = len(window) * world
            elapsed = max(time.time() - window_t, 1e-9)
            examples = cfg.batch_size * world * cfg.gradient_accumulation
            if grad_norm is None and hasattr(s.model, "get_global_grad_norm"):
                grad_norm = s.model.get_global_grad_norm()  # DeepSpeed computes it in its step
            s.history.append({"kind": "train", "step": step, "epoch": round(step / max(1, s.steps_in[0]), 4),
                              "loss": summed[0] / n,
                              "loss_by_dim": {str(d): v / n for d, v in zip(s.dims, summed[1:-1])},
                              "lr": s.scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              "examples_per_s": examples / elapsed, "tokens_per_s": summed[-1] / elapsed})
            improved = False
            if step % cfg.eval_every == 0 or step == s.total_steps:
                with _explain_oom(s, f"validating at step {step}"):
                    improved = _validate(s, record=True)["improved"]
                s.model.train()
            # The last step too (a kill while publishing needs no retraining), and every step whose weights
            # became the best: they are saved inside that checkpoint, so the best can never come from a run
            # that a preemption discarded.
            if step % cfg.checkpoint_every == 0 or step == s.total_steps or improved or s.stopped_early:
                _checkpoint(s)
            window, window_t = [], time.time()  # throughput of training alone: validation and saving left out
            if s.stopped_early:
                batches.close()
                return
        batches.close()
        if step >= s.total_steps:
            return


def _explain_oom(s: Session, where: str):
    from m3tune.training.memory import explain_oom

    cfg = s.cfg

    def hint() -> str:  # read only when it happened: not a store read per step
        latest = _read_latest(s.out)
        return (f"A rerun resumes from the checkpoint of step {latest['step']}; these settings may change on "
                "resume." if latest else "No checkpoint was written yet.")

    return explain_oom(where=where, resume_hint=hint, settings={
        "batch_size": cfg.batch_size, "gradcache_chunk": s.chunk or "off", "passage_max_length": cfg.passage_max_length,
        "gradient_checkpointing": "on" if s.checkpointing else "off", "mixed_precision": s.precision})


def _micro_batches(s: Session, epoch: int, plan: list[list[int]], start: int, rank: int):
    """This process's tokenized micro-batches of PLAN from START; the next one is tokenized in a thread while
    the model works on the current one (the tokenizer and torch both release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from m3tune.training.data import collate

    cfg = s.cfg

    def make(m: int):
        indices = plan[m][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        return collate([s.train_examples[i] for i in indices], indices, s.fast_tokenize, negatives=cfg.negatives,
                       seed=cfg.seed, epoch=epoch, query_max_length=cfg.query_max_length,
                       passage_max_length=cfg.passage_max_length, profile=s.profile,
                       negative_mix=(cfg.hard_share, cfg.semi_hard_share, cfg.random_share),
                       positive_pool=cfg.positive_pool)

    with ThreadPoolExecutor(1, thread_name_prefix="m3tune-collate") as pool:
        upcoming = pool.submit(make, start) if start < len(plan) else None
        for m in range(start, len(plan)):
            current = upcoming.result()
            upcoming = pool.submit(make, m + 1) if m + 1 < len(plan) else None
            yield current


def _check_finite(s: Session, loss, step: int) -> None:
    """Stop before a NaN/inf gradient reaches the weights; every process agrees (one all-reduce)."""
    import torch

    bad = s.accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum").item()
    if bad:
        latest = _read_latest(s.out)
        kept = f"the last good checkpoint (step {latest['step']}) is kept in {s.out.uri_of(CHECKPOINTS)}" \
            if latest else "no checkpoint was written yet"
        raise NonFiniteLoss(f"train: the loss became {loss.item()} at step {step}; stopped before updating the "
                            f"weights, {kept}. Lower --learning-rate, use bf16 rather than fp16, or check the data")


def _validate(s: Session, *, record: bool) -> dict[str, Any]:
    """Retrieval metrics at every dim, overall and per query type; RECORD: log them, track the best and the
    patience ("improved" in the answer)."""
    from m3tune.training.validate import evaluate

    cfg = s.cfg
    model = s.accelerator.unwrap_model(s.model)
    with s.accelerator.autocast():
        metrics, by_type = evaluate(model, s.fast_tokenize, s.valset, dims=s.dims,
                                    query_max_length=cfg.query_max_length, passage_max_length=cfg.passage_max_length,
                                    batch_size=max(cfg.batch_size, 32), device=s.accelerator.device, profile=s.profile)
    metrics = {str(d): m for d, m in metrics.items()}
    by_type = {t: {str(d): m for d, m in per.items()} for t, per in by_type.items()}
    if not record:
        if s.accelerator.is_main_process:
            log.info("validation before training: %s", _fmt(metrics, s.dims))
        return metrics
    score = selection_score(metrics, metric=cfg.select_metric, dim=cfg.select_dim, dims=s.dims)
    if s.accelerator.num_processes > 1:
        # Rank 0's score decides for everyone: saving the best and stopping early are collective, and a last-bit
        # difference between processes (non-deterministic kernels) must not split their paths.
        import torch
        from accelerate.utils import broadcast

        score = float(broadcast(torch.tensor([score], device=s.accelerator.device), from_process=0).item())
    improved = s.best is None or score > s.best["score"]
    s.history.append({"kind": "validation", "step": s.step, "metrics": metrics, "by_type": by_type, "score": score,
                      "best": improved})
    if improved:
        # the weights are saved with this step's checkpoint, written right after (train forces it)
        s.best, s.bad_evals = {"step": s.step, "score": score, "metrics": metrics, "by_type": by_type,
                               "checkpoint": _checkpoint_name(s.step)}, 0
    else:
        s.bad_evals += 1
        if cfg.patience and s.bad_evals >= cfg.patience:
            s.stopped_early = True
    if s.accelerator.is_main_process:
        log.info("step %d validation: %s%s", s.step, _fmt(metrics, s.dims),
                 " (best)" if improved else f" ({s.bad_evals} without improvement)")
    return {"metrics": metrics, "improved": improved}


def selection_score(metrics: dict[str, dict[str, float]], *, metric: str, dim, dims: list[int]) -> float:
    """The number that picks the best checkpoint: METRIC at DIM (default the largest), or its mean over dims."""
    if dim == "mean":
        return sum(metrics[str(d)][metric] for d in dims) / len(dims)
    return metrics[str(dim if dim is not None else max(dims))][metric]


def _fmt(metrics: dict, dims: list[int]) -> str:
    return "; ".join(f"{d}d R@10 {metrics[str(d)]['recall@10']:.3f} MRR@10 {metrics[str(d)]['mrr@10']:.3f} "
                     f"nDCG@10 {metrics[str(d)]['ndcg@10']:.3f}" for d in dims)


def _save_model(s: Session, folder: Path) -> None:
    """The current weights and config as a transformers folder (gathered from ZeRO-3 shards: every process
    calls this)."""
    import inspect

    from transformers import PreTrainedModel

    state = s.accelerator.get_state_dict(s.model)
    if s.accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        # The model's own parameter names. transformers 5 "reverts" the renamings it applied on load, and under
        # ZeRO-3 (zero.Init) it records its legacy LayerNorm one, so it wrote LayerNorm gamma/beta, which
        # readers other than AutoModel do not map back. 4.x has no such option and writes the model's names.
        own = {"save_original_format": False} if "save_original_format" in \
            inspect.signature(PreTrainedModel.save_pretrained).parameters else {}
        s.accelerator.unwrap_model(s.model).save_pretrained(folder, state_dict=state, safe_serialization=True, **own)
    s.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------- checkpoints
#
# ROOT/train/checkpoints/step-N/ holds Accelerate's state (weights, optimizer, scheduler, RNG of every
# process), trainer_state.json and, in the checkpoint of a step whose validation improved, best/ (the
# weights as a transformers folder). latest.json, written last, names the newest complete checkpoint, the
# one holding the best weights, the schedule's horizon and the key: what the run's path depends on.

def _checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _resume_key(cfg, data: dict[str, str], *, precision: str, world: int, zero_stage: int | None) -> dict[str, Any]:
    """What the weights' path depends on: the data's digests and every config field but RESUME_FREE ones (the
    resolved precision and the number of processes too: both change the numbers; the ZeRO stage, since a
    JSON file's name does not say it and ZeRO-3 cannot load ZeRO-2's shards)."""
    from m3tune.training.config import RESUME_FREE

    fields = cfg.model_dump(mode="json", exclude=set(RESUME_FREE))
    fields["mixed_precision"], fields["processes"] = precision, world
    if zero_stage is not None:  # absent without DeepSpeed: DDP checkpoints of earlier versions still resume
        fields["zero_stage"] = zero_stage
    return {**{f"input {name}": digest for name, digest in data.items()}, **fields}


def _key_digest(key: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _changes(old: dict, new: dict) -> list[str]:
    """What differs between two keys, in words."""
    out = []
    for name in sorted(set(old) | set(new), key=lambda n: (not n.startswith("input "), n)):
        a, b = old.get(name, "(none)"), new.get(name, "(none)")
        if a != b:
            out.append(f"{name[len('input '):]} changed ({a} -> {b})" if name.startswith("input ")
                       else f"{name} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _check_resumable(out, key: dict, *, restart: bool, is_main: bool) -> dict | None:
    """latest.json when its run can be resumed with KEY; None for a fresh start (after removing what another
    run left, with RESTART or when no checkpoint was completed); else an error saying what changed."""
    folder = out.child(CHECKPOINTS)
    latest = _read_latest(out)
    if latest is not None and latest.get("key") == key:
        return latest
    if latest is not None and not restart:
        changed = _changes(latest["key"], key) if isinstance(latest.get("key"), dict) else \
            ["the checkpoints were written by an earlier m3tune that recorded no key"]
        raise ConfigError(f"train: {folder.uri} holds a run (step {latest.get('step')}) made with other inputs or "
                          f"settings; resuming it would mix two runs: {'; '.join(changed)}. Rerun with what it was "
                          "made with to resume it, or pass --restart to delete its checkpoints and start over")
    # A fresh start: what is there (a restarted run's checkpoints, a first upload cut short) would be mistaken
    # for ours, or outlive ours when old checkpoints are pruned by name.
    if is_main:
        stale = folder.list()
        if stale:
            log.warning("train: removing %d file(s) in %s left by %s; starting afresh", len(stale), folder.uri,
                        "the run --restart replaces" if latest else "an unfinished first checkpoint")
        for rel in stale:
            folder.delete(rel)
    return None


def _read_latest(out) -> dict | None:
    """checkpoints/latest.json of the store OUT, checked before any of it is used: it lives in the run root,
    so anyone who can write the bucket writes it, and its names are joined to local paths that are removed
    and written."""
    from m3tune.storage import StorageError, check_relative

    if not out.exists(LATEST):
        return None
    where = out.uri_of(LATEST)
    try:
        latest = json.loads(out.read_bytes(LATEST))
    except (ValueError, UnicodeDecodeError) as e:
        raise StorageError(f"{where}: not JSON ({e}); remove it to start afresh") from None
    if not isinstance(latest, dict) or not isinstance(latest.get("name"), str):
        raise StorageError(f"{where}: field 'name': expected the checkpoint's folder name")
    check_relative(latest["name"], where=f"{where}: field 'name'")
    if "key" in latest:  # the current format
        if not isinstance(latest.get("step"), int) or not isinstance(latest.get("horizon"), int):
            raise StorageError(f"{where}: fields 'step' and 'horizon': expected integers")
        if latest.get("best") is not None:
            if not isinstance(latest["best"], str):
                raise StorageError(f"{where}: field 'best': expected a checkpoint's folder name")
            check_relative(latest["best"], where=f"{where}: field 'best'")
    return latest


def _checkpoint(s: Session) -> None:
    """Save the full training state (and the best weights, when this step's are the best) and publish it to the
    run root; latest.json is written last."""
    acc = s.accelerator
    name = _checkpoint_name(s.step)
    local = s.work / CHECKPOINTS / name
    acc.save_state(str(local))
    holds_best = s.best is not None and s.best["step"] == s.step
    if holds_best:
        _save_model(s, local / BEST)
    if acc.is_main_process:
        (local / STATE).write_text(json.dumps(_trainer_state(s)))
    acc.wait_for_everyone()
    remote = s.out.child(f"{CHECKPOINTS}/{name}")
    if acc.is_main_process:
        # A killed run's partial upload of this step may hold files this one does not write. Cleared once, before
        # any node uploads: each node sends only its own processes' files, so a node clearing what it did not
        # write (as upload_folder's remove_others would) deleted the other nodes' shards.
        for rel in remote.list():
            remote.delete(rel)
    acc.wait_for_everyone()
    if acc.is_local_main_process:  # each node sends what its processes wrote (their RNG states, ZeRO shards)
        upload_folder(local, remote)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if s.ran["zero_stage"] is not None:  # what every node uploaded: each rank's ZeRO shards
            from m3tune.training.engine import zero_shards

            s.shards = zero_shards(remote.list(), world=acc.num_processes, where=remote.uri)
        s.out.write_bytes(LATEST, json.dumps({"step": s.step, "name": name, "config_digest": s.digest, "key": s.key,
                                              "horizon": s.horizon,
                                              "best": s.best["checkpoint"] if s.best else None}).encode())
        _prune(s)
        log.info("checkpoint %s -> %s%s", name, s.out.uri_of(f"{CHECKPOINTS}/{name}"),
                 " (best weights)" if holds_best else "")
        if holds_best:  # what save() publishes, unless a later step does better
            shutil.rmtree(s.work / BEST, ignore_errors=True)
            shutil.move(str(local / BEST), str(s.work / BEST))
    acc.wait_for_everyone()
    shutil.rmtree(local, ignore_errors=True)


def _prune(s: Session) -> None:
    """Keep the newest keep_checkpoints checkpoints and the one holding the best weights."""
    folder = s.out.child(CHECKPOINTS)
    # a name after this step's is a killed run's partial upload: this run overwrites it when it gets there
    names = sorted(n for n in {p.split("/")[0] for p in folder.list() if p.startswith("step-")}
                   if n <= _checkpoint_name(s.step))
    keep = set(names[-s.cfg.keep_checkpoints:]) | ({s.best["checkpoint"]} if s.best else set())
    for old in names:
        if old not in keep:
            for rel in folder.child(old).list():
                folder.child(old).delete(rel)


def _trainer_state(s: Session) -> dict:
    return {"step": s.step, "history": s.history, "best": s.best, "bad_evals": s.bad_evals, "before": s.before,
            "stopped_early": s.stopped_early, "examples_seen": s.examples_seen, "config_digest": s.digest}


def _resume(s: Session, latest: dict | None = None) -> None:
    """Continue from the checkpoint LATEST (default: the run root's latest.json, checked) names, with the best
    weights from the checkpoint that holds them."""
    latest = latest if latest is not None else _read_latest(s.out)
    if latest is None:
        return
    local = local_path(s.work / CHECKPOINTS, latest["name"])  # checked again where it becomes a path
    if s.accelerator.is_local_main_process:
        shutil.rmtree(local, ignore_errors=True)
        download_folder(s.out.child(f"{CHECKPOINTS}/{latest['name']}"), local)
        if latest.get("best"):
            best = s.out.child(f"{CHECKPOINTS}/{latest['best']}/{BEST}")
            if not best.list():
                from m3tune.storage import StorageError

                raise StorageError(f"{best.uri}: the best weights latest.json names are missing; pass --restart "
                                   "to start over")
            shutil.rmtree(s.work / BEST, ignore_errors=True)
            download_folder(best, s.work / BEST)
    s.accelerator.wait_for_everyone()
    where = s.out.uri_of(f"{CHECKPOINTS}/{latest['name']}")
    load_checkpoint_state(s.accelerator, local, where)
    state = read_trainer_state(local / STATE, f"{where}/{STATE}")
    for key in ("step", "history", "best", "bad_evals", "before", "stopped_early", "examples_seen"):
        setattr(s, key, state[key])


def load_checkpoint_state(accelerator, local: Path, where: str) -> None:
    """Accelerate's state from the checkpoint folder LOCAL (downloaded from WHERE). Its files are loaded with
    torch.load(weights_only=True), which refuses a pickle that would run code, and fails on a truncated or
    edited file: either is the run root's content, not a bug, so one line naming the checkpoint, exit 4."""
    import pickle

    try:
        accelerator.load_state(str(local))
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"{where}: tampered or corrupt checkpoint, refused ({type(e).__name__}: {first[:300]}); "
                       "pass --restart to start over") from None


def read_trainer_state(path: Path, where: str) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, checked: it lives in the run root (anyone who can write the bucket
    writes it), and a missing field or a step of the wrong type would fail deep in the loop, or resume at
    a step the weights are not at."""
    from pydantic import BaseModel, ConfigDict, ValidationError

    class TrainerState(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        step: int
        history: list[dict[str, Any]]
        best: dict[str, Any] | None
        bad_evals: int
        before: dict[str, Any] | None
        stopped_early: bool
        examples_seen: int

    try:
        state = TrainerState.model_validate_json(path.read_bytes())
    except OSError as e:
        raise BadInput(f"{where}: missing from its checkpoint ({e.strerror}); pass --restart to start over") from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(map(str, first["loc"]))
        raise BadInput(f"{where}: tampered: {'field ' + repr(field) + ': ' if field else ''}{first['msg']}; pass "
                       "--restart to start over") from None
    if state.step < 0 or state.bad_evals < 0 or state.examples_seen < 0 or \
            (state.best is not None and not isinstance(state.best.get("step"), int)):
        raise BadInput(f"{where}: tampered: negative counts or a best without its step; pass --restart to start over")
    return state.model_dump()


# ----------------------------------------------------------------------------------------------- save

def save(s: Session) -> dict[str, Any] | None:
    """The model folder (the best checkpoint's weights), metrics.jsonl and result.json in WORKDIR/out."""
    import torch

    from m3tune.training import export
    from m3tune.training.engine import peak_rss_bytes

    acc = s.accelerator
    if s.best is None:  # no validation ran (cannot happen with total_steps >= 1), keep the last weights
        _save_model(s, s.work / BEST)
    # every process's peak resident memory (what ZeRO saves per process shows here): one all-gather
    peaks = acc.gather(torch.tensor([peak_rss_bytes()], device=acc.device)).tolist()
    if not acc.is_main_process:
        return None
    cfg = s.cfg
    out = s.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    model_dir = out / "model"
    shutil.copytree(s.work / BEST, model_dir)
    s.tokenizer.save_pretrained(model_dir)  # written once here: it never changes
    export.write_sentence_transformers_files(model_dir, hidden=s.hidden, max_seq_length=cfg.passage_max_length,
                                             profile=s.profile)
    # unified: the trained heads are in the saved weights' folder (heads.UnifiedModel.save_pretrained)
    heads = [] if s.unified else export.copy_bge_m3_heads(s.base_path, model_dir)
    export.copy_notice(s.base_path, model_dir)
    export.plot_curves(s.history, s.dims, model_dir / export.CURVES, before=s.before)
    data = {"train_examples": len(s.train_examples),
            "train_examples_without_negatives": sum(1 for e in s.train_examples if not e.negs),
            "validation_queries": len(s.valset.queries), "validation_passages": len(s.valset.corpus_keys),
            "validation_queries_by_type": s.valset.type_counts(),
            "steps": s.step, "schedule_steps": s.horizon, "examples_seen": s.examples_seen,
            "processes": acc.num_processes, "global_batch": cfg.batch_size * acc.num_processes,
            "effective_batch": cfg.batch_size * acc.num_processes * cfg.gradient_accumulation,
            "examples_left_out_of_epoch_1": len(s.train_examples) - sum(len(b) for b in s.plans[0]),
            "sampler_left_out": [p.report for p in s.plans],  # per epoch, by type, language and source
            "mixed_precision": s.ran["mixed_precision"], "gradient_checkpointing": s.ran["gradient_checkpointing"],
            "gradcache_chunk": s.chunk or None, "length_group": None if s.chunk else s.length_group,
            "memory_estimate": s.memory_line,
            # what ran (checked against the request before step 1), not the flags
            "ran": {**s.ran, "zero_shards": [name.rsplit("/", 1)[-1] for name in s.shards] or None}}
    card = export.model_card(base=cfg.model, config=cfg.model_dump(exclude={"workdir"}), data=data, best=s.best,
                             before=s.before, heads=heads, hidden=s.hidden, dims=s.dims, profile=s.profile,
                             trained_heads=s.heads_source)
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        for row in s.history:
            f.write(json.dumps(row) + "\n")
    result = {"counts": {**data, "stopped_early": s.stopped_early, "heads_copied": heads,
                         "heads_trained": s.heads_source},
              # a measurement, not a count: it differs between two runs of the same config
              "metrics": {"before": s.before, "best": s.best,
                          "final_loss": next((h["loss"] for h in reversed(s.history) if h["kind"] == "train"), None),
                          "peak_rss_mib_per_process": [round(p / 2 ** 20) for p in peaks]}}
    (out / "result.json").write_text(json.dumps(result))
    return result


def cleanup(s: Session) -> None:
    s.accelerator.wait_for_everyone()
    s.accelerator.free_memory()
    shutil.rmtree(s.work / CHECKPOINTS, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m m3tune.training.loop", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="run root URI")
    parser.add_argument("--config", required=True, help="JSON file of TrainConfig fields")
    parser.add_argument("--workdir", required=True, help="local working folder")
    args = parser.parse_args(argv)
    from m3tune.procs import die_with_parent
    from m3tune.redact import RedactingFilter

    # a worker of torchrun's (its elastic agent sets TORCHELASTIC_RUN_ID) would outlive a SIGKILLed torchrun
    # (each worker has a session of its own) and write on into the run root. Not when started by hand: its
    # parent is then a shell, whose exit (a closed terminal under nohup) must not kill a training run.
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent(signal.SIGKILL)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    try:
        run(root_uri=args.root, config=json.loads(Path(args.config).read_text()), workdir=args.workdir)
    except UserError as e:
        # the step (when it launched us) raises this line as its own error rather than "the processes failed"
        folder = Path(args.workdir) / ERRORS
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
            {"message": str(e).splitlines()[0], "bad_input": isinstance(e, BadInput)}), encoding="utf-8")
        log.error("%s", e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
