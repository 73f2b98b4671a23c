"""Evaluation throughput on one machine: benchmark.py's path (each clip encoded once, its K/V shared by
the three modes, questions batched, greedy generation of up to --max-new-tokens tokens plus the
first-token likelihood) against the predecessor's (one question at a time; each option's text scored
by its own forward pass, which encodes the frames again, in every mode). Same random real-size model,
same 4-way questions about random clips. Prints questions/s (a question = all three modes) for both.

    python scripts/bench_eval.py [--questions 8] [--frames 8] [--batch-size 8] [--skip-predecessor]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_loaders import Item  # noqa: E402
from bench_runner import Runner  # noqa: E402
from model import MODES, FoveatedVLM  # noqa: E402

OPTIONS = ["red", "green", "blue", "yellow"]


def predecessor_style(model, frames, prompt, device) -> float:
    """Seconds for one question the predecessor's way: per mode, per option, one forward over the
    frames and the option text (mean CE over the answer tokens; lowest wins)."""
    start = time.perf_counter()
    user = [{"role": "user", "content": prompt}]
    head = model.chat_ids(user)
    for mode in MODES:
        losses = []
        for letter, option in zip("ABCD", OPTIONS):
            ids = model.chat_ids(user + [{"role": "assistant", "content": f"{letter}. {option}"}], False)
            mask = torch.tensor([[0] * len(head) + [1] * (len(ids) - len(head))], device=device)
            out = model(frames=frames[None].to(device), input_ids=torch.tensor([ids], device=device),
                        loss_mask=mask, mode=mode)
            losses.append(out["loss"].item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--llm", default="smollm2-135m", help="random preset (backbones.LLM_PRESETS)")
    parser.add_argument("--dino", default="dinov2-small", help="random preset (backbones.DINO_PRESETS), e.g. dinov3-vits16")
    parser.add_argument("--skip-predecessor", action="store_true")
    args = parser.parse_args()
    logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = FoveatedVLM(llm_name=f"random:{args.llm}", dino_name=f"random:{args.dino}").to(device).eval()
    clips = [torch.randint(0, 256, (args.frames, 3, args.size, args.size), dtype=torch.uint8)
             for _ in range(args.questions)]
    listing = "".join(f"\n{x}. {o}" for x, o in zip("ABCD", OPTIONS))
    prompt = f"What colour is the circle?{listing}\nAnswer with the option's letter from the given choices directly."
    items = [Item("synthetic", str(i), prompt, "A", ("video", f"clip{i}"), candidates=("A", "B", "C", "D"))
             for i in range(args.questions)]
    runner = Runner(model, list(MODES), device)
    runner.run({items[0].clip: clips[0]}, items[:1], args.max_new_tokens)  # warm-up
    runner.timings.clear()
    start = time.perf_counter()
    for i in range(0, args.questions, args.batch_size):
        batch = items[i:i + args.batch_size]
        runner.run({it.clip: clips[int(it.uid)] for it in batch}, batch, args.max_new_tokens)
    ours = time.perf_counter() - start
    print(f"device={device} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M questions={args.questions} "
          f"frames={args.frames}x{args.size}px batch={args.batch_size} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"benchmark.py path: {args.questions / ours:.3f} questions/s (3 modes each; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in runner.timings.items()) + ")")
    if not args.skip_predecessor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"), torch.no_grad():
            predecessor_style(model, clips[0], prompt, device)  # warm-up
            seconds = sum(predecessor_style(model, clip, prompt, device) for clip in clips)
        print(f"predecessor's way: {args.questions / seconds:.3f} questions/s -> ours is "
              f"{seconds / ours:.1f}x faster")


if __name__ == "__main__":
    main()
