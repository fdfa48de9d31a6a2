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
    assert _error_line(out) == ("error: train: not trained as asked: --mixed-precision fp16 runs as no on "
                                "XLMRobertaModel")


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


# ------------------------------------------------------------------------- make test-deepspeed (slow)

@pytest.mark.deepspeed_slow
def test_zero3_follows_the_reference_and_publishes_standard_names(tmp_path, quran_pairs, tiny_model, reference):
    import torch
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from m3tune.training import memory

    root, manifest = _run(tmp_path, "zero3", quran_pairs, model=tiny_model, processes=2, deepspeed="zero3")
    np.testing.assert_allclose(_losses(_history(root)), _losses(reference), rtol=RTOL)
    ran = manifest.counts["ran"]
    assert (ran["engine"], ran["zero_stage"], ran["world_size"]) == ("DeepSpeedEngine", 3, 2)
    # ZeRO-3 partitions the weights too: a model and an optimizer shard per rank
    assert ran["zero_shards"] == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1)
                                  for kind in ("model", "optim")]
    # the estimate counts the partitioned parameters (ds_numel), not their empty local tensors
    base = AutoModel.from_pretrained(tiny_model, add_pooling_layer=False)
    static = memory.static_bytes(sum(p.numel() for p in base.parameters()), 0)
    assert f"weights, gradients and AdamW {static / memory.GIB:.2f} GiB" in manifest.counts["memory_estimate"]
    assert static / memory.GIB >= 0.005
    folder = root.child("train").path / "model"  # type: ignore[attr-defined]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(base.state_dict())  # LayerNorm weight/bias, not gamma/beta
    loaded, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    embedding = SentenceTransformer(str(folder), device="cpu").encode(["بسم الله"], convert_to_tensor=True)
    assert embedding.shape == (1, 32) and torch.isfinite(embedding).all()


def _kill_at_first_checkpoint(proc: subprocess.Popen, store, *, steps: int) -> int:
    """SIGKILL PROC and every process under it (the step, torchrun, its workers: a pod or node dying) once STORE
    holds a checkpoint; its step. Not PROC's process group alone: torchrun starts each worker in a session of its
    own, so a killed group left the workers training on, and writing later checkpoints into the run root."""
    import psutil

    deadline = time.time() + 300
    while not store.exists("checkpoints/latest.json") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)
    killed_at = json.loads(store.read_bytes("checkpoints/latest.json"))["step"]
    assert killed_at < steps, "the run finished before it could be killed"
    return killed_at


@pytest.mark.slow
def test_a_killed_step_takes_its_training_processes_with_it(tmp_path, quran_pairs):  # noqa: F811
    """SIGKILL of `m3tune step train` alone (not its process tree): torchrun, which put each worker in a session
    of its own, and the workers end too (the kernel's parent-death signal, m3tune/procs.py), so nothing trains on
    into the run root behind a rerun. Before it, the workers trained to the end."""
    import psutil

    root = _root_with_data(str(tmp_path / "runs" / "orphans"), quran_pairs, manifest=True)
    cmd = [sys.executable, "-m", "m3tune.cli", "step", "train", "--root", root.uri, "--workdir", str(tmp_path / "w"),
           *_short_args(), "--model", "local:tiny-xlmr", "--processes", "2", "--max-steps", "100000",
           "--checkpoint-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = psutil.Process(proc.pid)
    deadline = time.time() + 240
    workers: list = []
    def training(p) -> bool:
        try:  # both started and past their imports
            return "m3tune.training.loop" in " ".join(p.cmdline()) and p.cpu_times().user > 1
        except psutil.Error:  # gone meanwhile, or a zombie (a short-lived helper process)
            return False

    while time.time() < deadline and proc.poll() is None:
        workers = [p for p in step.children(recursive=True) if training(p)]
        if len(workers) == 2:
            break
        time.sleep(0.2)
    assert len(workers) == 2, "the two training processes never started"
    tree = step.children(recursive=True)
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:  # not leave them running whatever the assertion says
        p.kill()
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    assert not root.child("train").exists("model/model.safetensors")  # nothing finished behind the kill


@pytest.mark.deepspeed_slow
def test_zero2_killed_mid_run_resumes_and_ends_as_the_unbroken_run(tmp_path, quran_pairs):
    """The tiny model with its dropout: the resumed steps reproduce the unbroken run's only if the RNG state of
    every process came back from the checkpoint (a fresh start or a reseeded resume draws other masks)."""
    from safetensors.torch import load_file

    args = ["--model", "local:tiny-xlmr", "--processes", "2", "--deepspeed", "zero2", "--checkpoint-every", "1"]
    unbroken = _root_with_data(str(tmp_path / "runs" / "unbroken"), quran_pairs, manifest=True)
    assert _step_train(unbroken, tmp_path / "u", *args).returncode == 0

    root = _root_with_data(str(tmp_path / "runs" / "killed"), quran_pairs, manifest=True)
    cmd = [sys.executable, "-m", "m3tune.cli", "step", "train", "--root", root.uri, "--workdir",
           str(tmp_path / "pod-1"), *_short_args(), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = _kill_at_first_checkpoint(proc, root.child("train"), steps=4)
    shards = [n for n in root.child(f"train/checkpoints/step-{killed_at:08d}").list() if "zero_pp_rank_" in n]
    assert len(shards) == 2
    resumed = _step_train(root, tmp_path / "pod-2", *args)  # another pod: an empty local folder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {killed_at}" in resumed.stderr  # the step counter came back
    history = _history(root)
    assert [h["step"] for h in history if h["kind"] == "train"] == [1, 2, 3, 4]
    assert _losses(history) == _losses(_history(unbroken))  # bit for bit
    weights = [load_file(str(r.child("train").path / "model" / "model.safetensors")) for r in (root, unbroken)]
    assert all(torch_equal(weights[0][k], weights[1][k]) for k in weights[1])

    # the same checkpoint resumed under ZeRO-3: refused before step 1, saying what changed
    out = _step_train(root, tmp_path / "pod-3", *args[:-4], "--deepspeed", "zero3", "--checkpoint-every", "1")
    assert out.returncode == 1
    line = _error_line(out)
    assert line.startswith("error: train: ") and 'deepspeed "zero2" -> "zero3"' in line and "zero_stage 2 -> 3" in line


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.deepspeed_slow
def test_unified_heads_and_matryoshka_under_zero2(tmp_path, quran_pairs, tiny_model):
    """BGE-M3's three heads (dense at every Matryoshka dim, sparse, ColBERT) trained under ZeRO-2 in 2 processes:
    the one-process curve of the same global batch, and the trained heads published."""
    import torch

    from m3tune.encoder.heads import COLBERT_FILE, SPARSE_FILE

    one, _ = _run(tmp_path, "unified-one", quran_pairs, model=tiny_model, batch_size=8, unified=True)
    two, manifest = _run(tmp_path, "unified-zero2", quran_pairs, model=tiny_model, processes=2, deepspeed="zero2",
                         unified=True)
    assert manifest.counts["ran"]["zero_stage"] == 2 and manifest.counts["heads_trained"] == "loaded"
    h1, h2 = _history(one), _history(two)
    np.testing.assert_allclose(_losses(h2), _losses(h1), rtol=RTOL)
    for a, b in zip([h for h in h1 if h["kind"] == "train"], [h for h in h2 if h["kind"] == "train"]):
        np.testing.assert_allclose([b["loss_by_dim"][str(d)] for d in SHORT["dims"]],
                                   [a["loss_by_dim"][str(d)] for d in SHORT["dims"]], rtol=RTOL)
    folder = two.child("train").path / "model"  # type: ignore[attr-defined]
    for name in (SPARSE_FILE, COLBERT_FILE):
        trained = torch.load(folder / name, weights_only=True)
        base = torch.load(Path(tiny_model) / name, weights_only=True)
        assert trained.keys() == base.keys() and not torch.equal(trained["weight"], base["weight"])


# ------------------------------------------------------------------ two nodes on one machine (rendezvous)

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(root, tmp_path, tag: str, *args: str) -> list[subprocess.Popen]:
    """Two "pods", each `m3tune step train` with one process, through the env contract of the JobSet /
    PyTorchJob pods: MASTER_ADDR/PORT, PET_NNODES, the node rank as PET_NODE_RANK (node 0) or
    JOB_COMPLETION_INDEX (node 1); torchrun's c10d rendezvous on 127.0.0.1. Each has its own local folder."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PET_NNODES="2", PET_RDZV_ID=tag,
                   **({"PET_NODE_RANK": "0"} if node == 0 else {"JOB_COMPLETION_INDEX": "1"}))
        cmd = [sys.executable, "-m", "m3tune.cli", "step", "train", "--root", root.uri, "--workdir",
               str(tmp_path / f"{tag}-node{node}"), *_short_args(), *args]
        log = open(tmp_path / f"{tag}-node{node}.log", "w")  # noqa: SIM115 — the child writes it
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs, timeout: float = 300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


@pytest.mark.deepspeed_slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_two_nodes_give_the_single_node_curve(tmp_path, quran_pairs, tiny_model, reference, engine):
    root = _root_with_data(str(tmp_path / "runs" / engine), quran_pairs, manifest=True)
    args = ["--model", tiny_model, *(["--deepspeed", "zero2"] if engine == "zero2" else [])]
    assert _wait(_two_nodes(root, tmp_path, engine, *args)) == [0, 0], \
        (tmp_path / f"{engine}-node0.log").read_text()[-3000:]
    np.testing.assert_allclose(_losses(_history(root)), _losses(reference), rtol=RTOL)
    from m3tune.manifest import read_manifest

    ran = read_manifest(root.child("train")).counts["ran"]
    assert ran["world_size"] == 2 and ran["zero_stage"] == (2 if engine == "zero2" else None)


@pytest.mark.deepspeed_slow
def test_a_killed_node_stops_the_other_fast_and_a_rerun_resumes(tmp_path, quran_pairs, tiny_model, reference):
    root = _root_with_data(str(tmp_path / "runs" / "nodes"), quran_pairs, manifest=True)
    args = ["--model", tiny_model, "--deepspeed", "zero2", "--checkpoint-every", "1"]
    node0, node1 = _two_nodes(root, tmp_path, "first", *args)
    killed_at = _kill_at_first_checkpoint(node1, root.child("train"), steps=4)
    killed = time.time()
    assert node0.wait(timeout=120) == 1  # not a hang until gloo's 30-minute timeout
    survivor = (tmp_path / "first-node0.log").read_text()
    print(f"the survivor stopped {time.time() - killed:.1f} s after the kill")
    assert "error: train: the training processes failed" in survivor
    assert "With 2 nodes, a node that died or lost the network stops the others too." in survivor

    procs = _two_nodes(root, tmp_path, "rerun", *args)
    assert _wait(procs) == [0, 0], (tmp_path / "rerun-node0.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"rerun-node{n}.log").read_text() for n in (0, 1))
    assert f"resumed at step {killed_at}" in logs
    history = _history(root)
    assert [h["step"] for h in history if h["kind"] == "train"] == [1, 2, 3, 4]
    np.testing.assert_allclose(_losses(history), _losses(reference), rtol=RTOL)
