"""Encoding a batch's texts in groups of similar length, so that little of the encoder's work is padding.

A batch is tokenized as one tensor padded to its longest text; with real passages (a verse is ~24 tokens, a
hadith ~110, the longest are truncated at the maximum) about half of that tensor is padding, and the
encoder spends as much on a padding token as on a real one. Here the texts are sorted by length, cut into
groups of GROUP texts, each group trimmed to its own longest text and encoded in its own forward pass; the
embeddings come back in the batch's order. Each text attends only to its own tokens either way (the
attention mask), so this computes the same embeddings and the same loss, and leaves which examples share a
batch unchanged; only the floating-point summation order differs.
"""

from __future__ import annotations


def encode_by_length(model, tokens: dict, pooling: str, *, group: int, encode=None):
    """ENCODE(model, tokens, pooling) (default: training.loss.encode) over TOKENS' rows in length-sorted groups
    of GROUP rows (0: one pass over the whole padded tensor), in TOKENS' row order.

    ENCODE may return a tuple (training.loss.encode_unified: the pooled vector, then per-token outputs: sparse
    weights (N, L), multi-vectors of the tokens after the first (N, L-1, H)): the per-token outputs come back at
    their columns of the full padded width, zero in the columns a group trimmed (padding, which the losses
    mask)."""
    import torch

    if encode is None:
        from m3tune.training.loss import encode
    mask = tokens["attention_mask"]
    n, width = mask.shape
    if group <= 0 or n == 0:
        return encode(model, tokens, pooling)
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    parts = []
    for rows in order.split(group):
        # the columns where any of these rows has a token: one block, whichever side the tokenizer pads
        keep = mask[rows].bool().any(0)
        out = encode(model, {k: v[rows][:, keep] for k, v in tokens.items()}, pooling)
        parts.append((out[0], *(_widen(o, keep, width) for o in out[1:])) if isinstance(out, tuple) else (out,))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    outs = tuple(torch.cat(column)[inverse] for column in zip(*parts))
    return outs if len(outs) > 1 else outs[0]


def _widen(out, keep, width: int):
    """A per-token output OUT of a group trimmed to the KEEP columns (dim 1: one entry per KEEP column, or per
    KEEP column after the first) scattered back to the full WIDTH (or WIDTH - 1), zeros elsewhere."""
    skip = int(keep.sum()) - out.shape[1]  # 0: every token; 1: the tokens after the first
    columns = keep.nonzero().squeeze(1)[skip:] - skip
    full = out.new_zeros((out.shape[0], width - skip, *out.shape[2:]))
    full[:, columns] = out
    return full


def padding_share(tokens: dict, group: int) -> float:
    """The share of the positions the encoder computes that are padding, encoded in groups of GROUP (0: none)."""
    import torch

    mask = tokens["attention_mask"]
    real = int(mask.sum())
    if group <= 0:
        return 1 - real / max(1, mask.numel())
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    computed = sum(len(rows) * int(lengths[rows].max()) for rows in order.split(group))
    return 1 - real / max(1, computed)
