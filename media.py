"""Decoding images and videos into uint8 frames at the model's resolution, and the uniform frame
sampling rule shared by training, shard building and benchmarks.

Frames stay uint8 [T, 3, S, S] until they reach the model (the encoder normalises them), which keeps
worker-to-GPU traffic at a quarter of float32. JPEGs decode through torchvision's libjpeg-turbo
`decode_jpeg` when torchvision is installed, through Pillow otherwise; videos through decord when it
is installed, through PyAV otherwise (decord is unmaintained and x86-64 only).
"""

import io

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

try:  # optional: faster JPEG decoding
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the environment
    decode_jpeg = None
try:  # optional: seeking video decoder
    import decord
except ImportError:  # pragma: no cover - depends on the environment
    decord = None

from config import RESIZE_MODES as SQUARE_RESIZE_MODES

RESIZE_MODES = SQUARE_RESIZE_MODES + ("short",)
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class MediaError(Exception):
    """An image or video that cannot be decoded; the sample is skipped."""


class EmptyVideo(MediaError):
    """A video container without a single decodable frame."""


def sample_frame_indices(num_frames: int, max_frames: int, fps: float | None = None,
                         target_fps: float | None = None) -> list[int]:
    """Indices of the frames to keep: evenly spread over the whole clip (the centre of each of k
    equal segments), k = min(num_frames, max_frames, and with target_fps the clip's duration times
    target_fps, at least 1). Empty for a clip without frames."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if num_frames <= 0:
        return []
    k = min(num_frames, max_frames)
    if target_fps and fps and fps > 0:
        k = min(k, max(1, int(num_frames / fps * target_fps + 0.5)))
    return [min(num_frames - 1, int((i + 0.5) * num_frames / k)) for i in range(k)]


def resize(frames: torch.Tensor, size: int, mode: str = "squash", fill=None) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> [..., 3, size, size]. squash: stretch to the square (keeps all
    content); crop: centre square of the short side (loses the edges); pad: fit inside and pad with
    the colour `fill` (keeps content and aspect; the vision backbone's `pad_fill`, its mean colour,
    normalises to ~0). short: short side to `size`, aspect kept (not square; for storing frames in
    shards)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "pad" and fill is None:
        raise ValueError("resize mode 'pad' needs the fill colour (the vision backbone's pad_fill)")
    h, w = frames.shape[-2:]
    if mode == "squash":
        out_h, out_w = size, size
    elif mode in ("crop", "short"):
        scale = size / min(h, w)
        out_h, out_w = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        scale = size / max(h, w)
        out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    x = frames.reshape(-1, 3, h, w)
    if (out_h, out_w) != (h, w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    if mode == "crop":
        top, left = (out_h - size) // 2, (out_w - size) // 2
        x = x[..., top: top + size, left: left + size]
    elif mode == "pad" and (out_h, out_w) != (size, size):
        canvas = torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1).repeat(x.shape[0], 1, size, size)
        top, left = (size - out_h) // 2, (size - out_w) // 2
        canvas[..., top: top + out_h, left: left + out_w] = x
        x = canvas
    return x.reshape(*frames.shape[:-2], *x.shape[-2:])


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] (a view of an [H, W, 3] buffer: whoever stacks the frames makes the one copy)."""
    if img.getexif().get(0x0112, 1) != 1:  # phone photos store their rotation in EXIF
        img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grayscale (PNG) opens as I;16 (older Pillow: I), whose convert("RGB") clips every value
        # above 255 to white: scale 0..65535 to 0..255 instead. (16-bit colour PNGs already open as
        # 8-bit RGB/RGBA, scaled by Pillow.)
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas onto white: charts and documents are drawn for a white page
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(img.height, img.width, 3).permute(2, 0, 1)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, found by walking its markers; None if absent."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame marker
            return int.from_bytes(data[i + 7: i + 9], "big"), int.from_bytes(data[i + 5: i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2: i + 4], "big")
    return None


def decode_image(data: bytes, size: int | None = None, mode: str = "squash", fill=None) -> torch.Tensor:
    """Image bytes -> uint8 [3, size, size] (or the original size when size is None); mode and fill
    as in `resize`."""
    try:
        dims = _jpeg_size(data) if data[:3] == b"\xff\xd8\xff" else None
        if dims and decode_jpeg is not None and (size is None or min(dims) < 2 * size):
            # libjpeg-turbo through torchvision: faster than Pillow at the target size (bench_data.py)
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                              apply_exif_orientation=True)
        else:
            pil = Image.open(io.BytesIO(data))
            if pil.format == "JPEG" and size is not None:
                pil.draft("RGB", (size, size))  # much larger than needed: decode at a reduced DCT scale
            img = pil_to_tensor(pil)
    except Exception as e:  # decoders raise many types on corrupt data
        raise MediaError(f"undecodable image ({type(e).__name__}: {e})") from e
    if img.shape[-1] == 0 or img.shape[-2] == 0:
        raise MediaError("empty image")
    return resize(img, size, mode, fill) if size is not None else img


def encode_jpeg(image, quality: int = 90) -> bytes:
    """uint8 [3, H, W] tensor, [H, W, 3] array or PIL image -> JPEG bytes (Pillow, deterministic)."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_video(data: bytes, max_frames: int, size: int | None = None, mode: str = "squash",
                 target_fps: float | None = None, fill=None) -> torch.Tensor:
    """Video bytes -> uint8 [T, 3, size, size] (`resize` mode and fill; original size when size is None),
    T uniformly sampled frames (sample_frame_indices). Frames are resized as they are decoded, so a
    long high-resolution clip never sits in memory at full size. Raises MediaError for undecodable
    videos, EmptyVideo for videos without frames."""
    fit = (lambda x: resize(x, size, mode, fill)) if size is not None else (lambda x: x)  # noqa: E731
    if decord is not None and _opens(data):
        try:
            return _decord_frames(data, max_frames, target_fps, fit)
        except MediaError:
            raise
        except Exception:  # decord failing on a container PyAV may still read
            pass
    return _pyav_frames(data, max_frames, target_fps, fit)


def _opens(data) -> bool:
    """Whether FFmpeg (through PyAV) reads the container's header. decord is given only bytes that
    pass: on bytes it cannot open, its C++ logger writes the whole input to stderr as the file's name
    (megabytes of binary for a large corrupt file), before the error PyAV reports in one line."""
    try:
        with av.open(io.BytesIO(data)):
            return True
    except Exception:  # noqa: BLE001  PyAV / FFmpeg raise many types for unreadable input
        return False


def _decord_frames(data, max_frames, target_fps, fit):
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    index = sample_frame_indices(len(reader), max_frames, reader.get_avg_fps(), target_fps)
    if not index:
        raise EmptyVideo("video has no frames")
    chunks = [fit(torch.from_numpy(reader.get_batch(index[i: i + 8]).asnumpy()).permute(0, 3, 1, 2))
              for i in range(0, len(index), 8)]
    reader.seek(0)  # releases decord's frame buffers (its get_batch memory growth)
    return torch.cat(chunks).contiguous()


def _pyav_frames(data, max_frames, target_fps, fit):
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise EmptyVideo("file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            n = stream.frames or _count_packets(container, stream)
        index = sample_frame_indices(n, max_frames, fps, target_fps)
        frames, decoded = _pyav_pick(data, index, fit)
        if len(frames) < len(index):
            # The container over-reported its length (or its tail is damaged): sample again over
            # the frames that do decode.
            frames, _ = _pyav_pick(data, sample_frame_indices(decoded, max_frames, fps, target_fps), fit)
    except MediaError:
        raise
    except av.error.EOFError as e:  # the file ends before its first frame
        raise EmptyVideo(f"video ends before its first frame ({e})") from e
    except Exception as e:
        raise MediaError(f"undecodable video ({type(e).__name__}: {e})") from e
    if not frames:
        raise EmptyVideo("video has no decodable frames")
    return torch.stack(frames)


def _count_packets(container, stream) -> int:
    """Frame count by demuxing (no decoding), for containers that do not store it (mkv, webm)."""
    n = 0
    try:
        for packet in container.demux(stream):
            n += bool(packet.size)
    except av.error.FFmpegError:  # a damaged tail ends the count
        pass
    return n


def _pyav_pick(data, index, fit):
    """Decode sequentially, keeping the frames at `index`; returns (frames, frames decoded)."""
    wanted, frames, i = set(index), [], -1
    if not wanted:
        return [], 0
    last = max(wanted)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = container.decode(stream)
        while i < last:
            try:
                frame = next(decoded)
            except StopIteration:
                break
            except av.error.FFmpegError:
                if i < 0:
                    raise
                break  # a damaged tail: the frames before it are the video
            i += 1
            if i in wanted:
                frames.append(fit(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)))
    return frames, i + 1


def frame_extension_index(ext: str) -> int | None:
    """`000.jpg` -> 0 for numbered frame members; None for anything else."""
    stem, _, kind = ext.partition(".")
    return int(stem) if stem.isdigit() and kind in IMAGE_EXTENSIONS else None

