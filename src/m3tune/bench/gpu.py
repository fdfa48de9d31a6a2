"""`m3tune bench gpu`: the GPU run, prepared as one unattended script.

Phases, in order, each checking the time left in the budget first and
skipped with the reason recorded when too little is left:

1. `e5-small`: m3tune's own training loop (`training.loop` setup / train,
   its Matryoshka InfoNCE, bf16 through Accelerate) on `local:e5-small`
   with real Quran pairs, a few dozen steps; tokens per second counted from
   the batches the loop actually fed the model.
2. `bge-m3` and `bge-m3-checkpointing`: the full BGE-M3 architecture
   (XLM-RoBERTa large, built from a config, random weights: nothing is
   downloaded) trained on random token ids at sequence length 512 in bf16,
   SDPA attention (FlashAttention 2 when flash-attn is importable), with
   gradient checkpointing off, then on.
3. `quality`: `m3tune bench quality --config configs/quality-gpu.yaml` in a
   child process with the time that is left as a hard limit; cut off, it
   records the steps that finished (the run root resumes).

MFU counts model FLOPs, not hardware FLOPs: 6 x non-embedding parameters
per token (forward + backward; an embedding lookup multiplies nothing) plus
12 x layers x hidden x sequence per token for attention's two score
matmuls; activations recomputed by gradient checkpointing are not counted.

Everything goes to one folder: results.json (rewritten after every phase,
so a killed run leaves what it measured) and summary.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from m3tune.errors import ConfigError, UserError

FLOPS_FORMULA = ("training FLOPs = tokens x (6 x non-embedding parameters + 12 x layers x hidden x sequence); "
                 "MFU = FLOPs / s / the device's dense bf16 peak; recomputation by gradient checkpointing is not "
                 "counted")

# Dense (not sparse) bf16 tensor-core peak in TFLOP/s, from NVIDIA's datasheets. The first fragment found in
# the device name wins, so the PCIe/NVL variants (lower clocks and power) come before their SXM names.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

# Seconds a phase needs at least to be worth starting (model build, warm-up, a few timed steps).
PHASE_NEEDS = {"e5-small": 75.0, "bge-m3": 45.0, "bge-m3-checkpointing": 45.0, "quality": 90.0}
WRITE_MARGIN = 10.0  # kept back from the quality phase to write results and summary after it


def bge_m3_config(**overrides):
    """BGE-M3's architecture (BAAI/bge-m3's config.json: XLM-RoBERTa large, 8,194 positions); OVERRIDES shrink it
    for tests."""
    from transformers import XLMRobertaConfig

    fields = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    return XLMRobertaConfig(**{**fields, **overrides})


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, those outside nn.Embedding tables): the lookups cost no multiply-adds."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return total, total - embedding


def flops_per_token(*, non_embedding_params: int, layers: int, hidden: int, seq: int) -> int:
    """Training FLOPs per token: 6N for the dense weights (2 forward, 4 backward) plus 12·L·H·S for attention's
    QKᵀ and AV (2·2·S·H forward per layer, three times that with backward)."""
    return 6 * non_embedding_params + 12 * layers * hidden * seq


def mfu(flops_per_s: float, peak_tflops: float | None) -> float | None:
    return flops_per_s / (peak_tflops * 1e12) if peak_tflops else None


def peak_for(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, the table key that matched) for DEVICE_NAME, or None when the table lacks it."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, key
    return None


# ------------------------------------------------------------------------------------- refusals, up front

def check_out(out: Path) -> None:
    """Refuse an --out that is, holds or lies inside a run root, or holds anything at all: the benchmark
    writes a fresh folder and never mixes its files with a run's (or an earlier benchmark's)."""
    from m3tune.pipeline import STEPS

    text = str(out)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", text):  # s3://… (which Path folds to s3:/…), file://…
        raise ConfigError(f"--out {text}: a local folder, not a URI")
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    for folder in (out, *out.parents):
        steps = [s for s in STEPS if (folder / s / "_manifest.json").is_file()]
        if steps:
            where = "is" if folder == out else f"lies inside {folder}, which is"
            raise ConfigError(f"--out {out} {where} a run root (holds {steps[0]}/_manifest.json); the benchmark "
                              "never writes inside a run: give a new folder")
    if out.is_dir():
        manifest = next(out.rglob("_manifest.json"), None)
        if manifest is not None:
            raise ConfigError(f"--out {out} holds a run's files ({manifest.relative_to(out)}); give a new folder")
        if any(out.iterdir()):
            raise ConfigError(f"--out {out} is not empty; give a new folder (the default is a fresh "
                              "gpu-bench-<timestamp>)")


def require_cuda() -> str:
    """The first CUDA device's name, or a UserError saying why there is none."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("bench gpu needs a CUDA device; torch.cuda.is_available() is False on this machine"
                        + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"))
    return torch.cuda.get_device_name(0)


def check_model(model: str) -> str:
    """MODEL's path as transformers loads it, failing now (not after the GPU phases) when it is absent."""
    from m3tune.encoder.profiles import resolve

    path = resolve(model)
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model {model!r}: cannot load its config: {str(e).splitlines()[0]}") from None
    return path


# -------------------------------------------------------------------------------------------- measuring

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def attention_choice() -> str:
    """FlashAttention 2 when its package is importable, else PyTorch's SDPA (its own flash / memory-efficient
    kernels)."""
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def build_encoder(config, *, device, attention: str, gradient_checkpointing: bool):
    """(random-weight XLMRobertaModel on DEVICE, attention implementation used, note): built on the device
    itself (568M parameters initialised on a GPU in a second, not on the CPU), falling back to SDPA when
    FlashAttention refuses this model or setup."""
    import torch
    from transformers import XLMRobertaModel

    note = None
    try:
        with torch.device(device):
            model = XLMRobertaModel._from_config(config, attn_implementation=attention, add_pooling_layer=False)
    except (ImportError, ValueError) as e:
        if attention == "sdpa":
            raise
        note = f"{attention} refused ({str(e).splitlines()[0]}); SDPA used"
        with torch.device(device):
            model = XLMRobertaModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), model.config._attn_implementation, note


def measure_encoder(model, *, device, batch: int, seq: int, steps: int, warmup: int, dtype=None,
                    deadline: float | None = None, peak_tflops: float | None = None) -> dict[str, Any]:
    """Train MODEL for WARMUP then up to STEPS timed steps, each BATCH queries + BATCH passages of SEQ random
    tokens through m3tune's CLS pooling and Matryoshka InfoNCE, AdamW and clipping as the training loop does.

    DTYPE: autocast's (bf16 on the GPU; None: full precision). DEADLINE (time.monotonic()): no timed step
    starts after it, at least one runs. Any device: the tests time a tiny model on the CPU."""
    import torch

    from m3tune.training.loss import encode, matryoshka_info_nce

    config = model.config
    hidden = int(config.hidden_size)
    dims = [d for d in (hidden, hidden // 2, hidden // 4, hidden // 8) if d >= 1]
    params, non_embedding = parameter_counts(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator(device=device).manual_seed(0)
    keys = torch.arange(batch, device=device)
    valid = torch.ones(batch, dtype=torch.bool, device=device)

    def tokens():
        # ids above the special tokens (0-3) and below the vocabulary's end; no padding: every token is work
        ids = torch.randint(4, int(config.vocab_size), (batch, seq), device=device, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            q, p = encode(model, tokens()), encode(model, tokens())
        loss, _ = matryoshka_info_nce(q, p, pos_keys=keys[:, None], col_keys=keys, col_valid=valid, dims=dims,
                                      weights=[1.0] * len(dims), temperature=0.02, cross_device=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(warmup)]  # kernels chosen, allocator and optimizer state settled
    _sync(device)
    timed, t0 = 0, time.perf_counter()
    while timed < steps and (timed == 0 or deadline is None or time.monotonic() < deadline):
        losses.append(step())
        timed += 1
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens_per_s = 2 * batch * seq * timed / seconds
    per_token = flops_per_token(non_embedding_params=non_embedding, layers=int(config.num_hidden_layers),
                                hidden=hidden, seq=seq)
    values = [float(x) for x in losses]
    return {"parameters": params, "non_embedding_parameters": non_embedding, "layers": int(config.num_hidden_layers),
            "hidden": hidden, "sequences_per_step": 2 * batch, "seq": seq, "warmup_steps": warmup,
            "timed_steps": timed, "seconds": round(seconds, 4), "tokens_per_s": tokens_per_s,
            "flops_per_token": per_token, "model_tflops_per_s": tokens_per_s * per_token / 1e12,
            "mfu": mfu(tokens_per_s * per_token, peak_tflops), "peak_memory_gib": _peak_gib(device),
            "loss_first": values[0], "loss_last": values[-1], "losses_finite": all(map(math.isfinite, values))}


def measure_loop(model: str, work: Path, *, batch: int, steps: int, warmup: int, mixed_precision: str,
                 dims: tuple[int, ...] = (384, 256, 128), peak_tflops: float | None = None, n_train: int = 1024,
                 n_val: int = 64, max_length: int = 256) -> dict[str, Any]:
    """m3tune's training loop on MODEL with real Quran pairs (bench.train's data) under WORK: tokens/s over
    the steps after WARMUP, counted from what the loop fed the model (padding included: the model computes it;
    the share of real tokens is reported beside it)."""
    import torch

    from m3tune.bench import train as bench
    from m3tune.training import loop
    from m3tune.training.config import TrainConfig

    root = work / "run"
    bench.prepare(str(root), n_train=n_train, n_val=n_val)
    # Enough epochs for STEPS (each a few ms of batch planning), not a thousand of them.
    epochs = steps * batch // n_train + 2
    config = TrainConfig(model=model, dims=list(dims), batch_size=batch, gradient_accumulation=1,
                         max_steps=steps, epochs=epochs, negatives=3, query_max_length=64,
                         passage_max_length=max_length, learning_rate=3e-5, mixed_precision=mixed_precision,
                         eval_every=10**6, checkpoint_every=10**6, patience=None, workdir=str(work / "work"),
                         # what is measured is one full-batch forward and backward a step, as set here: not the
                         # CUDA memory defaults (checkpointing, GradCache chunks) train picks when left unset
                         gradient_checkpointing=False, gradcache_chunk=0, validation_corpus="validation")
    session = loop.setup(config, root_uri=str(root), work=work / "work")
    device = session.accelerator.device
    _reset_memory(device)
    calls: list[tuple] = []  # (sequences, padded length, real tokens) of each training forward

    def count(_module, args, kwargs):
        if torch.is_grad_enabled():  # validation encodes without grad: not training work
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            # the real-token count stays a device tensor until the end: int() here would sync every forward
            calls.append((int(ids.shape[0]), int(ids.shape[1]), mask.sum()))

    inner = session.accelerator.unwrap_model(session.model)
    hook = inner.register_forward_pre_hook(count, with_kwargs=True)
    try:
        loop.train(session)
    finally:
        hook.remove()
        loop.cleanup(session)
    cfg = inner.config
    params, non_embedding = parameter_counts(inner)
    steps_run = [h for h in session.history if h["kind"] == "train"]
    if len(calls) != 2 * len(steps_run):  # queries and passages: two forwards a step, or the counts mean nothing
        raise RuntimeError(f"expected two training forwards a step, saw {len(calls)} over {len(steps_run)} steps")
    timed = steps_run[warmup:]
    seconds = sum(batch / h["examples_per_s"] for h in timed)
    used = calls[2 * warmup:]
    padded = sum(n * length for n, length, _ in used)
    real = sum(int(r) for _, _, r in used)
    flops = sum(n * length * flops_per_token(non_embedding_params=non_embedding, layers=int(cfg.num_hidden_layers),
                                             hidden=int(cfg.hidden_size), seq=length) for n, length, _ in used)
    return {"model": model, "parameters": params, "non_embedding_parameters": non_embedding,
            "layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size),
            "attention": getattr(cfg, "_attn_implementation", None), "mixed_precision": mixed_precision,
            "batch": f"{batch} queries + {batch} positives + {batch * 3} hard negatives (max)",
            "steps": len(steps_run), "warmup_steps": warmup, "timed_steps": len(timed), "seconds": round(seconds, 4),
            "examples_per_s": batch * len(timed) / seconds, "tokens_per_s": padded / seconds,
            "real_tokens_per_s": real / seconds, "padding_share": 1 - real / padded,
            "model_tflops_per_s": flops / seconds / 1e12, "mfu": mfu(flops / seconds, peak_tflops),
            "peak_memory_gib": _peak_gib(device), "final_loss": timed[-1]["loss"] if timed else None}


# ------------------------------------------------------------------------------------------------ phases

def _phase_e5(out: Path, *, model: str, peak: float | None) -> dict[str, Any]:
    import shutil

    try:
        return measure_loop(model, out / "e5-small", batch=64, steps=40, warmup=5, mixed_precision="bf16",
                            peak_tflops=peak)
    finally:  # the loop's scratch model copies (hundreds of MB) are not results
        shutil.rmtree(out / "e5-small" / "work", ignore_errors=True)


def _phase_bge(*, checkpointing: bool, batch: int, peak: float | None, deadline: float) -> dict[str, Any]:
    import torch

    device = torch.device("cuda", 0)

    def once(attention: str):
        _reset_memory(device)
        model, used, note = build_encoder(bge_m3_config(), device=device, attention=attention,
                                          gradient_checkpointing=checkpointing)
        try:
            result = measure_encoder(model, device=device, batch=batch, seq=512, steps=20, warmup=3,
                                     dtype=torch.bfloat16, deadline=deadline, peak_tflops=peak)
        finally:
            del model
            _reset_memory(device)
        return {"attention": used, **({"attention_note": note} if note else {}),
                "gradient_checkpointing": checkpointing, **result}

    attention = attention_choice()
    try:
        return once(attention)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if attention == "sdpa":
            raise
        # flash-attn installed but failing in the step (a build for another CUDA or torch): unattended, the
        # run measures SDPA rather than nothing, and says so.
        return {**once("sdpa"), "attention_note": f"{attention} failed ({type(e).__name__}: "
                                                  f"{(str(e).splitlines() or [''])[0]}); SDPA measured"}


def _phase_quality(out: Path, *, config: Path, deadline: float) -> dict[str, Any]:
    """`m3tune bench quality` in its own process group, killed at DEADLINE; what finished is read back from
    the run root's manifests (a rerun of the printed command resumes from them)."""
    import signal
    import subprocess
    import sys

    from m3tune.manifest import read_manifest
    from m3tune.bench.quality import PHASES
    from m3tune.runroot import open_root

    import torch

    if torch.cuda.is_available():
        _reset_memory(torch.device("cuda", 0))  # the GPU phases' cached blocks, so the child has the whole card
    root = out / "quality"
    cmd = [sys.executable, "-m", "m3tune.cli", "bench", "quality", "--config", str(config.absolute()),
           "--root", str(root)]
    limit = max(1.0, deadline - time.monotonic())
    with open(out / "quality.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, cut = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the pipeline and its training child go too
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, cut = proc.returncode, True
    store = open_root(str(root))
    done = {name: round(m.seconds, 1) for name in PHASES if (m := read_manifest(store.child(name))) is not None}
    result: dict[str, Any] = {"command": " ".join(cmd[1:]).replace("-m m3tune.cli", "m3tune", 1),
                              "exit_code": rc, "limit_s": round(limit), "steps_done_seconds": done,
                              "log": "quality.log"}
    summary = root / "quality" / "summary.json"
    if cut:
        result["status"] = "cut off"
        result["cut_off"] = (f"killed after {limit:.0f} s (the budget's end) with {len(done)} of {len(PHASES)} "
                             f"steps done; rerun `m3tune bench quality --config {config} --root {root}` to finish")
    elif rc in (0, 3) and summary.is_file():  # 3: it finished but missed its goal, a result like any other
        s = json.loads(summary.read_text(encoding="utf-8"))
        result |= {"goal_met": s["goal_met"], "goal": s["goal"], "overall": s["overall"],
                   "total_seconds": s["total_seconds"], "summary": "quality/quality/summary.md"}
    else:
        tail = (out / "quality.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"bench quality exited {rc}: {tail[0] if tail else 'no output'} (see quality.log)")
    return result


def run(out: Path, *, budget_s: float, started: float, model: str, batch: int, peak_tflops: float | None,
        quality_config: Path | None, command: str, log) -> dict[str, Any]:
    """Check everything that can be checked, then run the phases within BUDGET_S of STARTED (time.monotonic());
    write OUT/results.json after each phase and OUT/summary.md at the end. Nothing is written before the checks
    pass."""
    import platform

    check_out(out)
    if quality_config is not None and not quality_config.is_file():
        raise ConfigError(f"--quality-config {quality_config}: no such file (run from the repository root, or "
                          "pass --no-quality)")
    name = require_cuda()
    check_model(model)  # after the CUDA check: resolving local:e5-small converts it on first use
    if batch < 1:
        raise ConfigError("--batch must be at least 1")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ConfigError("--peak-tflops must be positive")
    import torch
    import transformers

    found = peak_for(name)
    if peak_tflops:
        peak, peak_source = peak_tflops, "--peak-tflops"
    elif found:
        peak, peak_source = found[0], f"table: {found[1]}"
    else:
        peak, peak_source = None, f"unknown: {name!r} is not in the table; pass --peak-tflops for MFU"
    deadline = started + budget_s
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": command, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget_s,
        "device": {"name": name, "count": torch.cuda.device_count(),
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                   "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)},
        "software": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "flash_attn": _version("flash-attn")},
        "peak_bf16_tflops": peak, "peak_source": peak_source, "flops_formula": FLOPS_FORMULA, "phases": {}}
    phases = [("e5-small", lambda d: _phase_e5(out, model=model, peak=peak)),
              ("bge-m3", lambda d: _phase_bge(checkpointing=False, batch=batch, peak=peak, deadline=d)),
              ("bge-m3-checkpointing", lambda d: _phase_bge(checkpointing=True, batch=batch, peak=peak, deadline=d))]
    if quality_config is not None:
        phases.append(("quality", lambda d: _phase_quality(out, config=quality_config, deadline=d - WRITE_MARGIN)))
    run_phases(phases, deadline=deadline, results=results, out=out, log=log,
               oom_hint=f" (lower --batch, now {batch})")
    if quality_config is None:
        results["phases"]["quality"] = {"status": "skipped", "reason": "--no-quality"}
    results["total_s"] = round(time.monotonic() - started, 1)
    _write(out / "results.json", json.dumps(results, indent=2) + "\n")
    _write(out / "summary.md", summary_markdown(results))
    return results


def run_phases(phases, *, deadline: float, results: dict[str, Any], out: Path, log, oom_hint: str = "") -> None:
    """Each (name, fn(deadline)) of PHASES in turn, skipped when less than PHASE_NEEDS[name] seconds are left;
    a phase that raises is recorded as failed and the next one still runs (nobody is watching). Its entry goes
    to RESULTS["phases"] and OUT/results.json is rewritten after each."""
    for phase, fn in phases:
        left = deadline - time.monotonic()
        if left < PHASE_NEEDS[phase]:
            entry = {"status": "skipped", "reason": f"budget: {left:.0f} s left, the phase needs about "
                                                    f"{PHASE_NEEDS[phase]:.0f} s"}
        else:
            log.info("bench gpu: %s (%.0f s left)", phase, left)
            t0 = time.monotonic()
            try:
                entry = {"status": "ok", **fn(deadline)}
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                if type(e).__name__ == "OutOfMemoryError":
                    first += oom_hint
                entry = {"status": "failed", "reason": f"{type(e).__name__}: {first}"}
            entry["wall_s"] = round(time.monotonic() - t0, 1)
        results["phases"][phase] = entry
        log.info("bench gpu: %s %s", phase, entry["status"] + (f": {entry['reason']}" if "reason" in entry else ""))
        _write(out / "results.json", json.dumps(results, indent=2) + "\n")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader (or a kill) never sees half a file


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_markdown(results: dict[str, Any]) -> str:
    d = results["device"]
    lines = [f"# m3tune bench gpu — {d['name']}", "",
             f"`{results['command']}` · started {results['started_utc']} · {results.get('total_s', '?')} s of a "
             f"{results['budget_s']:.0f} s budget", "",
             f"Device: {d['name']} (×{d['count']}, compute {d['capability']}, {d['memory_gib']} GiB); "
             f"software: " + ", ".join(f"{k} {v}" for k, v in results["software"].items() if v), "",
             f"Peak: {_fmt(results['peak_bf16_tflops'], '.0f')} TFLOP/s dense bf16 ({results['peak_source']}).",
             f"FLOPs: {results['flops_formula']}.", "",
             "| phase | status | attention | tokens/s | model TFLOP/s | MFU | peak memory GiB | notes |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for phase, p in results["phases"].items():
        if p["status"] != "ok" or phase == "quality":
            note = p.get("reason") or ("below" if phase == "quality" else "")
            lines.append(f"| {phase} | {p['status']} | | | | | | {note} |")
            continue
        per_step = f"{p['sequences_per_step']} sequences" if "sequences_per_step" in p else p["batch"]
        notes = [f"{per_step} per step", f"{p['timed_steps']} timed steps"]
        if "padding_share" in p:
            notes.append(f"{p['examples_per_s']:.0f} examples/s, {p['padding_share']:.0%} padding")
        if "gradient_checkpointing" in p:
            notes.append(f"checkpointing {'on' if p['gradient_checkpointing'] else 'off'}, seq {p['seq']}")
        lines.append(f"| {phase} | ok | {p.get('attention')} | {p['tokens_per_s']:,.0f} | "
                     f"{p['model_tflops_per_s']:.1f} | {_fmt(p['mfu'], '.1%')} | {_fmt(p['peak_memory_gib'], '.1f')} | "
                     f"{'; '.join(notes)} |")
    q = results["phases"].get("quality", {})
    if q.get("status") in ("ok", "cut off"):
        lines += ["", "## Quality benchmark (GPU config)", "", f"`{q['command']}` (exit {q['exit_code']})", ""]
        if "cut_off" in q:
            lines.append(f"Not finished: {q['cut_off']}. Steps done (s): {q['steps_done_seconds']}.")
        else:
            metrics = list(next(iter(q["overall"].values())))
            lines += ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
            lines += [f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in metrics) + " |" for m, v in q["overall"].items()]
            lines += ["", f"Goal {'MET' if q['goal_met'] else 'NOT MET'}: {q['goal']}; {q['total_seconds']} s; "
                          f"full summary: {q['summary']}."]
    return "\n".join(lines) + "\n"
