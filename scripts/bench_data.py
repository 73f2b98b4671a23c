"""Measure data-pipeline throughput in frames per second per worker: shards of 8-frame clips of
224-px JPEGs (photo-like content, ~17 KB a frame), read through the training stream (tar reading,
JPEG decoding, resizing, tokenization, batching) with 0..N DataLoader workers. Nothing downloaded.

    python scripts/bench_data.py [--samples 400] [--workers 0 2] [--frame-size 224]

--http also reads the same shards as URLs from a loopback HTTP server (a thread of this process;
shards.read_samples through webdataset's gopen); --skip-cost times what a resume inside a shard
costs: skipping 999 samples of a 1,000-sample shard (counted, their media neither kept nor decoded)
against reading them, and against reading and decoding them, from the file and over HTTP.
"""

import argparse
import functools
import random
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media  # noqa: E402
from backbones import offline_tokenizer  # noqa: E402
from data import Loader, SampleSpec, ShardStream, Source, decode_sample  # noqa: E402
from shards import ShardWriter, read_samples  # noqa: E402


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


def write_dataset(directory, samples: int, frames: int, px: int, per_shard: int = 100) -> list[bytes]:
    """Shards of `samples` clips cycling through 64 distinct JPEGs; returns those JPEGs."""
    rng = random.Random(0)
    pool = [photo_like(rng, px) for _ in range(64)]  # decoding cost does not depend on reuse
    with ShardWriter(directory, max_samples=per_shard) as writer:
        for i in range(samples):
            files = {f"{t:03d}.jpg": pool[(i * frames + t) % len(pool)] for t in range(frames)}
            files["json"] = {"messages": [{"role": "user", "content": "What happens in this video?"},
                                          {"role": "assistant", "content": f"Clip {i}: a few blobs drift by."}],
                             "source": "bench"}
            writer.write(f"clip{i:06d}", files)
    return pool


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory) -> tuple[ThreadingHTTPServer, str]:
    """A loopback HTTP server for `directory` in a thread; (server, base URL)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def skip_cost(tokenizer, frames: int, px: int, size: int):
    """Resume inside a 1,000-sample shard: skip 999 samples vs read them vs read and decode them."""
    spec = SampleSpec(stage="sft", frame_size=size, max_frames=frames)
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, 1000, frames, px, per_shard=1000)
        path = Path(tmp) / "shard-00000.tar"
        httpd, base = serve(tmp)
        mb = path.stat().st_size / 2**20
        print(f"resume skip cost: one shard of 1000 samples x {frames} frames ({mb:.0f} MB)")
        try:
            for where, shard in (("file", str(path)), ("http", f"{base}/{path.name}")):
                timed = {}
                start = time.perf_counter()
                assert sum(1 for _ in read_samples(shard, skip=999)) == 1
                timed["skip 999"] = time.perf_counter() - start
                start = time.perf_counter()
                assert sum(1 for _ in read_samples(shard)) == 1000
                timed["read 1000"] = time.perf_counter() - start
                if where == "file":
                    start = time.perf_counter()
                    for n, (key, files) in enumerate(read_samples(shard)):
                        if n < 999:
                            decode_sample(key, files, spec, tokenizer)
                    timed["read 1000 + decode 999"] = time.perf_counter() - start
                print(f"  {where}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timed.items()))
        finally:
            httpd.shutdown()
            httpd.server_close()


def run(pattern, tokenizer, workers: int, size: int, batch_size: int, max_frames: int) -> tuple[float, int]:
    spec = SampleSpec(stage="sft", frame_size=size, max_frames=max_frames)
    stream = ShardStream([Source.from_patterns("bench", pattern)], spec, tokenizer, batch_size=batch_size,
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
    parser.add_argument("--http", action="store_true",
                        help="also read the same shards from a loopback HTTP server, by URL")
    parser.add_argument("--skip-cost", action="store_true",
                        help="time skipping 999 samples of a 1,000-sample shard (a resume) against reading them")
    args = parser.parse_args(argv)
    tokenizer = offline_tokenizer()
    if args.skip_cost:
        skip_cost(tokenizer, args.frames, args.source_size, args.frame_size)
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
        places = [("file", tmp)]
        httpd = None
        if args.http:
            httpd, base = serve(tmp)
            count = len(list(Path(tmp).glob("*.tar")))
            places.append(("http", f"{base}/shard-{{00000..{count - 1:05d}}}.tar"))
        try:
            for workers in args.workers:
                for where, pattern in places:
                    rate, frames = run(pattern, tokenizer, workers, args.frame_size, args.batch_size, args.frames)
                    per = rate / max(1, workers)
                    print(f"{where} workers={workers}: {rate:.0f} frames/s total, {per:.0f} frames/s per worker "
                          f"({frames} frames)")
        finally:
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()


if __name__ == "__main__":
    main()
