"""Where it looked: how much of each query's attention falls on the synthetic clips' target object.

scripts/make_synthetic.py records the target's box in every frame (meta "boxes", original pixels).
For each frame the model sees, `patch_cover` turns the box into the fraction of every patch it
covers, and `target_share` scores a query's last-block attention against it: the share of the
frame's attention mass that lands on the target, next to the share a uniform-over-patches attention
would give (chance). `clip_scores` runs one clip, `read_probe` reads clips from shards as the data
pipeline would, `draw_looked` draws one, `summarise` averages over clips.

    probe = read_probe("data/synthetic/val_sft", frame_size=224, max_frames=8, limit=20)
    scores = [clip_scores(model, sample, meta, "coarse_fine") for sample, meta in probe]
    summarise(scores)["dynamic"]["share"]  # (mean, std) over clips
"""

import json

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from data import media_members  # noqa: E402
from frames import CMAP, attention_grid, from_images, overlay  # noqa: E402
from media import frame_extension_index  # noqa: E402
from shards import expand, read_samples  # noqa: E402

KINDS = ("static", "dynamic")
BOX_COLOUR = "lime"


def scale_box(box, original_size: int, frame_size: int) -> list[float]:
    """A box [x0, y0, x1, y1] in a square frame's original pixels -> in the resized frame's pixels.
    Coordinates are pixel edges (pixel j spans [j, j + 1)), so a squash resize scales them by
    frame_size / original_size exactly."""
    s = frame_size / original_size
    return [v * s for v in box]


def patch_cover(box, original_size: int, frame_size: int, patch_size: int) -> torch.Tensor:
    """[gh, gw]: the fraction of each patch's area inside the box (scaled from original_size to
    frame_size). The grid is frame_size // patch_size per side (the backbone drops the remainder)."""
    x0, y0, x1, y1 = scale_box(box, original_size, frame_size)
    n = frame_size // patch_size
    lo = torch.arange(n, dtype=torch.float64) * patch_size  # patch i spans [i * p, (i + 1) * p)

    def overlap(a, b):  # length of [a, b) inside each patch's span, per patch
        return ((lo + patch_size).clamp(max=b) - lo.clamp(min=a)).clamp(min=0)

    # rectangles intersect axis by axis: area = overlap in y (rows) x overlap in x (columns)
    return (overlap(y0, y1)[:, None] * overlap(x0, x1)[None, :] / patch_size ** 2).float()


def target_share(attention: torch.Tensor, cover: torch.Tensor, total=1.0) -> dict:
    """A query's attention on the target, per frame.

    attention [T, gh, gw]: its mass on each patch (the prefix tokens' mass left out);
    cover [T, gh, gw]: `patch_cover` of each frame; total: the frame's mass over ALL keys (prefix +
    patches), [T] or a number (1 for softmax attention, the default).
    Returns per frame [T]: share = sum(attention * cover) / total (mass on the prefix tokens counts
    as not on the target), chance = sum(cover) / patches (the share of an attention spread uniformly
    over the patches), ratio = share / chance (inf or nan where the box misses the grid), on_patches =
    sum(attention) / total; and "mean": each of them averaged over the frames (floats)."""
    total = torch.as_tensor(total, dtype=torch.float32)
    attention, cover = attention.float(), cover.float()
    per_frame = {"share": (attention * cover).flatten(1).sum(1) / total,
                 "chance": cover.flatten(1).mean(1),
                 "on_patches": attention.flatten(1).sum(1) / total}
    per_frame["ratio"] = per_frame["share"] / per_frame["chance"]
    return {**per_frame, "mean": {k: v.mean().item() for k, v in per_frame.items()}}


@torch.no_grad()
def attention_maps(model, frames: torch.Tensor, question, mode: str) -> dict:
    """Where each query looked, for one clip (uint8 [T, 3, S, S]) or image ([3, S, S], shown as the
    model's image_frames tokens) and its question (a string, or a conversation: chat messages) as a
    generation prompt (as benchmark.py asks it):
    the vision backbone's last block, mean over heads. The static query's is the same in every mode
    (autoregressive, which reads no static tokens, takes coarse_only's). Returns {"pixels": the
    encoded frames [N, 3, S, S], "token_frame": [T] the frame each visual token reads, "maps": {kind:
    [T, gh, gw] over the patches, or None where the mode has no such query (dynamic in coarse_only)},
    "totals": {kind: [T] the attention mass over all keys, the prefix tokens included}}. A model
    without queries (the pooled baseline) has nothing to show: ValueError."""
    from collate import pack_frames
    from precision import autocast

    model.visual.require_queries("attention maps")
    device = model.device
    dino = model.encoder.dino
    pixels, index = pack_frames([frames], model.image_frames)
    (gh, gw), prefix = dino.grid(*pixels.shape[-2:]), dino.num_prefix
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    ids = torch.tensor([model.chat_ids(messages)], device=device)

    pixels_d, index_d = pixels.to(device), index.to(device)
    with autocast(device):
        kv = model.encode_frames(pixels_d)  # once, for the pass below and the static query
        attention = model(frames=pixels_d, frame_index=index_d, input_ids=ids, mode=mode, kv=kv,
                          return_attention=True)["attention"]
        if attention.get("static") is None:  # autoregressive: the glance at each frame, no LLM involved
            attention["static"] = model.look(kv, frame_ids=index_d.clamp(min=0), return_attention=True)[1]
    out = {"pixels": pixels, "token_frame": index[0].tolist(), "maps": {}, "totals": {}}
    for kind in KINDS:
        attn = attention.get(kind)  # [1, T, blocks, heads, keys]
        if attn is None:
            out["maps"][kind] = out["totals"][kind] = None
            continue
        # the last block, mean over heads: the map over the patches, and the mass over every key
        out["maps"][kind] = attention_grid(attn[0], prefix, (gh, gw))
        out["totals"][kind] = attn[0, :, -1].float().mean(1).cpu().sum(1)
    return out


def clip_scores(model, sample: dict, meta: dict, mode: str) -> dict | None:
    """One clip and its question through the model (attention_maps) scored against the target: the
    share of each query's attention on the target's patches (`target_share`).

    sample: {"frames": uint8 [T, 3, S, S], "question": str, ...}; meta: the shard's meta with its
    boxes for those T frames (`read_probe`). Returns {"key", "task", "cover" [T, gh, gw],
    "maps": {kind: [T, gh, gw]}, kind: `target_share`} for kind static and dynamic (None where the
    mode has no dynamic query, i.e. coarse_only), or None for a model without queries (a pooled
    baseline with tokens_per_frame)."""
    if not model.visual.queries:
        return None
    frames = sample["frames"]
    if len(meta["boxes"]) != len(frames):
        raise ValueError(f"{len(meta['boxes'])} boxes for {len(frames)} frames")
    looked = attention_maps(model, frames, sample["question"], mode)
    patch = model.encoder.dino.patch_size
    cover = torch.stack([patch_cover(b, meta["frame_size"], frames.shape[-1], patch) for b in meta["boxes"]])
    result = {"key": sample.get("key"), "task": meta.get("task"), "cover": cover, "maps": {}}
    for kind in KINDS:
        maps = looked["maps"][kind]
        result[kind] = None if maps is None else target_share(maps, cover, total=looked["totals"][kind])
        if maps is not None:
            result["maps"][kind] = maps
    return result


def read_probe(shards, frame_size: int, max_frames: int, limit: int | None = None) -> list[tuple[dict, dict]]:
    """The first `limit` clips with target boxes from shards (a glob, a folder, a list: shards.expand)
    -> [(sample, meta)]. sample: {"key", "frames": uint8 [T, 3, frame_size, frame_size], "question":
    the first user message}; meta: the shard's meta with "boxes" (original pixels) cut to the T kept
    frames and "frame_numbers" (which of the clip's frames they are). Frames are thinned to max_frames
    as data.decode_sample does (frames.from_images) and resized with the default squash."""
    probe = []
    for path in expand(shards):
        for key, files in read_samples(path):
            doc = json.loads(files["json"])
            meta = doc.get("meta") or {}
            kind, members = media_members(files)
            if kind != "frames" or "boxes" not in meta:  # text-only samples have nothing to look at
                continue
            frames, keep = from_images([files[m] for m in members], max_frames, frame_size)
            # member i of the frame-ordered list is frame number frame_extension_index (e.g. 007.jpg -> 7)
            numbers = [frame_extension_index(members[i]) for i in keep]
            meta = {**meta, "boxes": [meta["boxes"][n] for n in numbers], "frame_numbers": numbers}
            probe.append(({"key": key, "frames": frames, "question": doc["messages"][0]["content"]}, meta))
            if limit is not None and len(probe) >= limit:
                return probe
    return probe


def draw_looked(path, frames: torch.Tensor, attention: dict, boxes_scaled, title: str):
    """A PNG: one column per frame; rows the frame, then each query's attention over it (attention:
    {row label: [T, gh, gw] or None (left out)}, e.g. {"static query": ..., "dynamic query": ...}), on
    one colour scale; the target box outlined in every panel. frames uint8 [T, 3, S, S]; patch i covers
    pixels [i * p, (i + 1) * p), p = S // gh; boxes_scaled [T] of [x0, y0, x1, y1] in the frames' pixels."""
    rows = [("frame", None)] + [(label, a) for label, a in attention.items() if a is not None]
    t_total, size = frames.shape[0], frames.shape[-1]
    vmax = max(float(a.max()) for _, a in rows[1:]) if len(rows) > 1 else 1.0
    fig, axes = plt.subplots(len(rows), t_total, figsize=(1.6 * t_total + 1.2, 1.6 * len(rows) + 0.8),
                             squeeze=False, layout="constrained")
    for r, (name, attn) in enumerate(rows):
        for t in range(t_total):
            ax = axes[r, t]
            frame = frames[t].permute(1, 2, 0).numpy()
            ax.imshow(frame if attn is None else overlay(frame, attn[t].numpy(), vmax), interpolation="nearest")
            x0, y0, x1, y1 = boxes_scaled[t]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, lw=1.2))
            ax.set_xlim(-0.5, size - 0.5)
            ax.set_ylim(size - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t + 1}/{t_total}", fontsize=9)
            if t == 0:
                ax.set_ylabel(name, fontsize=9)
    if len(rows) > 1:  # the label in three short lines: beside a single row a one-line label was cut off
        fig.colorbar(plt.cm.ScalarMappable(plt.Normalize(0, vmax), CMAP), ax=axes[1:].ravel().tolist(),
                     shrink=0.8 if len(rows) > 2 else 1.0, label="attention\n(last block,\nmean over heads)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarise(scores: list) -> dict:
    """`clip_scores` results (None entries skipped) -> {"clips": n, "chance": (mean, std), kind:
    {"share", "ratio", "on_patches": (mean, std) over clips of the clip means, "per_frame": mean share
    at frame t over the clips that have a frame t}} per query kind scored (std: population, ddof 0)."""
    scores = [s for s in scores if s is not None]

    def spread(values):
        v = torch.tensor(values, dtype=torch.float64)
        return v.mean().item(), v.std(correction=0).item()

    out = {"clips": len(scores)}
    if not scores:
        return out
    out["chance"] = spread([s["static"]["mean"]["chance"] for s in scores])
    for kind in KINDS:
        scored = [s[kind] for s in scores if s[kind] is not None]
        if not scored:
            continue
        # per-frame shares padded with nan to the longest clip, then averaged over the clips present
        longest = max(len(k["share"]) for k in scored)
        grid = np.full((len(scored), longest), np.nan)
        for i, k in enumerate(scored):
            grid[i, :len(k["share"])] = k["share"].numpy()
        out[kind] = {name: spread([k["mean"][name] for k in scored]) for name in ("share", "ratio", "on_patches")}
        out[kind]["per_frame"] = np.nanmean(grid, axis=0).tolist()
    return out
