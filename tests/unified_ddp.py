"""Run by test_unified.test_two_processes_gather_every_head_or_keep_colbert_local under torchrun (2 gloo
processes): unified_info_nce with cross-device negatives on seeded random inputs (test_unified.ddp_inputs),
once with the token vectors gathered and once with ColBERT kept local (colbert_gather_bytes 0); rank 0 saves
every rank's loss parts to OUT."""

import sys

import torch
import torch.distributed as dist

from m3tune.training.loss import Unified, unified_info_nce
from test_unified import ddp_inputs


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
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
