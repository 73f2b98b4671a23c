"""Time one coarse_fine forward+backward at real size (SmolLM2-135M + DINOv2-small architectures by
default, --dino dinov3-vits16 for DINOv3 ViT-S/16; random weights, built locally). CPU: fp32. CUDA: bf16 autocast over fp32 master weights, with
samples/s and peak memory. Prints the median over --steps timed steps after --warmup.
--objective next_frame times the proof of concept's step instead (no text; the head predicting 4 x
size/8 x size/8 VAE-shaped latents of the next frame, fine + coarse pass)."""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import FoveatedVLM  # noqa: E402
from objectives import NextFrame  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--mode", default="coarse_fine")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--llm", default="smollm2-135m", help="random preset (backbones.LLM_PRESETS)")
    parser.add_argument("--dino", default="dinov2-small", help="random preset (backbones.DINO_PRESETS), e.g. dinov3-vits16")
    parser.add_argument("--objective", choices=["text", "next_frame"], default="text")
    args = parser.parse_args()
    logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (8 if device.type == "cuda" else 1)
    latent = [4, args.size // 8, args.size // 8]  # what an SD VAE gives at this frame size
    head = {"next_frame": latent} if args.objective == "next_frame" else {}
    model = FoveatedVLM(llm_name=f"random:{args.llm}", dino_name=f"random:{args.dino}", **head).to(device).train()
    unit = NextFrame("vae", 0, 1.0, 0.0, args.mode) if args.objective == "next_frame" else None
    if unit:
        unit.setup(model, None)
    vocab = model.llm.config.vocab_size
    ids = torch.randint(3, vocab, (batch, args.tokens), device=device)
    am = torch.ones_like(ids)
    lm = torch.zeros_like(ids)
    lm[:, args.tokens // 2:] = 1
    frames = torch.randn(batch, args.frames, 3, args.size, args.size, device=device)
    video = {"frames": frames.flatten(0, 1), "frame_index": torch.arange(batch * args.frames, device=device).view(batch, -1),
             "latents": torch.randn(batch * args.frames, *latent, device=device)}
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if unit:
                loss = unit.loss(model, video, args.mode)[0] / unit.normaliser(video)
            else:
                loss = model(frames=frames, input_ids=ids, attention_mask=am, loss_mask=lm, mode=args.mode)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device={device} params={params:.1f}M objective={args.objective} mode={args.mode} batch={batch} "
          f"frames={args.frames} size={args.size} tokens={args.tokens if not unit else 0} "
          f"threads={torch.get_num_threads()}")
    print(f"forward+backward: median {median:.3f}s over {len(times)} steps "
          f"(min {min(times):.3f}s, max {max(times):.3f}s) -> {batch / median:.2f} samples/s")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
