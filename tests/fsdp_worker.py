"""Run by tests/test_fsdp.py under torchrun (two gloo ranks, distributed ddp or fsdp) or as one process:
train.train_step alone on a fixed sequence of global batches, so that one process and two ranks see
the same samples whatever the loaders would split. Step s's global batch is micro-batches 2s and
2s + 1 of one exact pass over data.train (cycled): with two ranks, rank r takes micro-batch 2s + r;
one process takes both (optim.grad_accum: 2). `--text-only S:I,...` strips the frames of micro-batch
I of step S (a text-only micro-batch, on rank I). Writes rank<R>.json next to the config: each
step's status, loss and gradient norm; then train.finish exports final/ into run_dir. With
FVLM_TEST_STACKS_AFTER=SECONDS, a worker still running then prints every thread's stack and exits (a
hang shows where it waits).

    python tests/fsdp_worker.py --config C --steps N [--text-only 3:1,7:0]
"""

import argparse
import faulthandler
import json
import os
from pathlib import Path

import torch

import distributed
import train
from config import load_config


def text_only(host: dict) -> dict:
    """The micro-batch without its frames: every sample text only."""
    return dict(host, frames=None, latents=None, frame_index=host["frame_index"][:, :0])


def global_batches(run, steps: int, stripped: set) -> list[list[dict]]:
    one = distributed.Dist(0, 1, torch.device("cpu"))  # one exact pass as a single process reads it
    cfg = run.cfg
    loader = train.make_loader(cfg, run.model, one, train.sources(cfg.data.train), resampled=False,
                               batch_size=cfg.data.batch_size, pin=False)
    pool = list(loader)
    out = []
    for s in range(steps):
        pair = [pool[(2 * s + i) % len(pool)] for i in range(2)]
        out.append([text_only(h) if (s, i) in stripped else h for i, h in enumerate(pair)])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--text-only", default="")
    args = parser.parse_args(argv)
    if os.environ.get("FVLM_TEST_STACKS_AFTER"):
        faulthandler.dump_traceback_later(float(os.environ["FVLM_TEST_STACKS_AFTER"]), exit=True)
    stripped = {tuple(int(x) for x in spec.split(":")) for spec in filter(None, args.text_only.split(","))}
    cfg = load_config(args.config)
    dist = distributed.setup("cpu")
    try:
        run = train.setup(cfg, dist)
        rows = []
        for pair in global_batches(run, args.steps, stripped):
            result = train.train_step(run, pair[dist.rank::dist.world_size])
            loss = sum(w * s / max(n, 1.0) for (_, w), s, n in zip(run.objectives, result.loss_sums,
                                                                  result.normalisers))
            rows.append({"status": result.status, "loss": loss, "grad_norm": result.grad_norm})
            if result.status == "ok":
                run.counters["step"] += 1
        train.finish(run)
    finally:
        distributed.teardown(dist)
    (Path(args.config).parent / f"rank{dist.rank}.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
