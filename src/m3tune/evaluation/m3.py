"""BGE-M3's three retrievers, each on its own and together, for the evaluate step.

A model folder with BGE-M3's heads (`sparse_linear.pt`, `colbert_linear.pt`: BGE-M3 itself, or a model
`train` fine-tuned with `unified: true`) retrieves three ways (m3tune.encoder.heads has the definitions):

    sparse:SPEC    lexical weights by an inverted index: the corpus's weights as a sparse (passages x
                   vocabulary) matrix, each query's scores one sparse product (scipy), exact
    colbert:SPEC   multi-vector late interaction rescoring the dense top RERANK_K (at each Matryoshka dim:
                   the candidates of that dim)
    m3:SPEC        the ensemble dense + 0.3 sparse + colbert (BGE-M3's weights, FlagEmbedding's
                   `compute_score`) reranking the union of the dense and sparse top RERANK_K

so the evaluate step reports every head beside the dense one (`SPEC`). A folder is encoded once per
process for all three. Not through the embeddings cache: the per-token vectors are the bulk (BGE-M3:
~2 KB a token in float16), and are kept in memory for the run only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from m3tune.errors import UserError

RERANK_K = 100
ENSEMBLE = (1.0, 0.3, 1.0)  # dense, sparse, colbert: BGE-M3's weights for s_rank (its paper, Eq. 4)


@dataclass
class M3Vectors:
    dense: np.ndarray  # (n, H), full width, L2-normalised
    lexical: object  # scipy.sparse.csr_matrix (n, vocabulary): each id's weight, max over its occurrences
    colbert: list[np.ndarray]  # per text: (tokens after CLS, H) float16, each row L2-normalised


class M3Model:
    """An Encoder (its profile: prompts, pooling, marks) with the folder's two heads."""

    def __init__(self, encoder, path: str):
        from m3tune.encoder import heads

        self.encoder = encoder
        if encoder.model is None:
            raise ValueError("M3Model needs the encoder's PyTorch model: load it with runtime='torch'")
        hidden = int(encoder.model.config.hidden_size)
        sparse, colbert, source = heads.load_or_create(path, hidden, seed=0)
        if source != "loaded":
            raise UserError(f"{path}: no {heads.SPARSE_FILE} / {heads.COLBERT_FILE}: not a BGE-M3 model with "
                            "sparse and multi-vector heads (train with unified: true, or use BAAI/bge-m3)")
        param = next(encoder.model.parameters())
        # the very forward training used (heads.UnifiedModel): ReLU(sparse_linear), colbert_linear after CLS
        self.model = heads.UnifiedModel(encoder.model, sparse.to(param.device, param.dtype),
                                        colbert.to(param.device, param.dtype)).eval()
        self.special = heads.special_ids(encoder.tokenizer)
        self.vocabulary = int(encoder.model.get_input_embeddings().num_embeddings)

    def encode(self, texts: Sequence[str], *, queries: bool) -> M3Vectors:
        import torch
        import torch.nn.functional as F
        from scipy import sparse as sp

        from m3tune.encoder.model import pool

        enc, n = self.encoder, len(texts)
        dense = np.zeros((n, enc.dim), dtype=np.float32)
        colbert: list[np.ndarray] = [np.zeros((0, enc.dim), dtype=np.float16)] * n
        rows, cols, vals = [], [], []
        special = torch.tensor(self.special)
        with torch.inference_mode():
            for batch, ids, mask in enc._batches([enc.profile.prepare(t, queries=queries) for t in texts]):
                ids_t, mask_t = torch.from_numpy(ids).to(enc.device), torch.from_numpy(mask).to(enc.device)
                out = self.model(input_ids=ids_t, attention_mask=mask_t)
                dense[batch] = F.normalize(pool(out.last_hidden_state, mask_t, enc.pooling).float(),
                                           dim=-1).cpu().numpy()
                weights = out.sparse.float().cpu()
                weights = weights * (torch.from_numpy(mask).bool() & ~torch.isin(torch.from_numpy(ids), special))
                vectors = F.normalize(out.colbert.float(), dim=-1).cpu().numpy()
                for j, row in enumerate(batch):
                    length = int(mask[j].sum())
                    colbert[row] = vectors[j, :length - 1].astype(np.float16)
                    best: dict[int, float] = {}
                    for token, w in zip(ids[j, :length].tolist(), weights[j, :length].tolist()):
                        if w > best.get(token, 0.0):
                            best[token] = w
                    rows += [row] * len(best)
                    cols += list(best)
                    vals += list(best.values())
        lexical = sp.csr_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(n, self.vocabulary))
        return M3Vectors(dense, lexical, colbert)


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """Mean over the query's tokens of the best cosine with any of the passage's."""
    if len(q) == 0 or len(p) == 0:
        return 0.0
    return float((q.astype(np.float32) @ p.astype(np.float32).T).max(1).mean())


def _truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    cut = vectors[:, :dim]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def sparse_matrix(q: M3Vectors, p: M3Vectors) -> np.ndarray:
    """(queries, passages) lexical scores: the sparse product walks each query id's postings (CSR x CSC)."""
    return np.asarray((q.lexical @ p.lexical.T).todense(), dtype=np.float32)


def rank(head: str, q: M3Vectors, p: M3Vectors, query_ids: list[str], passage_ids: list[str], *, k: int,
         dims: Sequence[int], rerank_k: int = RERANK_K) -> dict[int | None, dict[str, dict[str, float]]]:
    """HEAD's (sparse, colbert or m3) top K per query: {None: full width, dim: ...} (runs for ir-measures)."""
    lexical = sparse_matrix(q, p)
    if head == "sparse":
        top = _top(lexical, k)
        return {None: {qid: {passage_ids[j]: float(lexical[i, j]) for j in row}
                       for i, (qid, row) in enumerate(zip(query_ids, top))}}
    full = q.dense.shape[1]
    runs = {}
    for dim in [None] + [d for d in dims if d < full]:
        qd, pd = (q.dense, p.dense) if dim is None else (_truncate(q.dense, dim), _truncate(p.dense, dim))
        dense = qd @ pd.T
        candidates = _top(dense, rerank_k)
        if head == "m3":
            candidates = np.concatenate([candidates, _top(lexical, rerank_k)], axis=1)
        run = {}
        for i, qid in enumerate(query_ids):
            scored = {}
            for j in dict.fromkeys(candidates[i].tolist()):
                c = colbert_score(q.colbert[i], p.colbert[j])
                scored[passage_ids[j]] = c if head == "colbert" else \
                    ENSEMBLE[0] * float(dense[i, j]) + ENSEMBLE[1] * float(lexical[i, j]) + ENSEMBLE[2] * c
            run[qid] = dict(sorted(scored.items(), key=lambda kv: -kv[1])[:k])
        runs[dim] = run
    return runs


_ENCODED: dict[tuple, tuple[M3Vectors, M3Vectors]] = {}


def encoded(model: M3Model, path: str, queries: Sequence[str], passages: Sequence[str]):
    """(queries', passages' M3Vectors), computed once per process for the three specs of one folder."""
    import hashlib

    texts = "\x00".join([*queries, "\x01", *passages]).encode()
    key = (path, model.encoder.fingerprint, hashlib.sha256(texts).hexdigest())
    if key not in _ENCODED:
        _ENCODED.clear()  # one folder's vectors at a time: they are large
        _ENCODED[key] = (model.encode(queries, queries=True), model.encode(passages, queries=False))
    return _ENCODED[key]
