"""Pretrain a small ViT in the DINOv2 architecture on the synthetic world, so that the study's testbed
starts from a vision backbone that sees (no pretrained DINOv2 is available offline; a random one
gives the probe nothing to read).

Every step draws fresh frames from make_synthetic's world (its shapes, palette, grey, backgrounds and
JPEG round trip; 0-12 objects of one random size per frame, never the probe's questions) and trains a
dense objective from the generator's ground truth, on the final patch tokens through linear heads:
- the colour of the object on each patch (8 palette colours, grey, or none),
- its shape (4, or none),
- the position of its centre (every patch; a background patch's own centre), in patch units.
A patch belongs to an object when it holds >= 25 % of the object's pixels or the object covers >= 25 %
of the patch (so a small object straddling four patches labels all four); a patch with a smaller
sliver of an object is left out of the loss. Why supervised rather than self-supervised: the labels
are free and exact here, and they are what the probe asks about; a DINO-style objective needs far
more compute than a 2-core CPU has to learn colour and shape of 10-px objects.

The output is a transformers folder (config.json, model.safetensors) that `model.dino: <folder>` loads
like facebook/dinov2-small, plus pretrain.json: the settings, the loss curve, wall time, frames/s and
the gate, measured on held-out frames with linear probes on the frozen final patch tokens (colour and
shape of the object on a patch, the object's centre by least squares) and the attention entropy of
every block (1 = uniform). Folders are named by a hash of the settings under --out and reused when
present (a rerun trains nothing). Deterministic per seed at a given thread count.

    python scripts/pretrain_vision.py --out runs/backbones            # prints the folder
    python scripts/pretrain_vision.py --out runs/backbones --steps 0  # the gate of the random init
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import Dinov2Config, Dinov2Model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_synthetic as world  # noqa: E402
from backbones import POSITIONS, set_positions  # noqa: E402
from config import add_dataclass_flags, dataclass_from_flags  # noqa: E402
from media import decode_image, encode_jpeg  # noqa: E402
from vit import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

VERSION = 1  # bump when the objective or the scenes change: cached folders are then not reused
COLOURS = (*sorted(world.PALETTE), "grey")  # class k + 1; 0 = no object
MIN_SHARE = 0.25  # a patch is an object's when it holds this share of the object or is this much covered
GATE_FIT, GATE_TEST = 384, 192  # held-out frames for fitting the linear probes / scoring them


@dataclass(frozen=True)
class Settings:
    """Everything the folder depends on (its name is a hash of these)."""
    frame_size: int = 112
    patch_size: int = 14
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    position: str = "sincos"  # the patch position embeddings' initialisation (backbones.POSITIONS)
    # which patches learn the shape: every patch of an object ("object": a token then binds its object's
    # colour and shape) or only the one holding its centre ("centre": easier, but the shape sits on one token)
    shape_on: str = "object"
    scale: list[float] = field(default_factory=lambda: [0.09, 0.16])  # object side / frame side, per frame
    objects: list[int] = field(default_factory=lambda: [0, 12])  # per frame, uniformly (fewer when they cannot fit)
    steps: int = 1500
    batch: int = 64  # frames per step
    lr: float = 1e-3
    seed: int = 0

    def check(self):
        if self.frame_size % self.patch_size or self.width % self.heads:
            raise ValueError(f"need frame_size % patch_size == 0 and width % heads == 0, got {self}")
        if self.shape_on not in ("object", "centre"):
            raise ValueError(f"shape_on must be 'object' or 'centre', got {self.shape_on!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if len(self.scale) != 2 or len(self.objects) != 2:
            raise ValueError(f"scale and objects are [min, max] pairs, got {self.scale} and {self.objects}")
        if not 0 < self.scale[0] <= self.scale[1] <= 0.25 or not 0 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"need 0 < scale min <= max <= 0.25 and 0 <= objects min <= max, got {self}")
        if self.steps < 0 or self.batch < 1:
            raise ValueError("need steps >= 0 and batch >= 1")

    def folder_name(self) -> str:
        key = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return f"vit-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    @property
    def grid(self) -> int:
        return self.frame_size // self.patch_size


# ---- the synthetic world, with per-patch ground truth -------------------------------------------

def scene(rng: random.Random, s: Settings):
    """One frame: (uint8 [3, px, px] after the probe's JPEG round trip, object index map [px, px]
    (0 = background, i + 1 = objects[i]), objects)."""
    px = s.frame_size
    size = world.object_size(px, rng.uniform(*s.scale))
    room = int(0.3 * (px / (1.5 * size)) ** 2)  # what random placement with a size // 2 gap always fits
    count = min(rng.randint(*s.objects), room)
    objects = [{"shape": rng.choice(world.SHAPES), "colour": rng.choice(COLOURS), "box": [x, y, x + size, y + size]}
               for x, y in world.place(rng, count, size, px, [])]
    image, index = world.background(rng, px), Image.new("L", (px, px), 0)
    paint, label = ImageDraw.Draw(image), ImageDraw.Draw(index)
    for i, o in enumerate(objects):
        x, y = o["box"][:2]
        world.draw_shape(paint, o["shape"], world.PALETTE.get(o["colour"], world.GREY), x, y, size)
        world.draw_shape(label, o["shape"], i + 1, x, y, size)
    pixels = decode_image(encode_jpeg(image, quality=world.JPEG_QUALITY))
    return pixels, np.asarray(index), objects


def dense_labels(index: np.ndarray, objects: list, patch: int, shape_on: str = "object"):
    """Per patch (row-major): colour class of its object, shape class (of its object with shape_on
    "object", of the object centred on it with "centre"; 0 = none, -100 = left out) and the centre of
    its object (of the patch itself on background) in patch units [g * g, 2] as (x, y)."""
    g = index.shape[0] // patch
    # [g * g, patch * patch]: the pixels of patch (r, c) at row r * g + c
    cells = index[:g * patch, :g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    rows, cols = np.divmod(np.arange(g * g), g)
    centre = np.stack([cols + 0.5, rows + 0.5], 1).astype(np.float32)
    colour, shape = np.zeros(g * g, np.int64), np.full(g * g, -100, np.int64)
    if not objects:
        return colour, shape, centre
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(objects))], 1)  # [g * g, objects]
    area = np.maximum(counts.sum(0), 1)
    owner = counts.argmax(1)
    top = counts.max(1)
    mine = (top >= MIN_SHARE * area[owner]) | (top >= MIN_SHARE * patch * patch)
    sliver = (top > 0) & ~mine
    for p in np.nonzero(mine)[0]:  # shape is left out on background: the colour head says "no object"
        o = objects[owner[p]]
        colour[p] = COLOURS.index(o["colour"]) + 1
        if shape_on == "object":
            shape[p] = world.SHAPES.index(o["shape"]) + 1
        x0, y0, x1, y1 = o["box"]
        centre[p] = ((x0 + x1) / 2 / patch, (y0 + y1) / 2 / patch)
    if shape_on == "centre":  # the patch holding the centre sees most of a small object
        for o in objects:
            shape[centre_patch(o, patch, g)] = world.SHAPES.index(o["shape"]) + 1
    colour[sliver] = -100
    return colour, shape, centre


def centre_patch(obj: dict, patch: int, g: int) -> int:
    """The row-major index of the patch holding an object's centre pixel."""
    x0, y0, x1, y1 = obj["box"]
    return min((y0 + y1) // 2 // patch, g - 1) * g + min((x0 + x1) // 2 // patch, g - 1)


def batch_of(s: Settings, stream: str, index: int, size: int) -> dict:
    """Frames and labels drawn from their own seed (stream, index): the same for every run and worker."""
    rng = random.Random(f"pretrain_vision/{s.seed}/{stream}/{index}")
    frames, colours, shapes, centres = [], [], [], []
    for _ in range(size):
        pixels, idx, objects = scene(rng, s)
        c, sh, ce = dense_labels(idx, objects, s.patch_size, s.shape_on)
        frames.append(pixels)
        colours.append(c), shapes.append(sh), centres.append(ce)
    return {"frames": torch.stack(frames), "colour": torch.from_numpy(np.stack(colours)),
            "shape": torch.from_numpy(np.stack(shapes)), "centre": torch.from_numpy(np.stack(centres))}


class Frames(IterableDataset):
    """Training batches start .. steps - 1, drawn by the loader's workers while the main process trains:
    worker k of W draws steps start + k, start + k + W, ..., and the loader takes one from each worker in
    turn, so the order (and every batch: batch_of seeds it by step) does not depend on W."""

    def __init__(self, s: Settings, start: int = 0):
        self.s, self.start = s, start

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.s.steps, workers):
            yield batch_of(self.s, "train", step, self.s.batch)


# ---- the model -----------------------------------------------------------------------------------

class DenseHeads(nn.Module):
    """Linear read-outs of the final patch tokens: colour, shape, centre."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(world.SHAPES) + 1)
        self.centre = nn.Linear(width, 2)


def backbone(s: Settings) -> Dinov2Model:
    config = Dinov2Config(hidden_size=s.width, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                          mlp_ratio=s.mlp_ratio, patch_size=s.patch_size, image_size=s.frame_size,
                          layerscale_value=1.0)
    torch.manual_seed(s.seed)
    model = Dinov2Model(config)
    set_positions(model, s.position, torch.Generator().manual_seed(s.seed))
    return model


def normalise(frames: torch.Tensor) -> torch.Tensor:
    mean = 255 * torch.tensor(IMAGENET_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = 255 * torch.tensor(IMAGENET_STD, device=frames.device).view(1, 3, 1, 1)
    return (frames.float() - mean) / std


def patch_tokens(model: Dinov2Model, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [N, 3, px, px] -> final-normed patch tokens [N, g * g, D] (the CLS token dropped)."""
    return model(pixel_values=normalise(frames)).last_hidden_state[:, 1:]


def losses(model, heads, batch) -> dict:
    z = patch_tokens(model, batch["frames"])
    colour = F.cross_entropy(heads.colour(z).flatten(0, 1), batch["colour"].flatten(), ignore_index=-100)
    shape = F.cross_entropy(heads.shape(z).flatten(0, 1), batch["shape"].flatten(), ignore_index=-100)
    keep = (batch["colour"] != -100).float()[..., None]  # slivers: no position either
    centre = (F.smooth_l1_loss(heads.centre(z), batch["centre"], reduction="none") * keep).sum() / keep.sum() / 2
    return {"colour": colour, "shape": shape, "centre": centre}


def train(s: Settings, threads: int, log) -> tuple[Dinov2Model, dict]:
    """Trains on CUDA when there is one (bf16 autocast over fp32 weights; more workers draw frames), else
    on the CPU with `threads` threads and one worker; returns the backbone on the CPU."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = 1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
    model, heads = backbone(s).to(device), DenseHeads(s.width).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.05)
    warmup = max(1, s.steps // 20)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max(1, s.steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve, window, start = [], [], time.perf_counter()
    # workers draw the frames while this process trains (none for a gate-only run)
    loader = DataLoader(Frames(s), batch_size=None, num_workers=workers if s.steps else 0,
                        prefetch_factor=4 if s.steps else None, pin_memory=device.type == "cuda")
    model.train()
    for step, batch in enumerate(loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            parts = losses(model, heads, batch)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        window.append(torch.stack([v.detach().float() for v in parts.values()]))
        if (step + 1) % 100 == 0 or step + 1 == s.steps:  # the one host sync in 100 steps
            mean = torch.stack(window).mean(0).tolist()
            curve.append({"step": step + 1, **dict(zip(parts, mean)), "seconds": time.perf_counter() - start})
            window = []
            log(f"step {step + 1}/{s.steps}  " + "  ".join(f"{k} {v:.3f}" for k, v in zip(parts, mean))
                + f"  {(step + 1) * s.batch / (time.perf_counter() - start):.0f} frames/s")
    seconds = time.perf_counter() - start
    model.to("cpu").eval()
    return model, {"curve": curve, "train_seconds": seconds,
                   "frames_per_second": s.steps * s.batch / seconds if s.steps else None}


# ---- the gate ------------------------------------------------------------------------------------

def held_out(s: Settings, stream: str, frames: int) -> dict:
    parts = [batch_of(s, stream, i, 64) for i in range(math.ceil(frames / 64))]
    return {k: torch.cat([p[k] for p in parts])[:frames] for k in parts[0]}


def linear_probe(x_fit, y_fit, x_test, y_test, classes: int) -> float:
    """Accuracy on (x_test, y_test) of a multinomial logistic regression fitted on (x_fit, y_fit)."""
    probe = nn.Linear(x_fit.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x_fit), y_fit) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (probe(x_test).argmax(1) == y_test).float().mean().item()


def least_squares(x_fit, y_fit, x_test, y_test) -> torch.Tensor:
    """|error| per test row of a ridge regression y ~ [x, 1] fitted on the fit rows."""
    a = torch.cat([x_fit, torch.ones(len(x_fit), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y_fit.double())
    return (torch.cat([x_test, torch.ones(len(x_test), 1)], 1).double() @ w - y_test.double()).norm(dim=1)


@torch.no_grad()
def attention_entropy(model: Dinov2Model, frames: torch.Tensor) -> list[float]:
    """Per block: the patch tokens' attention entropy over all keys, mean over heads and tokens, divided
    by log(keys) (1 = uniform)."""
    model.config._attn_implementation = "eager"  # the attention weights are returned only by eager
    out = model(pixel_values=normalise(frames), output_attentions=True)
    model.config._attn_implementation = "sdpa"
    keys = out.attentions[0].shape[-1]
    return [float(-(a * a.clamp_min(1e-12).log()).sum(-1)[:, :, 1:].mean() / math.log(keys)) for a in out.attentions]


@torch.no_grad()
def gate(model: Dinov2Model, s: Settings) -> dict:
    """Linear probes on the frozen final patch tokens of held-out frames: object patches only."""
    fit, test = held_out(s, "gate_fit", GATE_FIT), held_out(s, "gate_test", GATE_TEST)
    z_fit, z_test = (patch_tokens(model, b["frames"]).flatten(0, 1) for b in (fit, test))
    mean, std = z_fit.mean(0), z_fit.std(0) + 1e-6
    z_fit, z_test = (z_fit - mean) / std, (z_test - mean) / std
    on_fit, on_test = fit["colour"].flatten() > 0, test["colour"].flatten() > 0  # object patches
    result = {"object_patches": {"fit": int(on_fit.sum()), "test": int(on_test.sum())}}
    with torch.enable_grad():
        for name, classes in (("colour", len(COLOURS) + 1), ("shape", len(world.SHAPES) + 1)):
            y_fit, y_test = fit[name].flatten(), test[name].flatten()
            keep_fit, keep_test = y_fit > 0, y_test > 0  # the patches that carry the label (shape_on)
            result[f"{name}_accuracy"] = linear_probe(z_fit[keep_fit], y_fit[keep_fit], z_test[keep_test],
                                                      y_test[keep_test], classes)
    error = least_squares(z_fit[on_fit], fit["centre"].flatten(0, 1)[on_fit], z_test[on_test],
                          test["centre"].flatten(0, 1)[on_test]) * s.patch_size
    result["centre_error_px"] = {"median": error.median().item(), "mean": error.mean().item(),
                                 "within_half_patch": (error <= s.patch_size / 2).float().mean().item()}
    result["attention_entropy"] = attention_entropy(model, test["frames"][:32])
    result["passed"] = passed(result, s)
    return result


def passed(g: dict, s: Settings) -> bool:
    """The bar: colour and shape >= 95 % on object patches, the centre within half a patch for >= 90 % of
    them, and attention no longer uniform (some block below 0.9 of the uniform entropy)."""
    return (g["colour_accuracy"] >= 0.95 and g["shape_accuracy"] >= 0.95
            and g["centre_error_px"]["within_half_patch"] >= 0.9 and min(g["attention_entropy"]) < 0.9)


# ---- the cached folder ---------------------------------------------------------------------------

def ensure(s: Settings, root: Path, threads: int = 1, log=print) -> Path:
    """The pretrained folder for these settings under root: trained (and gated) unless already there."""
    s.check()
    folder = Path(root) / s.folder_name()
    if (folder / "pretrain.json").is_file():
        log(f"pretrained vision backbone: {folder} (cached)")
        return folder
    log(f"pretraining the vision backbone into {folder}")
    model, report = train(s, threads, log)
    report["gate"] = gate(model, s)
    log(f"gate: {json.dumps(report['gate'])}")
    tmp = folder.with_name(folder.name + ".part")
    model.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps({"version": VERSION, "settings": dataclasses.asdict(s),
                                                   "threads": threads, **report}, indent=1) + "\n")
    tmp.rename(folder)  # complete or absent: an interrupted run leaves only the .part folder
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/backbones"), help="the cache of pretrained folders")
    parser.add_argument("--threads", type=int, default=1, help="training threads (one more process draws frames)")
    add_dataclass_flags(parser, Settings)
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    folder = ensure(dataclass_from_flags(args, Settings), args.out, args.threads)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
