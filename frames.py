"""Frames as the model and the figures see them: the frame-size check (`check_frame_size`), a media file
-> frames (`read_media`), a clip stored as images -> frames (`from_images`), a query's attention as a
map over the patches (`attention_grid`) and the one way such a map is drawn over its frame (`CMAP`,
`OVERLAY_ALPHA`, `overlay`). The app, generate.py,
session.py, train.py, benchmark.py, lmms_fvlm.py, looked.py and scripts/report.py use these."""

from pathlib import Path

import numpy as np
import torch

from media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, decode_image, decode_video, sample_frame_indices

CMAP = "inferno"  # every attention overlay: report.py's figures, looked.py's, the app's, generate.py's GIF
OVERLAY_ALPHA = 0.6
# what a file picker offers: media.py's extensions, and y4m (raw video PyAV reads, made by the tests)
VIDEO_SUFFIXES = tuple(f".{e}" for e in VIDEO_EXTENSIONS) + (".y4m",)
IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTENSIONS)


def check_frame_size(size: int, patch: int, label: str | None = None, error=ValueError):
    """Raise error(message) unless frames of `size` px are a positive multiple of the vision backbone's
    `patch` px (the backbone would cut the remainder off). label names the setting, with its value
    (default "frame size {size}")."""
    if size < patch or size % patch:
        raise error(f"{label or f'frame size {size}'} is not a multiple of the vision backbone's {patch}-px patches")


def read_media(path, max_frames: int, frame_size: int, kind: str | None = None) -> torch.Tensor:
    """An image file -> uint8 [3, S, S]; a video file -> [T, 3, S, S], T <= max_frames evenly spread.
    kind "image" or "video" says which it is; None goes by the suffix, and a file with neither an image
    nor a video suffix is read as an image, else as a video (FFmpeg would also read a still image as a
    one-frame video). MediaError when it cannot be decoded."""
    path = Path(path)
    data = path.read_bytes()
    if kind is None:
        suffix = path.suffix.lower()
        kind = "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None
    if kind == "image":
        return decode_image(data, frame_size)
    if kind == "video":
        return decode_video(data, max_frames, frame_size)
    try:  # an unknown suffix: an image with an unusual name, else a video
        return decode_image(data, frame_size)
    except MediaError:
        return decode_video(data, max_frames, frame_size)


def from_images(images, max_frames: int, frame_size: int):
    """A clip stored as one image per frame (bytes, or paths read here), in frame order -> (uint8
    [T, 3, S, S], the kept indices): T <= max_frames frames spread evenly over the clip, as training
    thins them (media.sample_frame_indices), and only those decoded. MediaError naming the frame's
    index (and its path) when one cannot be decoded."""
    keep = sample_frame_indices(len(images), max_frames)
    frames = []
    for i in keep:
        image = images[i]
        try:
            frames.append(decode_image(image.read_bytes() if isinstance(image, Path) else image, frame_size))
        except MediaError as e:
            raise MediaError(f"frame {i}{f' ({image})' if isinstance(image, Path) else ''}: {e}") from None
    return torch.stack(frames), keep


def attention_grid(attn: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """A query's attention [T, blocks, heads, keys] (keys: `prefix` CLS / register tokens, then the
    patches row by row) -> the last block's, mean over heads, on the patches: [T, gh, gw] float on the
    CPU. ValueError when the keys are not prefix + gh x gw."""
    gh, gw = grid
    if attn.shape[-1] != prefix + gh * gw:
        raise ValueError(f"attention has {attn.shape[-1]} keys; expected {prefix} prefix + {gh} x {gw} patches")
    return attn[:, -1].float().mean(1)[:, prefix:].reshape(-1, gh, gw).cpu()


def overlay(frame: np.ndarray, heat, vmax: float) -> np.ndarray:
    """frame [H, W, 3] uint8 with heat [gh, gw] over it, patch i on pixels [i * p, (i + 1) * p) with
    p = H // gh (a remainder past the last patch, which the backbone drops, stays as it is), in CMAP
    over [0, vmax], blended at OVERLAY_ALPHA -> [H, W, 3] uint8."""
    from matplotlib import colormaps

    heat = np.asarray(heat, dtype=np.float64)
    (gh, gw), (h, w) = heat.shape, frame.shape[:2]
    ph, pw = h // gh, w // gw
    up = heat.repeat(ph, 0).repeat(pw, 1)
    colours = colormaps[CMAP](np.clip(up / max(vmax, 1e-12), 0, 1))[..., :3] * 255
    out = frame.copy()
    covered = frame[:gh * ph, :gw * pw]
    out[:gh * ph, :gw * pw] = ((1 - OVERLAY_ALPHA) * covered + OVERLAY_ALPHA * colours).round().astype(np.uint8)
    return out
