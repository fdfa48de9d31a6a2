"""The `train` step: run the training loop here (one process) or under torchrun (several, or several nodes),
then publish the model folder and metrics.jsonl to ROOT/train/.

Two ways to run on several GPUs or nodes, both without SSH:
- the step launches: `--processes N` starts torchrun on this machine; in a
  JobSet or a Kubeflow PyTorchJob (one pod per node, each running
  `m3tune step train`) the pod reads MASTER_ADDR, MASTER_PORT, PET_NNODES or
  WORLD_SIZE (pods) and PET_NODE_RANK, JOB_COMPLETION_INDEX or RANK (its node
  rank) and joins torchrun's c10d rendezvous;
- already launched (`accelerate launch ... m3tune step train`, as the Argo
  template runs it; LOCAL_RANK is set): every process trains in place.
DeepSpeed runs inside these processes through Accelerate; its own (SSH)
launcher is never used. Rank 0 (node 0) publishes; the other processes and
pods exit 0 after training without writing a manifest, so rank 0's is the
step's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3tune.context import StepContext
from m3tune.errors import BadInput, ConfigError, UserError
from m3tune.procs import dies_with_this_process
from m3tune.training.config import TrainConfig


def nodes_of(env: Mapping[str, str]) -> int:
    """The pods (nodes) of a PyTorchJob or JobSet, each running `m3tune step train`: PET_NNODES or WORLD_SIZE."""
    return int(env.get("PET_NNODES") or env.get("WORLD_SIZE") or "1")


def world_size_of(processes: int, env: Mapping[str, str]) -> int:
    """The processes that will train: WORLD_SIZE when already launched, else PROCESSES on each node."""
    if "LOCAL_RANK" in env:
        return int(env.get("WORLD_SIZE", "1"))
    return processes * nodes_of(env)


def launch_command(processes: int, env: Mapping[str, str], loop_args: list[str], *,
                   deepspeed: bool = False) -> tuple[list[str] | None, int]:
    """(torchrun command, node rank), or (None, global rank) to train in this process.

    Already launched (LOCAL_RANK set: `accelerate launch` or torchrun around `m3tune step train`, as the Argo
    template does): every process trains here. Otherwise PET_NNODES / WORLD_SIZE name the pods of a
    PyTorchJob or JobSet, PET_NODE_RANK / JOB_COMPLETION_INDEX / RANK this pod's rank among them.
    DEEPSPEED: even one process goes through torchrun (a world of 1): DeepSpeed's engine needs the process
    group the launcher's environment sets up, and in this process it crashed at its first barrier."""
    if "LOCAL_RANK" in env:
        return None, int(env.get("RANK", "0"))
    nnodes = str(nodes_of(env))
    node_rank = env.get("PET_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or env.get("RANK") or "0"
    if nnodes == "1" and processes == 1 and not deepspeed:
        return None, 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--nnodes", nnodes]
    if nnodes != "1":
        if not env.get("MASTER_ADDR"):
            raise ConfigError(f"train on {nnodes} nodes needs MASTER_ADDR (and MASTER_PORT) of node 0")
        endpoint = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
        cmd += ["--node_rank", node_rank, "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                "--rdzv_id", env.get("PET_RDZV_ID", "m3tune-train")]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "m3tune.training.loop", *loop_args], int(node_rank)


# Written in every work dir m3tune makes: training clears its out/, best/ and checkpoints/ (and, for the default
# folder, the whole of it), so a folder without the mark holds nothing m3tune may delete.
WORKDIR_MARK = ".m3tune-workdir"


def claim_workdir(work: Path, *, ours: bool = False) -> Path:
    """WORK, made (or found) m3tune's: created with the mark where missing or empty; a folder of the user's own
    (not empty, no mark) is refused before anything in it is touched. OURS: a folder under m3tune's cache (the
    default work dir, which an earlier version made without the mark)."""
    if work.exists() and not work.is_dir():
        raise ConfigError(f"workdir {work}: not a folder")
    if not ours and work.is_dir() and not (work / WORKDIR_MARK).is_file() and any(work.iterdir()):
        raise ConfigError(f"workdir {work}: not empty and not made by m3tune (no {WORKDIR_MARK}); training "
                          "clears its out/, best/ and checkpoints/: give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORKDIR_MARK).write_text("a work folder of m3tune's train step: its contents may be deleted\n")
    return work


def workdir_for(ctx: StepContext, config: TrainConfig) -> Path:
    import hashlib

    from m3tune.encoder.tiny import cache_dir

    if config.workdir:
        return Path(config.workdir)
    key = hashlib.sha256(f"{ctx.root.uri}|{config.model_dump_json()}".encode()).hexdigest()[:16]
    return cache_dir() / "train" / key


def train(ctx: StepContext, **config: Any) -> dict[str, Any]:
    from m3tune.training.loop import run

    cfg = TrainConfig.model_validate(config)
    world = world_size_of(cfg.processes, os.environ)
    if cfg.deepspeed:  # bad input stops here, before torchrun starts and before step 1
        from m3tune.training.config import check_deepspeed

        check_deepspeed(cfg.deepspeed, batch_size=cfg.batch_size, gradient_accumulation=cfg.gradient_accumulation,
                        world=world)
    work = claim_workdir(workdir_for(ctx, cfg), ours=not cfg.workdir)
    (work / "config.json").write_text(cfg.model_dump_json())
    cmd, node_rank = launch_command(cfg.processes, os.environ,
                                    ["--root", ctx.root.uri, "--config", str(work / "config.json"),
                                     "--workdir", str(work)], deepspeed=bool(cfg.deepspeed))
    if cmd is None:
        result = run(root_uri=ctx.root.uri, config=cfg.model_dump(), workdir=str(work))
        if node_rank != 0:  # one of several launched processes: the main one publishes
            raise SystemExit(0)
    else:
        import shutil

        import torch

        from m3tune.training.loop import ERRORS, RESULT

        env = dict(os.environ)
        if not torch.cuda.is_available() and not cfg.deepspeed:
            # DDP on CPU: Accelerate's MULTI_CPU (gloo). Never under DeepSpeed: with it Accelerate skips
            # DeepSpeed without a word and trains plain DDP.
            env["ACCELERATE_USE_CPU"] = "1"
        for stale in (work / ERRORS, work / "out"):  # a failed or finished run's files are not this run's
            shutil.rmtree(stale, ignore_errors=True)
        ctx.log.info("launching: %s", " ".join(cmd))
        # torchrun dies with this step (SIGTERM: it then stops its workers), and each worker with torchrun
        # (loop.main): torchrun puts every worker in a session of its own, so a killed step left them training
        rc = subprocess.run(cmd, env=env, preexec_fn=dies_with_this_process(signal.SIGTERM)).returncode
        if rc != 0:
            reason = _first_error(work / ERRORS)
            if reason:  # a UserError in the processes (bad input, a request not honoured): its one line
                raise (BadInput if reason["bad_input"] else UserError)(reason["message"])
            nodes = nodes_of(os.environ)
            lost = (f" With {nodes} nodes, a node that died or lost the network stops the others too." if nodes > 1
                    else "")
            raise UserError(f"train: the training processes failed (exit {rc}); their log is above.{lost} A rerun "
                            f"resumes from the last checkpoint in {ctx.out.uri_of('checkpoints')}")
        if not (work / RESULT).exists():
            # The global rank 0 writes the result. Under c10d rendezvous it may be on any node, not the one
            # whose PET_NODE_RANK is 0, so its presence, not the env, picks the node that publishes.
            ctx.log.info("train: node %d done; the node of rank 0 publishes the model", node_rank)
            raise SystemExit(0)  # no manifest from a worker node: node 0's is the step's
        result = json.loads((work / RESULT).read_text())
    _publish(ctx, work / "out")
    if not cfg.workdir:  # published: the local copies (gigabytes for BGE-M3) are no longer needed
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return result


def _first_error(folder: Path) -> dict | None:
    """The error a training process wrote to FOLDER (rank 0's first): its one line, and whether it is bad input
    (exit 4: a retry fails the same way), if any."""
    files = sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])) if folder.is_dir() else []
    return json.loads(files[0].read_text(encoding="utf-8")) if files else None


def _publish(ctx: StepContext, out: Path) -> None:
    """The model folder and metrics.jsonl, each file atomically, recorded in the manifest; a file an earlier
    run left in model/ (a head the new base lacks) is removed."""
    from dataclasses import replace

    from m3tune.storage import upload_folder

    written = upload_folder(out / "model", ctx.out.child("model"), remove_others=True)
    for rel, info in written.items():
        ctx.outputs[f"model/{rel}"] = replace(info, name=f"model/{rel}")
    ctx.write_bytes("metrics.jsonl", (out / "metrics.jsonl").read_bytes())  # one line per step: small
    ctx.log.info("published %d files of the model to %s", len(written), ctx.out.uri_of("model"))
