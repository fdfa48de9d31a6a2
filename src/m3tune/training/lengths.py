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
    of GROUP rows (0: one pass over the whole padded tensor), in TOKENS' row order."""
    import torch

    if encode is None:
        from m3tune.training.loss import encode
    mask = tokens["attention_mask"]
    n = mask.shape[0]
    if group <= 0 or n == 0:
        return encode(model, tokens, pooling)
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    parts = []
    for rows in order.split(group):
        # the columns where any of these rows has a token: one block, whichever side the tokenizer pads
        keep = mask[rows].bool().any(0)
        parts.append(encode(model, {k: v[rows][:, keep] for k, v in tokens.items()}, pooling))
    out = torch.cat(parts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return out[inverse]


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
