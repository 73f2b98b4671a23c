"""Measure data-pipeline throughput in frames per second per worker: shards of 8-frame clips of
224-px JPEGs (photo-like content, ~17 KB a frame), read through the training stream (tar reading,
JPEG decoding, resizing, tokenization, batching) with 0..N DataLoader workers. Nothing downloaded.

    python scripts/bench_data.py [--samples 400] [--workers 0 2] [--frame-size 224]
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media  # noqa: E402
from backbones import offline_tokenizer  # noqa: E402
from data import Loader, SampleSpec, ShardStream, Source  # noqa: E402
from shards import ShardWriter  # noqa: E402


def photo_like(rng: random.Random, px: int) -> bytes:
    """Blurred blobs and edges on a gradient: JPEG sizes like natural 224-px frames, not like noise."""
    img = Image.linear_gradient("L").resize((px, px)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y, r = rng.randrange(px), rng.randrange(px), rng.randrange(4, px // 4)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(1))
    noise = Image.effect_noise((px, px), 40).convert("RGB")
    return media.encode_jpeg(Image.blend(img, noise, 0.15), quality=90)


def write_dataset(directory, samples: int, frames: int, px: int) -> list[bytes]:
    """Shards of `samples` clips cycling through 64 distinct JPEGs; returns those JPEGs."""
    rng = random.Random(0)
    pool = [photo_like(rng, px) for _ in range(64)]  # decoding cost does not depend on reuse
    with ShardWriter(directory, max_samples=100) as writer:
        for i in range(samples):
            files = {f"{t:03d}.jpg": pool[(i * frames + t) % len(pool)] for t in range(frames)}
            files["json"] = {"messages": [{"role": "user", "content": "What happens in this video?"},
                                          {"role": "assistant", "content": f"Clip {i}: a few blobs drift by."}],
                             "source": "bench"}
            writer.write(f"clip{i:06d}", files)
    return pool


def run(directory, tokenizer, workers: int, size: int, batch_size: int, max_frames: int) -> tuple[float, int]:
    spec = SampleSpec(stage="sft", frame_size=size, max_frames=max_frames)
    stream = ShardStream([Source.from_patterns("bench", directory)], spec, tokenizer, batch_size=batch_size,
                         resampled=False, rank=0, world_size=1)
    start, frames = time.perf_counter(), 0
    for batch in Loader(stream, num_workers=workers):
        frames += batch["frames"].shape[0]
    return frames / (time.perf_counter() - start), frames


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-size", type=int, default=224, help="model resolution the loader resizes to")
    parser.add_argument("--source-size", type=int, default=224, help="resolution of the stored JPEGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    tokenizer = offline_tokenizer()
    decoder = "torchvision decode_jpeg" if media.decode_jpeg is not None else "Pillow"
    with tempfile.TemporaryDirectory() as tmp:
        pool = write_dataset(tmp, args.samples, args.frames, args.source_size)
        kb = sum(map(len, pool)) / len(pool) / 1024
        print(f"{args.samples} clips x {args.frames} frames, {args.source_size}-px JPEGs ({kb:.1f} KB each) "
              f"-> {args.frame_size} px; JPEG decoder: {decoder}")
        start = time.perf_counter()
        for data in pool * 5:
            media.decode_image(data, args.frame_size)
        print(f"decode + resize alone: {5 * len(pool) / (time.perf_counter() - start):.0f} frames/s")
        for workers in args.workers:
            rate, frames = run(tmp, tokenizer, workers, args.frame_size, args.batch_size, args.frames)
            per = rate / max(1, workers)
            print(f"workers={workers}: {rate:.0f} frames/s total, {per:.0f} frames/s per worker ({frames} frames)")


if __name__ == "__main__":
    main()
