"""Measure the communication share of a data-parallel training step on 2 gloo ranks (CPU) for the
three ways ranks can share the model: today's scheme (distributed: ddp, one bucketed all-reduce of the
gradients after the backward), PyTorch's DistributedDataParallel (all-reduces overlapped with the
backward; find_unused_parameters, as text-only micro-batches would need) and FSDP2 (distributed: fsdp). Each rank runs the same micro-batches through each scheme
in turn (interleaved repeats: a shared CPU is noisy) and also without any communication ("local");
a scheme's communication share is (its step time - local) / its step time: the communication the
step waits for, what overlap can hide. Prints the median step times and shares from rank 0.

    python scripts/bench_dist.py --shape tiny --steps 3 --repeats 3
    python scripts/bench_dist.py --shape 135m
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # model and frame size of each shape (synthetic data, 4 samples of 3 frames per micro-batch)
    "tiny": ({"llm": "random:tiny", "dino": "random:tiny", "query_dim": 16}, 56),
    "135m": ({"llm": "random:smollm2-135m", "dino": "random:dinov2-small", "query_dim": 384}, 112),
}
SCHEMES = ("local", "ours", "torch_ddp", "fsdp")


def build(shape: str, data: Path, run_dir: Path):
    """(the config of a shape, on data) for train.setup."""
    from config import config_from_dict

    model, frame_size = SHAPES[shape]
    return config_from_dict({
        "stage": "sft", "run_dir": str(run_dir), "seed": 0, "device": "cpu", "precision": "fp32", "model": model,
        "data": {"train": [{"name": "main", "shards": str(data / "sft")}], "frame_size": frame_size,
                 "max_frames": 4, "max_text_tokens": 256, "batch_size": 4, "num_workers": 0},
        "optim": {"steps": 1000, "lr": {"connector": 1e-4, "dino": 1e-4, "llm": 1e-4}}}, "bench_dist")


class Loss(torch.nn.Module):
    """The model plus the training loss: one forward per micro-batch (what DDP wraps)."""

    def __init__(self, model, loss_fn, units, mode):
        super().__init__()
        self.model, self.loss_fn, self.units, self.mode = model, loss_fn, units, mode

    def forward(self, batch):
        return sum(loss for loss, _ in self.loss_fn(self.model, batch, self.units, self.mode))


def worker(shape: str, data: Path, steps: int, repeats: int, out: Path):
    from torch.nn.parallel import DistributedDataParallel

    import distributed
    import train
    from objectives import micro_batch_losses

    d = distributed.setup("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build(shape, data, Path(tmp) / f"run{d.rank}")
        run = train.setup(cfg, d)
        batches = [run.to_device(next(run.data)) for _ in range(steps)]
    units = tuple(o for o, _ in run.objectives)
    model = run.model
    fsdp_model = train.build_model(cfg)
    distributed.broadcast_model(d, fsdp_model)
    root = distributed.shard(fsdp_model, micro_batch_losses, d, bf16=False)
    plain = Loss(model, micro_batch_losses, units, cfg.mode)
    # find_unused_parameters: what training would need (a text-only micro-batch leaves the encoder unused)
    ddp = DistributedDataParallel(Loss(train.build_model(cfg), micro_batch_losses, units, cfg.mode),
                                  find_unused_parameters=True)
    step_of = {
        "local": (plain, lambda: None),
        "ours": (plain, lambda: distributed.all_reduce_grads(d, run.params)),
        "torch_ddp": (ddp, lambda: None),
        "fsdp": (lambda b: sum(loss for loss, _ in root(b, units, cfg.mode)), lambda: None),
    }
    optimizers = {"local": train.make_optimizer(model, cfg), "torch_ddp": train.make_optimizer(ddp.module.model, cfg),
                  "fsdp": train.make_optimizer(fsdp_model, cfg)}
    optimizers["ours"] = optimizers["local"]
    times = {s: [] for s in SCHEMES}
    for repeat in range(repeats + 1):  # the first round warms up
        for scheme in SCHEMES:
            forward, communicate = step_of[scheme]
            distributed.barrier(d)
            start = time.perf_counter()
            for batch in batches:
                forward(batch).backward()
                communicate()
                optimizers[scheme].step()
                optimizers[scheme].zero_grad(set_to_none=True)
            distributed.barrier(d)
            if repeat:
                times[scheme].append((time.perf_counter() - start) / len(batches))
    if d.is_main:
        params = sum(p.numel() for p in model.parameters())
        local = statistics.median(times["local"])
        lines = [(f"{shape}: {params / 1e6:.1f}M parameters, 2 gloo ranks, {cfg.data.batch_size} samples per rank per "
                  f"step, {repeats} interleaved repeats of {steps} steps (median; a shared CPU: noisy)")]
        for scheme in SCHEMES:
            t = statistics.median(times[scheme])
            spread = f"{min(times[scheme]):.3f}-{max(times[scheme]):.3f}"
            share = "" if scheme == "local" else f", communication share {(t - local) / t:+.0%}"
            lines.append(f"  {scheme:>9}: {t:.3f} s/step (range {spread}){share}")
        lines.append(f"  fsdp / ours step time: {statistics.median(times['fsdp']) / statistics.median(times['ours']):.2f}")
        out.write_text("\n".join(lines) + "\n")
    distributed.teardown(d)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per scheme, interleaved (default 3)")
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.shape, Path(args.worker[0]), args.steps, args.repeats, Path(args.worker[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), "--out", str(data), "--size", "48",
                        "--frames", "3", "--frame-size", "96", "--object-scale", "0.2", "--distractors", "0", "2"],
                       check=True, stdout=subprocess.DEVNULL)
        out = Path(tmp) / "report.txt"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--shape", args.shape, "--steps", str(args.steps), "--repeats", str(args.repeats),
                        "--worker", str(data), str(out)], check=True, env=env)
        print(out.read_text(), end="")


if __name__ == "__main__":
    main()
