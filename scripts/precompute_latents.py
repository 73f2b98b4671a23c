"""Precompute each stored frame's autoencoder latent into shards, for the next-frame latent objective.

Reads shards and writes, for each input shard, one output shard with the same samples and members plus
`KEY.latents.npy` (float16 [N, C, h, w], the latent of each stored frame in frame order; an image:
N = 1; see latents.py for what a latent is):

    python scripts/precompute_latents.py --shards "data/synthetic/*/" --out data/synthetic_vae --target vae

- Video-file samples (KEY.mp4, ...) become frame samples: decoded at --max-frames / --target-fps,
  stored as JPEG frames (short side --frame-size) whose latents are computed from the JPEGs as written,
  so that latent i belongs to the frame the loader decodes from KEY.00i.jpg.
- Text-only samples are copied unchanged; samples whose media cannot be decoded are skipped and
  counted per reason (printed at the end and kept in OUT/latents.json).
- Resumable: an output shard is written under a temporary name and renamed when complete; a rerun
  skips the shards already there (OUT/latents.json must record the same settings).
- The output keeps the inputs' folder layout below their common folder (sft/, eval/, ...).
"""

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import latents  # noqa: E402
import media  # noqa: E402
from data import media_members  # noqa: E402
from shards import EXT_CHARS, KEY_CHARS, ShardError, ShardWriter, expand, read_samples  # noqa: E402
from tokenization import SampleError  # noqa: E402

SUMMARY = "latents.json"
SETTINGS = ("target", "model", "size", "resize", "pad_fill", "max_frames", "target_fps", "frame_size",
            "jpeg_quality")


class Skip(Exception):
    """A sample that cannot get latents; `reason` names its counter in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# --- one sample ------------------------------------------------------------------------------

def frames_of(key: str, files: dict, args) -> tuple[dict, torch.Tensor | None]:
    """(the sample's members to write, uint8 frames [N, 3, size, size] to encode, or None for a
    text-only sample). A video file is replaced by JPEG frames; frames come from the members as
    written, decoded and resized as the loader does (media.decode_image)."""
    if not KEY_CHARS.match(key) or key.startswith("/"):
        raise Skip("bad_key", f"key {key!r} cannot be written to a shard")
    bad = [ext for ext in files if not EXT_CHARS.match(ext)]
    if bad:
        raise Skip("bad_member", f"member extensions {bad} cannot be written to a shard")
    files = {ext: data for ext, data in files.items() if ext != "latents.npy"}  # stale ones are recomputed
    try:
        kind, members = media_members(files)
    except SampleError as e:
        raise Skip(e.reason, str(e).split(": ", 1)[-1]) from e
    if kind is None:
        return files, None
    if kind == "video":
        files = _video_to_frames(files, members[0], args)
        kind, members = media_members(files)
    try:
        frames = [media.decode_image(files[ext], args.size, args.resize, args.pad_fill) for ext in members]
    except media.MediaError as e:
        raise Skip("bad_image", str(e)) from e
    return files, torch.stack(frames)


def _video_to_frames(files: dict, ext: str, args) -> dict:
    try:
        frames = media.decode_video(files[ext], args.max_frames, args.frame_size or None, "short",
                                    target_fps=args.target_fps or None)
    except media.EmptyVideo as e:
        raise Skip("empty_video", str(e)) from e
    except media.MediaError as e:
        raise Skip("bad_video", str(e)) from e
    out = {k: v for k, v in files.items() if k != ext}
    out.update({f"{i:03d}.jpg": media.encode_jpeg(f, args.jpeg_quality) for i, f in enumerate(frames)})
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# --- one shard -------------------------------------------------------------------------------

class ShardJob:
    """Converts one input shard into one output shard. Frames of several samples are encoded together
    (--batch-size frames at a time, so image datasets fill the GPU too); samples are written in input
    order once their latents are known."""

    def __init__(self, writer: ShardWriter, ae, args):
        self.writer, self.ae, self.args = writer, ae, args
        self.pending, self.pending_frames = [], 0  # [(key, files, frames, from a video file)]
        self.stats = {"samples": 0, "with_latents": 0, "frames": 0, "text_only": 0, "videos_converted": 0,
                      "skipped": Counter(), "examples": {}}

    def add(self, key: str, files: dict):
        try:
            out, frames = frames_of(key, files, self.args)
        except Skip as e:
            self.skip(e.reason, f"{key}: {e.detail}")
            return
        from_video = any(ext in media.VIDEO_EXTENSIONS for ext in files)
        self.pending.append((key, out, frames, from_video))
        self.pending_frames += 0 if frames is None else len(frames)
        if self.pending_frames >= self.args.batch_size:
            self.flush()

    def skip(self, reason: str, detail: str):
        self.stats["skipped"][reason] += 1
        self.stats["examples"].setdefault(reason, detail[:300])

    def flush(self):
        with_frames = [frames for _, _, frames, _ in self.pending if frames is not None]
        encoded = latents.encode(self.ae, torch.cat(with_frames), self.args.size, self.args.resize,
                                 self.args.pad_fill, self.args.batch_size) if with_frames else None
        start = 0
        for key, files, frames, from_video in self.pending:
            if frames is None:
                self.writer.write(key, files)
                self.stats["text_only"] += 1
            else:
                z = encoded[start: start + len(frames)].numpy().astype(np.float16)
                start += len(frames)
                if not np.isfinite(z).all():  # beyond float16's range (|z| > 65504), or a broken model
                    self.skip("non_finite_latents", f"{key}: latents with inf/nan in float16")
                    continue
                self.writer.write(key, {**files, "latents.npy": npy_bytes(z)})
                self.stats["with_latents"] += 1
                self.stats["frames"] += len(frames)
                self.stats["videos_converted"] += from_video
            self.stats["samples"] += 1
        self.pending, self.pending_frames = [], 0


def convert_shard(src: str, dst: Path, ae, args) -> tuple[dict, Path, Path]:
    """Convert src into a shard in a temporary folder next to dst: (stats, the shard written there,
    the folder). The caller renames the shard to dst: only complete shards ever carry a final name."""
    tmp = dst.parent / f".{dst.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    start = time.perf_counter()
    # One output shard per input shard: no sample or size limit splits it.
    with ShardWriter(tmp, prefix="part", max_samples=1 << 62, max_bytes=1 << 62) as writer:
        job = ShardJob(writer, ae, args)
        try:
            for key, files in read_samples(src):
                job.add(key, files)
        except ShardError as e:  # a cut or corrupt input: the samples before the break are kept
            job.skip("corrupt_shard", str(e))
        job.flush()
    stats = dict(job.stats, seconds=round(time.perf_counter() - start, 2))
    stats["skipped"] = dict(stats["skipped"])
    written = tmp / "part-00000.tar"
    if not writer.paths:  # nothing to write: an empty shard still marks this input as done
        tarfile.open(written, "w").close()
    return stats, written, tmp


# --- driver ----------------------------------------------------------------------------------

def output_paths(inputs: list[str], out: Path) -> list[tuple[str, Path]]:
    """(input, output) pairs: the inputs' paths below their common folder, under `out`."""
    parents = [os.path.dirname(os.path.abspath(p)) for p in inputs]
    base = os.path.commonpath(parents)
    pairs = [(p, out / os.path.relpath(os.path.abspath(p), base)) for p in inputs]
    if out.resolve() in {Path(p).resolve() for p in parents}:
        raise ValueError(f"--out {out} is a folder of input shards; write the latents shards elsewhere")
    return pairs


def settings(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def load_summary(out: Path, args) -> dict:
    """The summary of earlier runs into `out`; refuses one made with other settings (the shards
    already written would hold latents of another kind)."""
    path = out / SUMMARY
    if not path.exists():
        return {"settings": settings(args), "shards": {}}
    summary = json.loads(path.read_text())
    old, new = summary.get("settings", {}), json.loads(json.dumps(settings(args)))
    changed = [f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in SETTINGS if old.get(k) != new[k]]
    if changed:
        raise ValueError(f"{out} holds latents precomputed with other settings ({'; '.join(changed)}); use another "
                         "--out, or delete that folder to start over")
    return summary


def save_summary(out: Path, summary: dict):
    totals = {"samples": 0, "with_latents": 0, "frames": 0, "text_only": 0, "videos_converted": 0}
    skipped = Counter()
    for stats in summary["shards"].values():
        for k in totals:
            totals[k] += stats.get(k, 0)
        skipped.update(stats.get("skipped", {}))
    summary["totals"] = dict(totals, skipped=dict(sorted(skipped.items())))
    tmp = out / f".{SUMMARY}.partial"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / SUMMARY)  # never a half-written summary


def run(args) -> dict:
    """Convert every input shard not converted yet; returns the summary."""
    pairs = output_paths(expand(args.shards), Path(args.out))  # bad paths fail before the model loads
    args.out.mkdir(parents=True, exist_ok=True)
    summary = load_summary(args.out, args)
    todo = [(src, dst) for src, dst in pairs if not dst.exists()]
    print(f"{len(pairs)} input shards, {len(pairs) - len(todo)} already done", flush=True)
    if not todo:
        return summary
    device = torch.device(args.device)
    ae = latents.load_autoencoder(args.model, args.target, device, setting="--model")
    for i, (src, dst) in enumerate(todo, 1):
        dst.parent.mkdir(parents=True, exist_ok=True)
        stats, written, tmp = convert_shard(src, dst, ae, args)
        name = str(dst.relative_to(args.out))
        summary["shards"][name] = dict(stats, input=os.path.abspath(src))
        save_summary(args.out, summary)  # first: a crash before the rename redoes the shard, recording it again
        written.replace(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        rate = stats["samples"] / max(stats["seconds"], 0.01)
        print(f"[{i}/{len(todo)}] {name}: {stats['samples']} samples ({stats['frames']} frames) in "
              f"{stats['seconds']:.1f}s, {rate:.1f} samples/s; skipped {sum(stats['skipped'].values())}", flush=True)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python scripts/precompute_latents.py --shards "
                                            "'data/synthetic/*/' --out data/synthetic_taesd --target taesd")
    parser.add_argument("--shards", nargs="+", required=True, help="shard files, globs, {000..099} ranges or folders")
    parser.add_argument("--out", required=True, type=Path, help="output folder (the inputs' layout is kept)")
    parser.add_argument("--target", required=True, choices=tuple(latents.AUTOENCODER_CLASSES),
                        help="vae: AutoencoderKL (SD VAE); taesd: AutoencoderTiny")
    parser.add_argument("--model", help=f"hub id or local folder (default: {latents.DEFAULT_MODELS})")
    parser.add_argument("--size", type=int, default=256, help="frames are resized to size x size before encoding")
    parser.add_argument("--resize", choices=("squash", "crop", "pad"), default="squash",
                        help="how frames become square: the training resize mode (data.resize)")
    parser.add_argument("--pad-fill", type=int, nargs=3, metavar=("R", "G", "B"),
                        help="--resize pad: the padding colour (the vision backbone's pad_fill)")
    parser.add_argument("--max-frames", type=int, default=64, help="video files: at most this many frames")
    parser.add_argument("--target-fps", type=float, default=1.0, help="video files: frames per second kept (0: all)")
    parser.add_argument("--frame-size", type=int, default=224,
                        help="video files: stored frames' short side, aspect kept (0: keep the resolution)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="video files: quality of the stored frames")
    parser.add_argument("--batch-size", type=int, default=16, help="frames encoded at once")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:1, cpu, ...")
    args = parser.parse_args(argv)
    args.model = args.model or latents.DEFAULT_MODELS[args.target]
    if args.resize == "pad" and args.pad_fill is None:
        parser.error("--resize pad needs --pad-fill R G B (the vision backbone's pad colour)")
    args.pad_fill = tuple(args.pad_fill) if args.pad_fill and args.resize == "pad" else None
    for name in ("size", "max_frames", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    return args


def format_summary(summary: dict) -> str:
    t = summary["totals"]
    lines = [f"{t['samples']} samples in {len(summary['shards'])} shards: {t['with_latents']} with latents "
             f"({t['frames']} frames, {t['videos_converted']} from video files), {t['text_only']} text only",
             "skipped " + (", ".join(f"{r} {n}" for r, n in t["skipped"].items()) or "none")]
    examples = {}
    for stats in summary["shards"].values():
        for reason, detail in stats.get("examples", {}).items():
            examples.setdefault(reason, detail)
    lines += [f"  first {reason}: {detail}" for reason, detail in sorted(examples.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError, latents.LatentModelError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "totals" in summary:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
