"""Validation by retrieval: Recall@10, MRR@10 and nDCG@10 of the validation queries over the validation
corpus (the validation positives plus a seeded sample of the run's corpus: loop._validation_data), at each
Matryoshka dim (embeddings truncated and re-normalised, as a user with `truncate_dim` gets), overall and per
query type.

Each query's exact top 10 comes from one score matrix (numpy); the metrics are
computed from them by ir-measures (pytrec_eval), the evaluate step's engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

K = 10


def embed(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int, device, profile=None,
          queries: bool = False) -> np.ndarray:
    """Full-width embeddings (pooled, not normalised) of TEXTS prepared by PROFILE (default: CLS, as given),
    in order, batches sorted by length."""
    from m3tune.encoder.profiles import Profile

    profile = profile or Profile(strip_marks=False)
    import torch

    from m3tune.encoder.model import tokenize
    from m3tune.training.loss import encode

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            tokens = tokenize(tokenizer, [profile.prepare(texts[i], queries=queries) for i in batch], max_length)
            tokens = {k: v.to(device) for k, v in tokens.items()}
            rep = encode(model, tokens, profile.pooling).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), rep.shape[1]), dtype=np.float32)
            out[batch] = rep
    model.train(was_training)
    return out


def retrieval_metrics(q: np.ndarray, p: np.ndarray, relevant: Sequence[set[int]], *, k: int = K,
                      groups: Sequence[str] | None = None):
    """Mean recall@k, MRR@k, nDCG@k (binary relevance) of queries Q over passages P (rows L2-normalised),
    computed by ir-measures (pytrec_eval) from each query's exact top k, as the evaluate step does.
    With GROUPS (one name a query): (overall, {group: the same means over its queries})."""
    import ir_measures

    scores = q @ p.T
    top = np.argpartition(-scores, min(k, p.shape[0]) - 1, axis=1)[:, :k]
    run = {str(i): {str(int(j)): float(scores[i, j]) for j in row} for i, row in enumerate(top)}
    qrels = {str(i): {str(j): 1 for j in rel} for i, rel in enumerate(relevant)}
    measures = {f"recall@{k}": ir_measures.R @ k, f"mrr@{k}": ir_measures.RR @ k, f"ndcg@{k}": ir_measures.nDCG @ k}
    names = {str(m): name for name, m in measures.items()}
    per_query = np.zeros((len(relevant), len(measures)))  # a query without a hit in its top k scores 0
    columns = list(measures)
    for row in ir_measures.iter_calc(list(measures.values()), qrels, run):
        per_query[int(row.query_id), columns.index(names[str(row.measure)])] = row.value
    overall = dict(zip(columns, map(float, per_query.mean(0))))
    if groups is None:
        return overall
    by_group = {}
    for g in sorted(set(groups)):
        rows = [i for i, name in enumerate(groups) if name == g]
        by_group[g] = dict(zip(columns, map(float, per_query[rows].mean(0))))
    return overall, by_group


def evaluate(model, tokenizer, valset, *, dims: Sequence[int], query_max_length: int, passage_max_length: int,
             batch_size: int, device, profile=None):
    """({dim: {metric: value}}, {query type: {dim: {metric: value}}}) on the validation set (texts prepared
    and pooled by PROFILE, default CLS as given). Every type present in the validation set has its row, so a
    type the model gets worse at is seen even where the overall mean rises."""
    index = {key: i for i, key in enumerate(valset.corpus_keys)}
    relevant = [{index[k] for k in rel} for rel in valset.relevant]
    q = embed(model, tokenizer, valset.queries, max_length=query_max_length, batch_size=batch_size, device=device,
              profile=profile, queries=True)
    p = embed(model, tokenizer, valset.corpus_texts, max_length=passage_max_length, batch_size=batch_size,
              device=device, profile=profile)
    types = list(valset.types) or ["unknown"] * len(valset.queries)
    out, by_type = {}, {}
    for dim in dims:
        qd = q[:, :dim] / np.linalg.norm(q[:, :dim], axis=1, keepdims=True).clip(1e-12)
        pd = p[:, :dim] / np.linalg.norm(p[:, :dim], axis=1, keepdims=True).clip(1e-12)
        out[dim], groups = retrieval_metrics(qd, pd, relevant, groups=types)
        for t, m in groups.items():
            by_type.setdefault(t, {})[dim] = m
    return out, by_type
