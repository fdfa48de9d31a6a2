"""InfoNCE over positives, hard negatives and in-batch negatives, Matryoshka over dims; cross-device
negatives; BGE-M3's unified loss; GradCache.

One encoder pass gives full-width embeddings; for each Matryoshka dim they
are truncated and re-normalised, and each query is scored against every
passage column of the (possibly all-gathered) batch: its own positive is the
target; its hard negatives, the other queries' positives and their hard
negatives are the negatives. A column holding one of the query's own
positives, or a near-duplicate of one (`pos_keys` carries both: another
query's positive or hard negative can be either), is masked out, on this
process's columns and the gathered ones alike, and so is an empty negative
slot.

Unified BGE-M3 training (unified_info_nce) adds the sparse and multi-vector
heads' scores over the same columns and masks, their ensemble and
self-distillation from it; GradCache then caches all three heads' outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass


def encode(model, tokens: dict, pooling: str = "cls"):
    """The dense vector before normalisation: the first token's hidden state (CLS: BGE-M3), or the mean of
    the unpadded tokens' (mean: e5), as m3tune's Encoder pools them."""
    from m3tune.encoder.model import pool

    hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    return pool(hidden, tokens["attention_mask"], pooling)


def encode_unified(model, tokens: dict, pooling: str = "cls"):
    """(dense vector before normalisation, sparse weight of each token (N, L), multi-vector of each token after
    CLS before normalisation (N, L-1, H)) from a heads.UnifiedModel: what GradCache caches per text."""
    from m3tune.encoder.model import pool

    out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return pool(out.last_hidden_state, tokens["attention_mask"], pooling), out.sparse, out.colbert


def gather(tensor, *, with_grad: bool):
    """All processes' TENSORs concatenated in rank order (a no-op in one process).

    With grad, torch.distributed.nn's all_gather sends each process's share of
    the gradient back to the process that computed the embeddings, so the
    summed loss of N processes has the gradient of one process's loss on the
    whole global batch (DDP averages, the loss is a mean: they agree)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(tensor), dim=0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _targets_and_mask(q, n_local: int, *, pos_keys, col_keys, col_valid, cross_device: bool):
    """(rank, each query's target column, the (B, columns) mask of columns that are no negative of it), over
    the gathered columns with CROSS_DEVICE: an empty slot, and any column holding one of the query's own
    positives or a near-duplicate of one but its target."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if cross_device and dist.is_available() and dist.is_initialized() else 0
    if cross_device:
        col_keys = gather(col_keys, with_grad=False)
        col_valid = gather(col_valid, with_grad=False)
    targets = torch.arange(q.shape[0], device=q.device) + rank * n_local
    columns = torch.arange(col_keys.shape[0], device=q.device)
    own_positive = (col_keys[None, :, None] == pos_keys[:, None, :]).any(-1) & (pos_keys >= 0).any(-1, keepdim=True)
    masked = ~col_valid[None, :] | (own_positive & (columns[None, :] != targets[:, None]))
    return rank, targets, masked


def matryoshka_info_nce(q, p, *, pos_keys, col_keys, col_valid, dims: Sequence[int], weights: Sequence[float],
                        temperature: float, cross_device: bool):
    """(weighted loss, {dim: loss}) for this process's queries Q (B, H) against passages P (B*(1+k), H).

    P's first B rows are the queries' positives, in order. With CROSS_DEVICE
    the passage columns of every process are gathered (targets shift by this
    process's offset); the loss is the mean over this process's queries."""
    import torch.nn.functional as F

    _, targets, masked = _targets_and_mask(q, p.shape[0], pos_keys=pos_keys, col_keys=col_keys,
                                           col_valid=col_valid, cross_device=cross_device)
    if cross_device:
        p = gather(p, with_grad=True)
    total, per_dim = 0.0, {}
    for dim, weight in zip(dims, weights):
        logits = (dense_scores(q, p, dim) / temperature).masked_fill(masked, float("-inf"))
        loss = F.cross_entropy(logits, targets)
        per_dim[dim] = loss.detach()
        total = total + weight * loss
    return total, per_dim


# ------------------------------------------------------------------------------- the three heads' scores

def dense_scores(q, p, dim: int):
    """Cosine of the first DIM dims (truncated, re-normalised: Matryoshka) of Q (B, H) and P (N, H): (B, N)."""
    import torch.nn.functional as F

    return F.normalize(q[:, :dim].float(), dim=-1) @ F.normalize(p[:, :dim].float(), dim=-1).T


def sparse_scores(q_weights, q_ids, q_mask, p_weights, p_ids, p_mask, special):
    """Lexical matching (BGE-M3's sparse score): for each (query, passage), the sum over the token ids both
    hold of the query's and the passage's weight of that id, each the maximum over its occurrences; SPECIAL
    ids (heads.special_ids) and padding weigh nothing. (B, N).

    The weights are max-pooled into the ids this batch holds, not into the whole vocabulary as FlagEmbedding
    does in training ((texts, tokens, 250,002) floats): the same numbers in a (texts, ids in the batch)
    matrix."""
    import torch

    special = torch.as_tensor(special, device=q_ids.device)
    ids, inverse = torch.unique(torch.cat([q_ids.flatten(), p_ids.flatten()]), return_inverse=True)
    q_inv, p_inv = inverse[:q_ids.numel()].view_as(q_ids), inverse[q_ids.numel():].view_as(p_ids)

    def pooled(weights, token_ids, mask, inv):
        kept = weights.float() * (mask.bool() & ~torch.isin(token_ids, special)).float()
        # the weights are >= 0 (ReLU), so max-pooling into zeros is the maximum over the occurrences
        return torch.zeros(weights.shape[0], ids.numel(), dtype=kept.dtype, device=kept.device).scatter_reduce(
            1, inv, kept, reduce="amax", include_self=True)

    return pooled(q_weights, q_ids, q_mask, q_inv) @ pooled(p_weights, p_ids, p_mask, p_inv).T


def colbert_scores(q_vectors, q_mask, p_vectors, p_mask, *, block_elements: int = 1 << 26):
    """Late interaction (BGE-M3's multi-vector score): the mean over the query's tokens after CLS of the
    highest cosine with any of the passage's tokens after CLS. Q_VECTORS (B, Lq-1, H) and P_VECTORS
    (N, Lp-1, H) come before normalisation; the masks are the (.., L) attention masks. (B, N).

    A padding token never matches (FlagEmbedding's training lets a zeroed padding vector score 0 against
    every query token, which wins where every real token scores below 0); its inference (`colbert_score` on
    the encoded vectors) agrees with this. Passages are scored a block at a time so that the (B, Lq, block,
    Lp) similarity stays under BLOCK_ELEMENTS numbers; only the maxima's indices are kept for backward."""
    import torch
    import torch.nn.functional as F

    qn, pn = F.normalize(q_vectors.float(), dim=-1), F.normalize(p_vectors.float(), dim=-1)
    q_real, p_real = q_mask[:, 1:].bool(), p_mask[:, 1:].bool()
    step = max(1, block_elements // max(1, qn.shape[0] * qn.shape[1] * pn.shape[1]))
    out = []
    for start in range(0, pn.shape[0], step):
        sim = torch.einsum("qih,pjh->qipj", qn, pn[start:start + step])
        sim = sim.masked_fill(~p_real[start:start + step][None, None], float("-inf"))
        best = sim.max(-1).values.masked_fill(~q_real[:, :, None], 0.0)  # (B, Lq-1, block)
        out.append(best.sum(1) / q_real.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------- unified loss

@dataclass(frozen=True)
class Unified:
    """The unified loss's settings (TrainConfig's unified fields). Defaults: FlagEmbedding 1.4's
    `EncoderOnlyEmbedderM3Model` (finetune/embedder/encoder_only/m3/modeling.py), the BGE-M3 paper's
    Eq. (5)-(9): ensemble score s_dense + 0.3 s_sparse + s_colbert; loss (L_dense + L_ensemble + 0.1 L_sparse
    + L_colbert) / 4; with self-distillation, the ensemble's softmax teaches each head (cross-entropy against
    it, weighted 1 / 0.1 / 1, over 3) and the two halves are averaged."""

    ensemble_weights: tuple[float, float, float] = (1.0, 0.3, 1.0)  # dense, sparse, colbert
    loss_weights: tuple[float, float, float] = (1.0, 0.1, 1.0)
    temperatures: tuple[float, float, float] = (0.02, 0.02, 0.02)
    self_distill: bool = True
    special_ids: tuple[int, ...] = ()
    colbert_gather_bytes: int = 2 << 30  # gather every process's passage token vectors up to this size


def _gather_tokens(t, *, with_grad: bool):
    """T (N, L, ...) of every process, padded with zeros to the longest L, concatenated in rank order."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    length = torch.tensor([t.shape[1]], device=t.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = [0, 0] * (t.dim() - 2) + [0, int(length.item()) - t.shape[1]]
    return gather(F.pad(t, pad), with_grad=with_grad)


def _distill(teacher, student, masked):
    """Cross-entropy of STUDENT's softmax against TEACHER's probabilities (FlagEmbedding's kl_div loss), masked
    columns left out (their teacher probability is 0; their student log-probability -inf)."""
    import torch

    log_p = torch.log_softmax(student, dim=-1).masked_fill(masked, 0.0)
    return -(teacher * log_p).sum(-1).mean()


def unified_info_nce(q, p, *, q_tokens: dict, p_tokens: dict, pos_keys, col_keys, col_valid, dims: Sequence[int],
                     weights: Sequence[float], settings: Unified, cross_device: bool):
    """(loss, {dim: dense loss, "sparse", "colbert", "ensemble", "distill": losses}) of BGE-M3's unified
    training with Matryoshka dense dims, for this process's queries.

    Q and P are encode_unified's (dense, sparse weights, multi-vectors) of the queries and passages; the
    tokens give their ids and masks. Every head scores the same columns with the same mask as the dense
    loss (matryoshka_info_nce): in-batch, hard and (CROSS_DEVICE) every process's negatives. The token-level
    tensors are gathered for that: the sparse weights always (a number per token); the multi-vectors while
    all processes' passages take at most settings.colbert_gather_bytes, else the ColBERT loss, the ensemble
    and the distillation use this process's passages only (as FlagEmbedding always does for unified
    training). The dense loss is the Matryoshka sum over DIMS (WEIGHTS); the ensemble uses the widest dim."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    (qd, qs, qc), (pd, ps, pc) = q, p
    n_local = pd.shape[0]
    rank, targets, masked = _targets_and_mask(qd, n_local, pos_keys=pos_keys, col_keys=col_keys,
                                              col_valid=col_valid, cross_device=cross_device)
    p_ids, p_mask = p_tokens["input_ids"], p_tokens["attention_mask"]
    distributed = cross_device and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    local_colbert = False
    if distributed:
        world = dist.get_world_size()
        length = torch.tensor([pc.shape[1]], device=pc.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        local_colbert = world * pc.shape[0] * int(length.item()) * pc.shape[2] * 4 > settings.colbert_gather_bytes
        pd = gather(pd, with_grad=True)
        ps = _gather_tokens(ps, with_grad=True)
        if not local_colbert:
            pc = _gather_tokens(pc, with_grad=True)
        p_mask_all = _gather_tokens(p_mask, with_grad=False)
        p_ids = _gather_tokens(p_ids, with_grad=False)  # padded slots: mask 0, no weight
    else:
        p_mask_all = p_mask
    t_dense, t_sparse, t_colbert = settings.temperatures

    def cut(logits):  # the columns that are no negative of a row leave its softmax
        return logits.masked_fill(masked, float("-inf"))

    losses, total_dense, dense_logits = {}, 0.0, {}
    for dim, weight in zip(dims, weights):
        dense_logits[dim] = dense_scores(qd, pd, dim) / t_dense
        losses[dim] = F.cross_entropy(cut(dense_logits[dim]), targets)
        total_dense = total_dense + weight * losses[dim]
    sparse_logits = sparse_scores(qs, q_tokens["input_ids"], q_tokens["attention_mask"], ps, p_ids, p_mask_all,
                                  settings.special_ids) / t_sparse
    losses["sparse"] = F.cross_entropy(cut(sparse_logits), targets)
    if local_colbert:  # this process's columns only, for the ColBERT loss, the ensemble and the distillation
        cols = slice(rank * n_local, (rank + 1) * n_local)
        masked, targets = masked[:, cols], targets - rank * n_local
        dense_logits = {d: v[:, cols] for d, v in dense_logits.items()}
        sparse_cut = sparse_logits[:, cols]
        colbert_mask = p_mask
    else:
        sparse_cut, colbert_mask = sparse_logits, p_mask_all
    colbert_logits = colbert_scores(qc, q_tokens["attention_mask"], pc, colbert_mask) / t_colbert
    losses["colbert"] = F.cross_entropy(cut(colbert_logits), targets)
    w_dense, w_sparse, w_colbert = settings.ensemble_weights
    ensemble = cut(w_dense * dense_logits[max(dims)] + w_sparse * sparse_cut + w_colbert * colbert_logits)
    losses["ensemble"] = F.cross_entropy(ensemble, targets)
    l_dense, l_sparse, l_colbert = settings.loss_weights
    loss = (l_dense * total_dense + losses["ensemble"] + l_sparse * losses["sparse"]
            + l_colbert * losses["colbert"]) / 4
    if settings.self_distill:
        teacher = torch.softmax(ensemble.detach(), dim=-1)
        distill_dense = sum(w * _distill(teacher, cut(dense_logits[d]), masked) for d, w in zip(dims, weights))
        losses["distill"] = (l_dense * distill_dense + l_sparse * _distill(teacher, cut(sparse_cut), masked)
                             + l_colbert * _distill(teacher, cut(colbert_logits), masked)) / 3
        loss = (loss + losses["distill"]) / 2
    return loss, {k: v.detach() for k, v in losses.items()}


def _chunks(tokens: dict, size: int) -> list[dict]:
    n = tokens["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in tokens.items()} for i in range(0, n, size)]


class _SameRandomness:
    """Replays the RNG state of a chunk's first forward pass in its second, so dropout masks agree."""

    def __init__(self, device):
        import torch

        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def __enter__(self):
        import torch

        self.saved = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda is not None else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc):
        import torch

        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


def gradcache_backward(model, queries: dict, passages: dict, *, chunk: int, loss_fn: Callable, backward: Callable,
                       no_sync: Callable[[], object], sync: bool, pooling: str = "cls", unified: bool = False):
    """GradCache (Gao et al., 2021): the gradient of the full-batch contrastive loss in the memory of CHUNK texts.

    1. embed every chunk without a graph (remembering its RNG state);
    2. take the loss on those embeddings and its gradient with respect to them;
    3. re-embed each chunk with a graph (same dropout) and backpropagate that gradient into the model.
    UNIFIED: the embeddings are encode_unified's three (dense, sparse weights, multi-vectors), each cached
    and given its gradient; loss_fn then takes those triples. Returns (loss, per-dim losses). Written here
    because no maintained package does this for an Accelerate loop (the reference GradCache repository is
    unmaintained and wraps its own loop)."""
    import torch

    def embed(c):
        return encode_unified(model, c, pooling) if unified else (encode(model, c, pooling),)

    device = queries["input_ids"].device
    parts = [("q", c) for c in _chunks(queries, chunk)] + [("p", c) for c in _chunks(passages, chunk)]
    states, reps = [], {"q": [], "p": []}
    with torch.no_grad():
        for kind, c in parts:
            states.append(_SameRandomness(device))
            reps[kind].append(embed(c))
    cached = {kind: [torch.cat(column).detach().requires_grad_() for column in zip(*reps[kind])]
              for kind in ("q", "p")}
    q, p = (tuple(cached["q"]), tuple(cached["p"])) if unified else (cached["q"][0], cached["p"][0])
    loss, per_dim = loss_fn(q, p)
    backward(loss)  # through the loss only: fills the cached tensors' .grad (scaled as the loss was)
    grads = {kind: [(t.grad if t.grad is not None else torch.zeros_like(t)).split([r[0].shape[0] for r in reps[kind]])
                    for t in cached[kind]] for kind in ("q", "p")}
    seen = {"q": 0, "p": 0}
    for n, ((kind, c), state) in enumerate(zip(parts, states)):
        last = n == len(parts) - 1
        with state, (nullcontext() if (sync and last) else no_sync()):
            rep = embed(c)
            torch.autograd.backward(list(rep), grad_tensors=[g[seen[kind]] for g in grads[kind]])
        seen[kind] += 1
    return loss.detach(), per_dim
