"""Ask a trained FoveatedVLM one question about a video, an image, a folder of frames, a camera or
nothing (text only), print its reply and one line of timings.

    python generate.py --checkpoint runs/stage3_135M --video clip.mp4 "What happens?"
    python generate.py --checkpoint runs/stage3_135M --image photo.jpg --mode coarse_only "Describe it."
    python generate.py --checkpoint runs/stage3_135M --frames frames/ --stream --attention looked.gif "What moves?"
    python generate.py --checkpoint runs/stage3_135M --camera 0 --seconds 5 --skip 2 "What do you see?"

The reply goes to stdout (streamed piece by piece with --stream), then one line of timings to stderr:
    frames 16 | encode 4.12 ms/frame | TTFT 38.50 ms | 212.30 tokens/s
- encode: the vision backbone's encode of the frames (`model.encode_frames`, the call generation makes
  itself, timed where it happens, with a CUDA synchronize on either side), per encoded frame (an
  image is one frame, however many tokens it is shown as);
- TTFT: from the start of generation to the first reply token, the encode left out: the prompt, the
  LLM's prefill over the visual tokens (and the query passes that read each frame) and the first
  decoding step;
- tokens/s: the tokens after the first one, over the time from the first to the last (counted as
  streamed text pieces: one per token, except that a character split over several tokens counts once).
One run's figures, first-call (warm-up) costs included. With --camera the frames go through a
`session.StreamSession` as they arrive and the figures are the session's own (`summary()`): encode is
per frame added (backbone + query pass; the mean of the last 100), TTFT counts only the question's
prefill and the first token, since the frames are already in the cache; "frames N of M read" when
--skip passes over some.

Media are decoded and checked before the checkpoint loads; a bad file, flag or checkpoint ends in one
`error:` line naming it, exit code 2. cuda when available (bf16 autocast, as `model.generate` does),
else cpu.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

from cli import HelpFormatter, int_at_least
from loading import TRUST_FLAG
from config import MODES
from looked import attention_maps
from frames import check_frame_size, from_images, overlay, read_media as read_file
from media import IMAGE_EXTENSIONS, MediaError
from model import load_model
from session import STREAM_MODES, StreamSession

MEDIA_FLAGS = ("--video", "--image", "--frames", "--camera")
SINK = 4  # --camera: the first frames kept as the session's attention sink
GIF_PANEL = 128  # --attention: each panel at least this many pixels a side (small frames are enlarged)
GIF_HEADER = 16  # --attention: the label strip above the panels
GIF_FRAME_MS = 500

EXAMPLES = """examples:
  # a clip, frames sampled uniformly over it; the reply as it comes
  python generate.py --checkpoint runs/stage3_135M --video clip.mp4 --stream "What happens?"

  # where the queries looked, frame by frame, as a GIF (the foveated model only)
  python generate.py --checkpoint runs/stage3_135M --video clip.mp4 --attention looked.gif "What moves?"

  # the published checkpoint.pt (weights only): name its backbones
  python generate.py --checkpoint checkpoint.pt --llm HuggingFaceTB/SmolLM2-1.7B-Instruct \\
      --dino facebook/dinov2-small --image photo.jpg "Describe the image."

  # 5 seconds of a webcam (/dev/video0), every second frame, answered by a streaming session
  python generate.py --checkpoint runs/stage3_135M --camera 0 --seconds 5 --skip 2 "What do you see?"

timings (one line on stderr, after the reply): frames encoded, the backbone's encode in ms per frame
(the encode generation itself runs, timed with CUDA synchronised), TTFT in ms from the start of
generation to the first token with that encode left out, tokens/s after the first token. --camera
gives its StreamSession's own figures: TTFT there is the question's prefill and first token only.
"""


class UsageError(ValueError):
    """Bad input (a flag, a file, a checkpoint): one `error:` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as one `error:` line too (no usage block), still exit code 2."""

    def error(self, message):
        _fail(message)


def _fail(message: str):
    print("error: " + " ".join(str(message).split("\n")).strip(), file=sys.stderr)
    raise SystemExit(2)


def _number(kind, low: float, high: float | None = None, low_open: bool = False):
    """An argparse `type`: a number (int or float) in [low, high] ((low, high] with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {bounds}, "
                                             f"got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="generate.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                     formatter_class=HelpFormatter)
    parser.add_argument("prompt", help="the question (the user message of the chat template); with no media flag "
                                       "the model answers from the text alone")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="run directory, save_pretrained folder or checkpoint file")
    parser.add_argument("--llm", help="backbone LLM (hub id or folder) for a checkpoint file: needed for the "
                                      "published checkpoint.pt, else replaces the one stored in the checkpoint")
    parser.add_argument("--dino", help="vision backbone (hub id or folder) for a checkpoint file, as --llm")
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="load a checkpoint file that holds pickled Python objects besides tensors; unpickling "
                             "can run code from the file, so only for files you trust")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--video", type=Path, metavar="FILE", help="a video file (mp4, webm, mkv, ...)")
    media.add_argument("--image", type=Path, metavar="FILE",
                       help="an image file, shown as the model's image_frames tokens of one encoded frame")
    media.add_argument("--frames", type=Path, metavar="DIR",
                       help=f"a folder of image files ({', '.join(IMAGE_EXTENSIONS)}), one clip's frames in "
                            f"natural order (frame2 before frame10)")
    media.add_argument("--camera", type=int_at_least(0), metavar="N",
                       help="the V4L2 camera /dev/videoN, read for --seconds into a streaming session (modes "
                            "autoregressive and coarse_only)")
    parser.add_argument("--mode", default="autoregressive", choices=MODES, help="forward mode")
    parser.add_argument("--max-frames", type=int_at_least(1), default=64, metavar="N",
                        help="frames sampled uniformly from a video or a --frames folder; with --camera the most "
                             f"frames the session keeps (the first {SINK} and the latest)")
    parser.add_argument("--frame-size", type=int_at_least(1), default=224, metavar="PX",
                        help="frame side in pixels (a multiple of the vision backbone's patch size)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=128, metavar="N",
                        help="reply length limit")
    parser.add_argument("--stream", action="store_true", help="print the reply piece by piece as it is generated")
    parser.add_argument("--temperature", type=_number(float, 0.0), default=0.0, metavar="T",
                        help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True), default=1.0, metavar="P",
                        help="nucleus sampling: the smallest set of tokens reaching this probability (with "
                             "--temperature > 0)")
    parser.add_argument("--seed", type=int, metavar="N", help="random seed for sampling (default: not seeded)")
    parser.add_argument("--attention", type=Path, metavar="OUT.gif",
                        help="write a GIF: each frame beside the static and the dynamic query's attention over it "
                             "(the vision backbone's last block, mean over heads, one colour scale); with "
                             "--video, --image or --frames, for the foveated model (not the pooled baseline)")
    parser.add_argument("--seconds", type=_number(float, 0.0, low_open=True), default=5.0, metavar="S",
                        help="--camera: how long to read (by the frames' timestamps)")
    parser.add_argument("--skip", type=_number(int, 1, 10), default=1, metavar="K",
                        help="--camera: read every K-th frame (1: all)")
    return parser


# ---- media ----------------------------------------------------------------------------------------------

def _check_file(flag: str, path: Path):
    if not path.is_file():
        raise UsageError(f"{flag} {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")


def natural_key(name: str):
    """frame2.png before frame10.png: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder in natural order (other files are ignored)."""
    if not folder.is_dir():
        raise UsageError(f"--frames {folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    if not files:
        raise UsageError(f"--frames {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return sorted(files, key=lambda p: natural_key(p.name))


def read_media(args) -> torch.Tensor | None:
    """The frames the model is shown: uint8 [T, 3, S, S] (video, frames folder), [3, S, S] (image) or
    None (text only, camera)."""
    for flag, path, kind in (("--video", args.video, "video"), ("--image", args.image, "image")):
        if path is not None:
            _check_file(flag, path)
            try:
                return read_file(path, args.max_frames, args.frame_size, kind)
            except MediaError as e:
                raise UsageError(f"{flag} {path}: {e}") from None
    if args.frames is not None:
        try:
            return from_images(frame_files(args.frames), args.max_frames, args.frame_size)[0]
        except MediaError as e:
            raise UsageError(f"--frames {args.frames}: {e}") from None
    return None


def open_camera(index: int):
    """/dev/videoN through PyAV's V4L2 input."""
    device = f"/dev/video{index}"
    try:
        return av.open(device, format="v4l2")
    except Exception as e:  # noqa: BLE001  PyAV / FFmpeg raise many types for a missing or busy device
        raise UsageError(f"--camera {index}: cannot open {device} ({type(e).__name__}: {e})") from None


def camera_frames(container, seconds: float):
    """The camera's frames as uint8 [H, W, 3] arrays for `seconds`, measured by the frames' timestamps
    (the wall clock for frames without one), or until the stream ends."""
    start = None
    for frame in container.decode(video=0):
        stamp = frame.time if frame.time is not None else time.monotonic()
        start = stamp if start is None else start
        if stamp - start >= seconds:
            return
        yield frame.to_ndarray(format="rgb24")


# ---- generation -----------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EncodeTimer:
    """Times the model's own `encode_frames` calls while active (the instance attribute shadows the
    method; removed on exit): seconds spent and frames encoded."""

    def __init__(self, model, device):
        self.model, self.device, self.seconds, self.frames = model, device, 0.0, 0

    def __enter__(self):
        encode = self.model.encode_frames

        def timed(pixels):
            _sync(self.device)  # work queued before the encode is not the encode's
            start = time.perf_counter()
            out = encode(pixels)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            self.frames += pixels.shape[0]
            return out

        self.model.encode_frames = timed
        return self

    def __exit__(self, *exc):
        del self.model.encode_frames


def _consume(pieces, write, stream: bool):
    """Read a reply's text pieces -> (reply, time of the first piece, of the last, number of pieces)."""
    out, first, last = [], None, None
    for piece in pieces:
        last = time.perf_counter()
        first = last if first is None else first
        out.append(piece)
        if stream:
            write(piece)
    return "".join(out), first, last, len(out)


def _rate(n, first, last):
    return (n - 1) / (last - first) if n > 1 and last > first else None


def answer(model, frames, args, device, write) -> tuple[str, dict]:
    """model.generate(stream=True) on the frames, timed (see the module docstring)."""
    with EncodeTimer(model, device) as timer:
        start = time.perf_counter()
        pieces = model.generate(frames, args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode,
                                temperature=args.temperature, top_p=args.top_p, stream=True)
        reply, first, last, n = _consume(pieces, write, args.stream)
    stats = {"frames": timer.frames, "frames_read": None,
             "encode_ms": 1000 * timer.seconds / timer.frames if timer.frames else None,
             "ttft_ms": 1000 * (first - start - timer.seconds) if first is not None else None,
             "tokens_per_s": _rate(n, first, last)}
    return reply, stats


def answer_camera(model, args, write) -> tuple[str, dict]:
    """--camera: --seconds of frames into a StreamSession (every --skip-th), then the question."""
    mode = model.visual.run_mode(args.mode)  # the pooled baseline streams in coarse_only, its one mode
    sink = min(SINK, args.max_frames - 1)
    session = StreamSession(model, mode=mode, frame_size=args.frame_size, window=args.max_frames - sink, sink=sink,
                            skip=args.skip)
    with open_camera(args.camera) as container:
        for frame in camera_frames(container, args.seconds):
            session.add_frame(frame)
    if not session.frames_added:
        raise UsageError(f"--camera {args.camera}: no frame read from /dev/video{args.camera}")
    pieces = session.ask(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, stream=True)
    reply = _consume(pieces, write, args.stream)[0]
    s = session.summary()
    return reply, {"frames": s["frames_added"], "frames_read": s["frames_seen"], "encode_ms": s["encode_ms"],
                   "ttft_ms": s["ttft_ms"], "tokens_per_s": s["tokens_per_s"]}


def timing_line(stats: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    frames = f"frames {stats['frames']}"
    if stats.get("frames_read") is not None and stats["frames_read"] != stats["frames"]:
        frames += f" of {stats['frames_read']} read"
    return (f"{frames} | encode {fmt(stats['encode_ms'])} ms/frame | TTFT {fmt(stats['ttft_ms'])} ms | "
            f"{fmt(stats['tokens_per_s'])} tokens/s")


# ---- where it looked ------------------------------------------------------------------------------------

@torch.no_grad()
def write_attention_gif(path, pixels: torch.Tensor, token_frame: list[int], maps: dict,
                        frame_ms: int = GIF_FRAME_MS) -> Path:
    """One GIF frame per visual token: its frame, then each query's attention over it (frames.overlay,
    one colour scale for the whole GIF), labelled above."""
    from PIL import Image, ImageDraw, ImageFont

    kinds = [k for k in ("static", "dynamic") if maps.get(k) is not None]
    side = max(pixels.shape[-1], GIF_PANEL)
    vmax = max(float(maps[k].max()) for k in kinds) or 1.0
    try:
        font = ImageFont.load_default(size=11)
    except (TypeError, ImportError, OSError):  # no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    images = []
    for t, f in enumerate(token_frame):
        frame = Image.fromarray(pixels[f].permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.NEAREST)
        panels = [(f"frame {t + 1}/{len(token_frame)}", frame)]
        for kind in kinds:
            heat = overlay(np.asarray(frame), maps[kind][t].numpy(), vmax)  # one block per patch
            panels.append((f"{kind} query", Image.fromarray(heat)))
        canvas = Image.new("RGB", (side * len(panels), side + GIF_HEADER), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (label, panel) in enumerate(panels):
            canvas.paste(panel, (i * side, GIF_HEADER))
            draw.text((i * side + 3, 1), label, fill="black", font=font)
        images.append(canvas)
    path = Path(path)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


# ---- the command line -----------------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def _check_before_loading(args):
    """Everything that can be checked without the model."""
    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.attention is not None:
        if args.camera is not None:
            raise UsageError("--attention draws a clip's frames: give --video, --image or --frames, not --camera")
        if args.video is None and args.image is None and args.frames is None:
            raise UsageError("--attention needs frames to draw: give --video, --image or --frames")
        if not args.attention.parent.is_dir():
            raise UsageError(f"--attention {args.attention}: no folder {args.attention.parent}")
    if args.camera is not None:
        if args.mode not in STREAM_MODES:
            raise UsageError(f"--mode {args.mode} cannot run on --camera (it reads the whole clip twice): use "
                             f"{' or '.join(STREAM_MODES)}")
        open_camera(args.camera).close()  # a missing or busy device fails now; reopened once the model is loaded


def _load(args, device):
    try:
        model, source = load_model(args.checkpoint, args.llm, args.dino, trust=args.trust_checkpoint)
    except Exception as e:  # noqa: BLE001  a checkpoint fails in many ways; each is one line naming it
        message = _one_line(e)
        named = str(args.checkpoint) in message
        raise UsageError(f"--checkpoint {'' if named else str(args.checkpoint) + ' '}cannot be loaded: "
                         f"{message}") from None
    model.to(device).eval()
    check_frame_size(args.frame_size, model.encoder.dino.patch_size, f"--frame-size {args.frame_size}", UsageError)
    if args.attention is not None:
        try:
            model.visual.require_queries("--attention")
        except ValueError as e:
            raise UsageError(str(e)) from None
    return model, source


def run(args) -> dict:
    _check_before_loading(args)
    frames = read_media(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, source = _load(args, device)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.camera is not None:
        reply, stats = answer_camera(model, args, write)
    else:
        reply, stats = answer(model, frames, args, device, write)
    print("" if args.stream else reply)
    print(timing_line(stats), file=sys.stderr)
    result = {"reply": reply, "stats": stats, "checkpoint": source}
    if args.attention is not None:
        looked = attention_maps(model, frames, args.prompt, args.mode)
        pixels, token_frame, maps = looked["pixels"], looked["token_frame"], looked["maps"]
        result["attention"] = str(write_attention_gif(args.attention, pixels, token_frame, maps))
    return result


def main(argv=None) -> dict:
    """The command line; bad input ends in one `error:` line on stderr and SystemExit(2)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, MediaError) as e:  # UsageError is a ValueError
        _fail(_one_line(e))


if __name__ == "__main__":
    main()
