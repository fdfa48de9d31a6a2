"""InfoNCE over positives, hard negatives and in-batch negatives, Matryoshka over dims; cross-device
negatives; GradCache.

One encoder pass gives full-width embeddings; for each Matryoshka dim they
are truncated and re-normalised, and each query is scored against every
passage column of the (possibly all-gathered) batch: its own positive is the
target; its hard negatives, the other queries' positives and their hard
negatives are the negatives. A column holding one of the query's own
positives, or a near-duplicate of one (`pos_keys` carries both: another
query's positive or hard negative can be either), is masked out, on this
process's columns and the gathered ones alike, and so is an empty negative
slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext


def encode(model, tokens: dict, pooling: str = "cls"):
    """The dense vector before normalisation: the first token's hidden state (CLS: BGE-M3), or the mean of
    the unpadded tokens' (mean: e5), as m3tune's Encoder pools them."""
    hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


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


def matryoshka_info_nce(q, p, *, pos_keys, col_keys, col_valid, dims: Sequence[int], weights: Sequence[float],
                        temperature: float, cross_device: bool):
    """(weighted loss, {dim: loss}) for this process's queries Q (B, H) against passages P (B*(1+k), H).

    P's first B rows are the queries' positives, in order. With CROSS_DEVICE
    the passage columns of every process are gathered (targets shift by this
    process's offset); the loss is the mean over this process's queries."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    n_local = p.shape[0]
    rank = dist.get_rank() if cross_device and dist.is_available() and dist.is_initialized() else 0
    if cross_device:
        p = gather(p, with_grad=True)
        col_keys = gather(col_keys, with_grad=False)
        col_valid = gather(col_valid, with_grad=False)
    targets = torch.arange(q.shape[0], device=q.device) + rank * n_local
    columns = torch.arange(p.shape[0], device=q.device)
    own_positive = (col_keys[None, :, None] == pos_keys[:, None, :]).any(-1) & (pos_keys >= 0).any(-1, keepdim=True)
    masked = ~col_valid[None, :] | (own_positive & (columns[None, :] != targets[:, None]))
    total, per_dim = 0.0, {}
    for dim, weight in zip(dims, weights):
        qd = F.normalize(q[:, :dim].float(), dim=-1)
        pd = F.normalize(p[:, :dim].float(), dim=-1)
        logits = (qd @ pd.T / temperature).masked_fill(masked, float("-inf"))
        loss = F.cross_entropy(logits, targets)
        per_dim[dim] = loss.detach()
        total = total + weight * loss
    return total, per_dim


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
                       no_sync: Callable[[], object], sync: bool, pooling: str = "cls"):
    """GradCache (Gao et al., 2021): the gradient of the full-batch contrastive loss in the memory of CHUNK texts.

    1. embed every chunk without a graph (remembering its RNG state);
    2. take the loss on those embeddings and its gradient with respect to them;
    3. re-embed each chunk with a graph (same dropout) and backpropagate that gradient into the model.
    Returns (loss, per-dim losses). Written here because no maintained package does this for an
    Accelerate loop (the reference GradCache repository is unmaintained and wraps its own loop)."""
    import torch

    device = queries["input_ids"].device
    parts = [("q", c) for c in _chunks(queries, chunk)] + [("p", c) for c in _chunks(passages, chunk)]
    states, reps = [], {"q": [], "p": []}
    with torch.no_grad():
        for kind, c in parts:
            states.append(_SameRandomness(device))
            reps[kind].append(encode(model, c, pooling))
    q = torch.cat(reps["q"]).detach().requires_grad_()
    p = torch.cat(reps["p"]).detach().requires_grad_()
    loss, per_dim = loss_fn(q, p)
    backward(loss)  # through the loss only: fills q.grad and p.grad (scaled as the loss was)
    grads = {"q": q.grad.split([r.shape[0] for r in reps["q"]]), "p": p.grad.split([r.shape[0] for r in reps["p"]])}
    seen = {"q": 0, "p": 0}
    for n, ((kind, c), state) in enumerate(zip(parts, states)):
        last = n == len(parts) - 1
        with state, (nullcontext() if (sync and last) else no_sync()):
            rep = encode(model, c, pooling)
            torch.autograd.backward(rep, grad_tensors=grads[kind][seen[kind]])
        seen[kind] += 1
    return loss.detach(), per_dim
