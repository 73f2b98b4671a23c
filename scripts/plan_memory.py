"""Plan a training config's GPU memory before running it: per rank, the parameters, gradients,
optimizer states, activations (with and without gradient checkpointing) and frame tokens per sample
under ddp and fsdp, which settings fit N cards of a given size, and, when nothing fits, by how much
(memory.py holds the estimate). --measure instead runs two steps of the config on this CPU in fp32
and prints the measured peak of live tensor storage beside the estimate for the same batches.

    python scripts/plan_memory.py --config configs/stage2_1.7B.yaml --gpu-mem 24 --gpus 4
    python scripts/plan_memory.py --config configs/tiny_stage2.yaml --measure
"""
import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memory
from config import load_config
from model import FoveatedVLM

# published backbones the planner knows without downloading: the random preset of the same architecture
PUBLISHED = {"HuggingFaceTB/SmolLM2-1.7B-Instruct": "random:smollm2-1.7b",
             "HuggingFaceTB/SmolLM2-135M-Instruct": "random:smollm2-135m",
             "offline:smollm2-135m-instruct": "random:smollm2-135m",
             "facebook/dinov2-small": "random:dinov2-small"}
PARTS = ("weights", "gradients", "optimizer", "gathered", "reference", "activations", "logits_grad", "peak")


def meta_model(cfg) -> FoveatedVLM:
    """cfg's model on the meta device (no weights allocated, none downloaded for PUBLISHED backbones)."""
    m = cfg.model
    with torch.device("meta"):
        return FoveatedVLM(m, llm=PUBLISHED.get(m.llm, m.llm), dino=PUBLISHED.get(m.dino, m.dino), pretrained=False)


def table(plans: list) -> str:
    head = f"{'strategy':>10} {'ckpt':>5} " + " ".join(f"{p:>11}" for p in PARTS)
    rows = [head]
    for plan in plans:
        name = f"{plan.strategy} x{plan.ranks}"
        rows.append(f"{name:>10} {'on' if plan.checkpointing else 'off':>5} " + " ".join(
            f"{plan.parts.get(p, 0) / memory.GiB:>9.2f}Gi" for p in PARTS))
    return "\n".join(rows)


def plan(cfg, gpu_gib: float, gpus: int) -> str:
    """The report: the config's micro-batch under each strategy on `gpus` ranks, the settings that fit
    gpu_gib cards at the config's effective batch, or the shortfall."""
    s = memory.shapes(meta_model(cfg), cfg, torch.bfloat16)
    gpu = gpu_gib * memory.GiB
    b, accum = cfg.data.batch_size, cfg.optim.grad_accum
    effective = b * accum * gpus
    plans = [memory.estimate(s, cfg, strategy, gpus, b, accum, ckpt)
             for strategy in (("ddp", "fsdp") if gpus > 1 else ("ddp",)) for ckpt in (False, True)]
    lines = [(f"{cfg.model.llm} + {cfg.model.dino}: {s.params / 1e6:.0f}M parameters ({s.trainable / 1e6:.0f}M "
              f"trained), {s.layers} decoder layers; bf16 on CUDA"),
             (f"micro-batch {b} x grad_accum {accum} x {gpus} GPU(s) = {effective} samples per step; a sample at the "
              f"config's maxima: {cfg.data.max_text_tokens} text tokens, {cfg.data.max_frames} frames -> "
              f"{plans[0].parts['frame_tokens_per_sample']} frame tokens through the LLM ({cfg.mode})"),
             "per rank, GiB:", table(plans), ""]
    ranks = sorted({1, 2, 4, 8, 16, 32, 64, gpus})
    ok = memory.options(s, cfg, gpu, ranks, b * accum * gpus)
    if ok:
        lines.append(f"settings that fit {gpu_gib:g} GiB cards ({memory.gib(memory.RESERVE)} kept for the CUDA "
                     f"context) at {effective} samples per step:")
        for p in ok:
            lines.append(f"  {p.strategy:>4} on {p.ranks:>2} GPU(s): data.batch_size {p.batch_size}, optim.grad_accum "
                         f"{p.grad_accum}, gradient_checkpointing {str(p.checkpointing).lower()}: {memory.gib(p.total)}")
    else:  # the least a rank can need here: the most ranks, one sample per micro-batch, checkpointing
        least = memory.estimate(s, cfg, "fsdp", ranks[-1], 1, 2, True).total + memory.RESERVE
        lines.append(f"no GPU count fits {gpu_gib:g} GiB cards: even fsdp on {ranks[-1]} GPUs, one sample per "
                     f"micro-batch and gradient checkpointing need {memory.gib(least)} per rank, "
                     f"{memory.gib(least - gpu)} more than the card has (lower data.max_frames / "
                     f"data.max_text_tokens, or larger cards)")
    return "\n".join(lines)


def measure(cfg, steps: int = 2) -> tuple[int, dict]:
    """(the peak bytes of live tensor storage over `steps` optimizer steps of cfg as one CPU process
    in fp32, counting the model, the optimizer and everything a step allocates; the largest
    micro-batch's shape: text_tokens, frames and targets per sample)."""
    import distributed
    import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config_with(cfg, tmp)
        run = train.setup(cfg, distributed.setup("cpu"))
        batches = [train.draw_micro_batches(run) for _ in range(steps)]
        counter = memory.LiveBytes()
        tensors = list(run.model.parameters()) + list(run.model.buffers())
        for objective, _ in run.objectives:
            if getattr(objective, "reference_model", None) is not None:
                tensors += list(objective.reference_model.parameters())
        counter.add(tensors)
        with counter:
            for micro in batches:
                train.train_step(run, micro)
    hosts = [h for micro in batches for h in micro]
    widest = max(hosts, key=lambda h: h["input_ids"].numel() if "input_ids" in h else h["chosen_input_ids"].numel())
    ids = widest["input_ids"] if "input_ids" in widest else widest["chosen_input_ids"]
    shape = {"text_tokens": ids.shape[1], "frames": widest["frame_index"].shape[1],
             "targets": math.ceil(widest["target_index"].numel() / ids.shape[0]) if "target_index" in widest else ids.shape[1]}
    return counter.peak, shape


def load_config_with(cfg, run_dir: str):
    """cfg for a measuring run: one CPU process in fp32, loading in the main process, no validation,
    checkpoints or logs outside run_dir."""
    from config import config_from_dict

    tree = cfg.to_dict()
    tree.update(run_dir=run_dir, device="cpu", precision="fp32", distributed="ddp", init_from=None)
    tree["data"].update(num_workers=0, val=[])
    tree["eval"].update(every_steps=0, at_start=False)
    return config_from_dict(tree, "the measuring run")


def measured_report(cfg) -> tuple[float, float, str]:
    """(estimated bytes, measured bytes, a line saying both) for cfg's batches on this CPU."""
    peak, shape = measure(cfg)
    s = memory.shapes(meta_model(cfg), cfg, torch.float32)
    est = memory.estimate(s, cfg, "ddp", 1, cfg.data.batch_size, cfg.optim.grad_accum, cfg.gradient_checkpointing,
                          amp=False, **shape).total
    return est, peak, (f"estimated {memory.gib(est)}, measured {memory.gib(peak)} ({(est - peak) / peak:+.1%}) for "
                       f"micro-batches of {cfg.data.batch_size} x {shape['text_tokens']} text tokens, "
                       f"{shape['frames']} frames, {shape['targets']} loss tokens per sample")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a stage config (configs/*.yaml)")
    parser.add_argument("--gpu-mem", type=float, default=24.0, help="GiB per GPU (default 24)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the run gets (default 1)")
    parser.add_argument("--measure", action="store_true",
                        help="run two steps on this CPU (fp32) and compare the measured peak with the estimate")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.measure:
        print(measured_report(cfg)[2])
    else:
        print(plan(cfg, args.gpu_mem, args.gpus))


if __name__ == "__main__":
    main()
