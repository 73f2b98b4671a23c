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

Sequence layout (layout.py): with "video_first" (the published model) the visual tokens come first
and the whole chat text follows; with "prompt_first" they follow the first user message's content, so
the queries can depend on the question. Padding never changes a real token's output.

Loss (loss.py). `logits[:, j]` predicts the text token after token j (from the sequence position just before
that token, which is the last visual token where the video sits in between). The loss is the
token-weighted mean of -log p over text tokens j >= 1 with loss_mask[j] = 1; labels of other tokens
are -100. The first text token is never a target (it follows nothing but the video).
"""

import dataclasses
from typing import NamedTuple

import torch
from torch import nn
from transformers import DynamicCache

import decoding
import loading
from backbones import load_llm, vision_config, vision_weights
from config import MODES, ModelConfig, model_config
from encoder import FoveatedEncoder
from layout import (Cache, Frames, Layout, assemble, chat_marks, check_text, chunk_mask, frame_inputs, make_layout,
                    stack_pairs, take)
from loss import next_token_loss
from predict import NextFrameHead
from tokenization import chat_ids, pad_id
from visual import visual_tokens


class Pass(NamedTuple):
    """What an LLM pass over a batch gives."""
    h_pred: torch.Tensor  # [B, S, D] hidden state predicting the token after each text token (Layout.pred_pos)
    queries: torch.Tensor | None  # [B, T, query_dim] the fine queries used (None in coarse_only / text only)
    attention: dict  # "static" / "dynamic" -> [B, T, blocks, heads, keys] with return_attention (else None)


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
        self.visual = visual_tokens(self, cfg.tokens_per_frame)  # foveated queries or pooled patches, chosen once
        dino_config = vision_config(cfg.dino)
        self.encoder = FoveatedEncoder(dino_config, cfg.query_dim, queries=self.visual.queries)
        self.encoder.dino.load_state_dict(vision_weights(cfg.dino, dino_config, cfg.pretrained))
        self.dino_config = dino_config
        llm_dim = self.llm.config.hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.dino.dim, llm_dim)
        if self.visual.queries:  # the query path (the pooled baseline has none)
            self.llm_to_query = nn.Linear(llm_dim, cfg.query_dim)
            # std 1: smaller queries give near-uniform attention at the start of training
            self.q_static = nn.Parameter(torch.randn(1, cfg.query_dim))
            self.q_init = nn.Parameter(torch.randn(1, cfg.query_dim))
        # the proof-of-concept's next-frame head (objectives.NextFrame); absent in the published layout
        self.next_frame = NextFrameHead(llm_dim, cfg.next_frame, cfg.next_frame_width) if cfg.next_frame else None
        tok = self.tokenizer
        self.marks = chat_marks(tok)  # the ChatML tokens prompt_first places the video by
        stops = {self.marks.im_end, tok.eos_token_id}
        eos = self.llm.generation_config.eos_token_id if self.llm.generation_config is not None else None
        stops.update(eos if isinstance(eos, list) else [eos])
        self.stop_ids = sorted(s for s in stops if s is not None)
        self.pad_id = pad_id(tok)  # an int: no tokenizer in traced code

    # the settings, read from the one config
    visual_scale = property(lambda self: self.config.visual_scale)
    layout = property(lambda self: self.config.layout)
    image_frames = property(lambda self: self.config.image_frames)
    system_prompt = property(lambda self: self.config.system_prompt)

    # ---- inputs ---------------------------------------------------------------------------------

    def _visual(self, frames, frame_mask, frame_index, batch) -> Frames | None:
        """Validate the frame inputs and describe which frame each frame slot reads."""
        return frame_inputs(frames, frame_mask, frame_index, batch)

    def _layout(self, input_ids, attention_mask, vis: Frames | None, visual_pos=None) -> Layout:
        """Logical positions of every text and visual token (layout.Layout)."""
        if vis is None:
            visual_valid = input_ids.new_zeros(input_ids.shape[0], 0, dtype=torch.bool)
        else:  # each frame slot is per_frame consecutive visual tokens
            n = self.visual.per_frame
            visual_valid = vis.valid.repeat_interleave(n, 1) if n > 1 else vis.valid
        return make_layout(input_ids, attention_mask, visual_valid, self.layout, self.marks, visual_pos)

    # ---- visual tokens --------------------------------------------------------------------------

    def _project(self, z):
        return self.dino_to_llm(z) * self.visual_scale

    def _static_tokens(self, vis, kv, return_attention):
        """The glance at every encoded frame once (q_static; the pooled tokens), then shared by every
        slot reading that frame -> ([B, T * per_frame, D] backbone-width tokens, attention or None)."""
        z, attn = self.visual.glance(kv, return_attention)
        return z[vis.token_frame].flatten(1, 2), (attn[vis.token_frame] if attn is not None else None)

    def _query_tokens(self, queries, vis, kv, return_attention):
        """Per-token queries [B, T, Dq] -> tokens [B, T, D]."""
        b, t, dq = queries.shape
        if vis.unique:
            # scatter queries into frame order (pads go to a spare row n): no K/V copy
            n = vis.pixels.shape[0]
            dest = torch.where(vis.valid, vis.token_frame, n).flatten()
            q = queries.new_zeros(n + 1, dq).scatter(0, dest[:, None].expand(-1, dq), queries.flatten(0, 1))[:n]
            z, attn = self.visual.read(kv, q, return_attention=return_attention)
            return z[vis.token_frame], (attn[vis.token_frame] if attn is not None else None)
        z, attn = self.visual.read(kv, queries.flatten(0, 1), vis.token_frame.flatten(), return_attention)
        return z.view(b, t, -1), (attn.view(b, t, *attn.shape[1:]) if attn is not None else None)

    def _fine_queries(self, h_vis):
        """Hidden states at the visual tokens -> queries shifted by one frame (frame 0 gets q_init):
        token t is looked at with the query the LLM formed after seeing token t - 1."""
        q = self.next_query(h_vis)
        return torch.cat([self.first_query(q.shape[0])[:, None].to(q.dtype), q[:, :-1]], dim=1)

    def _visual_embeddings(self, mode, vis, kv, lay, text_emb, return_attention, queries=None):
        """(visual token embeddings for the parallel modes, the fine queries used, attention maps)."""
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
                h = self._llm(*assemble(text_emb, emb, lay.before_video()))
                h_vis = take(h, lay.visual_pos)
            queries = self._fine_queries(h_vis)
            z, attn["dynamic"] = self._query_tokens(queries, vis, kv, return_attention)
            emb = self._project(z)
        return emb, queries, attn

    # ---- LLM passes -----------------------------------------------------------------------------

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
        seq, pos = assemble(text_emb, vis_emb, lay)
        h = self._llm(seq, pos, cache.kv if cache is not None else None)
        if cache is not None:
            cache.valid = pos < lay.length[:, None]  # real tokens fill the first `length` slots
        return Pass(take(h, lay.pred_pos), queries, attn)

    def _autoregressive(self, text_emb, vis, kv, lay: Layout, return_attention, cache, queries=None) -> Pass:
        """Prefix text (prompt_first), then frame by frame through the KV cache, then the rest of the text.

        Physical cache order follows logical order for real tokens; padding slots are masked out and
        every token gets its logical position, so batching never changes a real token's output.
        `queries` [B, T, Dq] replace the LLM-chosen queries (teacher forcing).
        """
        tv, before = lay.text_valid, lay.text_rank < lay.visual_start[:, None]
        h_prefix = None
        if self.layout == "prompt_first":  # the question first: the whole text, only its prefix real
            h_prefix = self.append(cache, text_emb, lay.text_pos, tv & before)
        if vis is not None:
            h_vis, used, dynamic = self._frames_through_cache(vis, kv, lay.visual_pos, cache, return_attention, queries)
        h_rest = self.append(cache, text_emb, lay.text_pos, tv & ~before)
        # each text token's successor is predicted from its own state (prefix or rest pass)...
        h_pred = h_rest if h_prefix is None else torch.where(before[..., None], h_prefix, h_rest)
        if vis is None:
            return Pass(h_pred, None, {})
        # ...except where the video sits in between: then from the last visual token
        last = take(h_vis, (lay.n_visual - 1).clamp(min=0)[:, None])
        h_pred = torch.where(lay.pred_from_visual[..., None], last, h_pred)
        return Pass(h_pred, used, {"dynamic": dynamic})

    def _frames_through_cache(self, vis, kv, visual_pos, cache, return_attention, queries=None):
        """The frames one by one through the KV cache with the per-frame steps (look, append, next
        query): frame t + 1 is read with the query formed from the hidden state after frame t (frame 0:
        first_query; `queries` [B, T, Dq] replace them) -> (hidden states [B, T, D], queries used
        [B, T, Dq], their attention or None)."""
        query = self.first_query(vis.valid.shape[0])
        h_vis, used, attn = [], [], []
        for t in range(vis.valid.shape[1]):
            if queries is not None:
                query = queries[:, t]
            used.append(query)
            emb, a = self.look(kv, query, vis.token_frame[:, t], return_attention)
            attn.append(a)
            h = self.append(cache, emb, visual_pos[:, t:t + 1], vis.valid[:, t:t + 1])
            h_vis.append(h)
            query = self.next_query(h[:, 0])  # where to look in the next frame
        return torch.cat(h_vis, dim=1), torch.stack(used, 1), (torch.stack(attn, 1) if return_attention else None)

    # ---- the per-frame steps: the autoregressive pass, StreamSession and looked.py are made of these ----

    @property
    def device(self) -> torch.device:
        return self.dino_to_llm.weight.device

    def new_cache(self, batch: int) -> Cache:
        """An empty KV cache for `batch` sequences."""
        return Cache(DynamicCache(config=self.llm.config), torch.zeros(batch, 0, dtype=torch.bool, device=self.device))

    def look(self, kv, query=None, frame_ids=None, return_attention: bool = False):
        """Visual tokens of encoded frames (kv = encode_frames(pixels)), ready for the LLM: (embeddings
        [M, per_frame, llm width], the backbone's attention [M, blocks, heads, keys] or None). query None:
        the glance (the static query; the pooled baseline's tokens), of every frame or of frame_ids [M];
        query [M, query_dim]: where the LLM chose to look, query m in frame frame_ids[m] (default m)."""
        if query is None:
            z, attn = self.visual.glance(kv, return_attention)
            if frame_ids is not None:
                z, attn = z[frame_ids], (attn[frame_ids] if attn is not None else None)
        else:
            z, attn = self.visual.read(kv, query, frame_ids, return_attention)
            z = z[:, None]
        return self._project(z), attn

    def first_query(self, batch: int):
        """[batch, query_dim]: the query frame 0 is read with (q_init; None for the pooled baseline)."""
        return self.visual.first_query(batch)

    def next_query(self, h: torch.Tensor) -> torch.Tensor:
        """LLM hidden states [..., D] -> where to look in the next frame, [..., query_dim]."""
        return self.llm_to_query(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids [B, S] -> the LLM's input embeddings [B, S, D]."""
        return self.llm.get_input_embeddings()(ids)

    def append(self, cache: Cache, embeds, positions, valid=None) -> torch.Tensor:
        """A chunk of tokens (embeds [B, n, D] at logical positions [B, n]; valid [B, n], default all
        real) through the LLM onto the cache -> their hidden states [B, n, D]. A chunk token attends to
        the cache's real slots and the real ones of its chunk before it (layout.chunk_mask)."""
        if valid is None:
            valid = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        mask, cache.valid = chunk_mask(cache.valid, valid)
        return self._llm(embeds, positions, cache.kv, mask)

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
        if queries is not None:
            self.visual.require_queries("queries=")
        mode = self.visual.run_mode(mode)
        check_text(input_ids, attention_mask, loss_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vis = self._visual(frames, frame_mask, frame_index, input_ids.shape[0])
        kv = self._kv(vis, kv)
        lay = self._layout(input_ids, attention_mask, vis, visual_pos)
        if queries is not None and mode == "coarse_only":
            raise ValueError("queries= replaces the fine queries; coarse_only has none")
        if queries is not None and (vis is None or queries.shape[:2] != vis.valid.shape):
            raise ValueError(f"queries must be [B, T, query_dim] matching the visual tokens, got {tuple(queries.shape)}")
        text_emb = self.embed(input_ids)
        if mode == "autoregressive":
            res = self._autoregressive(text_emb, vis, kv, lay, return_attention, self.new_cache(input_ids.shape[0]),
                                       queries)
        else:
            res = self._parallel(mode, text_emb, vis, kv, lay, return_attention, queries)
        loss = next_token_loss(self.llm.lm_head, res.h_pred, input_ids, attention_mask, loss_mask, target_index)
        out = dict(queries=res.queries, **loss)
        if return_attention:
            out["attention"] = res.attention
        return out

    def frame_states(self, frames, frame_index=None, frame_mask=None, mode: str = "coarse_fine",
                     return_attention: bool = False, kv=None) -> dict:
        """A video without text through the LLM (the next-frame objective): the hidden state at each
        frame. Returns valid [B, T]; coarse [B, T, D]: the pass over the static-query tokens (the pooled
        baseline: over its per_frame tokens a frame, the state after each frame's last one); fine
        [B, T, D] (not in coarse_only, nor for the pooled baseline, which has one pass): coarse_fine's
        pass over the tokens looked at with the queries formed from the coarse pass, or the
        autoregressive pass, whose query for frame t + 1 comes from its own state after frame t (true
        inference); with return_attention, attention {"static", "dynamic"} [B, T, blocks, heads, keys]
        (None for the pooled baseline). State t has seen frames 0..t only, in both passes (the fine
        query of frame t comes from the coarse state of frame t - 1).
        frames / frame_mask / frame_index / kv as in forward."""
        _check_mode(mode)
        mode = self.visual.run_mode(mode)
        batch = frame_index.shape[0] if frame_index is not None else (frames.shape[0] if frames is not None else 0)
        vis = self._visual(frames, frame_mask, frame_index, batch)
        if vis is None:
            raise ValueError("frame_states needs frames")
        kv = self._kv(vis, kv)
        # video only: token i at position i (real frames first, padding after them: causal attention
        # keeps padding out of every real token's state); frame t is tokens t * n .. t * n + n - 1
        n = self.visual.per_frame
        pos = torch.arange(vis.valid.shape[1] * n, device=vis.valid.device).expand(batch, -1)
        z, static = self._static_tokens(vis, kv, return_attention)
        coarse = self._llm(self._project(z), pos)[:, n - 1::n]  # the state after each frame's last token
        out = {"valid": vis.valid, "coarse": coarse, "fine": None, "attention": {"static": static, "dynamic": None}}
        pos = pos[:, :vis.valid.shape[1]]  # the fine passes: one token a frame
        if mode == "coarse_fine":
            z, out["attention"]["dynamic"] = self._query_tokens(self._fine_queries(out["coarse"]), vis, kv,
                                                                 return_attention)
            out["fine"] = self._llm(self._project(z), pos)
        elif mode == "autoregressive":
            out["fine"], _, out["attention"]["dynamic"] = self._frames_through_cache(vis, kv, pos, self.new_cache(batch),
                                                                                     return_attention)
        return out

    def dpo_logps(self, frames, chosen_ids, chosen_attention_mask, chosen_loss_mask, rejected_ids,
                  rejected_attention_mask, rejected_loss_mask, frame_mask=None, frame_index=None,
                  mode: str = "coarse_fine", chosen_target_index=None, rejected_target_index=None):
        """Summed answer-token log-probs of the chosen and rejected replies, sharing one backbone encode
        and one coarse pass (the prompt is taken from the chosen sequence); one LLM pass for both.
        The two target indices (as in forward, each in its own side's grid) go together."""
        if mode not in ("coarse_only", "coarse_fine"):
            raise ValueError(f"dpo_logps supports modes coarse_only and coarse_fine, got {mode!r}")
        mode = self.visual.run_mode(mode)
        for ids, am, lm in ((chosen_ids, chosen_attention_mask, chosen_loss_mask),
                            (rejected_ids, rejected_attention_mask, rejected_loss_mask)):
            check_text(ids, am, lm)
        b = chosen_ids.shape[0]
        if rejected_ids.shape[0] != b:
            raise ValueError(f"chosen batch {b} != rejected batch {rejected_ids.shape[0]}")
        if (chosen_target_index is None) != (rejected_target_index is None):
            raise ValueError("pass both chosen_target_index and rejected_target_index, or neither")
        ids, am, lm, index = stack_pairs(  # [2B, s]: chosen rows, then rejected
            self.pad_id, (chosen_ids, chosen_attention_mask, chosen_loss_mask),
            (rejected_ids, rejected_attention_mask, rejected_loss_mask), chosen_target_index, rejected_target_index)
        vis = self._visual(frames, frame_mask, frame_index, b)
        both = vis.repeat(2) if vis is not None else None
        text_emb = self.embed(ids)
        lay = self._layout(ids, am, both)
        vis_emb = None
        if vis is not None:  # the visual tokens depend on the frames and the prompt only: computed once
            kv = self.encode_frames(vis.pixels)
            vis_emb = self._visual_embeddings(mode, vis, kv, lay.rows(slice(0, b)), text_emb[:b], False)[0].repeat(2, 1, 1)
        h_pred = self._parallel(mode, text_emb, both, None, lay, vis_emb=vis_emb).h_pred
        res = next_token_loss(self.llm.lm_head, h_pred, ids, am, lm, index)
        return dict(chosen_logps=res["logp_sum"][:b], rejected_logps=res["logp_sum"][b:],
                    chosen_tokens=res["num_tokens"][:b], rejected_tokens=res["num_tokens"][b:])

    # ---- generation -----------------------------------------------------------------------------

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the LLM's chat template, with our system prompt unless the
        conversation has its own."""
        return chat_ids(self.tokenizer, messages, self.system_prompt, add_generation_prompt)

    def generate(self, frames=None, prompt="", max_new_tokens: int = 128, mode: str = "autoregressive",
                 temperature: float = 0.0, top_p: float = 1.0, stream: bool = False):
        """Reply to `prompt` about `frames` (decoding.py).

        prompt: a string, a list of chat messages, or a list of those (a batch).
        frames: None, an image [3, H, W], a video [T, 3, H, W], a batch [B, T, 3, H, W], or a list
            with one of None / image / video per prompt. Images are shown as `image_frames` tokens.
        Returns the reply (a list for a batch), or with stream=True an iterator of text pieces
        (single prompt only). Greedy when temperature == 0, else temperature + top-p sampling.
        """
        _check_mode(mode)
        return decoding.generate(self, frames, prompt, max_new_tokens, mode, temperature, top_p, stream)

    @torch.no_grad()
    def generate_ids(self, input_ids, attention_mask=None, frames=None, frame_index=None, kv=None,
                     mode: str = "autoregressive", max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0) -> dict:
        """Batched decoding from prepared inputs (the evaluation path).

        input_ids / attention_mask [B, S]: templated prompts (decoding.prompt_ids), right padded.
        frames [N, 3, H, W] packed with frame_index [B, T] (collate.pack_frames), and optionally
        kv = self.encode_frames(frames), computed once and reused across modes and prompts.
        Returns {"tokens": each sample's new ids (without the stop token), "first_logits": [B, V]
        float32 logits of the first new token, i.e. the prompt's next-token distribution}.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return decoding.collect(decoding.steps(self, input_ids, attention_mask, frames, frame_index, kv, mode,
                                               max_new_tokens, temperature, top_p))

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, frames=None, frame_index=None, kv=None, mode: str = "autoregressive"):
        """Prompts through the LLM into a new KV cache, the start of decoding -> (the logits of each
        row's first new token [B, V], the cache, that token's logical position [B]). input_ids /
        attention_mask [B, S]: right-padded prompts; frames [N, 3, H, W] packed with frame_index [B, T];
        kv as in forward. Inputs are moved to the model's device (uint8 frames stay uint8: the encoder
        normalises them)."""
        _check_mode(mode)
        mode = self.visual.run_mode(mode)
        b, device = input_ids.shape[0], self.device
        ids, am = input_ids.to(device), attention_mask.to(device)
        vis = None
        if frames is not None:
            dtype = frames.dtype if frames.dtype == torch.uint8 else self.dino_to_llm.weight.dtype
            vis = self._visual(frames.to(device, dtype), None, frame_index.to(device), b)
        kv = self._kv(vis, kv)
        lay = self._layout(ids, am, vis)
        cache, text_emb = self.new_cache(b), self.embed(ids)
        if mode == "autoregressive":
            res = self._autoregressive(text_emb, vis, kv, lay, False, cache)
        else:
            res = self._parallel(mode, text_emb, vis, kv, lay, cache=cache)
        # the prompt's last real token predicts the first new token; new tokens continue the positions
        return self.llm.lm_head(take(res.h_pred, (lay.n_text - 1)[:, None])[:, 0]), cache, lay.length

    def encode_frames(self, pixels: torch.Tensor, chunk: int | None = None):
        """What the visual tokens are computed from, once per frame and reusable across modes and
        prompts (the `kv` of forward, frame_states, look and generate_ids): the backbone's per-block K/V
        (encoder.encode), or for the pooled baseline the final patch tokens average-pooled to an s x s
        grid, [N, s * s, D] (row-major). chunk: encode that many frames at a time (the same result;
        on CPU, 32 frames at a time run ~20 % faster per frame than 128: cache misses)."""
        if chunk is None or pixels.shape[0] <= chunk:
            return self.visual.encode(pixels)
        return self.visual.join([self.visual.encode(pixels[i:i + chunk]) for i in range(0, pixels.shape[0], chunk)])

    def _kv(self, vis, kv):
        """The frames' encoding (encode_frames): computed here, or given (precomputed for these frames)."""
        if vis is None:
            return None
        if kv is None:
            return self.encode_frames(vis.pixels)
        self.visual.check_kv(kv, vis.pixels.shape[0])
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
        return super().load_state_dict(
            loading.normalize_state(state_dict, type(self.encoder.dino).state_from_hf,
                                    self.llm.config.tie_word_embeddings), strict=strict, assign=assign)

    def save_pretrained(self, directory, state: dict | None = None):
        """directory/config.json (the ModelConfig) + model.safetensors, with the backbones' configs and
        the tokenizer in llm/ and dino/, so that from_pretrained needs nothing else (loading.save_pretrained).
        state: the weights to write instead of this model's (a sharded training run's, gathered)."""
        loading.save_pretrained(self, directory, state)

    @classmethod
    def from_pretrained(cls, directory, **overrides):
        """A save_pretrained folder (or a run directory: its final/); overrides replace settings of its
        config.json. directory may be a Hugging Face Hub id (`owner/name[@revision]`, see loading.fetch):
        a repo with an export is downloaded and read as a folder; one with only the published
        checkpoint.pt is read with the safe loader and built with its published backbones (overrides
        may then name only llm / dino). Reads every form `load_model` reads (loading.read_model)."""
        llm, dino = overrides.pop("llm", None), overrides.pop("dino", None)
        return cls.from_stored(loading.read_model(directory, llm, dino, overrides=overrides))

    @classmethod
    def from_stored(cls, stored: loading.Stored):
        """The model of loading.read_model's result: built from its backbones, its weights loaded."""
        model = cls(stored.config, llm=stored.llm, dino=stored.dino, pretrained=False)
        model.load_state_dict(stored.state)
        # the backbones may have been built from an export's folders; the config keeps where they came from
        model.config = dataclasses.replace(model.config, llm=stored.config.llm, dino=stored.config.dino)
        return model


def load_model(path, llm: str | None = None, dino: str | None = None, trust: bool = False):
    """(FoveatedVLM, what was read) from any form loading.read_model reads: an export folder, a run
    directory, a training checkpoint, the published checkpoint.pt (llm / dino: its backbones), a Hub id.
    trust: unpickle arbitrary objects (loading.read_torch_file)."""
    stored = loading.read_model(path, llm, dino, trust)
    return FoveatedVLM.from_stored(stored), stored.what


# ---- helpers ----------------------------------------------------------------------------------------

def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
