"""Streaming speed (session.py) on one machine: per-frame latency (backbone encode + one cached LLM
step), sustained frames/s and memory over a long windowed stream, TTFT and decode tokens/s after a
question at several context lengths, against the no-cache baseline that re-reads every frame for each
answer (model.generate on the clip so far). Random weights, built locally: --size tiny, or real
(SmolLM2-135M + DINOv2-small architectures). CUDA: bf16 autocast; timings synchronise.

    python scripts/bench_stream.py --size tiny
    python scripts/bench_stream.py --size real --frames 2000 --contexts 16 64 256 --json out.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import FoveatedVLM  # noqa: E402
from session import StreamSession  # noqa: E402

SIZES = {"tiny": ("random:tiny", "random:tiny", 32, 56), "real": ("random:smollm2-135m", "random:dinov2-small", 384, 224)}
QUESTION = "What happens in the video?"


def memory_mb(device) -> float:
    """Allocated GPU memory, or this process's resident set on the CPU (Linux), in MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream(model, frames, args, device) -> dict:
    """A windowed stream of args.frames frames: per-frame ms (percentiles), frames/s, memory samples."""
    session = StreamSession(model, frame_size=args.frame_size, window=args.window, timings=True)
    for frame in frames[:args.warmup]:
        session.add_frame(frame)
    session.reset()
    per_frame, memory = [], []
    start = time.perf_counter()
    for i in range(args.frames):
        t0 = time.perf_counter()
        session.add_frame(frames[i % len(frames)])
        sync(device)
        per_frame.append(1000 * (time.perf_counter() - t0))
        if i % max(1, args.frames // 8) == 0 or i == args.frames - 1:
            memory.append((i + 1, round(memory_mb(device), 1)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(per_frame, n=20)
    s = session.summary()
    return {"frames": args.frames, "window": args.window, "frames_per_s": args.frames / wall,
            "frame_ms": {"mean": statistics.fmean(per_frame), "p50": statistics.median(per_frame), "p95": q[18]},
            "encode_ms": s["encode_ms"], "llm_ms": s["llm_ms"], "cache_tokens": s["cache_tokens"],
            "memory_mb": memory}


def answer_speed(model, frames, context, args, device) -> dict:
    """TTFT and decode tokens/s after `context` frames: the session's, and the no-cache baseline's
    (model.generate re-reads all `context` frames for the answer)."""
    session = StreamSession(model, frame_size=args.frame_size)
    for frame in frames[:context]:
        session.add_frame(frame)
    session.ask(QUESTION, max_new_tokens=2)  # warm-up
    pieces = session.ask(QUESTION, max_new_tokens=args.new_tokens, stream=True)
    sync(device)
    start = time.perf_counter()
    next(pieces, None)
    sync(device)
    ttft = time.perf_counter() - start
    n = 1 + sum(1 for _ in pieces)
    decode = session.summary()["tokens_per_s"]
    clip = torch.stack([session.pixels(f)[0] for f in frames[:context]])
    base = model.generate(clip, QUESTION, max_new_tokens=1, mode="autoregressive", stream=True)
    sync(device)
    start = time.perf_counter()
    next(base, None)
    sync(device)
    return {"context": context, "ttft_ms": 1000 * ttft, "decode_tokens_per_s": decode, "pieces": n,
            "no_cache_ttft_ms": 1000 * (time.perf_counter() - start)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--frames", type=int, default=2000, help="frames of the windowed stream")
    parser.add_argument("--window", type=int, default=64, help="frames kept (plus 4 sink frames)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 64, 256], help="frames before a question")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--frame-size", type=int, help="default: 56 (tiny), 224 (real)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    llm, dino, query_dim, size = SIZES[args.size]
    args.frame_size = args.frame_size or size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = FoveatedVLM(llm_name=llm, dino_name=dino, query_dim=query_dim).to(device).eval()
    model.stop_ids = []  # random weights: no stop token, so every answer decodes the full --new-tokens
    frames = torch.randint(0, 256, (max(args.contexts + [64]), 3, args.frame_size, args.frame_size), dtype=torch.uint8)
    out = {"size": args.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "frame_size": args.frame_size,
           "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "stream": stream(model, frames, args, device),
           "answers": [answer_speed(model, frames, c, args, device) for c in args.contexts]}
    s = out["stream"]
    print(f"{out['size']} ({out['parameters_m']}M parameters, {args.frame_size} px) on {out['device']} "
          f"({out['threads']} threads)")
    print(f"stream of {s['frames']} frames, window {s['window']}: {s['frames_per_s']:.1f} frames/s; per frame "
          f"{s['frame_ms']['mean']:.1f} ms mean, {s['frame_ms']['p50']:.1f} p50, {s['frame_ms']['p95']:.1f} p95 "
          f"(encode {s['encode_ms']:.1f} + LLM {s['llm_ms']:.1f}); cache {s['cache_tokens']} tokens; memory MiB "
          f"at frame: " + ", ".join(f"{i}: {m}" for i, m in s["memory_mb"]))
    print("| frames of context | TTFT ms (session) | TTFT ms (no cache: re-read the frames) | decode tokens/s |")
    print("|---|---|---|---|")
    for a in out["answers"]:
        decode = f"{a['decode_tokens_per_s']:.1f}" if a["decode_tokens_per_s"] else "-"
        print(f"| {a['context']} | {a['ttft_ms']:.1f} | {a['no_cache_ttft_ms']:.1f} | {decode} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
