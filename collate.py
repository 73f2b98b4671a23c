"""Batching: pack frames, pad text and DPO pairs, and group variable-length samples under a budget.

A batch carries frames packed, not padded: `frames` [N, 3, H, W] uint8 holds each distinct frame
once (an image shown as `image_frames` visual tokens is stored, and encoded by DINO, once) and
`frame_index` [B, T] says which frame each visual token reads, -1 marking padding (so the frame mask
is `frame_index >= 0`). Text is right-padded. `target_index` lists the loss targets as flat indices
into the [B, S-1] next-token grid, computed here on the host so that the model can compute logits
only where the loss needs them without a device sync.

Samples that carry precomputed per-frame latents (`SampleSpec(latents=True)`) give `latents`
[N, C, h, w], packed like `frames` (row i is the latent of frame i; an image's one latent serves all
its visual tokens), so the target of visual token (b, t) is `latents[frame_index[b, t]]`. The key is
always there: None when no sample carries latents (as `frames` is None for text-only batches).
"""

import torch

IGNORE_INDEX = -100


def pack_frames(samples, image_frames: int = 8):
    """Per-sample frames -> (pixels [N, 3, H, W], frame_index [B, T]) for the packed forward input.

    Each entry is None (text only), an image [3, H, W] (shown as `image_frames` visual tokens that
    all read the one encoded frame) or a video [T, 3, H, W]. frame_index is -1 at padding.
    """
    pixels, rows, start = [], [], 0
    for i, s in enumerate(samples):
        if s is None:
            rows.append([])
            continue
        if s.dim() == 3:
            pixels.append(s.unsqueeze(0))
            rows.append([start] * image_frames)
        elif s.dim() == 4:
            pixels.append(s)
            rows.append(list(range(start, start + s.shape[0])))
        else:
            raise ValueError(f"sample {i}: frames must be [3, H, W] or [T, 3, H, W], got {tuple(s.shape)}")
        start += pixels[-1].shape[0]
    index = pad_rows(rows, -1)
    return (torch.cat(pixels) if pixels else None), index


def pack_latents(samples) -> torch.Tensor | None:
    """Per-sample latents aligned with `pack_frames` over the same samples: [N, C, h, w], row i the
    latent of packed frame i; None when no sample has latents. Every sample with frames must then have
    one latent per stored frame (an image: 1), all of one shape."""
    if all(s.get("latents") is None for s in samples):
        return None
    rows, shape = [], None
    for s in samples:
        f, lat = s["frames"], s.get("latents")
        if f is None:
            if lat is not None:
                raise ValueError(f"sample {s['key']!r}: latents {tuple(lat.shape)} but no frames")
            continue
        frames = 1 if f.dim() == 3 else f.shape[0]
        if lat is None or lat.dim() != 4 or lat.shape[0] != frames:
            got = "none" if lat is None else str(tuple(lat.shape))
            raise ValueError(f"sample {s['key']!r}: {frames} frame(s) need latents [{frames}, C, h, w], got {got} "
                             "(a batch mixes samples with and without latents?)")
        if shape is not None and lat.shape[1:] != shape[1]:
            raise ValueError(f"latents of sample {s['key']!r} are {tuple(lat.shape[1:])} per frame but those of "
                             f"{shape[0]!r} are {tuple(shape[1])}: precomputed with different settings?")
        shape = shape or (s["key"], lat.shape[1:])
        rows.append(lat)
    return torch.cat(rows)


def pad_rows(rows, value: int) -> torch.Tensor:
    """Lists of ints -> [len(rows), longest] long tensor, right-padded with value."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def target_index(loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices into the [B, S-1] grid of next-token targets: text tokens j >= 1 with loss_mask
    (and attention_mask) set, index b * (S-1) + j - 1 (the model's loss convention, model.py)."""
    mask = loss_mask.bool() if attention_mask is None else loss_mask.bool() & attention_mask.bool()
    return mask[:, 1:].flatten().nonzero()[:, 0]


def pad_text(ids, masks, pad_id: int, prefix: str = "") -> dict:
    """input_ids / attention_mask / loss_mask [B, S] and target_index [K] from per-sample id and mask
    lists."""
    input_ids = pad_rows(ids, pad_id)
    attention_mask = pad_rows([[1] * len(r) for r in ids], 0)
    loss_mask = pad_rows(masks, 0)
    return {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": attention_mask,
            f"{prefix}loss_mask": loss_mask, f"{prefix}target_index": target_index(loss_mask, attention_mask)}


def collate(samples, pad_id: int, image_frames: int = 8) -> dict:
    """Samples {frames, input_ids, loss_mask, key, source, optional latents} (DPO samples: chosen_* and
    rejected_* instead of input_ids/loss_mask) -> one batch. Both replies of a DPO pair share the
    frames (and latents)."""
    frames, frame_index = pack_frames([s["frames"] for s in samples], image_frames)
    batch = dict(frames=frames, frame_index=frame_index, latents=pack_latents(samples),
                 keys=[s["key"] for s in samples], sources=[s["source"] for s in samples])
    if "chosen_ids" in samples[0]:
        for side in ("chosen", "rejected"):
            batch.update(pad_text([s[f"{side}_ids"] for s in samples], [s[f"{side}_mask"] for s in samples],
                                  pad_id, prefix=f"{side}_"))
    else:
        batch.update(pad_text([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], pad_id))
    return batch


def sample_cost(sample, image_frames: int = 8) -> tuple[int, int, int]:
    """(frames DINO encodes, sequence length incl. visual tokens, rows in the batch) of a sample."""
    f = sample["frames"]
    frames = 0 if f is None else (1 if f.dim() == 3 else f.shape[0])
    visual = 0 if f is None else (image_frames if f.dim() == 3 else f.shape[0])
    if "chosen_ids" in sample:
        return frames, visual + max(len(sample["chosen_ids"]), len(sample["rejected_ids"])), 2
    return frames, visual + len(sample["input_ids"]), 1


def budget_batches(items, max_batch_size: int, max_frames: int | None = None, max_tokens: int | None = None,
                   image_frames: int = 8, get_sample=lambda item: item):
    """Group a stream of items (get_sample(item) is the sample) into lists, in order: at most
    max_batch_size samples, at most max_frames encoded frames and at most max_tokens padded sequence
    positions (rows x longest) per batch.
    Without the two budgets this is fixed-size batching. A sample over the budget on its own forms
    a batch alone (never dropped)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    batch, frames, longest, rows = [], 0, 0, 0
    for s in items:
        f, length, r = sample_cost(get_sample(s), image_frames)
        fits = (len(batch) < max_batch_size
                and (max_frames is None or frames + f <= max_frames)
                and (max_tokens is None or (rows + r) * max(longest, length) <= max_tokens))
        if batch and not fits:
            yield batch
            batch, frames, longest, rows = [], 0, 0, 0
        batch.append(s)
        frames, longest, rows = frames + f, max(longest, length), rows + r
    if batch:
        yield batch
