"""How much memory a training step needs: the estimate printed before step 1, GradCache's chunk sized from a
CUDA device's free memory, and the out-of-memory error that says which knob to turn.

The estimate (documented in docs/design.md; an estimate, not a measurement):

- weights, gradients and AdamW's two moments: 4 + 4 + 8 bytes per trainable parameter (fp32 master
  weights: autocast keeps them), 4 per frozen one;
- activations of one text of L tokens through one encoder layer of width H with a attention heads:
  L·H·(34 + 5·a·L/H) bytes at 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models", eq. 1 without tensor parallelism), twice that in fp32. The 5·a·L² term is the
  eager attention matrix; fused SDPA kernels store less, so the estimate errs high;
- with gradient checkpointing only each layer's input is kept (2·L·H bytes at 16-bit), plus one layer's
  full activations while it is recomputed.

GradCache's chunk is the number of the longest texts (passage_max_length) whose activations fit in
80% of the free memory left after the static part (the rest is the CUDA context, the allocator's
fragmentation and the embeddings GradCache caches).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from m3tune.errors import UserError

GIB = 1024 ** 3
HEADROOM = 0.8


class OutOfMemory(UserError):
    """The device ran out of memory: the message names the settings that lower it."""


@dataclass(frozen=True)
class Estimate:
    static_bytes: int  # weights, gradients, AdamW moments
    per_text_bytes: int  # activations of one passage of passage_max_length tokens
    texts_per_micro_batch: int  # queries and passages of one process's micro-batch
    chunk: int  # texts encoded at once (GradCache chunk, or the whole micro-batch)

    @property
    def activation_bytes(self) -> int:
        return self.per_text_bytes * self.chunk

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes


def static_bytes(trainable: int, frozen: int) -> int:
    return 16 * trainable + 4 * frozen


def per_text_bytes(*, tokens: int, hidden: int, layers: int, heads: int, half: bool, checkpointing: bool) -> int:
    """Activation bytes of one text of TOKENS tokens through the encoder (see the module's docstring)."""
    scale = 1 if half else 2
    layer = tokens * hidden * (34 + 5 * heads * tokens / hidden) * scale
    if checkpointing:
        return int(layers * 2 * tokens * hidden * scale + layer)
    return int(layers * layer)


def gradcache_chunk_for(free_bytes: int, *, static: int, per_text: int, texts: int) -> int:
    """GradCache's chunk for FREE_BYTES of free device memory: 0 (no chunking) when the whole micro-batch of
    TEXTS fits, else the texts that fit (at least 1)."""
    budget = free_bytes * HEADROOM - static
    fits = int(budget // per_text) if per_text > 0 else texts
    return 0 if fits >= texts else max(1, fits)


def describe(est: Estimate, *, free_bytes: int | None, precision: str, checkpointing: bool, tokens: int) -> str:
    chunking = (f"GradCache chunks of {est.chunk} texts" if est.chunk < est.texts_per_micro_batch
                else f"all {est.texts_per_micro_batch} texts at once")
    line = (f"memory estimate: weights, gradients and AdamW {est.static_bytes / GIB:.2f} GiB; activations "
            f"{est.activation_bytes / GIB:.2f} GiB ({chunking} of up to {tokens} tokens, {precision}, gradient "
            f"checkpointing {'on' if checkpointing else 'off'}); total {est.total_bytes / GIB:.2f} GiB")
    return line + (f" of {free_bytes / GIB:.1f} GiB free" if free_bytes is not None else "")


@contextmanager
def explain_oom(*, where: str, settings: dict, resume_hint=lambda: ""):
    """Turn the device's out-of-memory error inside the block into one that names the knobs to turn
    (RESUME_HINT: called then, says where a rerun resumes)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    try:
        yield
    except oom as e:
        now = ", ".join(f"{k} {v}" for k, v in settings.items())
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        raise OutOfMemory(
            f"train: the device ran out of memory {where} ({now}): {first}. Lower one of: --gradcache-chunk "
            "(texts encoded at once; GradCache keeps the contrastive batch), --batch-size, --passage-max-length; "
            f"or turn on --gradient-checkpointing. {resume_hint()}".rstrip()) from None
