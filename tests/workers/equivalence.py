"""Torchrun worker for the 1-process vs W-process equivalence test.

Trains with the real Trainer step and records, at every step, the training-split indices
of the samples kept across the whole global batch; rank 0 saves them with the final
parameters of both networks."""

import sys

import torch

from jocor_ddp.config import load_config
from jocor_ddp.dist import all_gather_cat, close_distributed, init_distributed
from jocor_ddp.trainer import Trainer


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx)
    kept = []
    for epoch in range(cfg.train.epochs):
        trainer.begin_epoch(epoch)
        for item in trainer.step.feed.steps(epoch, 0):
            trainer.step.run(item)
            batch, out_ = trainer.step.last
            idx = all_gather_cat(ctx, batch.idx)
            kept.append(torch.sort(idx[out_.kept_global[0]]).values.cpu())
    if ctx.is_main:
        state = {k: v.detach().cpu().clone() for k, v in trainer.pair.state_dict().items()}
        torch.save({"kept": kept, "state": state}, out)
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
