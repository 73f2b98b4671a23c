"""FoveatedVLM: one visual token per frame, with the LLM choosing where each next frame is looked at.
(With `tokens_per_frame: N` the same class is the "frames as images" baseline: each frame read as N
average-pooled patch tokens, no queries; every mode is then the same single pass.)

Public contract (the published model card):
    model = FoveatedVLM(llm_name=..., dino_name=..., query_dim=384, visual_scale=0.14, deep_query=True)
    model.load_state_dict(ckpt["model"])            # the published layout loads unchanged
    out = model(frames=frames, input_ids=ids, attention_mask=am, loss_mask=lm, mode="coarse_fine")
    out["loss"], out["logits"]
Every setting lives in one `config.ModelConfig` (`FoveatedVLM(cfg)`, or its fields as keywords;
`model.config`), which save_pretrained writes as config.json.

Sequence layout. Every token has a logical position: with layout "video_first" (the published model)
the T visual tokens come first and the whole chat text follows; with "prompt_first" the visual tokens
are inserted after the first user message's content (before its <|im_end|>), so the queries can
depend on the question. In the parallel modes real tokens are placed at their logical positions and
all padding (pad frames, pad text) after them, so plain causal attention isolates padding and a real
token's output never depends on how much padding its batch has (`Layout`).

Loss. `logits[:, j]` predicts the text token after token j (from the sequence position just before
that token, which is the last visual token where the video sits in between). The loss is the
token-weighted mean of -log p over text tokens j >= 1 with loss_mask[j] = 1; labels of other tokens
are -100. The first text token is never a target (it follows nothing but the video).
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from backbones import load_llm, vision_config, vision_weights
from collate import IGNORE_INDEX, pack_frames, pad_rows
from config import EXPORT_FORMAT, MODES, ModelConfig, model_config, read_export_config
from encoder import FoveatedEncoder
from predict import NextFrameHead
from tokenization import chat_ids, pad_id


@dataclass
class Visual:
    """Which encoded frame each visual token reads.

    pixels [N, 3, H, W]; token_frame [B, T] (pads point at frame 0); valid [B, T];
    unique: no frame is read by two tokens, so per-token queries can be scattered into frame
    order instead of copying K/V per token. token_part [B, T]: which of its frame's pooled tokens a
    token is (the multi-token baseline; None for the foveated model).
    """
    pixels: torch.Tensor
    token_frame: torch.Tensor
    valid: torch.Tensor
    unique: bool
    token_part: torch.Tensor | None = None

    def parts(self, n: int) -> "Visual":
        """Each frame's token as n consecutive tokens (parts 0 .. n - 1 of the frame): [B, T] -> [B, T * n]."""
        b, t = self.token_frame.shape
        part = torch.arange(n, device=self.valid.device).repeat(t).expand(b, -1)
        return Visual(self.pixels, self.token_frame.repeat_interleave(n, 1), self.valid.repeat_interleave(n, 1),
                      False, part)

    @property
    def num_tokens(self) -> int:
        return self.valid.shape[1]

    def repeat(self, times: int) -> "Visual":
        """The same frames for `times` copies of the batch (stacked along the batch)."""
        part = self.token_part.repeat(times, 1) if self.token_part is not None else None
        return Visual(self.pixels, self.token_frame.repeat(times, 1), self.valid.repeat(times, 1), self.unique, part)


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


class Pass(NamedTuple):
    """What an LLM pass over a batch gives."""
    h_pred: torch.Tensor  # [B, S, D] hidden state predicting the token after each text token (Layout.pred_pos)
    queries: torch.Tensor | None  # [B, T, query_dim] the fine queries used (None in coarse_only / text only)
    attention: dict  # "static" / "dynamic" -> [B, T, blocks, heads, keys] with return_attention (else None)
    cache_valid: torch.Tensor  # [B, L] which slots of the KV cache hold real tokens


class FoveatedVLM(nn.Module):
    def __init__(self, config: ModelConfig | None = None, *, llm_name=None, dino_name=None, deep_query: bool = True,
                 **settings):
        """config: the model's settings (config.ModelConfig), or its fields as keywords. llm_name /
        dino_name (the published names of `llm` / `dino`): hub id, local folder or random:<preset>
        (llm_name may also be a .gguf file). pretrained=False reads only the backbones' configs and
        initialises them randomly."""
        super().__init__()
        if config is not None and not isinstance(config, ModelConfig):
            raise TypeError(f"FoveatedVLM takes a config.ModelConfig or keywords (llm_name=..., dino_name=..., ...), "
                            f"not {type(config).__name__}")
        if not deep_query:
            raise ValueError("deep_query=False (the single shallow cross-attention) is not supported: "
                             "its tokens barely depend on the query; use the deep query")
        for key, value in (("llm", llm_name), ("dino", dino_name), ("llm", settings.pop("llm", None)),
                           ("dino", settings.pop("dino", None))):
            if value is not None:
                settings[key] = str(value)  # a path works as well as a string
        base = dataclasses.asdict(config) if config is not None else {}
        cfg = model_config({**base, **settings}, "FoveatedVLM")  # type-checked: unknown keywords are errors
        self.config = cfg
        self.llm, self.tokenizer = load_llm(cfg.llm, cfg.pretrained)
        dino_config = vision_config(cfg.dino)
        self.encoder = FoveatedEncoder(dino_config, cfg.query_dim, queries=cfg.tokens_per_frame is None)
        self.encoder.dino.load_state_dict(vision_weights(cfg.dino, dino_config, cfg.pretrained))
        self.dino_config = dino_config
        llm_dim = self.llm.config.hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.dino.dim, llm_dim)
        if self.pooled is None:  # the query path (the pooled baseline has none)
            self.llm_to_query = nn.Linear(llm_dim, cfg.query_dim)
            # std 1: smaller queries give near-uniform attention at the start of training
            self.q_static = nn.Parameter(torch.randn(1, cfg.query_dim))
            self.q_init = nn.Parameter(torch.randn(1, cfg.query_dim))
        # the proof-of-concept's next-frame head (objectives.NextFrame); absent in the published layout
        self.next_frame = NextFrameHead(llm_dim, cfg.next_frame, cfg.next_frame_width) if cfg.next_frame else None
        tok = self.tokenizer
        ids = lambda s: tok.convert_tokens_to_ids(s) if s in tok.get_vocab() else None  # noqa: E731
        self._im_start, self._im_end = ids("<|im_start|>"), ids("<|im_end|>")
        user = tok.encode("user", add_special_tokens=False)
        self._user = user[0] if len(user) == 1 else None
        stops = {self._im_end, tok.eos_token_id}
        eos = self.llm.generation_config.eos_token_id if self.llm.generation_config is not None else None
        stops.update(eos if isinstance(eos, list) else [eos])
        self.stop_ids = sorted(s for s in stops if s is not None)
        self.pad_id = pad_id(tok)  # an int: no tokenizer in traced code

    # the settings, read from the one config
    visual_scale = property(lambda self: self.config.visual_scale)
    tokens_per_frame = property(lambda self: self.config.tokens_per_frame or 1)
    # the pooled baseline's grid side s (tokens_per_frame = s * s), None for the foveated model
    pooled = property(lambda self: None if self.config.tokens_per_frame is None else
                      math.isqrt(self.config.tokens_per_frame))
    layout = property(lambda self: self.config.layout)
    image_frames = property(lambda self: self.config.image_frames)
    system_prompt = property(lambda self: self.config.system_prompt)

    # ---- inputs ---------------------------------------------------------------------------------

    def _visual(self, frames, frame_mask, frame_index, batch) -> Visual | None:
        """Validate the frame inputs and describe which frame (and which pooled part) each visual token reads."""
        vis = self._frame_tokens(frames, frame_mask, frame_index, batch)
        return vis.parts(self.tokens_per_frame) if vis is not None and self.pooled is not None else vis

    def _frame_tokens(self, frames, frame_mask, frame_index, batch) -> Visual | None:
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
            valid = frame_index >= 0
            return Visual(frames, frame_index.clamp(min=0), valid, unique=False)
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        if b != batch:
            raise ValueError(f"frames have batch size {b} but input_ids have {batch}")
        if t == 0:
            return None
        if frame_mask is None:
            index = torch.arange(b * t, device=frames.device).view(b, t)
            return Visual(frames.flatten(0, 1), index, torch.ones(b, t, dtype=torch.bool, device=frames.device), True)
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
        index = (frame_mask.flatten().cumsum(0) - 1).clamp(min=0).view(b, t)
        return Visual(pixels, index, frame_mask, True)

    def _layout(self, input_ids, attention_mask, vis: Visual | None, visual_pos=None) -> Layout:
        """Logical positions of every text and visual token (see Layout)."""
        b, s = input_ids.shape
        text_valid = attention_mask.bool()
        visual_valid = vis.valid if vis is not None else torch.zeros(b, 0, dtype=torch.bool, device=input_ids.device)
        n_text, n_visual = text_valid.sum(1), visual_valid.sum(1)
        rank = text_valid.long().cumsum(1) - 1  # real text tokens before j (padding repeats its left neighbour's)
        if self.layout == "video_first":
            start = torch.zeros_like(n_text)
        elif visual_pos is not None:
            start = torch.minimum(visual_pos.to(n_text), n_text)
        else:
            start = self.visual_start(input_ids, text_valid, rank)
        text_pos = rank + n_visual[:, None] * (rank >= start[:, None])
        successor = rank + 1  # rank of the token after j
        # the position just before the successor: shifted past the video when it comes after the video
        pred_pos = successor + n_visual[:, None] * (successor >= start[:, None]) - 1
        visual_pos = start[:, None] + visual_valid.long().cumsum(1) - 1
        return Layout(text_valid=text_valid, visual_valid=visual_valid, n_text=n_text, n_visual=n_visual,
                      visual_start=start, text_rank=rank, text_pos=text_pos, visual_pos=visual_pos.clamp(min=0),
                      pred_pos=pred_pos.clamp(min=0),
                      pred_from_visual=(successor == start[:, None]) & (n_visual[:, None] > 0))

    def visual_start(self, input_ids, text_valid, rank=None) -> torch.Tensor:
        """prompt_first: [B] text rank of the first <|im_end|> after the first '<|im_start|>user' (0
        where there is none): the video goes right before it, after the question. rank: the text
        tokens' ranks (Layout.text_rank), when already computed."""
        if self._im_start is None or self._user is None or self._im_end is None:
            raise ValueError("layout 'prompt_first' needs a ChatML tokenizer or an explicit visual_pos")
        ids, text_valid = input_ids, text_valid.bool()
        rank = text_valid.long().cumsum(1) - 1 if rank is None else rank
        starts = (ids[:, :-1] == self._im_start) & (ids[:, 1:] == self._user) & text_valid[:, :-1] & text_valid[:, 1:]
        starts = F.pad(starts, (0, 1))
        first_user = torch.where(starts.any(1), starts.long().argmax(1), ids.shape[1])
        after = torch.arange(ids.shape[1], device=ids.device)[None] > first_user[:, None]
        ends = (ids == self._im_end) & text_valid & after
        end = ends.long().argmax(1)
        return torch.where(ends.any(1), rank.gather(1, end[:, None])[:, 0], torch.zeros_like(end))

    def _check_text(self, input_ids, attention_mask, loss_mask):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")

    # ---- visual tokens --------------------------------------------------------------------------

    def _project(self, z):
        return self.dino_to_llm(z) * self.visual_scale

    def _static_tokens(self, vis, kv, return_attention):
        """q_static through every encoded frame once, then shared by every token reading that frame."""
        n = vis.pixels.shape[0]
        z, attn = self.encoder.query(self.q_static.expand(n, -1), kv, return_attention=return_attention)
        take = lambda x: x[vis.token_frame]  # noqa: E731  [B, T, ...]
        return take(z), (take(attn) if attn is not None else None)

    def _query_tokens(self, queries, vis, kv, return_attention):
        """Per-token queries [B, T, Dq] -> tokens [B, T, D]."""
        b, t, dq = queries.shape
        if vis.unique:
            # scatter queries into frame order (pads go to a spare row n): no K/V copy
            n = vis.pixels.shape[0]
            dest = torch.where(vis.valid, vis.token_frame, n).flatten()
            q = queries.new_zeros(n + 1, dq).scatter(0, dest[:, None].expand(-1, dq), queries.flatten(0, 1))[:n]
            z, attn = self.encoder.query(q, kv, return_attention=return_attention)
            return z[vis.token_frame], (attn[vis.token_frame] if attn is not None else None)
        z, attn = self.encoder.query(queries.flatten(0, 1), kv, vis.token_frame.flatten(), return_attention)
        return z.view(b, t, -1), (attn.view(b, t, *attn.shape[1:]) if attn is not None else None)

    def _fine_queries(self, h_vis):
        """Hidden states at the visual tokens -> queries shifted by one frame (frame 0 gets q_init):
        token t is looked at with the query the LLM formed after seeing token t - 1."""
        q = self.llm_to_query(h_vis)
        return torch.cat([self.q_init.expand(q.shape[0], 1, -1).to(q.dtype), q[:, :-1]], dim=1)

    def _visual_embeddings(self, mode, vis, kv, lay, text_emb, return_attention, queries=None):
        """(visual token embeddings for the parallel modes, the fine queries used, attention maps)."""
        if self.pooled is not None:  # kv: the pooled tokens [frames, s * s, D] (encode_frames)
            return self._project(kv[vis.token_frame, vis.token_part]), None, {}
        attn = {}
        if mode == "coarse_fine" and queries is not None:  # teacher-forced / intervened queries
            z, attn["dynamic"] = self._query_tokens(queries, vis, kv, return_attention)
            return self._project(z), queries, attn
        z, attn["static"] = self._static_tokens(vis, kv, return_attention)
        emb = self._project(z)
        if mode == "coarse_fine":
            if self.layout == "video_first":  # the text comes after the video: the coarse pass skips it
                h_vis = self._llm(emb, torch.arange(emb.shape[1], device=emb.device).expand(emb.shape[0], -1))
            else:  # coarse pass over [question; coarse visual tokens]; the rest of the text is padding
                h = self._llm(*self._assemble(text_emb, emb, lay.before_video()))
                h_vis = _take(h, lay.visual_pos)
            queries = self._fine_queries(h_vis)
            z, attn["dynamic"] = self._query_tokens(queries, vis, kv, return_attention)
            emb = self._project(z)
        return emb, queries, attn

    # ---- LLM passes -----------------------------------------------------------------------------

    def _assemble(self, text_emb, vis_emb, lay: Layout):
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

    def _llm(self, embeds, positions, cache=None, mask=None):
        out = self.llm.model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, cache=cache,
                             use_cache=cache is not None)
        return out.last_hidden_state

    def _parallel(self, mode, text_emb, vis, kv, lay: Layout, return_attention=False, queries=None, vis_emb=None,
                  cache=None) -> Pass:
        """coarse_only / coarse_fine over the whole sequence at once. vis_emb: the visual token
        embeddings, when already computed (DPO shares them between its two replies)."""
        attn = {}
        if vis_emb is None and vis is not None:
            vis_emb, queries, attn = self._visual_embeddings(mode, vis, kv, lay, text_emb, return_attention, queries)
        if vis_emb is None:
            vis_emb = text_emb.new_zeros(text_emb.shape[0], 0, text_emb.shape[2])
        seq, pos = self._assemble(text_emb, vis_emb, lay)
        h = self._llm(seq, pos, cache)
        cache_valid = pos < lay.length[:, None]  # real tokens fill the first `length` slots
        return Pass(_take(h, lay.pred_pos), queries, attn, cache_valid)

    def _autoregressive(self, text_emb, vis, kv, lay: Layout, return_attention, cache, queries=None) -> Pass:
        """Prefix text (prompt_first), then frame by frame through the KV cache, then the rest of the text.

        Physical cache order follows logical order for real tokens; padding slots are masked out and
        every token gets its logical position, so batching never changes a real token's output.
        `queries` [B, T, Dq] replace the LLM-chosen queries (teacher forcing).
        """
        b = text_emb.shape[0]
        tv, before = lay.text_valid, lay.text_rank < lay.visual_start[:, None]
        valid = torch.zeros(b, 0, dtype=torch.bool, device=text_emb.device)  # which cache slots are real
        h_prefix = None
        if self.layout == "prompt_first":  # the question first: the whole text, only its prefix real
            h_prefix, valid = self._cached_step(text_emb, lay.text_pos, tv & before, valid, cache)
        if vis is not None:
            h_vis, used, dynamic, valid = self._frames_through_cache(vis, kv, lay.visual_pos, valid, cache,
                                                                     return_attention, queries)
        h_rest, valid = self._cached_step(text_emb, lay.text_pos, tv & ~before, valid, cache)
        # each text token's successor is predicted from its own state (prefix or rest pass)...
        h_pred = h_rest if h_prefix is None else torch.where(before[..., None], h_prefix, h_rest)
        if vis is None:
            return Pass(h_pred, None, {}, valid)
        # ...except where the video sits in between: then from the last visual token
        last = _take(h_vis, (lay.n_visual - 1).clamp(min=0)[:, None])
        h_pred = torch.where(lay.pred_from_visual[..., None], last, h_pred)
        return Pass(h_pred, used, {"dynamic": dynamic}, valid)

    def _frames_through_cache(self, vis, kv, visual_pos, valid, cache, return_attention, queries=None):
        """The visual tokens one by one through the KV cache, the query for frame t + 1 formed from the
        hidden state after frame t (frame 0: q_init; `queries` [B, T, Dq] replace them) -> (hidden
        states [B, T, D], queries used [B, T, Dq], their attention or None, the updated slot mask)."""
        query = self.q_init.expand(vis.valid.shape[0], -1)
        h_vis, used, attn = [], [], []
        for t in range(vis.num_tokens):
            if queries is not None:
                query = queries[:, t]
            used.append(query)
            z, a = self.encoder.query(query, kv, vis.token_frame[:, t], return_attention)
            attn.append(a)
            h, valid = self._cached_step(self._project(z)[:, None], visual_pos[:, t:t + 1], vis.valid[:, t:t + 1],
                                         valid, cache)
            h_vis.append(h)
            query = self.llm_to_query(h[:, 0])  # where to look in the next frame
        return torch.cat(h_vis, dim=1), torch.stack(used, 1), (torch.stack(attn, 1) if return_attention else None), valid

    def _cached_step(self, embeds, positions, valid, cache_valid, cache):
        """Append a chunk of tokens to the KV cache -> (their hidden states, the updated slot mask).

        A chunk token attends to the earlier real slots, the real slots of its own chunk before it,
        and always to itself (so a padding token's attention row is never empty: no NaN). The mask is
        4-D boolean [B, 1, chunk, slots] (True = attend), which transformers takes as given."""
        past = cache_valid.shape[1]
        cache_valid = torch.cat([cache_valid, valid], dim=1)
        n = embeds.shape[1]
        slot = torch.arange(cache_valid.shape[1], device=cache_valid.device)
        token_slot = past + torch.arange(n, device=cache_valid.device)
        causal = slot[None, :] <= token_slot[:, None]
        mask = (cache_valid[:, None, :] & causal[None]) | (slot[None, :] == token_slot[:, None])[None]
        h = self._llm(embeds, positions, cache, mask[:, None])
        return h, cache_valid

    def _loss(self, h_pred, input_ids, attention_mask, loss_mask, target_index=None):
        """Next-token log-probs of the loss targets, from the hidden states that predict them.

        With target_index (flat indices into the [B, S - 1] grid of next-token cells, cell
        (b, j - 1) = text token j of row b; see collate.target_index), logits are computed at those
        cells only ([K, V], the training path). Without it, logits are computed everywhere ([B, S, V],
        the published contract) and the cells outside the masks are ignored."""
        b, s = input_ids.shape
        labels = input_ids[:, 1:]  # the label of cell (b, j - 1) is text token j
        if target_index is None:
            logits = self.llm.lm_head(h_pred)
            mask = attention_mask.bool() if loss_mask is None else loss_mask.bool() & attention_mask.bool()
            cell_logits = logits[:, :-1].flatten(0, 1)
            cell_labels = labels.masked_fill(~mask[:, 1:], IGNORE_INDEX).flatten()
            rows = torch.arange(b, device=input_ids.device).repeat_interleave(s - 1)
        else:
            rows, cols = _grid(target_index, s)
            cell_logits = logits = self.llm.lm_head(h_pred[rows, cols])
            cell_labels = labels[rows, cols]
        logp = token_logps(cell_logits, cell_labels)
        counted = (cell_labels != IGNORE_INDEX).long()
        logp_sum = logp.new_zeros(b).index_add(0, rows, logp)
        num_tokens = counted.new_zeros(b).index_add(0, rows, counted)
        return dict(logits=logits, loss=-logp_sum.sum() / num_tokens.sum().clamp(min=1), logp_sum=logp_sum,
                    num_tokens=num_tokens, target_labels=cell_labels, target_rows=rows)

    # ---- public API -----------------------------------------------------------------------------

    def forward(self, frames=None, input_ids=None, attention_mask=None, loss_mask=None, frame_mask=None,
                mode: str = "coarse_fine", frame_index=None, visual_pos=None, queries=None,
                return_attention: bool = False, target_index=None, kv=None):
        """Losses and next-token logits for a batch of (video, text) samples.

        frames: [B, T, 3, H, W] (uint8 RGB, or float normalised with the vision backbone's pixel
            statistics; optional frame_mask [B, T], real frames first), or packed [N, 3, H, W] with
            frame_index [B, T] (-1 = padding; entries may repeat, e.g. an image shown as 8 tokens is
            encoded once), or None / T = 0 for text only.
        input_ids, attention_mask, loss_mask: [B, S]; real text contiguous (right or left padded).
        visual_pos: [B] text rank where the video goes (prompt_first; found from the chat template
            when omitted).
        queries: [B, T, query_dim] used instead of the LLM-derived fine queries (coarse_fine and
            autoregressive), e.g. to teacher-force or to intervene on where the model looks.
        target_index: [K] the loss targets as flat indices into the [B, S-1] next-token grid
            (`collate.target_index(loss_mask, attention_mask)`; the collate sends it). Logits are
            then computed for those K tokens only, and `logits` is [K, V]: the training path.
        kv: `self.encode_frames(frames)` computed earlier, to reuse across calls (modes, prompts).
        Returns loss (token-weighted mean), logits [B, S, V], logp_sum [B] (summed log-prob of the
        loss tokens), num_tokens [B], target_labels / target_rows (the label of each next-token cell
        scored, -100 where ignored, and its sample: the rows of `logits` with target_index, of
        `logits[:, :-1]` flattened without), queries [B, T, query_dim] (the fine queries used, or None), and with
        return_attention the per-block attention of the static and dynamic queries,
        [B, T, blocks, heads, keys] (keys: the backbone's CLS and registers, then the patches).
        """
        _check_mode(mode)
        if input_ids is None:
            raise ValueError("input_ids are required")
        if self.pooled is not None:
            if queries is not None:
                raise ValueError("queries= needs the foveated model; this one reads pooled tokens (tokens_per_frame)")
            mode = "coarse_only"  # no queries: every mode is the same single pass
        self._check_text(input_ids, attention_mask, loss_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vis = self._visual(frames, frame_mask, frame_index, input_ids.shape[0])
        kv = self._kv(vis, kv)
        lay = self._layout(input_ids, attention_mask, vis, visual_pos)
        if queries is not None and mode == "coarse_only":
            raise ValueError("queries= replaces the fine queries; coarse_only has none")
        if queries is not None and (vis is None or queries.shape[:2] != vis.valid.shape):
            raise ValueError(f"queries must be [B, T, query_dim] matching the visual tokens, got {tuple(queries.shape)}")
        text_emb = self.llm.get_input_embeddings()(input_ids)
        if mode == "autoregressive":
            res = self._autoregressive(text_emb, vis, kv, lay, return_attention, DynamicCache(config=self.llm.config),
                                       queries)
        else:
            res = self._parallel(mode, text_emb, vis, kv, lay, return_attention, queries)
        out = dict(queries=res.queries, **self._loss(res.h_pred, input_ids, attention_mask, loss_mask, target_index))
        if return_attention:
            out["attention"] = res.attention
        return out

    def frame_states(self, frames, frame_index=None, frame_mask=None, mode: str = "coarse_fine",
                     return_attention: bool = False, kv=None) -> dict:
        """A video without text through the LLM (the next-frame objective): the hidden state at each
        visual token. Returns valid [B, T]; coarse [B, T, D]: the pass over the static-query tokens;
        fine [B, T, D] (not in coarse_only): coarse_fine's pass over the tokens looked at with the
        queries formed from the coarse pass, or the autoregressive pass, whose query for frame t + 1
        comes from its own state after frame t (true inference); with return_attention, attention
        {"static", "dynamic"} [B, T, blocks, heads, keys]. State t has seen frames 0..t only, in both
        passes (the fine query of frame t comes from the coarse state of frame t - 1).
        frames / frame_mask / frame_index / kv as in forward."""
        _check_mode(mode)
        if self.pooled is not None:
            raise ValueError("frame_states needs the foveated model (tokens_per_frame: null)")
        batch = frame_index.shape[0] if frame_index is not None else (frames.shape[0] if frames is not None else 0)
        vis = self._visual(frames, frame_mask, frame_index, batch)
        if vis is None:
            raise ValueError("frame_states needs frames")
        kv = self._kv(vis, kv)
        # video only: token t at position t (real frames first, padding after them: causal attention
        # keeps padding out of every real token's state)
        pos = torch.arange(vis.num_tokens, device=vis.valid.device).expand(batch, -1)
        z, static = self._static_tokens(vis, kv, return_attention)
        out = {"valid": vis.valid, "coarse": self._llm(self._project(z), pos), "fine": None,
               "attention": {"static": static, "dynamic": None}}
        if mode == "coarse_fine":
            z, out["attention"]["dynamic"] = self._query_tokens(self._fine_queries(out["coarse"]), vis, kv,
                                                                 return_attention)
            out["fine"] = self._llm(self._project(z), pos)
        elif mode == "autoregressive":
            empty = torch.zeros(batch, 0, dtype=torch.bool, device=vis.valid.device)
            out["fine"], _, out["attention"]["dynamic"], _ = self._frames_through_cache(
                vis, kv, pos, empty, DynamicCache(config=self.llm.config), return_attention)
        return out

    def dpo_logps(self, frames, chosen_ids, chosen_attention_mask, chosen_loss_mask, rejected_ids,
                  rejected_attention_mask, rejected_loss_mask, frame_mask=None, frame_index=None,
                  mode: str = "coarse_fine", chosen_target_index=None, rejected_target_index=None):
        """Summed answer-token log-probs of the chosen and rejected replies, sharing one backbone encode
        and one coarse pass (the prompt is taken from the chosen sequence); one LLM pass for both.
        The two target indices (as in forward, each in its own side's grid) go together."""
        if mode not in ("coarse_only", "coarse_fine"):
            raise ValueError(f"dpo_logps supports modes coarse_only and coarse_fine, got {mode!r}")
        mode = "coarse_only" if self.pooled is not None else mode
        for ids, am, lm in ((chosen_ids, chosen_attention_mask, chosen_loss_mask),
                            (rejected_ids, rejected_attention_mask, rejected_loss_mask)):
            self._check_text(ids, am, lm)
        b = chosen_ids.shape[0]
        if rejected_ids.shape[0] != b:
            raise ValueError(f"chosen batch {b} != rejected batch {rejected_ids.shape[0]}")
        if (chosen_target_index is None) != (rejected_target_index is None):
            raise ValueError("pass both chosen_target_index and rejected_target_index, or neither")
        s = max(chosen_ids.shape[1], rejected_ids.shape[1])
        pad = lambda x, v: F.pad(x, (0, s - x.shape[1]), value=v)  # noqa: E731
        ids = torch.cat([pad(chosen_ids, self.pad_id), pad(rejected_ids, self.pad_id)])  # [2B, s]: chosen, rejected
        am = torch.cat([pad(chosen_attention_mask, 0), pad(rejected_attention_mask, 0)])
        lm = torch.cat([pad(chosen_loss_mask, 0), pad(rejected_loss_mask, 0)])
        vis = self._visual(frames, frame_mask, frame_index, b)
        both = vis.repeat(2) if vis is not None else None
        text_emb = self.llm.get_input_embeddings()(ids)
        lay = self._layout(ids, am, both)
        vis_emb = None
        if vis is not None:  # the visual tokens depend on the frames and the prompt only: computed once
            kv = self.encode_frames(vis.pixels)
            vis_emb = self._visual_embeddings(mode, vis, kv, lay.rows(slice(0, b)), text_emb[:b], False)[0].repeat(2, 1, 1)
        index = None
        if chosen_target_index is not None:  # each side's [B, S_side - 1] grid -> the stacked [2B, s - 1] grid
            index = torch.cat([_regrid(chosen_target_index, chosen_ids.shape[1], s, 0),
                               _regrid(rejected_target_index, rejected_ids.shape[1], s, b)])
        res = self._loss(self._parallel(mode, text_emb, both, None, lay, vis_emb=vis_emb).h_pred, ids, am, lm, index)
        return dict(chosen_logps=res["logp_sum"][:b], rejected_logps=res["logp_sum"][b:],
                    chosen_tokens=res["num_tokens"][:b], rejected_tokens=res["num_tokens"][b:])

    # ---- generation -----------------------------------------------------------------------------

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the LLM's chat template, with our system prompt unless the
        conversation has its own."""
        return chat_ids(self.tokenizer, messages, self.system_prompt, add_generation_prompt)

    def generate(self, frames=None, prompt="", max_new_tokens: int = 128, mode: str = "autoregressive",
                 temperature: float = 0.0, top_p: float = 1.0, stream: bool = False):
        """Reply to `prompt` about `frames`.

        prompt: a string, a list of chat messages, or a list of those (a batch).
        frames: None, an image [3, H, W], a video [T, 3, H, W], a batch [B, T, 3, H, W], or a list
            with one of None / image / video per prompt. Images are shown as `image_frames` tokens.
        Returns the reply (a list for a batch), or with stream=True an iterator of text pieces
        (single prompt only). Greedy when temperature == 0, else temperature + top-p sampling.
        """
        _check_mode(mode)
        conversations, batched = _conversations(prompt)
        samples = _frames_per_sample(frames, len(conversations), batched)
        if stream and batched:
            raise ValueError("stream=True takes a single prompt")
        steps = self._generate_steps(conversations, samples, max_new_tokens, mode, temperature, top_p)
        if stream:
            return self._stream_text(steps)
        tokens = _collect(steps)["tokens"]
        replies = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return replies if batched else replies[0]

    @torch.no_grad()
    def generate_ids(self, input_ids, attention_mask=None, frames=None, frame_index=None, kv=None,
                     mode: str = "autoregressive", max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0) -> dict:
        """Batched decoding from prepared inputs (the evaluation path).

        input_ids / attention_mask [B, S]: templated prompts (e.g. `chat_ids`), right padded.
        frames [N, 3, H, W] packed with frame_index [B, T] (collate.pack_frames), and optionally
        kv = self.encode_frames(frames), computed once and reused across modes and prompts.
        Returns {"tokens": each sample's new ids (without the stop token), "first_logits": [B, V]
        float32 logits of the first new token, i.e. the prompt's next-token distribution}.
        """
        _check_mode(mode)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return _collect(self._decode_steps(input_ids, attention_mask, frames, frame_index, kv, mode, max_new_tokens,
                                           temperature, top_p))

    def _stream_text(self, steps):
        ids, sent = [], ""
        for step, _ in steps:
            if step[0] is None:
                continue
            ids.append(step[0])
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(sent):]
                sent = text

    def prompt_ids(self, conversations) -> tuple[torch.Tensor, torch.Tensor]:
        """Conversations -> right-padded generation prompts (input_ids, attention_mask) [B, S]."""
        rows = [self.chat_ids(c) for c in conversations]
        return pad_rows(rows, self.pad_id), pad_rows([[1] * len(r) for r in rows], 0)

    def _generate_steps(self, conversations, samples, max_new_tokens, mode, temperature, top_p):
        ids, am = self.prompt_ids(conversations)
        pixels, index = pack_frames(samples, self.image_frames)
        return self._decode_steps(ids, am, pixels, index, None, mode, max_new_tokens, temperature, top_p)

    @torch.no_grad()
    def _decode_steps(self, ids, am, pixels, index, kv, mode, max_new_tokens, temperature, top_p):
        """Yield, per decoding step, (each sample's new token id or None once it has stopped, the
        logits [B, V] that token was drawn from)."""
        device, weight_dtype = self.dino_to_llm.weight.device, self.dino_to_llm.weight.dtype
        mode = "coarse_only" if self.pooled is not None else mode
        b = ids.shape[0]
        ids, am = ids.to(device), am.to(device)
        if pixels is not None:  # uint8 frames stay uint8 (the encoder normalises them)
            dtype = pixels.dtype if pixels.dtype == torch.uint8 else weight_dtype
            pixels = pixels.to(device, dtype)
        with autocast(device):
            vis = self._visual(pixels, None, index.to(device), b) if pixels is not None else None
            kv = self._kv(vis, kv)
            lay = self._layout(ids, am, vis)
            cache = DynamicCache(config=self.llm.config)
            text_emb = self.llm.get_input_embeddings()(ids)
            if mode == "autoregressive":
                res = self._autoregressive(text_emb, vis, kv, lay, False, cache)
            else:
                res = self._parallel(mode, text_emb, vis, kv, lay, cache=cache)
            # the prompt's last real token predicts the first new token; new tokens continue the positions
            logits = self.llm.lm_head(_take(res.h_pred, (lay.n_text - 1)[:, None])[:, 0])
            yield from self._decode_loop(logits, cache, res.cache_valid, lay.length, max_new_tokens, temperature, top_p)

    def _decode_loop(self, logits, cache, cache_valid, pos, max_new_tokens, temperature, top_p):
        """Yield, per decoding step, (each sample's new token id or None once it has stopped, the
        logits [B, V] that token was drawn from), each token fed back through the KV cache.
        logits [B, V]: the first new token's distribution; pos [B]: that token's logical position."""
        b, device = logits.shape[0], logits.device
        stops = torch.tensor(self.stop_ids, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            tok = _sample(logits.float(), temperature, top_p)
            done |= torch.isin(tok, stops)  # a stop token ends its row, and a row once ended stays ended
            flags = done.tolist()  # one host sync a step (the token ids need it anyway)
            yield [None if f else t for f, t in zip(flags, tok.tolist())], logits
            if all(flags):
                return
            emb = self.llm.get_input_embeddings()(tok[:, None])
            h, cache_valid = self._cached_step(emb, pos[:, None], torch.ones(b, 1, dtype=torch.bool, device=device),
                                               cache_valid, cache)
            logits = self.llm.lm_head(h[:, 0])
            pos = pos + 1

    def encode_frames(self, pixels: torch.Tensor):
        """What the visual tokens are computed from, once per frame and reusable across modes and
        prompts (the `kv` of forward, frame_states and generate_ids): the backbone's per-block K/V
        (encoder.encode), or for the pooled baseline the final patch tokens average-pooled to an s x s
        grid, [N, s * s, D] (row-major)."""
        if self.pooled is None:
            return self.encoder.encode(pixels)
        dino, s = self.encoder.dino, self.pooled
        gh, gw = dino.grid(*pixels.shape[-2:])
        if s > min(gh, gw):
            raise ValueError(f"tokens_per_frame {s * s} pools to {s} x {s}, but frames of {tuple(pixels.shape[-2:])} px "
                             f"have a {gh} x {gw} patch grid")
        x = dino.features(pixels)[:, dino.num_prefix:]  # [N, gh * gw, D]: the patches, row-major
        x = x.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        # area pooling: each token is the mean of the patches of its cell (exact when s divides the grid)
        return F.adaptive_avg_pool2d(x, s).flatten(2).transpose(1, 2)

    def _kv(self, vis, kv):
        """The frames' encoding (encode_frames): computed here, or given (precomputed for these frames)."""
        if vis is None:
            return None
        if kv is None:
            return self.encode_frames(vis.pixels)
        if self.pooled is not None:
            if not torch.is_tensor(kv) or kv.shape[:2] != (vis.pixels.shape[0], self.tokens_per_frame):
                raise ValueError(f"kv must be encode_frames(frames): [{vis.pixels.shape[0]}, {self.tokens_per_frame}, "
                                 f"D] pooled tokens")
            return kv
        blocks = self.encoder.dino.num_blocks
        if len(kv) != blocks or kv[0][0].shape[0] != vis.pixels.shape[0]:
            raise ValueError(f"kv holds {kv[0][0].shape[0]} encoded frames in {len(kv)} blocks; the frames need "
                             f"{vis.pixels.shape[0]} in {blocks} (kv = encode_frames(frames))")
        return kv

    # ---- training helpers -----------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by part: `connector` (the learned queries and every layer this model adds:
        query_input_proj, output_proj, dino_to_llm, llm_to_query), `dino` (the vision backbone), `llm`."""
        groups = {"connector": [], "dino": [], "llm": []}
        for name, p in self.named_parameters():
            part = "llm" if name.startswith("llm.") else "dino" if name.startswith("encoder.dino.") else "connector"
            groups[part].append((name, p))
        return groups

    def gradient_checkpointing_enable(self):
        """Recompute activations in the backward pass: the LLM's decoder layers and the vision
        backbone's patch blocks (the query pass is one token per frame and keeps its activations)."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.encoder.dino.gradient_checkpointing = True

    # ---- weights --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts our layout and the published one: `_orig_mod.` / `module.` prefixes (torch.compile,
        DDP) are stripped, vision-backbone weights may use transformers' names, and a tied lm_head may
        be absent."""
        return super().load_state_dict(self._normalize_state(state_dict), strict=strict, assign=assign)

    def _normalize_state(self, state):
        out, dino = {}, {}
        for key, value in state.items():
            key = key.replace("_orig_mod.", "")
            if key.startswith("module."):
                key = key[len("module."):]
            if key.startswith("encoder.dino."):
                dino[key[len("encoder.dino."):]] = value
            else:
                out[key] = value
        out.update({"encoder.dino." + k: v for k, v in type(self.encoder.dino).state_from_hf(dino).items()})
        embed, head = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
        if self.llm.config.tie_word_embeddings and head not in out and embed in out:
            out[head] = out[embed]
        return out

    def save_pretrained(self, directory, state: dict | None = None):
        """directory/config.json (the ModelConfig) + model.safetensors, with the backbones' configs and
        the tokenizer in llm/ and dino/, so that from_pretrained needs nothing else. state: the weights
        to write instead of this model's (a sharded training run's, gathered)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.llm.config.save_pretrained(directory / "llm")
        self.tokenizer.save_pretrained(directory / "llm")
        self.dino_config.save_pretrained(directory / "dino")
        settings = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "pretrained"}
        (directory / "config.json").write_text(json.dumps(dict(settings, format=EXPORT_FORMAT), indent=2))
        state = dict(self.state_dict() if state is None else state)
        if self.llm.config.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory, **overrides):
        """A save_pretrained folder; overrides replace settings of its config.json. directory may be a
        Hugging Face Hub id (`owner/name[@revision]`, see checkpoint.fetch): a repo with an export is
        downloaded and read as a folder; one with only the published checkpoint.pt is read with the safe
        loader and built with its published backbones (overrides may then name only llm / dino)."""
        from safetensors.torch import load_file

        from checkpoint import build_fetched, fetch

        source = directory
        fetched = fetch(directory)  # downloaded once, built from here
        directory = fetched[0]
        if directory.is_file():  # a Hub repo's checkpoint.pt
            if set(overrides) - {"llm", "dino"}:
                raise ValueError(f"{source} holds a checkpoint.pt: only llm / dino may be overridden, not "
                                 f"{sorted(set(overrides) - {'llm', 'dino'})}")
            return build_fetched(fetched, overrides.get("llm"), overrides.get("dino"))[0]
        stored = read_export_config(directory)
        model = cls(stored, **dict(overrides, llm=directory / "llm", dino=directory / "dino", pretrained=False))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        # the backbones were built from the folder; the config keeps where they first came from
        model.config = dataclasses.replace(model.config, llm=stored.llm, dino=stored.dino)
        return model


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast over fp32 weights on CUDA; a no-op on CPU, which computes in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def token_logps(logits, labels):
    """log p(label) of each row of logits [K, V] (computed in fp32); 0 where label == -100. The one
    cross-entropy of the project: training, validation, DPO and the published dense path use it."""
    return -F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


# ---- helpers ----------------------------------------------------------------------------------------

def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _take(x, index):
    """x [B, L, D] gathered at index [B, K] -> [B, K, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _grid(index, length):
    """Flat indices into the [B, length - 1] next-token grid -> (rows, columns)."""
    width = max(length - 1, 1)
    return index // width, index % width


def _regrid(index, old_len, new_len, row_offset):
    """Flat indices into a [B, old_len - 1] grid -> into [row_offset + B, new_len - 1]."""
    rows, cols = _grid(index, old_len)
    return (rows + row_offset) * (new_len - 1) + cols


def _collect(steps) -> dict:
    """Decoding steps -> {"tokens": per-sample new ids, "first_logits": the first step's logits}."""
    tokens, first = None, None
    for step, logits in steps:
        if first is None:
            first, tokens = logits.float(), [[] for _ in step]
        for i, tok in enumerate(step):
            if tok is not None:
                tokens[i].append(tok)
    return {"tokens": tokens, "first_logits": first}


def _sample(logits, temperature, top_p):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1)[:, 0]


def _conversations(prompt):
    """prompt -> (list of message lists, batched?)."""
    as_messages = lambda p: [{"role": "user", "content": p}] if isinstance(p, str) else list(p)  # noqa: E731
    if isinstance(prompt, str):
        return [as_messages(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return [as_messages(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt:
        return [as_messages(p) for p in prompt], True
    raise ValueError("prompt must be a string, a list of chat messages, or a non-empty list of those")


def _frames_per_sample(frames, batch, batched):
    if frames is None:
        return [None] * batch
    if isinstance(frames, (list, tuple)):
        if len(frames) != batch:
            raise ValueError(f"{len(frames)} frame entries for {batch} prompts")
        return list(frames)
    if frames.dim() == 5:
        if frames.shape[0] != batch:
            raise ValueError(f"frames batch {frames.shape[0]} != {batch} prompts")
        return list(frames)
    if batched and batch != 1:
        raise ValueError("for a batch of prompts pass frames as a list (one entry per prompt) or [B, T, 3, H, W]")
    return [frames] * batch

