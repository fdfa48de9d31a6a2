"""Unified BGE-M3 training (issue [6/7]) on the tiny model: the three heads' scores against a slow direct
computation, GradCache and two gloo processes with all three heads, the BGE-M3 export read back by
FlagEmbedding, and the bad inputs it refuses.

The data and the tiny model (no dropout, with BGE-M3-style head files) are test_train's fixtures."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from test_train import BASE, DIMS, _history, _losses, _root_with_data, quran_pairs, tiny_model  # noqa: F401
from unified_ddp import ddp_inputs

UNIFIED = dict(BASE, batch_size=4, max_steps=3, eval_every=100, checkpoint_every=100, unified=True)


def _batch(root, tokenizer, n=6):
    from m3tune.training.data import collate, read_examples

    examples = read_examples(root.child("combine"), "train.jsonl")[:n]
    return collate(examples, list(range(n)), tokenizer, negatives=2, seed=1, epoch=0, query_max_length=24,
                   passage_max_length=40)


def _unified(tiny_model, seed=0):
    from transformers import AutoModel, AutoTokenizer

    from m3tune.encoder import heads

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoder = AutoModel.from_pretrained(tiny_model, add_pooling_layer=False)
    sparse, colbert, source = heads.load_or_create(tiny_model, 32, seed=seed)
    assert source == "loaded"
    return tokenizer, heads.UnifiedModel(encoder, sparse, colbert, vocabulary=heads.vocabulary_digest(tokenizer))


def _settings(tokenizer, **kw):
    from m3tune.encoder import heads
    from m3tune.training.loss import Unified

    return Unified(temperatures=(0.05, 0.05, 0.05), special_ids=tuple(heads.special_ids(tokenizer)), **kw)


# ------------------------------------------------------------------------------------------------- scores

def _slow_scores(tokenizer, q, p, q_tok, p_tok):
    """Dense, sparse and ColBERT scores, one (query, passage) pair at a time, from the definitions."""
    special = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}

    def lexical(weights, ids, mask):
        out = {}
        for w, i, m in zip(weights.tolist(), ids.tolist(), mask.tolist()):
            if m and i not in special and w > 0:
                out[i] = max(out.get(i, 0.0), w)
        return out

    def vectors(vecs, mask):  # the tokens after CLS, unpadded, normalised
        v = vecs[: int(mask.sum()) - 1].double()
        return v / v.norm(dim=-1, keepdim=True)

    nq, npass = q[0].shape[0], p[0].shape[0]
    dense, sparse, colbert = (np.zeros((nq, npass)) for _ in range(3))
    for a in range(nq):
        lq = lexical(q[1][a], q_tok["input_ids"][a], q_tok["attention_mask"][a])
        vq = vectors(q[2][a], q_tok["attention_mask"][a])
        for b in range(npass):
            x, y = q[0][a].double(), p[0][b].double()
            dense[a, b] = float(x @ y / x.norm() / y.norm())
            lp = lexical(p[1][b], p_tok["input_ids"][b], p_tok["attention_mask"][b])
            sparse[a, b] = sum(w * lp[i] for i, w in lq.items() if i in lp)
            vp = vectors(p[2][b], p_tok["attention_mask"][b])
            colbert[a, b] = float(np.mean([max(float(t @ u) for u in vp) for t in vq]))
    return dense, sparse, colbert


def test_the_three_scores_match_a_slow_reference(quran_pairs, tiny_model, tmp_path):
    import torch

    from m3tune.training.loss import colbert_scores, dense_scores, encode_unified, sparse_scores

    tokenizer, model = _unified(tiny_model)
    batch = _batch(_root_with_data(str(tmp_path / "r"), quran_pairs), tokenizer)
    with torch.no_grad():
        q = encode_unified(model, batch.queries)
        p = encode_unified(model, batch.passages)
    dense, sparse, colbert = _slow_scores(tokenizer, q, p, batch.queries, batch.passages)
    ids = [tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    np.testing.assert_allclose(dense_scores(q[0], p[0], 32).numpy(), dense, rtol=1e-5, atol=1e-6)
    got = sparse_scores(q[1], batch.queries["input_ids"], batch.queries["attention_mask"], p[1],
                        batch.passages["input_ids"], batch.passages["attention_mask"], ids)
    assert (sparse > 0).sum() > 10, (sparse > 0).sum()  # shared words: the lexical score is exercised
    np.testing.assert_allclose(got.numpy(), sparse, rtol=1e-5, atol=1e-6)
    for block in (1 << 26, 50):  # one block, and many small ones
        got = colbert_scores(q[2], batch.queries["attention_mask"], p[2], batch.passages["attention_mask"],
                             block_elements=block)
        np.testing.assert_allclose(got.numpy(), colbert, rtol=1e-5, atol=1e-6)


def test_unified_loss_is_flagembeddings_formula_with_matryoshka_and_masks():
    """A hand computation of the loss from the three score matrices (the column masked for row 0 is query 1's
    positive = query 0's own positive again, and an empty negative slot)."""
    import torch

    from m3tune.training.data import key_hash
    from m3tune.training.loss import Unified, colbert_scores, dense_scores, sparse_scores, unified_info_nce

    torch.manual_seed(0)
    B, N, L, H = 2, 4, 5, 8
    q = (torch.randn(B, H), torch.rand(B, L), torch.randn(B, L - 1, H))
    p = (torch.randn(N, H), torch.rand(N, L), torch.randn(N, L - 1, H))
    q_tok = {"input_ids": torch.randint(4, 9, (B, L)), "attention_mask": torch.ones(B, L, dtype=torch.long)}
    p_tok = {"input_ids": torch.randint(4, 9, (N, L)), "attention_mask": torch.ones(N, L, dtype=torch.long)}
    p_tok["attention_mask"][2, 3:] = 0
    keys = dict(pos_keys=torch.tensor([[key_hash("a")], [key_hash("b")]]),
                col_keys=torch.tensor([key_hash(k) for k in ("a", "b", "c", "a")]),
                col_valid=torch.tensor([True, True, True, False]))
    settings = Unified(temperatures=(0.05, 0.1, 0.2), special_ids=(0, 1, 2, 3))
    loss, parts = unified_info_nce(q, p, q_tokens=q_tok, p_tokens=p_tok, **keys, dims=[8, 4], weights=[1.0, 0.5],
                                   settings=settings, cross_device=False)
    allowed = [[0, 1, 2], [0, 1, 2]]  # column 3: an empty slot (and query 0's positive again)
    d = {dim: dense_scores(q[0], p[0], dim) / 0.05 for dim in (8, 4)}
    s = sparse_scores(q[1], q_tok["input_ids"], q_tok["attention_mask"], p[1], p_tok["input_ids"],
                      p_tok["attention_mask"], [0, 1, 2, 3]) / 0.1
    c = colbert_scores(q[2], q_tok["attention_mask"], p[2], p_tok["attention_mask"]) / 0.2
    e = d[8] + 0.3 * s + c

    def ce(m):
        return sum(-torch.log_softmax(m[r, allowed[r]], 0)[r] for r in range(B)) / B

    def kd(student):
        return sum(-(torch.softmax(e[r, allowed[r]], 0) * torch.log_softmax(student[r, allowed[r]], 0)).sum()
                   for r in range(B)) / B

    first = (ce(d[8]) + 0.5 * ce(d[4]) + ce(e) + 0.1 * ce(s) + ce(c)) / 4
    second = (kd(d[8]) + 0.5 * kd(d[4]) + 0.1 * kd(s) + kd(c)) / 3
    assert loss.item() == pytest.approx(((first + second) / 2).item(), rel=1e-5)
    assert parts["sparse"].item() == pytest.approx(ce(s).item(), rel=1e-5)
    assert parts[4].item() == pytest.approx(ce(d[4]).item(), rel=1e-5)
    # weight 0 on a head leaves it out of the ensemble without a NaN from 0 x -inf on a masked column
    zero = Unified(ensemble_weights=(1.0, 0.0, 1.0), temperatures=(0.05, 0.1, 0.2), special_ids=(0, 1, 2, 3))
    loss0, parts0 = unified_info_nce(q, p, q_tokens=q_tok, p_tokens=p_tok, **keys, dims=[8, 4], weights=[1.0, 0.5],
                                     settings=zero, cross_device=False)
    assert math.isfinite(loss0.item()) and parts0["ensemble"].item() == pytest.approx(ce(d[8] + c).item(), rel=1e-5)


def test_gradcache_gives_the_full_batch_gradient_for_all_three_heads(quran_pairs, tiny_model, tmp_path):
    import torch

    from m3tune.training.loss import encode_unified, gradcache_backward, unified_info_nce

    tokenizer = _unified(tiny_model)[0]
    batch = _batch(_root_with_data(str(tmp_path / "r"), quran_pairs), tokenizer)
    settings = _settings(tokenizer)

    def loss_fn(q, p):
        return unified_info_nce(q, p, q_tokens=batch.queries, p_tokens=batch.passages, pos_keys=batch.pos_keys,
                                col_keys=batch.col_keys, col_valid=batch.col_valid, dims=DIMS, weights=[1, 1, 1],
                                settings=settings, cross_device=False)

    runs = []
    for chunk in (None, 5):
        model = _unified(tiny_model)[1].train()
        if chunk is None:
            loss, _ = loss_fn(encode_unified(model, batch.queries), encode_unified(model, batch.passages))
            loss.backward()
        else:
            loss, _ = gradcache_backward(model, batch.queries, batch.passages, chunk=chunk, loss_fn=loss_fn,
                                         backward=lambda l: l.backward(), no_sync=nullcontext, sync=True, unified=True)
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_loss, full), (gc_loss, gc) = runs
    assert gc_loss == pytest.approx(full_loss, rel=1e-5)
    assert full.keys() == gc.keys()
    assert {"sparse_linear.weight", "colbert_linear.weight"} <= full.keys()
    for name in full:
        assert full[name].abs().sum() > 0 or "sparse" not in name
        torch.testing.assert_close(gc[name], full[name], rtol=1e-4, atol=1e-6)


def test_length_groups_give_the_one_pass_outputs_and_gradient_for_all_three_heads(quran_pairs, tiny_model, tmp_path):
    """Encoded in length-sorted groups (training.lengths), the per-token sparse weights and multi-vectors come
    back at their columns of the full width: the same three outputs, loss and gradient as one pass."""
    import torch

    from m3tune.training.lengths import encode_by_length, padding_share
    from m3tune.training.loss import encode_unified, unified_info_nce

    from m3tune.training.data import collate, read_examples

    tokenizer = _unified(tiny_model)[0]
    examples = read_examples(_root_with_data(str(tmp_path / "r"), quran_pairs).child("combine"), "train.jsonl")[:8]
    batch = collate(examples, list(range(8)), tokenizer, negatives=2, seed=1, epoch=0, query_max_length=32,
                    passage_max_length=160)
    assert padding_share(batch.passages, 3) < padding_share(batch.passages, 0)
    settings = _settings(tokenizer)
    runs = []
    for group in (0, 3):
        model = _unified(tiny_model)[1].train()
        q, p = (encode_by_length(model, t, "cls", group=group, encode=encode_unified)
                for t in (batch.queries, batch.passages))
        loss, _ = unified_info_nce(q, p, q_tokens=batch.queries, p_tokens=batch.passages, pos_keys=batch.pos_keys,
                                   col_keys=batch.col_keys, col_valid=batch.col_valid, dims=DIMS,
                                   weights=[1, 1, 1], settings=settings, cross_device=False)
        loss.backward()
        runs.append(([t.detach() for t in (*q, *p)], loss.item(),
                     {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}))
    (out0, loss0, grads0), (out3, loss3, grads3) = runs
    # at padding one pass leaves what the heads make of a pad token and the groups zeros: both masked
    q_mask, p_mask = batch.queries["attention_mask"], batch.passages["attention_mask"]
    real = [None, q_mask, q_mask[:, 1:], None, p_mask, p_mask[:, 1:]]
    for a, b, m in zip(out3, out0, real):
        assert a.shape == b.shape
        if m is not None:
            m = m.bool() if a.dim() == 2 else m.bool()[..., None]
            a, b = a * m, b * m
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert loss3 == pytest.approx(loss0, rel=1e-5)
    assert {"sparse_linear.weight", "colbert_linear.weight"} <= grads0.keys() == grads3.keys()
    for name in grads0:
        torch.testing.assert_close(grads3[name], grads0[name], rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------ training runs

@pytest.fixture(scope="module")
def unified_one(tmp_path_factory, quran_pairs, tiny_model):  # noqa: F811
    """3 unified steps of 8 examples in one process: the curve two processes must reproduce, and the export."""
    from m3tune.context import StepContext
    from m3tune.training.step import train

    base = tmp_path_factory.mktemp("unified-one")
    root = _root_with_data(str(base / "runs" / "one"), quran_pairs)
    train(StepContext(root=root, name="train"), **{**UNIFIED, "batch_size": 8, "model": tiny_model,
                                                   "workdir": str(base / "work")})
    return root


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_unified_curve(tmp_path, quran_pairs, tiny_model,  # noqa: F811
                                                                unified_one):
    """2 processes x 4 examples (dense, sparse weights and multi-vectors gathered) = 1 process x 8."""
    from m3tune.context import StepContext
    from m3tune.training.step import train

    root = _root_with_data(str(tmp_path / "runs" / "two"), quran_pairs)
    train(StepContext(root=root, name="train"), **{**UNIFIED, "processes": 2, "model": tiny_model,
                                                   "workdir": str(tmp_path / "work")})
    np.testing.assert_allclose(_losses(_history(root)), _losses(_history(unified_one)), rtol=2e-3)


def _export(root, tmp_path) -> Path:
    """A local copy of the model folder the train step published."""
    from m3tune.storage import download_folder

    folder = tmp_path / "model"
    download_folder(root.child("train/model"), folder)
    return folder


def test_export_is_a_bge_m3_folder_that_flagembedding_scores_alike(unified_one, tiny_model, tmp_path):  # noqa: F811
    """BGEM3FlagModel loads the exported folder; its dense, sparse and ColBERT scores of 20 query/passage pairs
    are m3tune's within 1e-4; the heads were trained (they moved from the base model's)."""
    import torch

    pytest.importorskip("FlagEmbedding", reason="FlagEmbedding (dev extra) is not installed")
    from FlagEmbedding import BGEM3FlagModel
    from transformers import AutoTokenizer

    from m3tune.encoder import heads
    from m3tune.training.data import read_examples
    from m3tune.training.loss import colbert_scores, dense_scores, encode_unified, sparse_scores

    folder = _export(unified_one, tmp_path)
    for name in (heads.SPARSE_FILE, heads.COLBERT_FILE):
        state = torch.load(folder / name, weights_only=True)
        assert set(state) == {"weight", "bias"}
        assert not torch.equal(state["weight"], torch.load(Path(tiny_model) / name, weights_only=True)["weight"])
    profile = json.loads((folder / "m3tune_profile.json").read_text())
    assert profile["heads"] == ["dense", "sparse", "colbert"]
    assert (folder / "modules.json").is_file() and "were trained" in (folder / "README.md").read_text()

    examples = read_examples(unified_one.child("combine"), "train.jsonl")[:20]
    queries, passages = [e.query for e in examples], [e.pos[0] for e in examples]
    flag = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu", pooling_method="cls")
    fq = flag.encode(queries, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=64)
    fp = flag.encode(passages, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=64)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, model = _unified(tiny_model)  # the same modules, with the exported weights
    model.encoder = type(model.encoder).from_pretrained(folder, add_pooling_layer=False)
    model.sparse_linear.load_state_dict(torch.load(folder / heads.SPARSE_FILE, weights_only=True))
    model.colbert_linear.load_state_dict(torch.load(folder / heads.COLBERT_FILE, weights_only=True))
    model.eval()
    special = heads.special_ids(tokenizer)
    for i in range(20):
        toks = [tokenizer([t], truncation=True, max_length=64, return_tensors="pt") for t in (queries[i], passages[i])]
        with torch.no_grad():
            (qd, qs, qc), (pd, ps, pc) = (encode_unified(model, t) for t in toks)
        (qt, pt) = toks
        ours = (dense_scores(qd, pd, 32).item(),
                sparse_scores(qs, qt["input_ids"], qt["attention_mask"], ps, pt["input_ids"], pt["attention_mask"],
                              special).item(),
                colbert_scores(qc, qt["attention_mask"], pc, pt["attention_mask"]).item())
        theirs = (float(fq["dense_vecs"][i] @ fp["dense_vecs"][i]),
                  float(flag.compute_lexical_matching_score(fq["lexical_weights"][i], fp["lexical_weights"][i])),
                  float(flag.colbert_score(fq["colbert_vecs"][i], fp["colbert_vecs"][i])))
        assert ours == pytest.approx(theirs, abs=1e-4), i


# ---------------------------------------------------------------------------------------------- bad input

def test_head_files_of_the_wrong_shape_or_width_are_named(tiny_model, tmp_path):  # noqa: F811
    import torch

    from m3tune.errors import BadInput
    from m3tune.encoder import heads

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    torch.save(torch.nn.Linear(64, 64).state_dict(), folder / heads.COLBERT_FILE)  # another model's width
    with pytest.raises(BadInput, match=r"colbert_linear\.pt: weight has shape \(64, 64\), expected \(32, 32\)"):
        heads.load_or_create(str(folder), 32, seed=0)
    torch.save({"weight": torch.zeros(1, 32)}, folder / heads.SPARSE_FILE)  # no bias
    with pytest.raises(BadInput, match=r"sparse_linear\.pt: expected the tensors \['bias', 'weight'\]"):
        heads.load_or_create(str(folder), 32, seed=0)
    (folder / heads.SPARSE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(BadInput, match=r"sparse_linear\.pt: not a torch state dict"):
        heads.load_or_create(str(folder), 32, seed=0)
    (folder / heads.SPARSE_FILE).unlink()
    with pytest.raises(BadInput, match="come as a pair"):
        heads.load_or_create(str(folder), 32, seed=0)
    (folder / heads.COLBERT_FILE).unlink()  # none: fresh, the same for the same seed
    a, b = heads.load_or_create(str(folder), 32, seed=5), heads.load_or_create(str(folder), 32, seed=5)
    assert a[2] == "fresh" and torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[1].weight, heads.load_or_create(str(folder), 32, seed=6)[1].weight)


def test_unified_refuses_a_tokenizer_that_does_not_match_the_heads_before_training(quran_pairs, tiny_model,  # noqa: F811
                                                                                    tmp_path):
    from m3tune.context import StepContext
    from m3tune.errors import ConfigError
    from m3tune.encoder import heads
    from m3tune.training.step import train

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    (folder / heads.VOCAB_FILE).write_text(json.dumps({"vocabulary": "sha256:" + "0" * 64}))
    root = _root_with_data(str(tmp_path / "runs" / "bad"), quran_pairs)
    with pytest.raises(ConfigError, match="trained with another vocabulary"):
        train(StepContext(root=root, name="train"), **{**UNIFIED, "model": str(folder),
                                                       "workdir": str(tmp_path / "work")})
    assert not root.child("train").exists("checkpoints/latest.json")
    config = json.loads((folder / "config.json").read_text())  # a tokenizer larger than the encoder's embedding
    (folder / heads.VOCAB_FILE).unlink()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ConfigError, match="does not belong to this encoder"):
        heads.check_vocabulary(tokenizer, embedding_rows=config["vocab_size"] - 100, folder=str(folder), model="m")


# --------------------------------------------------------------------------------------------- evaluation

def test_each_head_retrieves_on_its_own_and_the_ensemble_reranks(unified_one, tmp_path):
    """sparse:, colbert: and m3: specs of the exported model: each run's scores are the training scores of
    the pair (encoded alone), and each run is the best K of what its head scores."""
    import torch

    from m3tune.encoder.model import load_encoder
    from m3tune.evaluation import m3
    from m3tune.evaluation.models import parse_model
    from m3tune.training.data import read_examples
    from m3tune.training.loss import colbert_scores, dense_scores, encode_unified, sparse_scores

    assert [parse_model(t, "B").kind for t in ("sparse:run:train", "colbert:x", "m3:base", "x")] == \
        ["sparse", "colbert", "m3", "dense"]
    assert parse_model("m3:base", "B").target == "B"
    folder = str(_export(unified_one, tmp_path))
    examples = read_examples(unified_one.child("combine"), "validation.jsonl")[:12]
    queries = [e.query for e in examples]
    passages = list(dict.fromkeys([e.pos[0] for e in examples] + [n for e in examples for n in e.negs]))[:40]
    qids, pids = [f"q{i}" for i in range(len(queries))], [f"p{j}" for j in range(len(passages))]
    encoder = load_encoder(folder, batch_size=7, runtime="torch")
    model = m3.M3Model(encoder, folder)
    q, p = m3.encoded(model, folder, queries, passages)
    runs = {head: m3.rank(head, q, p, qids, pids, k=5, dims=[16], rerank_k=30) for head in ("sparse", "colbert", "m3")}

    _, unified = _unified(folder)
    unified.eval()
    special = model.special

    def one(text, queries_):
        tokens = encoder.tokenizer([encoder.profile.prepare(text, queries=queries_)], truncation=True,
                                   max_length=encoder.max_length, return_tensors="pt")
        with torch.no_grad():
            return tokens, encode_unified(unified, tokens)

    qs, ps = [one(t, True) for t in queries], [one(t, False) for t in passages]
    for i in range(len(queries)):
        (qt, (qd, qw, qc)) = qs[i]
        exact = {}
        for j, (pt, (pd, pw, pc)) in enumerate(ps):
            exact[pids[j]] = (dense_scores(qd, pd, 32).item(),
                              sparse_scores(qw, qt["input_ids"], qt["attention_mask"], pw, pt["input_ids"],
                                            pt["attention_mask"], special).item(),
                              colbert_scores(qc, qt["attention_mask"], pc, pt["attention_mask"]).item())
        for head, pick in (("sparse", lambda s: s[1]), ("colbert", lambda s: s[2]),
                           ("m3", lambda s: s[0] + 0.3 * s[1] + s[2])):
            run = runs[head][None][qids[i]]
            for pid, score in run.items():
                assert score == pytest.approx(pick(exact[pid]), abs=2e-3), (head, i, pid)  # float16 token vectors
            dense_top = sorted(exact, key=lambda x: -exact[x][0])[:30]
            sparse_top = sorted(exact, key=lambda x: -exact[x][1])[:30]
            pool = {"colbert": dense_top, "sparse": list(exact), "m3": set(dense_top) | set(sparse_top)}[head]
            best = sorted((pick(exact[x]) for x in pool), reverse=True)[:5]
            np.testing.assert_allclose(sorted(run.values(), reverse=True), best, atol=2e-3)
    assert set(runs["colbert"]) == {None, 16} and set(runs["sparse"]) == {None}


def test_two_processes_gather_every_head_or_keep_colbert_local(tmp_path):
    """Gathered: the two ranks' mean loss is one process's over both ranks' queries and passages. ColBERT
    local: the ColBERT, ensemble and distillation terms are each rank's own batch alone; the dense and sparse
    ones still see every rank's passages."""
    import os
    import subprocess
    import sys

    import torch
    import torch.nn.functional as F

    from m3tune.training.loss import Unified, unified_info_nce

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "unified_ddp.py"), str(tmp_path / "parts.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(tmp_path / "parts.pt")
    inputs = ddp_inputs()
    settings = Unified(temperatures=(0.05, 0.1, 0.2), special_ids=(0, 1, 2, 3))

    def run(q, p, q_tok, p_tok, keys):
        loss, per = unified_info_nce(q, p, q_tokens=q_tok, p_tokens=p_tok, **keys, dims=[8, 4], weights=[1.0, 0.5],
                                     settings=settings, cross_device=False)
        return {"loss": loss.item(), **{str(k): v.item() for k, v in per.items()}}

    def pad(t, length):
        return F.pad(t, [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]])

    # one process, both ranks' queries; the passages as the positives first (its targets), then the negatives
    (q0, p0, qt0, pt0, k0), (q1, p1, qt1, pt1, k1) = inputs
    B = q0[0].shape[0]
    lq, lp = max(qt0["input_ids"].shape[1], qt1["input_ids"].shape[1]), max(pt0["input_ids"].shape[1],
                                                                               pt1["input_ids"].shape[1])

    def both(a, b, length=None, positives_first=False):
        a, b = (a, b) if length is None else (pad(a, length), pad(b, length))
        return torch.cat([a[:B], b[:B], a[B:], b[B:]]) if positives_first else torch.cat([a, b])

    q = tuple(both(x, y, None if i == 0 else lq - (i == 2)) for i, (x, y) in enumerate(zip(q0, q1)))
    p = tuple(both(x, y, None if i == 0 else lp - (i == 2), True) for i, (x, y) in enumerate(zip(p0, p1)))
    q_tok = {key: both(qt0[key], qt1[key], lq) for key in qt0}
    p_tok = {key: both(pt0[key], pt1[key], lp, True) for key in pt0}
    keys = dict(pos_keys=torch.cat([k0["pos_keys"], k1["pos_keys"]]),
                col_keys=both(k0["col_keys"], k1["col_keys"], positives_first=True),
                col_valid=both(k0["col_valid"], k1["col_valid"], positives_first=True))
    single = run(q, p, q_tok, p_tok, keys)
    for name in single:
        mean = (ranks[0]["gathered"][name] + ranks[1]["gathered"][name]) / 2
        assert mean == pytest.approx(single[name], rel=1e-5), name
    for r in range(2):
        alone = run(*inputs[r])  # the rank's own batch, no other rank's passages
        for name in ("colbert", "ensemble", "distill"):
            assert ranks[r]["local"][name] == pytest.approx(alone[name], rel=1e-5), (r, name)
        for name in ("sparse", "8", "4"):
            assert ranks[r]["local"][name] == pytest.approx(ranks[r]["gathered"][name], rel=1e-6), (r, name)
        assert ranks[r]["local"]["colbert"] != pytest.approx(ranks[r]["gathered"]["colbert"], rel=1e-3)
