"""DeepSpeed executed: ZeRO-2 and ZeRO-3 through Accelerate in 2 gloo processes on CPU, the tiny model without
dropout on real Quran pairs (test_train's data), against test_train's one-process reference curve.

Tolerance: 2 processes x 4 examples with cross-device negatives are the one process's batch of 8, so the
per-step losses agree up to the summation order of the gathered scores and the reduced gradients: measured
4.5e-7 relative (DDP, ZeRO-2, ZeRO-3 alike), asserted within 1e-5.

`make test` runs the ZeRO-2 run, the silent-fallback and refused-request checks and the bad-input errors
(about 1.5 minutes); ZeRO-3, resume, unified heads and the two-node rendezvous are marked deepspeed_slow and run
by `make test-deepspeed` (.ci/run runs both).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3tune.cli import app
from test_train import SHORT, _history, _losses, _root_with_data, quran_pairs, reference, tiny_model  # noqa: F401

RTOL = 1e-5


def _step_train(root, tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`m3tune step train` in a process of its own (it launches torchrun), SHORT's settings unless ARGS say."""
    cmd = [sys.executable, "-m", "m3tune.cli", "step", "train", "--root", root.uri, "--workdir", str(tmp_path / "work"),
           *_short_args(), *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def _short_args() -> list[str]:
    args = []
    for key, value in SHORT.items():
        flag = "--" + key.replace("_", "-")
        if key == "dims":
            args += [a for d in value for a in ("--dim", str(d))]
        elif value is not None:  # patience None: one validation at the end, so never an early stop
            args += [flag, str(value)]
    return args


def _error_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _run(tmp_path, name: str, quran_pairs, **config):  # noqa: F811
    """The train step through the executor (its manifest written), as `m3tune step train` runs it."""
    from m3tune.executor import run_step
    from m3tune.training.config import TrainConfig

    root = _root_with_data(str(tmp_path / "runs" / name), quran_pairs, manifest=True)
    manifest, ran = run_step(root, "train", TrainConfig(**{**SHORT, "workdir": str(tmp_path / f"work-{name}"),
                                                           **config}))
    assert ran
    return root, manifest


# ------------------------------------------------------------------------------------- make test (fast)

def test_zero2_in_two_gloo_processes_follows_the_reference_and_records_what_ran(tmp_path, quran_pairs, tiny_model,
                                                                                reference):
    root, manifest = _run(tmp_path, "zero2", quran_pairs, model=tiny_model, processes=2, deepspeed="zero2")
    np.testing.assert_allclose(_losses(_history(root)), _losses(reference), rtol=RTOL)
    ran = manifest.counts["ran"]
    assert {k: ran[k] for k in ("engine", "distributed_type", "zero_stage", "world_size", "backend")} == {
        "engine": "DeepSpeedEngine", "distributed_type": "DEEPSPEED", "zero_stage": 2, "world_size": 2,
        "backend": "gloo"}
    # ZeRO-2 partitions the optimizer state: one shard per rank, in the run root's checkpoint
    shards = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert ran["zero_shards"] == shards
    listing = root.child("train/checkpoints/step-00000004").list()
    assert {f"pytorch_model/{s}" for s in shards} <= set(listing) and "optimizer.bin" not in listing
    card = root.child("train").read_bytes("model/README.md").decode()
    assert '"engine": "DeepSpeedEngine"' in card and '"zero_stage": 2' in card


def test_the_silent_ddp_fallback_is_refused_and_one_process_goes_through_the_launcher(tmp_path, quran_pairs,
                                                                                       tiny_model):
    """ACCELERATE_USE_CPU (which the step once set) made Accelerate skip DeepSpeed and train DDP, exit 0. Now
    one --deepspeed process is launched by torchrun (a world of 1), and what it built is checked before step 1."""
    root = _root_with_data(str(tmp_path / "runs" / "fallback"), quran_pairs, manifest=True)
    out = _step_train(root, tmp_path, "--model", tiny_model, "--deepspeed", "zero2",
                      env={"ACCELERATE_USE_CPU": "1"})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "torch.distributed.run --nproc_per_node 1" in out.stderr
    assert _error_line(out) == ("error: train: not trained as asked: --deepspeed asked for ZeRO-2, got "
                                "DistributedDataParallel (Accelerate's MULTI_CPU), not DeepSpeed")
    assert not root.child("train").exists("_manifest.json") and not root.child("train").list()


def test_fp16_on_cpu_is_an_error_not_fp32(tmp_path, quran_pairs, tiny_model):
    """Accelerate leaves fp16 autocast off on a CPU without a word; the step refuses the run. (A process of its
    own: Accelerate's state is one per process, and this one's reference run fixed it at fp32.)"""
    root = _root_with_data(str(tmp_path / "runs" / "fp16"), quran_pairs, manifest=True)
    out = _step_train(root, tmp_path, "--model", tiny_model, "--mixed-precision", "fp16")
    assert out.returncode == 1, out.stderr[-3000:]
    assert _error_line(out) == "error: train: not trained as asked: --mixed-precision fp16 runs as no on XLMRobertaModel"


def test_unhonoured_requests_are_named():
    from m3tune.training.engine import unhonoured

    ddp = {"engine": "DistributedDataParallel", "distributed_type": "MULTI_CPU", "zero_stage": None,
           "world_size": 1, "backend": None, "mixed_precision": "no", "gradient_checkpointing": False}
    assert unhonoured(ddp, zero_stage=None, world=1, precision="no", checkpointing=False) == []
    assert unhonoured(ddp, zero_stage=None, world=2, precision="no", checkpointing=True) == [
        "the launcher started 2 process(es) but they train as a world of 1 (backend None)",
        "--gradient-checkpointing on is off in the model"]
    zero3 = {**ddp, "engine": "DeepSpeedEngine", "distributed_type": "DEEPSPEED", "zero_stage": 3}
    assert unhonoured(zero3, zero_stage=2, world=1, precision="no", checkpointing=False) == [
        "--deepspeed asked for ZeRO-2, got ZeRO-3"]


@pytest.mark.parametrize("config, error", [
    ({"zero_optimization": {"stage": 4}},
     "cfg.json:1: zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/no/such/nvme"}}},
     "cfg.json:1: zero_optimization.offload_param.nvme_path '/no/such/nvme' is not an existing folder on this "
     "machine"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "cfg.json:1: zero_optimization.offload_param needs zero_optimization.stage 3 (parameters are partitioned "
     "only there), got stage 2"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 9},
     "cfg.json:1: train_batch_size 9 cannot be divided among 2 process(es) x 1 accumulation step(s); set it to "
     '"auto" (--batch-size is per process)'),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 16},
     "cfg.json:1: train_batch_size 16 is not --batch-size 4 x 2 process(es) x 1 accumulation step(s) = 8; set it "
     'to "auto" or --batch-size 8'),
], ids=["unknown-stage", "offload-to-missing-path", "param-offload-below-zero3", "world-cannot-divide",
        "batch-disagrees"])
def test_bad_deepspeed_input_is_a_one_line_error_before_launch(tmp_path, quran_pairs, tiny_model, config, error):
    root = _root_with_data(str(tmp_path / "runs" / "bad"), quran_pairs, manifest=True)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    out = CliRunner().invoke(app, ["step", "train", "--root", root.uri, "--workdir", str(tmp_path / "work"),
                                   "--model", tiny_model, *_short_args(), "--processes", "2",
                                   "--deepspeed", str(path)])
    assert out.exit_code == 1
    assert out.stderr.strip().splitlines()[-1] == f"error: {path.parent}/{error}"
    assert not (tmp_path / "work").exists()  # stopped before torchrun, before anything was written


def test_deepspeed_config_errors_name_the_line():
    from m3tune.errors import ConfigError
    from m3tune.training.config import check_deepspeed

    path = Path(__file__).parent / "data" / "no-such.json"
    with pytest.raises(ConfigError, match="neither zero2, zero3 nor a JSON file"):
        check_deepspeed(str(path), batch_size=4, gradient_accumulation=1, world=2)
    assert check_deepspeed("zero3", batch_size=4, gradient_accumulation=2, world=3)["zero_optimization"]["stage"] == 3


def test_deepspeed_config_error_points_at_the_field_line(tmp_path):
    from m3tune.errors import ConfigError
    from m3tune.training.config import check_deepspeed

    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 2\n  },\n  "train_micro_batch_size_per_gpu": 16\n}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:5: train_micro_batch_size_per_gpu is 16 but --batch-size is 4"):
        check_deepspeed(str(path), batch_size=4, gradient_accumulation=1, world=2)


def test_one_deepspeed_process_is_launched_with_a_world_of_one():
    from m3tune.training.step import launch_command

    cmd, rank = launch_command(1, {}, ["--root", "r"], deepspeed=True)
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "1", "--standalone"]
    assert rank == 0
    assert launch_command(1, {}, ["--root", "r"]) == (None, 0)  # DDP of one process trains in place
