"""The sequence the LLM reads: which frame each visual token reads, where every text and visual token
sits, and the attention masks of cached steps. Pure tensor math on ids, masks and indices (no model).

Every token has a logical position. With layout "video_first" (the published model) the visual
tokens come first and the whole chat text follows; with "prompt_first" they are inserted after the
first user message's content (before its <|im_end|>), so the queries can depend on the question. In
the parallel modes real tokens are placed at their logical positions and all padding (pad frames, pad
text) after them (`assemble`), so plain causal attention isolates padding and a real token's output
never depends on how much padding its batch has. Cached passes append chunks of tokens at their
logical positions, padding slots masked out (`chunk_mask`).

The loss reads a [B, S - 1] next-token grid: cell (b, j - 1) is text token j of row b, predicted
from the position just before it (`Layout.pred_pos`); collate.target_index lists cells as flat
indices into it (`grid`, `regrid`).
"""

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass
class Frames:
    """Which encoded frame each frame slot of a batch reads.

    pixels [N, 3, H, W]; token_frame [B, T] (pads point at frame 0); valid [B, T]; unique: no frame is
    read by two slots, so per-slot queries can be scattered into frame order instead of copying K/V.
    """
    pixels: torch.Tensor
    token_frame: torch.Tensor
    valid: torch.Tensor
    unique: bool

    def repeat(self, times: int) -> "Frames":
        """The same frames for `times` copies of the batch (stacked along the batch)."""
        return Frames(self.pixels, self.token_frame.repeat(times, 1), self.valid.repeat(times, 1), self.unique)


def frame_inputs(frames, frame_mask, frame_index, batch: int) -> Frames | None:
    """Check the frame inputs of a forward and say which frame each slot reads (None: no frames).
    frames [B, T, 3, H, W] with an optional frame_mask [B, T] (real frames first), or packed
    [N, 3, H, W] with frame_index [B, T] (-1: padding)."""
    if frames is None or frames.numel() == 0:
        if frame_index is not None and frame_index.shape[1] > 0:
            raise ValueError("frame_index given without frames")
        return None
    if frame_index is not None:
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"with frame_index, frames must be packed [N, 3, H, W]; got {tuple(frames.shape)}")
        if frame_index.dim() != 2 or frame_index.shape[0] != batch:
            raise ValueError(f"frame_index must be [B={batch}, T], got {tuple(frame_index.shape)}")
        if frame_mask is not None:
            raise ValueError("pass either frame_mask (with [B, T, 3, H, W] frames) or frame_index, not both")
        return Frames(frames, frame_index.clamp(min=0), frame_index >= 0, unique=False)
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    if b != batch:
        raise ValueError(f"frames have batch size {b} but input_ids have {batch}")
    if t == 0:
        return None
    if frame_mask is None:
        index = torch.arange(b * t, device=frames.device).view(b, t)
        return Frames(frames.flatten(0, 1), index, torch.ones(b, t, dtype=torch.bool, device=frames.device), True)
    if frame_mask.shape != (b, t):
        raise ValueError(f"frame_mask must have shape {(b, t)}, got {tuple(frame_mask.shape)}")
    frame_mask = frame_mask.bool()
    # Encode real frames only. This path syncs with the host (boolean indexing, and the check);
    # the training collate sends packed frames (frame_index) instead.
    if (frame_mask[:, 1:] & ~frame_mask[:, :-1]).any():
        raise ValueError("frame_mask must list each sample's real frames first (padding at the end)")
    pixels = frames[frame_mask]
    if pixels.shape[0] == 0:
        return None
    # real frame k of the flattened mask is row k of pixels; padding points at its left neighbour's
    index = (frame_mask.flatten().cumsum(0) - 1).clamp(min=0).view(b, t)
    return Frames(pixels, index, frame_mask, True)


def check_text(input_ids, attention_mask, loss_mask):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")


class ChatMarks(NamedTuple):
    """The ids of the ChatML tokens prompt_first looks for (None where the tokenizer lacks one)."""
    im_start: int | None
    user: int | None
    im_end: int | None


def chat_marks(tokenizer) -> ChatMarks:
    vocab = tokenizer.get_vocab()
    user = tokenizer.encode("user", add_special_tokens=False)
    return ChatMarks(vocab.get("<|im_start|>"), user[0] if len(user) == 1 else None, vocab.get("<|im_end|>"))


def visual_start(input_ids, text_valid, marks: ChatMarks, rank=None) -> torch.Tensor:
    """prompt_first: [B] text rank of the first <|im_end|> after the first '<|im_start|>user' (0 where
    there is none): the video goes right before it, after the question. rank: the text tokens' ranks
    (Layout.text_rank), when already computed."""
    if None in marks:
        raise ValueError("layout 'prompt_first' needs a ChatML tokenizer or an explicit visual_pos")
    ids, text_valid = input_ids, text_valid.bool()
    rank = text_valid.long().cumsum(1) - 1 if rank is None else rank
    starts = (ids[:, :-1] == marks.im_start) & (ids[:, 1:] == marks.user) & text_valid[:, :-1] & text_valid[:, 1:]
    starts = F.pad(starts, (0, 1))
    first_user = torch.where(starts.any(1), starts.long().argmax(1), ids.shape[1])
    after = torch.arange(ids.shape[1], device=ids.device)[None] > first_user[:, None]
    ends = (ids == marks.im_end) & text_valid & after
    end = ends.long().argmax(1)
    return torch.where(ends.any(1), rank.gather(1, end[:, None])[:, 0], torch.zeros_like(end))


@dataclass
class Layout:
    """Where each token of a batch sits in the sequence the LLM reads (logical positions: a row's real
    tokens take 0, 1, 2, ... without gaps; padding never takes a position a real token needs).

    Text token j of row b is real where text_valid[b, j]; text_rank[b, j] counts the real text tokens
    before it. The video goes in front of the real text token of rank visual_start[b] (0 with
    video_first; the <|im_end|> closing the first user message with prompt_first), so
        text_pos[b, j]   = text_rank[b, j]                 before the video
                         = text_rank[b, j] + n_visual[b]   after it
        visual_pos[b, t] = visual_start[b] + t             for the t-th real visual token.
    pred_pos[b, j] is the position whose hidden state predicts the token after text token j: the
    position just before that token, which is the last visual token where the video sits between
    j and its successor (pred_from_visual[b, j]; the successor of the last real token is the
    first token to generate).
    """
    text_valid: torch.Tensor  # [B, S] bool
    visual_valid: torch.Tensor  # [B, T] bool
    n_text: torch.Tensor  # [B] real text tokens
    n_visual: torch.Tensor  # [B] real visual tokens
    visual_start: torch.Tensor  # [B] text rank the video is inserted before
    text_rank: torch.Tensor  # [B, S]
    text_pos: torch.Tensor  # [B, S]
    visual_pos: torch.Tensor  # [B, T]
    pred_pos: torch.Tensor  # [B, S]
    pred_from_visual: torch.Tensor  # [B, S] bool

    @property
    def length(self) -> torch.Tensor:
        """[B] real tokens per row: they occupy positions 0 .. length - 1."""
        return self.n_text + self.n_visual

    def rows(self, index) -> "Layout":
        return Layout(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def before_video(self) -> "Layout":
        """The prompt_first coarse pass: only the text before the video is real (the rest is padding)."""
        return dataclasses.replace(self, text_valid=self.text_valid & (self.text_rank < self.visual_start[:, None]),
                                   n_text=self.visual_start)


def make_layout(input_ids, attention_mask, visual_valid, order: str, marks: ChatMarks, visual_pos=None) -> Layout:
    """Logical positions of every text token (input_ids, attention_mask [B, S]) and visual token
    (visual_valid [B, T], real tokens first) in the layout `order` (video_first / prompt_first; there
    visual_pos [B] may give the text rank the video goes before instead of the chat template's)."""
    text_valid = attention_mask.bool()
    n_text, n_visual = text_valid.sum(1), visual_valid.sum(1)
    rank = text_valid.long().cumsum(1) - 1  # real text tokens before j (padding repeats its left neighbour's)
    if order == "video_first":
        start = torch.zeros_like(n_text)
    elif visual_pos is not None:
        start = torch.minimum(visual_pos.to(n_text), n_text)
    else:
        start = visual_start(input_ids, text_valid, marks, rank)
    text_pos = rank + n_visual[:, None] * (rank >= start[:, None])
    successor = rank + 1  # rank of the token after j
    # the position just before the successor: shifted past the video when it comes after the video
    pred_pos = successor + n_visual[:, None] * (successor >= start[:, None]) - 1
    visual_pos = start[:, None] + visual_valid.long().cumsum(1) - 1
    return Layout(text_valid=text_valid, visual_valid=visual_valid, n_text=n_text, n_visual=n_visual,
                  visual_start=start, text_rank=rank, text_pos=text_pos, visual_pos=visual_pos.clamp(min=0),
                  pred_pos=pred_pos.clamp(min=0),
                  pred_from_visual=(successor == start[:, None]) & (n_visual[:, None] > 0))


def assemble(text_emb, vis_emb, lay: Layout):
    """Place real tokens at their logical positions and padding after them -> (sequence [B, S + T, D],
    positions). A row's padding text tokens take the slots length, length + 1, ... in order, then
    its padding visual tokens; every slot is filled exactly once."""
    b, s, d = text_emb.shape
    tv, vv, length = lay.text_valid, lay.visual_valid, lay.length
    pad_text_rank = (~tv).long().cumsum(1) - 1  # k-th padding text token of the row
    text_slot = torch.where(tv, lay.text_pos, length[:, None] + pad_text_rank)
    pads_text = s - tv.sum(1)
    pad_visual_rank = (~vv).long().cumsum(1) - 1
    vis_slot = torch.where(vv, lay.visual_pos, (length + pads_text)[:, None] + pad_visual_rank)
    slot = torch.cat([text_slot, vis_slot], dim=1)
    src = torch.cat([text_emb, vis_emb.to(text_emb.dtype)], dim=1)
    seq = torch.zeros_like(src).scatter(1, slot[..., None].expand(-1, -1, d), src)
    return seq, torch.arange(seq.shape[1], device=seq.device).expand(b, -1)


def chunk_mask(cache_valid, valid):
    """The attention mask of a chunk of n tokens appended to a KV cache whose slots are real where
    cache_valid [B, L] -> (mask [B, 1, n, L + n], the slots' validity after the chunk [B, L + n]).

    A chunk token attends to the earlier real slots, the real slots of its own chunk before it, and
    always to itself (so a padding token's attention row is never empty: no NaN). The mask is 4-D
    boolean (True = attend), which transformers takes as given."""
    past, n = cache_valid.shape[1], valid.shape[1]
    cache_valid = torch.cat([cache_valid, valid], dim=1)
    slot = torch.arange(cache_valid.shape[1], device=cache_valid.device)
    token_slot = past + torch.arange(n, device=cache_valid.device)
    causal = slot[None, :] <= token_slot[:, None]
    mask = (cache_valid[:, None, :] & causal[None]) | (slot[None, :] == token_slot[:, None])[None]
    return mask[:, None], cache_valid


@dataclass
class Cache:
    """The LLM's KV cache over a batch (a transformers DynamicCache) and which of its slots hold real
    tokens (padding slots are never attended to: `chunk_mask`). Physical slot order follows logical
    order for real tokens."""
    kv: object
    valid: torch.Tensor  # [B, L] bool

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def crop(self, length: int):
        """Forget every slot from `length` on."""
        if length < self.length:
            self.kv.crop(length - self.length)  # transformers takes the number of slots to drop, negated
            self.valid = self.valid[:, :length]


def take(x, index):
    """x [B, L, D] gathered at index [B, K] -> [B, K, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def grid(index, length):
    """Flat indices into the [B, length - 1] next-token grid -> (rows, columns)."""
    width = max(length - 1, 1)
    return index // width, index % width


def regrid(index, old_len, new_len, row_offset):
    """Flat indices into a [B, old_len - 1] grid -> into [row_offset + B, new_len - 1]."""
    rows, cols = grid(index, old_len)
    return (rows + row_offset) * (new_len - 1) + cols


def stack_pairs(pad_id: int, chosen, rejected, chosen_index=None, rejected_index=None):
    """Chosen and rejected (ids, attention_mask, loss_mask) [B, S_side], right padded to one width s
    and stacked [2B, s] (chosen rows first), with their target indices (each in its own side's
    [B, S_side - 1] grid) moved into the stacked [2B, s - 1] grid (None without)."""
    b, s = chosen[0].shape[0], max(chosen[0].shape[1], rejected[0].shape[1])
    pad = lambda x, v: F.pad(x, (0, s - x.shape[1]), value=v)  # noqa: E731
    ids, am, lm = (torch.cat([pad(c, v), pad(r, v)]) for c, r, v in zip(chosen, rejected, (pad_id, 0, 0)))
    index = None
    if chosen_index is not None:
        index = torch.cat([regrid(chosen_index, chosen[0].shape[1], s, 0),
                           regrid(rejected_index, rejected[0].shape[1], s, b)])
    return ids, am, lm, index
