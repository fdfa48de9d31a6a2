"""Run by test_train.test_gradcache_matches_the_full_batch_with_dropout_accumulation_and_ddp under torchrun (2
gloo processes): the training loop's GradCache path (Accelerate's accumulate / no_sync, cross-device
negatives) over 2 accumulation steps, dropout 0.1; rank 0 saves the gradients it ends with, and each
rank's batches, to OUT."""

import sys

import torch
from accelerate import Accelerator
from transformers import AutoModel, AutoTokenizer

from m3tune.training.loss import gradcache_backward, matryoshka_info_nce

DIMS, MICRO, CHUNK = [32, 16, 8], 2, 5


def batches(data: str):
    """Rank r's micro-batch m: test_train writes them (collated) to DATA as a torch file."""
    return torch.load(data, weights_only=False)


def main(model_path: str, data: str, out: str) -> None:
    acc = Accelerator(cpu=True, gradient_accumulation_steps=MICRO)
    model = AutoModel.from_pretrained(model_path, add_pooling_layer=False)  # dropout 0.1: the tiny model's own
    model = acc.prepare(model)
    model.train()
    plan = batches(data)
    rank = acc.process_index
    for m in range(MICRO):
        b = plan[m][rank]
        torch.manual_seed(1000 * m + rank)  # the reference replays these states chunk by chunk

        def loss_fn(q, p):
            return matryoshka_info_nce(q, p, pos_keys=b.pos_keys, col_keys=b.col_keys, col_valid=b.col_valid,
                                       dims=DIMS, weights=[1.0] * 3, temperature=0.05, cross_device=True)

        with acc.accumulate(model):
            gradcache_backward(model, b.queries, b.passages, chunk=CHUNK, loss_fn=loss_fn, backward=acc.backward,
                               no_sync=lambda: acc.no_sync(model), sync=acc.sync_gradients)
    if acc.is_main_process:
        torch.save({n: p.grad.clone() for n, p in acc.unwrap_model(model).named_parameters() if p.grad is not None},
                   out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
