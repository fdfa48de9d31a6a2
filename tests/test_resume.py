"""Resume that survives preemption: SIGKILL at seeded random points, three times, and the final weights equal
an unbroken run's; a resume whose data or model-path settings changed refuses and says what changed; the
settings that do not change the model's path (max_steps, patience, cadence) may change on resume.

The data and the tiny dropout-free model are test_train.py's fixtures (the same real Quran pairs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from test_train import BASE, _history, _losses, _root_with_data, quran_pairs, tiny_model  # noqa: F401

# 8 steps of 8 examples, a checkpoint every step (so a kill lands between any two), validation every 4
RUN = dict(BASE, batch_size=8, max_steps=8, eval_every=4, checkpoint_every=1, keep_checkpoints=2)


def _weights(root):
    from safetensors.torch import load_file

    return load_file(str(root.child("train").path / "model" / "model.safetensors"))  # type: ignore[attr-defined]


def _train(root, tmp_path, model, **over):
    from m3tune.context import StepContext
    from m3tune.training.step import train

    return train(StepContext(root=root, name="train"), **{**RUN, "model": model, "workdir": str(tmp_path), **over})


@pytest.mark.slow
def test_three_sigkills_at_random_points_end_with_the_unbroken_runs_weights(tmp_path, quran_pairs, tiny_model):
    """Each kill waits for a step drawn by a seeded RNG to be checkpointed, then a seeded delay of 0-0.4 s (so
    it lands in training, validation or an upload), and kills the process group. Every restart resumes in an
    empty local folder. The final weights equal the unbroken run's bit for bit: on CPU with the same thread
    count every kernel is deterministic, the data order is rebuilt from (seed, epoch) and the checkpoint holds
    the weights, AdamW's moments, the schedule and every RNG state."""
    import torch

    from m3tune.training.config import TrainConfig

    unbroken = _root_with_data(str(tmp_path / "runs" / "unbroken"), quran_pairs)
    _train(unbroken, tmp_path / "work-unbroken", tiny_model)

    uri = str(tmp_path / "runs" / "killed")
    root = _root_with_data(uri, quran_pairs)
    (tmp_path / "config.json").write_text(TrainConfig(**RUN, model=tiny_model).model_dump_json())
    rng = random.Random(13)
    store, killed_at = root.child("train"), []
    targets = sorted(rng.sample(range(1, RUN["max_steps"]), 3))
    for n, target in enumerate(targets):
        proc = subprocess.Popen([sys.executable, "-m", "m3tune.training.loop", "--root", uri, "--config",
                                 str(tmp_path / "config.json"), "--workdir", str(tmp_path / f"pod-{n}")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            if store.exists("checkpoints/latest.json") and \
                    json.loads(store.read_bytes("checkpoints/latest.json"))["step"] >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at.append(json.loads(store.read_bytes("checkpoints/latest.json"))["step"])
    assert killed_at == sorted(killed_at) and killed_at[-1] < RUN["max_steps"], killed_at
    _train(root, tmp_path / "pod-last", tiny_model)

    history, reference = _history(root), _history(unbroken)
    assert [h["step"] for h in history if h["kind"] == "train"] == list(range(1, 9))
    assert _losses(history) == _losses(reference)
    one, two = _weights(unbroken), _weights(root)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    # the final step is checkpointed, and latest.json names the checkpoint holding the best weights
    latest = json.loads(store.read_bytes("checkpoints/latest.json"))
    assert latest["step"] == 8 and store.exists(f"checkpoints/{latest['best']}/best/model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, quran_pairs, tiny_model):
    base = tmp_path_factory.mktemp("finished")
    root = _root_with_data(str(base / "runs" / "r"), quran_pairs)
    _train(root, base / "work", tiny_model, max_steps=4)
    return root


def test_max_steps_patience_and_cadence_may_change_on_resume(finished, tmp_path, tiny_model):
    """A resumed run with a lower max_steps, another patience and cadence keeps its checkpoints and steps."""
    import shutil

    from m3tune.runroot import open_root

    copy = tmp_path / "runs" / "copy"
    shutil.copytree(finished.path, copy)  # type: ignore[attr-defined]
    root = open_root(str(copy))
    before = root.child("train").read_bytes("checkpoints/latest.json")
    _train(root, tmp_path / "work", tiny_model, max_steps=3, patience=2, eval_every=1, checkpoint_every=3,
           keep_checkpoints=5)
    # nothing retrained: step 4 >= max_steps 3, the run is over; its history is the first run's
    assert [h["step"] for h in _history(root) if h["kind"] == "train"] == [1, 2, 3, 4]
    assert root.child("train").read_bytes("checkpoints/latest.json") == before


def test_a_resume_whose_data_or_model_path_changed_refuses_saying_what(finished, tmp_path, tiny_model):
    import shutil

    from m3tune.errors import ConfigError
    from m3tune.runroot import open_root

    copy = tmp_path / "runs" / "copy"
    shutil.copytree(finished.path, copy)  # type: ignore[attr-defined]
    root = open_root(str(copy))
    combine = root.child("combine")
    rows = combine.read_bytes("train.jsonl").splitlines(keepends=True)
    combine.write_bytes("train.jsonl", b"".join(rows[:-1]))  # combine reran: one example fewer
    with pytest.raises(ConfigError) as err:
        _train(root, tmp_path / "work", tiny_model, learning_rate=5e-3)
    message = str(err.value)
    assert "combine/train.jsonl changed (" in message and "learning_rate 0.01 -> 0.005" in message
    assert "combine/validation.jsonl" not in message and "--restart" in message
    assert root.child("train").exists("checkpoints/latest.json")  # nothing deleted
    # --restart deletes them and starts over on the new data
    _train(root, tmp_path / "work", tiny_model, learning_rate=5e-3, max_steps=2, restart=True)
    latest = json.loads(root.child("train").read_bytes("checkpoints/latest.json"))
    assert latest["step"] == 2 and latest["key"]["learning_rate"] == 5e-3
    assert not any(p.startswith("step-00000004") for p in root.child("train").child("checkpoints").list())


def test_max_steps_past_the_schedule_it_started_with_is_refused(finished, tmp_path, tiny_model):
    import shutil

    from m3tune.errors import ConfigError
    from m3tune.runroot import open_root

    copy = tmp_path / "runs" / "copy"
    shutil.copytree(finished.path, copy)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"max_steps 6 goes past the 4 steps of the schedule"):
        _train(open_root(str(copy)), tmp_path / "work", tiny_model, max_steps=6)
