"""The train step on CPU with the tiny local XLM-RoBERTa, on real Quran pairs.

The data (`m3tune.bench.train.quran_examples`): verses of the packaged
Quran (ingest), each a training example whose query is either its English
translation (cross-lingual) or its first eight Arabic words (an exact-quote
query), its hard negatives three other verses of the same surah and one
random verse. Validation verses are disjoint from
training ones. The model is the tiny XLM-R with dropout set to 0: at 32
dims, dropout's noise drowns the signal of a few dozen steps (it cannot
even overfit one batch with it), and without it one process and two give the
same numbers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.runroot import open_root

DIMS = [32, 16, 8]
BASE = dict(dims=DIMS, batch_size=16, gradient_accumulation=1, temperature=0.05, learning_rate=1e-2,
            warmup_ratio=0.05, query_max_length=32, passage_max_length=64, negatives=3, patience=None,
            validation_corpus_sample=300)


@pytest.fixture(scope="session")
def quran_pairs(tmp_path_factory) -> dict[str, bytes]:
    """train.jsonl (320 examples) and validation.jsonl (96) from the real Quran, as combine would publish them,
    and the ingest step's passages.jsonl and manifest (validation searches a sample of the corpus)."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.passages import read_passages
    from m3tune.executor import run_step
    from m3tune.bench.train import quran_examples

    root = open_root(str(tmp_path_factory.mktemp("quran") / "runs" / "q"))
    run_step(root, "ingest", IngestConfig(sources=["quran"]))
    rows = quran_examples(read_passages(root), random.Random(7), 416)
    dump = lambda part: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode()  # noqa: E731
    ingest = root.child("ingest")
    return {"train.jsonl": dump(rows[:320]), "validation.jsonl": dump(rows[320:]),
            "ingest/passages.jsonl": ingest.read_bytes("passages.jsonl"),
            "ingest/_manifest.json": ingest.read_bytes("_manifest.json")}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny XLM-R without dropout, carrying BGE-M3-style sparse and ColBERT heads to be copied."""
    import shutil

    import torch

    from m3tune.encoder.profiles import resolve

    path = tmp_path_factory.mktemp("models") / "tiny-nodrop"
    shutil.copytree(resolve("local:tiny-xlmr"), path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    with torch.random.fork_rng():  # seeded heads: an unlucky random sparse head scores almost every token 0
        torch.manual_seed(0)
        torch.save(torch.nn.Linear(32, 1).state_dict(), path / "sparse_linear.pt")
        torch.save(torch.nn.Linear(32, 32).state_dict(), path / "colbert_linear.pt")
    return str(path)


def _root_with_data(where: str, data: dict[str, bytes], *, manifest: bool = False, s3_endpoint: str | None = None):
    """A run root whose combine step has published DATA (with a manifest when the executor must see it done)."""
    root = open_root(where, s3_endpoint=s3_endpoint)
    for name, blob in data.items():  # the ingest step's output, its manifest last
        if name.startswith("ingest/") and name != "ingest/_manifest.json":
            root.write_bytes(name, blob)
    if "ingest/_manifest.json" in data:
        root.write_bytes("ingest/_manifest.json", data["ingest/_manifest.json"])
    data = {k: v for k, v in data.items() if not k.startswith("ingest/")}
    outputs = {name: root.child("combine").write_bytes(name, blob) for name, blob in data.items()}
    if manifest:
        from m3tune.manifest import Manifest, OutputInfo, write_manifest

        write_manifest(root.child("combine"), Manifest(
            step="combine", m3tune_version="test", config={}, config_digest="sha256:0", inputs={},
            outputs={k: OutputInfo(sha256=v.sha256, bytes=v.bytes, rows=blob.count(b"\n"))
                     for (k, v), blob in zip(outputs.items(), data.values())},
            started_at="2026-01-01T00:00:00", finished_at="2026-01-01T00:00:01", seconds=1.0))
    return root


def _history(root) -> list[dict]:
    return [json.loads(line) for line in root.child("train").read_bytes("metrics.jsonl").splitlines()]


def _losses(history) -> list[float]:
    return [h["loss"] for h in history if h["kind"] == "train"]


# ------------------------------------------------------------------------------------------- the main run

@pytest.fixture(scope="module")
def trained(tmp_path_factory, quran_pairs, tiny_model):
    """40 steps through the executor, as `m3tune step train` runs it."""
    from m3tune.executor import run_step
    from m3tune.training.config import TrainConfig

    base = tmp_path_factory.mktemp("trained")
    root = _root_with_data(str(base / "runs" / "main"), quran_pairs, manifest=True)
    config = TrainConfig(model=tiny_model, epochs=2, eval_every=20, checkpoint_every=20, workdir=str(base / "work"),
                         **BASE)
    manifest, ran = run_step(root, "train", config)
    assert ran
    return root, manifest


def test_loss_falls_and_validation_recall_rises(trained):
    root, manifest = trained
    history = _history(root)
    losses = _losses(history)
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    before, best = manifest.metrics["before"], manifest.metrics["best"]["metrics"]
    # 96 held-out queries over 466 passages; the untrained tiny model finds ~0.37 of them in its top 10
    assert best["32"]["recall@10"] >= before["32"]["recall@10"] + 0.1, (before, best)
    assert best["32"]["ndcg@10"] > before["32"]["ndcg@10"]


def test_every_matryoshka_dim_is_trained_and_validated(trained):
    root, manifest = trained
    history = _history(root)
    assert all(set(h["loss_by_dim"]) == {"32", "16", "8"} for h in history if h["kind"] == "train")
    # the gradient norm before clipping (lr 1e-2 with clipping at 1: above 1 at first) and the throughput
    norms = [h["grad_norm"] for h in history if h["kind"] == "train"]
    assert all(n > 0 for n in norms) and max(norms) > 1.0
    assert all(h["examples_per_s"] > 0 and h["tokens_per_s"] > h["examples_per_s"] for h in history
               if h["kind"] == "train")
    evals = [h for h in history if h["kind"] == "validation"]
    assert [h["step"] for h in evals] == [20, 40]
    for h in evals:
        assert set(h["metrics"]) == {"32", "16", "8"}
        assert set(h["metrics"]["8"]) == {"recall@10", "mrr@10", "ndcg@10"}
        # every query type of the validation set has its row (bench.quran_examples: question and exact)
        assert set(h["by_type"]) == {"question", "exact"} and set(h["by_type"]["exact"]) == {"32", "16", "8"}
    # the best checkpoint is the one with the highest nDCG@10 at the largest dim, and is what was published
    best = max(evals, key=lambda h: h["metrics"]["32"]["ndcg@10"])
    assert manifest.metrics["best"]["step"] == best["step"]


def test_outputs_are_published_with_the_manifest(trained):
    root, manifest = trained
    train = root.child("train")
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/modules.json",
                 "model/sentence_bert_config.json", "model/1_Pooling/config.json",
                 "model/config_sentence_transformers.json", "model/README.md", "model/validation_curves.png",
                 "metrics.jsonl"):
        assert name in manifest.outputs and train.exists(name), name
    latest = json.loads(train.read_bytes("checkpoints/latest.json"))
    assert latest["step"] == 40
    steps = {p.split("/")[1] for p in train.list() if p.startswith("checkpoints/step-")}
    assert steps == {"step-00000020", "step-00000040"}


def test_saved_model_loads_in_transformers_and_sentence_transformers_alike(trained):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    root, _ = trained
    folder = str(root.child("train").child("model").path)  # type: ignore[attr-defined]
    texts = ["إِنَّ ٱللَّهَ مَعَ ٱلصَّـٰبِرِينَ", "Indeed, Allah is with the patient."]
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        cls = model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    st = SentenceTransformer(folder, device="cpu")
    np.testing.assert_allclose(st.encode(texts), expected, atol=1e-5)
    small = SentenceTransformer(folder, device="cpu", truncate_dim=8).encode(texts)
    assert small.shape == (2, 8)
    trunc = expected[:, :8] / np.linalg.norm(expected[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(small / np.linalg.norm(small, axis=1, keepdims=True), trunc, atol=1e-5)


def test_model_card_curves_and_bge_m3_heads(trained, tiny_model):
    import matplotlib.image

    root, manifest = trained
    model = root.child("train").child("model")
    card = model.read_bytes("README.md").decode()
    assert "truncate_dim" in card and "| 8 |" in card and "train_examples" in card
    assert "sparse_linear.pt" in card and "not retrained" in card
    assert model.read_bytes("sparse_linear.pt") == (Path(tiny_model) / "sparse_linear.pt").read_bytes()
    assert model.read_bytes("colbert_linear.pt") == (Path(tiny_model) / "colbert_linear.pt").read_bytes()
    image = matplotlib.image.imread(str(model.path / "validation_curves.png"))  # type: ignore[attr-defined]
    assert image.shape[0] > 100 and image.shape[1] > 300
    assert manifest.counts["heads_copied"] == ["sparse_linear.pt", "colbert_linear.pt"]


def test_rerun_with_same_inputs_is_skipped(trained):
    from m3tune.executor import run_step
    from m3tune.pipeline import get_step

    root, manifest = trained
    again, ran = run_step(root, "train", get_step("train").config.model_validate(manifest.config))
    assert not ran and again.outputs == manifest.outputs


# ----------------------------------------------------------------------- processes, resume, failures

SHORT = dict(BASE, batch_size=4, max_steps=4, eval_every=100, checkpoint_every=2)


def _copy_of(trained, tmp_path):
    import shutil

    root, _ = trained
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(root.path, copy)  # type: ignore[attr-defined]  # the module's run stays as it is
    return open_root(str(copy))


def test_a_mistyped_model_fails_before_unpublishing_the_trained_one(trained, tmp_path):
    # [4/7] 5: before, the executor removed train's manifest first, then the step failed on the model, so a
    # good result was unpublished by a typo.
    from m3tune.manifest import read_manifest

    root = _copy_of(trained, tmp_path)
    before = read_manifest(root.child("train"))
    out = CliRunner().invoke(app, ["step", "train", "--root", root.uri, "--model", "/typo/model",
                                   "--workdir", str(tmp_path / "work")])
    assert out.exit_code == 1 and "model '/typo/model': no such folder" in out.stderr
    assert read_manifest(root.child("train")) == before


def test_a_flipped_byte_in_the_model_is_tampered_for_status_and_evaluate(trained, tmp_path):
    # [4/7] 3: before, a same-size edit of model.safetensors went unnoticed by status and was evaluated.
    from m3tune.evaluation.models import model_path
    from m3tune.manifest import Tampered

    root = _copy_of(trained, tmp_path)
    weights = root.child("train").path / "model" / "model.safetensors"  # type: ignore[attr-defined]
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 1000, len(data)):  # 1,000 bytes of the last tensor, the size unchanged
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    status = CliRunner().invoke(app, ["status", "--root", root.uri, "--json"])
    train = next(r for r in json.loads(status.stdout) if r["step"] == "train")
    assert train["state"] == "tampered" and "train/model/model.safetensors: tampered: sha256" in train["reason"]
    with pytest.raises(Tampered, match="model.safetensors: tampered"):
        model_path("run:train", root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, quran_pairs, tiny_model):
    """4 steps of 8 examples in one process (batch 8): the curve the other runs must reproduce."""
    from m3tune.context import StepContext
    from m3tune.training.step import train

    base = tmp_path_factory.mktemp("reference")
    root = _root_with_data(str(base / "runs" / "ref"), quran_pairs)
    train(StepContext(root=root, name="train"), **{**SHORT, "batch_size": 8, "model": tiny_model,
                                                   "workdir": str(base / "work")})
    return _history(root)


def test_two_gloo_processes_give_the_one_process_curve(tmp_path, quran_pairs, tiny_model, reference):
    """2 processes x 4 examples with cross-device negatives = 1 process x 8 examples: same losses, same metrics
    (the two processes encode in length groups, several forward passes before DDP's backward; the one does not)."""
    from m3tune.context import StepContext
    from m3tune.training.step import train

    root = _root_with_data(str(tmp_path / "runs" / "two"), quran_pairs)
    train(StepContext(root=root, name="train"), **{**SHORT, "processes": 2, "length_group": 5, "model": tiny_model,
                                                   "workdir": str(tmp_path / "work")})
    history = _history(root)
    np.testing.assert_allclose(_losses(history), _losses(reference), rtol=2e-3)
    two, one = history[-1]["metrics"], reference[-1]["metrics"]
    assert history[-1]["kind"] == "validation" and two.keys() == one.keys()
    for dim in one:
        for metric in one[dim]:
            assert two[dim][metric] == pytest.approx(one[dim][metric], abs=0.02)


def test_gradcache_run_follows_the_plain_curve(tmp_path, quran_pairs, tiny_model, reference):
    """The same steps encoded 12 texts at a time (GradCache) give the same losses as whole batches."""
    from m3tune.context import StepContext
    from m3tune.training.step import train

    root = _root_with_data(str(tmp_path / "runs" / "gc"), quran_pairs)
    train(StepContext(root=root, name="train"), **{**SHORT, "batch_size": 8, "gradcache_chunk": 12,
                                                   "model": tiny_model, "workdir": str(tmp_path / "work")})
    np.testing.assert_allclose(_losses(_history(root)), _losses(reference), rtol=1e-4)


def test_run_in_length_groups_follows_the_one_pass_curve(tmp_path, quran_pairs, tiny_model, reference):
    """Texts encoded in length-sorted groups of 5 give the losses of one pass over the batch padded to its
    longest text (the tiny model's default): grouping changes only how much padding is encoded."""
    from m3tune.context import StepContext
    from m3tune.training.step import train

    root = _root_with_data(str(tmp_path / "runs" / "grouped"), quran_pairs)
    train(StepContext(root=root, name="train"), **{**SHORT, "batch_size": 8, "length_group": 5,
                                                   "model": tiny_model, "workdir": str(tmp_path / "work")})
    np.testing.assert_allclose(_losses(_history(root)), _losses(reference), rtol=1e-4)


@pytest.mark.slow
def test_killed_run_resumes_from_s3_checkpoint_with_the_same_curve(tmp_path, quran_pairs, tiny_model, reference,
                                                                    s3_bucket, s3_endpoint):
    """A pod killed mid-run (SIGKILL) and restarted elsewhere (an empty local folder) continues the curve."""
    from m3tune.context import StepContext
    from m3tune.training.config import TrainConfig
    from m3tune.training.step import train

    uri = f"s3://{s3_bucket}/runs/resume"
    root = _root_with_data(uri, quran_pairs, s3_endpoint=s3_endpoint)
    config = {**SHORT, "batch_size": 8, "model": tiny_model}
    (tmp_path / "config.json").write_text(TrainConfig(**config).model_dump_json())
    env = {**os.environ, "M3TUNE_S3_ENDPOINT": s3_endpoint}
    proc = subprocess.Popen([sys.executable, "-m", "m3tune.training.loop", "--root", uri, "--config",
                             str(tmp_path / "config.json"), "--workdir", str(tmp_path / "pod-1")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_store = root.child("train")
    deadline = time.time() + 90
    while not train_store.exists("checkpoints/latest.json") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(train_store.read_bytes("checkpoints/latest.json"))["step"]
    assert killed_at < 4, "the run finished before it could be killed"

    os.environ["M3TUNE_S3_ENDPOINT"] = s3_endpoint
    try:
        train(StepContext(root=root, name="train"), **{**config, "workdir": str(tmp_path / "pod-2")})
    finally:
        del os.environ["M3TUNE_S3_ENDPOINT"]
    history = _history(root)
    assert [h["step"] for h in history if h["kind"] == "train"] == [1, 2, 3, 4]
    np.testing.assert_allclose(_losses(history), _losses(reference), rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, quran_pairs, tiny_model):
    from m3tune.context import StepContext
    from m3tune.training.loop import NonFiniteLoss
    from m3tune.training.step import train

    root = _root_with_data(str(tmp_path / "runs" / "nan"), quran_pairs)
    # checkpoints of a run with another config: never resumed; with --restart removed so that none outlives ours
    stale = root.child("train").child("checkpoints")
    stale.write_bytes("step-00009999/trainer_state.json", b"{}")
    stale.write_bytes("latest.json", json.dumps({"step": 9999, "name": "step-00009999",
                                                 "config_digest": "sha256:other"}).encode())
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+).*last good checkpoint \(step (\d+)\)") as err:
        train(StepContext(root=root, name="train"), **{**SHORT, "learning_rate": 1e30, "checkpoint_every": 1,
                                                       "warmup_ratio": 0.0, "model": tiny_model, "restart": True,
                                                       "workdir": str(tmp_path / "work")})
    import re

    failed, kept = map(int, re.search(r"at step (\d+).*step (\d+)\)", str(err.value)).groups())
    assert kept == failed - 1
    latest = json.loads(root.child("train").read_bytes("checkpoints/latest.json"))
    assert latest["step"] == kept and not root.child("train").exists("metrics.jsonl")
    assert not any(p.startswith("step-00009999") for p in stale.list())


def test_dims_wider_than_the_model_are_a_one_line_error_of_the_cli(tmp_path, quran_pairs, tiny_model):
    root = _root_with_data(str(tmp_path / "runs" / "wide"), quran_pairs, manifest=True)
    from typer.testing import CliRunner

    from m3tune.cli import app

    out = CliRunner().invoke(app, ["step", "train", "--root", root.uri, "--model", tiny_model, "--dim", "64",
                                   "--dim", "32", "--workdir", str(tmp_path / "work")])
    assert out.exit_code == 1
    assert out.stderr.strip().splitlines()[-1] == ("error: train: dims [64] exceed the hidden size 32 of "
                                                   f"{tiny_model}; give dims <= 32 (e.g. --dim 32 --dim 16)")
    assert not root.child("train").exists("_manifest.json")


# ----------------------------------------------------------------------------------------- components

def _example(query, pos_id, neg_ids=()):
    from m3tune.training.data import TrainExample

    return TrainExample(query, (f"text of {pos_id}",), (pos_id,), tuple(f"text of {n}" for n in neg_ids),
                        tuple(neg_ids))


def test_sampler_never_puts_a_shared_query_or_positive_in_one_batch():
    from m3tune.training.data import global_batches

    rng = random.Random(3)
    examples = [_example(f"query {rng.randrange(60)}", f"quran:1:{rng.randrange(80)}") for _ in range(400)]
    for epoch in range(3):
        batches = global_batches(examples, 16, seed=5, epoch=epoch)
        assert len(batches) >= 15
        for batch in batches:
            assert len(batch) == 16
            keys = [k for i in batch for k in examples[i].conflict_keys]
            assert len(keys) == len(set(keys))
    assert global_batches(examples, 16, seed=5, epoch=1) == global_batches(examples, 16, seed=5, epoch=1)
    assert global_batches(examples, 16, seed=5, epoch=1) != global_batches(examples, 16, seed=5, epoch=2)


def test_loss_masks_a_negative_that_is_the_querys_own_positive():
    """Query 0's positive p0 is also in the batch as query 1's hard negative: that column is not a negative."""
    import torch

    from m3tune.training.data import key_hash
    from m3tune.training.loss import matryoshka_info_nce

    torch.manual_seed(0)
    q, p = torch.randn(2, 8), torch.randn(4, 8)  # columns: pos0, pos1, neg of q0, neg of q1 (= p0 again)
    keys = torch.tensor([key_hash(k) for k in ("a", "b", "c", "a")])
    loss, per_dim = matryoshka_info_nce(q, p, pos_keys=torch.tensor([[key_hash("a")], [key_hash("b")]]),
                                        col_keys=keys, col_valid=torch.tensor([True, True, True, False]),
                                        dims=[8, 4], weights=[1.0, 0.5], temperature=0.05, cross_device=False)
    expected = 0
    for dim, w in ((8, 1.0), (4, 0.5)):
        logits = torch.nn.functional.normalize(q[:, :dim], dim=-1) @ torch.nn.functional.normalize(p[:, :dim], dim=-1).T
        logits = logits / 0.05
        l0 = -torch.log_softmax(logits[0, [0, 1, 2]], 0)[0]  # col 3 is p0 again (masked) -- and an empty slot
        l1 = -torch.log_softmax(logits[1, [0, 1, 2]], 0)[1]
        assert per_dim[dim].item() == pytest.approx(((l0 + l1) / 2).item(), rel=1e-5)
        expected += w * (l0 + l1) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradcache_gives_the_full_batch_gradient(quran_pairs, tiny_model, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from m3tune.training.data import collate, read_examples
    from m3tune.training.loss import encode, gradcache_backward, matryoshka_info_nce

    root = _root_with_data(str(tmp_path / "runs" / "gc"), quran_pairs)
    examples = read_examples(root.child("combine"), "train.jsonl")[:8]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = collate(examples, list(range(8)), tokenizer, negatives=3, seed=1, epoch=0, query_max_length=32,
                    passage_max_length=64)
    # the loop's fast path (the Rust tokenizer, numpy padding) builds the very same batch
    from m3tune.encoder.model import FastTokenize

    fast = collate(examples, list(range(8)), FastTokenize(tokenizer), negatives=3, seed=1, epoch=0,
                   query_max_length=32, passage_max_length=64)
    for part in ("queries", "passages"):
        for key, value in getattr(batch, part).items():
            assert torch.equal(getattr(fast, part)[key], value), (part, key)

    def loss_fn(q, p):
        return matryoshka_info_nce(q, p, pos_keys=batch.pos_keys, col_keys=batch.col_keys, col_valid=batch.col_valid,
                                   dims=DIMS, weights=[1, 1, 1], temperature=0.05, cross_device=False)

    grads = []
    for chunk in (None, 5):
        model = AutoModel.from_pretrained(tiny_model, add_pooling_layer=False).train()
        if chunk is None:
            loss, _ = loss_fn(encode(model, batch.queries), encode(model, batch.passages))
            loss.backward()
        else:
            from contextlib import nullcontext

            loss, _ = gradcache_backward(model, batch.queries, batch.passages, chunk=chunk, loss_fn=loss_fn,
                                         backward=lambda l: l.backward(), no_sync=nullcontext, sync=True)
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_loss, full), (gc_loss, gc) = grads
    assert gc_loss == pytest.approx(full_loss, rel=1e-5)
    assert full.keys() == gc.keys()
    for name in full:
        torch.testing.assert_close(gc[name], full[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_length_groups_give_the_one_pass_embeddings_and_gradient(quran_pairs, tiny_model, tmp_path, side):
    """Texts encoded in length-sorted groups, each trimmed to its longest (whichever side the tokenizer pads),
    come back in the batch's order with the one-pass embeddings, loss and gradient, and less padding."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from m3tune.training.data import collate, read_examples
    from m3tune.training.lengths import encode_by_length, padding_share
    from m3tune.training.loss import matryoshka_info_nce

    root = _root_with_data(str(tmp_path / "runs" / "lengths"), quran_pairs)
    examples = read_examples(root.child("combine"), "train.jsonl")[:8]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, padding_side=side)
    batch = collate(examples, list(range(8)), tokenizer, negatives=3, seed=1, epoch=0, query_max_length=32,
                    passage_max_length=64)
    assert padding_share(batch.passages, 5) < padding_share(batch.passages, 0)
    results = []
    for group in (0, 5):
        model = AutoModel.from_pretrained(tiny_model, add_pooling_layer=False).train()
        q = encode_by_length(model, batch.queries, "cls", group=group)
        p = encode_by_length(model, batch.passages, "mean", group=group)
        loss, _ = matryoshka_info_nce(q, p, pos_keys=batch.pos_keys, col_keys=batch.col_keys,
                                      col_valid=batch.col_valid, dims=DIMS, weights=[1, 1, 1], temperature=0.05,
                                      cross_device=False)
        loss.backward()
        results.append((q.detach(), p.detach(), loss.item(),
                        {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}))
    (q0, p0, loss0, grads0), (q5, p5, loss5, grads5) = results
    torch.testing.assert_close(q5, q0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p5, p0, rtol=1e-4, atol=1e-5)
    assert loss5 == pytest.approx(loss0, rel=1e-5)
    assert grads0.keys() == grads5.keys()
    for name in grads0:
        torch.testing.assert_close(grads5[name], grads0[name], rtol=1e-3, atol=1e-5)  # summation order


def test_shipped_deepspeed_configs_are_valid_and_cannot_replace_the_schedule(tmp_path):
    from importlib import resources

    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    from m3tune.errors import ConfigError
    from m3tune.training.config import SHIPPED_DEEPSPEED, deepspeed_config

    shipped = sorted(p.name for p in resources.files("m3tune.training").joinpath("deepspeed").iterdir()
                     if p.name.endswith(".json"))
    assert shipped == [f"{n}.json" for n in SHIPPED_DEEPSPEED]
    for name, stage in (("zero2", 2), ("zero3", 3)):
        raw = json.loads(resources.files("m3tune.training").joinpath(f"deepspeed/{name}.json").read_text())
        assert raw["_command"].startswith("m3tune step train") and f"--deepspeed {name}" in raw["_command"]
        config = deepspeed_config(name)
        parsed = HfDeepSpeedConfig(config)
        assert parsed.get_value("zero_optimization.stage") == stage and parsed.is_zero3() == (stage == 3)
        assert "optimizer" not in config and "scheduler" not in config and "_comment" not in config
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="remove the 'scheduler' section"):
        deepspeed_config(str(own))
    own.write_text('{"zero_optimization": {"stage": 2},}')
    with pytest.raises(ConfigError, match=r"mine.json:1: invalid JSON"):
        deepspeed_config(str(own))


def test_multi_node_environment_makes_a_torchrun_rendezvous():
    from m3tune.errors import ConfigError
    from m3tune.training.step import launch_command

    args = ["--root", "s3://b/r"]
    assert launch_command(1, {}, args) == (None, 0)
    cmd, rank = launch_command(4, {}, args)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "1", "--standalone",
                       "-m", "m3tune.training.loop", *args] and rank == 0
    # Kubeflow PyTorchJob (elastic variables)
    cmd, rank = launch_command(8, {"PET_NNODES": "2", "PET_NODE_RANK": "1", "MASTER_ADDR": "job-master-0",
                                   "MASTER_PORT": "23456"}, args)
    assert rank == 1 and cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "job-master-0:23456" and "ssh" not in " ".join(cmd)
    # JobSet: the node rank is the job completion index
    cmd, rank = launch_command(8, {"WORLD_SIZE": "3", "JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "m"}, args)
    assert rank == 2 and cmd[cmd.index("--nnodes") + 1] == "3"
    # already launched by `accelerate launch m3tune step train`: train in this process
    assert launch_command(1, {"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4"}, args) == (None, 3)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launch_command(1, {"PET_NNODES": "2"}, args)


def test_config_errors_are_clear():
    from pydantic import ValidationError

    from m3tune.training.config import TrainConfig

    with pytest.raises(ValidationError, match="dim_weights has 1 values but dims has 4"):
        TrainConfig(dim_weights=[1.0])
    with pytest.raises(ValidationError, match="gradcache_chunk does not work with deepspeed"):
        TrainConfig(gradcache_chunk=8, deepspeed="zero2")
    assert TrainConfig().dims == [1024, 512, 256, 128] and TrainConfig().temperature == 0.02


@pytest.mark.gpu
def test_bge_m3_sized_training_step_on_gpu():
    """`m3tune bench train --gpu` in small: BGE-M3's architecture trains in bf16 and reports a sane MFU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from m3tune.bench.train import gpu_throughput

    result = gpu_throughput(batch=4, steps=3, warmup=1)
    assert 5e8 < result["parameters"] < 6e8  # XLM-RoBERTa large: BGE-M3's 568M
    assert result["tokens_per_s"] > 0 and (result["mfu"] is None or 0 < result["mfu"] < 1)


def test_retrieval_metrics_match_a_hand_computation():
    import math

    from m3tune.training.validate import retrieval_metrics

    q = np.array([[1.0, 0.0]])
    p = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])  # ranked 0, 1, 2, 3
    got = retrieval_metrics(q, p, [{1, 3}], k=3)
    assert got["recall@3"] == pytest.approx(0.5)  # one of two relevant in the top 3
    assert got["mrr@3"] == pytest.approx(0.5)
    assert got["ndcg@3"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_validation_corpus_is_the_validation_passages_or_a_corpus_sample():
    from m3tune.training.data import validation_set

    examples = [_example("q1", "quran:1:1", ["quran:1:2"]), _example("q2", "quran:1:2", ["quran:1:1"])]
    small = validation_set(examples)
    assert sorted(small.corpus_keys) == ["quran:1:1", "quran:1:2"] and small.relevant == [{"quran:1:1"}, {"quran:1:2"}]
    everything = validation_set(examples, {f"quran:2:{i}": f"verse {i}" for i in range(5)}, types=["exact", "question"],
                                with_negatives=False)
    assert len(everything.corpus_keys) == 7 and everything.corpus_texts[-1] == "text of quran:1:2"
    assert everything.type_counts() == {"exact": 1, "question": 1}


def test_validation_samples_the_corpus_without_held_out_passages(tmp_path, quran_pairs):
    """The sample is seeded, holds every validation positive, and never a held-out passage (combine's list)."""
    from m3tune.corpus import heldout
    from m3tune.corpus.passages import read_passages
    from m3tune.training.config import TrainConfig
    from m3tune.training.data import read_examples
    from m3tune.training.loop import _validation_data

    root = _root_with_data(str(tmp_path / "runs" / "v"), quran_pairs)
    combine = root.child("combine")
    val = read_examples(combine, "validation.jsonl")
    held = heldout.load("packaged")
    positives = {k for ex in val for k in ex.pos_keys}
    one, data = _validation_data(TrainConfig(validation_corpus_sample=500), root, combine, val)
    again, _ = _validation_data(TrainConfig(validation_corpus_sample=500), root, combine, val)
    other, _ = _validation_data(TrainConfig(validation_corpus_sample=500, seed=1), root, combine, val)
    assert one.corpus_keys == again.corpus_keys and set(one.corpus_keys) != set(other.corpus_keys)
    assert len(one.corpus_keys) == len(positives) + 500 and positives <= set(one.corpus_keys)
    whole, _ = _validation_data(TrainConfig(validation_corpus_sample=0), root, combine, val)
    sampled = set(whole.corpus_keys) - positives  # (bench.quran_examples' positives may lie anywhere)
    assert sampled and not sampled & held
    assert len(sampled) == sum(1 for p in read_passages(root) if p.id not in held and p.id not in positives)
    assert set(data) == {"combine/train.jsonl", "combine/validation.jsonl", "ingest/passages.jsonl", "held-out list"}
    # a near-duplicate of a positive is no wrong answer: never in the sample
    import dataclasses

    twin = next(k for k in sorted(sampled) if k.startswith("quran:"))
    val = [dataclasses.replace(val[0], related_keys=(twin,)), *val[1:]]
    with_twin, _ = _validation_data(TrainConfig(validation_corpus_sample=0), root, combine, val)
    assert set(with_twin.corpus_keys) == set(whole.corpus_keys) - {twin}


def test_selection_on_a_named_dim_or_the_mean():
    from m3tune.training.loop import selection_score

    metrics = {"32": {"ndcg@10": 0.6}, "16": {"ndcg@10": 0.5}, "8": {"ndcg@10": 0.1}}
    assert selection_score(metrics, metric="ndcg@10", dim=None, dims=[32, 16, 8]) == 0.6
    assert selection_score(metrics, metric="ndcg@10", dim=16, dims=[32, 16, 8]) == 0.5
    assert selection_score(metrics, metric="ndcg@10", dim="mean", dims=[32, 16, 8]) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------- memory on a GPU

def test_gradcache_chunk_is_sized_from_free_memory():
    """BGE-M3's shape (24 layers, 1024 wide, 16 heads, 568M parameters) at 512 tokens in bf16."""
    from m3tune.training import memory

    static = memory.static_bytes(568_000_000, 0)
    assert static / memory.GIB == pytest.approx(8.46, abs=0.01)  # 16 bytes a trainable parameter
    plain = memory.per_text_bytes(tokens=512, hidden=1024, layers=24, heads=16, half=True, checkpointing=False)
    ckpt = memory.per_text_bytes(tokens=512, hidden=1024, layers=24, heads=16, half=True, checkpointing=True)
    # Korthikanti et al.: 512*1024*(34 + 5*16*512/1024) bytes a layer = 38 MiB; checkpointing keeps 1 MiB a layer
    assert plain == 24 * 512 * 1024 * 74 and ckpt == 24 * 2 * 512 * 1024 + 512 * 1024 * 74
    assert memory.per_text_bytes(tokens=512, hidden=1024, layers=24, heads=16, half=False,
                                 checkpointing=False) == 2 * plain
    texts = 32 * (2 + 7)  # 32 queries, 32 positives, 7 negative slots each
    h100 = 79 * memory.GIB
    chunk = memory.gradcache_chunk_for(h100, static=static, per_text=plain, texts=texts)
    assert chunk == int((h100 * 0.8 - static) // plain) and 0 < chunk < texts  # ~57 of 288: GradCache on
    assert memory.gradcache_chunk_for(h100, static=static, per_text=ckpt, texts=texts) == 0  # all fits
    assert memory.gradcache_chunk_for(10 * memory.GIB, static=static, per_text=plain, texts=texts) == 1
    line = memory.describe(memory.Estimate(static, plain, texts, chunk), free_bytes=h100, precision="bf16",
                           checkpointing=False, tokens=512)
    assert line.startswith("memory estimate: weights, gradients and AdamW 8.46 GiB") and "79.0 GiB free" in line
    assert f"GradCache chunks of {chunk} texts" in line


def test_out_of_memory_names_the_knobs_to_turn():
    import torch

    from m3tune.training.memory import OutOfMemory, explain_oom

    def step():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    settings = {"batch_size": 32, "gradcache_chunk": 64, "passage_max_length": 512, "gradient_checkpointing": "off"}
    with pytest.raises(OutOfMemory) as err:
        with explain_oom(where="at step 3", settings=settings, resume_hint=lambda: "A rerun resumes from step 2."):
            step()
    message = str(err.value)
    for knob in ("--gradcache-chunk", "--batch-size", "--passage-max-length", "--gradient-checkpointing"):
        assert knob in message
    assert "at step 3 (batch_size 32, gradcache_chunk 64" in message and "Tried to allocate 2.00 GiB" in message
    assert message.endswith("A rerun resumes from step 2.")
    with pytest.raises(ValueError):  # anything else passes through unchanged
        with explain_oom(where="x", settings={}):
            raise ValueError("not memory")


def test_cpu_defaults_stay_fp32_without_checkpointing_or_chunks(trained):
    """The trained run above left every memory knob unset: on CPU that is fp32, no checkpointing, no GradCache."""
    _, manifest = trained
    counts = manifest.counts
    assert counts["mixed_precision"] == "no" and counts["gradient_checkpointing"] is False
    assert counts["gradcache_chunk"] is None and counts["memory_estimate"].startswith("memory estimate:")
    assert counts["length_group"] == 0  # the 32-wide test model: one pass (groups of 16 from 256 wide)


def test_gradcache_matches_the_full_batch_with_dropout_accumulation_and_ddp(quran_pairs, tmp_path):
    """The loop's GradCache path in 2 gloo processes (DDP, cross-device negatives), 2 accumulation steps, chunks
    of 5 texts, the tiny model with its dropout of 0.1, against one process's autograd over the whole global
    batch with the same dropout masks (each rank's chunks re-encoded from the same seeded RNG state, in
    GradCache's order). Tolerance rtol 1e-4, atol 1e-6: both are float32 and compute the same sums in another
    order (per chunk vs per batch, DDP's all-reduce, the gathered columns' order), a few ulps each over
    hundreds of terms; a wrong RNG replay, a missing no_sync boundary or a lost accumulation step changes
    the gradients by percents (checked below: another dropout mask is far outside the tolerance)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from m3tune.encoder.profiles import resolve
    from m3tune.training.data import collate, read_examples
    from m3tune.training.loss import _chunks, encode, matryoshka_info_nce

    model_path = resolve("local:tiny-xlmr")
    root = _root_with_data(str(tmp_path / "runs" / "gcddp"), quran_pairs)
    examples = read_examples(root.child("combine"), "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    plan = [[collate(examples[8 * m + 4 * r:8 * m + 4 * r + 4], list(range(8 * m + 4 * r, 8 * m + 4 * r + 4)),
                     tokenizer, negatives=3, seed=1, epoch=0, query_max_length=32, passage_max_length=64)
             for r in range(2)] for m in range(2)]
    torch.save(plan, tmp_path / "plan.pt")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "gradcache_ddp.py"), model_path, str(tmp_path / "plan.pt"),
                           str(tmp_path / "grads.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "grads.pt")

    def reference(seed_offset: int):
        model = AutoModel.from_pretrained(model_path, add_pooling_layer=False).train()
        total = 0
        for m in range(2):
            reps = []
            for r in range(2):
                torch.manual_seed(1000 * m + r + seed_offset)  # what rank r set before micro-step m
                b = plan[m][r]
                q = torch.cat([encode(model, c) for c in _chunks(b.queries, 5)])
                p = torch.cat([encode(model, c) for c in _chunks(b.passages, 5)])
                reps.append((q, p))
            for r in range(2):  # rank r's loss: its queries against both ranks' columns, its own first
                order = [r, 1 - r]
                b = plan[m][r]
                loss, _ = matryoshka_info_nce(
                    reps[r][0], torch.cat([reps[o][1] for o in order]), pos_keys=b.pos_keys,
                    col_keys=torch.cat([plan[m][o].col_keys for o in order]),
                    col_valid=torch.cat([plan[m][o].col_valid for o in order]),
                    dims=[32, 16, 8], weights=[1.0] * 3, temperature=0.05, cross_device=False)
                total = total + loss / 4  # DDP averages the 2 ranks, Accelerate divides by the 2 steps
        total.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    full = reference(0)
    assert ddp.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(ddp[name], full[name], rtol=1e-4, atol=1e-6)
    other = reference(7)  # other dropout masks: the test would see a replay that drew new ones
    assert any(not torch.allclose(other[n], full[n], rtol=1e-2, atol=1e-4) for n in full)
