"""What actually trained: the engine Accelerate built, its ZeRO stage, the world size, the precision, gradient
checkpointing and the ZeRO shards of the last checkpoint, read from the running objects, not from the options.

Accelerate falls back without a word (ACCELERATE_USE_CPU makes it skip DeepSpeed and train DDP; a process
without a backend trains as rank 0 of 1; fp16 on CPU is plain fp32), so the loop checks these facts against
the request before step 1 (`unhonoured`: an error) and records them, not the flags, in the manifest and the
model card.
"""

from __future__ import annotations

import os
import re
from typing import Any

SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$")


def facts(accelerator, model) -> dict[str, Any]:
    """What runs in this process: engine class, Accelerate's distributed type, ZeRO stage (None without
    DeepSpeed), processes, backend, precision, gradient checkpointing."""
    import torch

    engine = type(model).__name__
    deepspeed = hasattr(model, "zero_optimization_stage")  # deepspeed.DeepSpeedEngine, without importing it
    if deepspeed:
        precision = "bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else "no"
    else:  # Accelerate autocasts only with native_amp; fp16 on a CPU leaves it off and trains in fp32
        precision = accelerator.mixed_precision if accelerator.native_amp else "no"
    dist = torch.distributed
    inner = accelerator.unwrap_model(model)
    return {"engine": engine,
            "distributed_type": str(accelerator.state.distributed_type).split(".")[-1],
            "zero_stage": int(model.zero_optimization_stage()) if deepspeed else None,
            "world_size": accelerator.num_processes,
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "mixed_precision": precision,
            # transformers sets `gradient_checkpointing` on the encoder modules it recomputes
            "gradient_checkpointing": any(getattr(m, "gradient_checkpointing", False) is True
                                          for m in inner.modules())}


def requested_world(env=os.environ) -> int:
    """The processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(env.get("WORLD_SIZE", "1"))


def unhonoured(ran: dict[str, Any], *, zero_stage: int | None, world: int, precision: str,
               checkpointing: bool) -> list[str]:
    """Each way RAN differs from the request, in words (empty: everything asked for runs)."""
    wrong = []
    if zero_stage is not None and (ran["engine"] != "DeepSpeedEngine" or ran["zero_stage"] != zero_stage):
        got = (f"ZeRO-{ran['zero_stage']}" if ran["zero_stage"] is not None
               else f"{ran['engine']} (Accelerate's {ran['distributed_type']}), not DeepSpeed")
        wrong.append(f"--deepspeed asked for ZeRO-{zero_stage}, got {got}")
    if zero_stage is None and ran["zero_stage"] is not None:
        wrong.append(f"no --deepspeed, but the engine is DeepSpeed ZeRO-{ran['zero_stage']}")
    if ran["world_size"] != world:
        wrong.append(f"the launcher started {world} process(es) but they train as a world of {ran['world_size']} "
                     f"(backend {ran['backend']})")
    if ran["mixed_precision"] != precision:
        wrong.append(f"--mixed-precision {precision} runs as {ran['mixed_precision']} on {ran['engine']}")
    if ran["gradient_checkpointing"] != checkpointing:
        wrong.append(f"--gradient-checkpointing {'on' if checkpointing else 'off'} is "
                     f"{'on' if ran['gradient_checkpointing'] else 'off'} in the model")
    return wrong


def zero_shards(names: list[str], *, world: int, where: str) -> list[str]:
    """The ZeRO shard files among a checkpoint's NAMES, checked: one optimizer shard for each of WORLD ranks
    (a DeepSpeed checkpoint without them would not resume as ZeRO)."""
    from m3tune.errors import UserError

    shards = sorted(n for n in names if SHARD.search(n))
    ranks = {int(SHARD.search(n)[1]) for n in shards if SHARD.search(n)[2] == "optim"}
    if ranks != set(range(world)):
        raise UserError(f"train: {where} holds ZeRO optimizer shards of ranks {sorted(ranks)}, not of each of the "
                        f"{world} processes: DeepSpeed did not save its partitioned state")
    return shards


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux, else getrusage's maximum (KiB on Linux and BSD,
    bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

