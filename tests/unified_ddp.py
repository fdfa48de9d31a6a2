"""Run by test_unified.test_two_processes_gather_every_head_or_keep_colbert_local under torchrun (2 gloo
processes): unified_info_nce with cross-device negatives on seeded random inputs (ddp_inputs, below),
once with the token vectors gathered and once with ColBERT kept local (colbert_gather_bytes 0); rank 0 saves
every rank's loss parts to OUT. The test computes its references from the same ddp_inputs."""

import os
import sys

import torch
import torch.distributed as dist

from m3tune.training.loss import Unified, unified_info_nce


def ddp_inputs(B=2, k=2, H=8):
    """Two ranks' (queries, passages, tokens, keys): random outputs of the three heads, passages of different
    padded lengths per rank, and a passage of rank 1 that is rank 0's query 0's positive again (masked)."""
    from m3tune.training.data import key_hash

    g = torch.Generator().manual_seed(3)
    out = []
    for r, (lq, lp) in enumerate(((5, 6), (4, 7))):
        n = B * (1 + k)
        q = (torch.randn(B, H, generator=g), torch.rand(B, lq, generator=g), torch.randn(B, lq - 1, H, generator=g))
        p = (torch.randn(n, H, generator=g), torch.rand(n, lp, generator=g), torch.randn(n, lp - 1, H, generator=g))
        q_tok = {"input_ids": torch.randint(0, 12, (B, lq), generator=g),
                 "attention_mask": torch.ones(B, lq, dtype=torch.long)}
        p_tok = {"input_ids": torch.randint(0, 12, (n, lp), generator=g),
                 "attention_mask": torch.ones(n, lp, dtype=torch.long)}
        p_tok["attention_mask"][1, lp - 2:] = 0
        names = [f"pos{r}{i}" for i in range(B)] + [f"neg{r}{i}" for i in range(B * k)]
        if r == 1:
            names[B] = "pos00"
        keys = dict(pos_keys=torch.tensor([[key_hash(f"pos{r}{i}")] for i in range(B)]),
                    col_keys=torch.tensor([key_hash(x) for x in names]), col_valid=torch.ones(n, dtype=torch.bool))
        out.append((q, p, q_tok, p_tok, keys))
    return out


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    q, p, q_tok, p_tok, keys = ddp_inputs()[rank]
    parts = {}
    for mode, limit in (("gathered", 1 << 30), ("local", 0)):
        settings = Unified(temperatures=(0.05, 0.1, 0.2), special_ids=(0, 1, 2, 3), colbert_gather_bytes=limit)
        loss, per = unified_info_nce(q, p, q_tokens=q_tok, p_tokens=p_tok, **keys, dims=[8, 4], weights=[1.0, 0.5],
                                     settings=settings, cross_device=True)
        parts[mode] = {"loss": loss.item(), **{str(k): v.item() for k, v in per.items()}}
    every = [None, None]
    dist.all_gather_object(every, parts)
    if rank == 0:
        torch.save(every, out)
    dist.barrier()
    dist.destroy_process_group()
    # torch's C++ teardown at interpreter exit aborted about 1 run in 6 ("terminate called without an active
    # exception": a joinable thread destroyed), after the work was done and saved, with or without the
    # destroy above; leave without it. A failure before this line still fails the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
