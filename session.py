"""Streaming video sessions: frames arrive one at a time, each costs one backbone encode and one cached
LLM step, and questions are answered from the current state, with memory bounded on an endless stream.

    session = StreamSession(model, window=64)          # autoregressive: the model chooses where to look
    for frame in camera:                                # uint8 [3, H, W] tensors, PIL images or HWC arrays
        session.add_frame(frame)
        if time_to_ask:
            print(session.ask("What happens?"))         # or: for piece in session.ask(..., stream=True)

The sequence the LLM reads is the video_first layout of `FoveatedVLM` (frames from position 0, then
the chat text), built incrementally in one KV cache:
- add_frame: encodes the frame, reads it with the current query (autoregressive: frame 0 with q_init,
  frame t with the query the LLM formed from its hidden state after frame t - 1; coarse_only: the
  static query, or the pooled baseline's tokens), appends its visual token(s) at the next position,
  and forms the query for the next frame. Frame skipping: with skip=k only every k-th frame is added.
- ask: appends the templated question after the frames, decodes the answer, then crops the cache back
  to the frames, so the answer never becomes part of the frame context and the next frame is read as
  if no question had been asked (the query for it was formed before the question). Asking twice gives
  the same answer; T frames then ask() equals `model.generate(frames, question, mode=...)` on those T
  frames (tests/test_session.py).
- window: at most `sink + window` frames stay in the cache. When a frame would exceed that, the oldest
  frame after the first `sink` frames is evicted (the first frames stay as an attention sink: LLMs put
  much attention on the first positions, and removing them destabilises it). Positions stay valid: the
  frames after the evicted one move down by its token count, their cached keys rotated back by the
  same number of RoPE positions, so the cache always holds positions 0 .. L - 1 with no gap and never
  grows past the positions the LLM was trained on. Without a window the cache grows by one frame per
  add_frame (exact, for clips).
Batch size 1; the model's layout must be video_first (prompt_first puts the question before the
frames, which a stream cannot know in advance). coarse_fine reads the whole clip twice, so it cannot
stream: modes are autoregressive and coarse_only (the pooled baseline: coarse_only).
"""

import time
from collections import deque

import numpy as np
import torch
from PIL import Image

from media import pil_to_tensor, resize
from decoding import decode, stream_text
from frames import check_frame_size
from precision import autocast

STREAM_MODES = ("autoregressive", "coarse_only")


class StreamSession:
    """One stream of frames through a FoveatedVLM (see the module docstring)."""

    def __init__(self, model, mode: str = "autoregressive", frame_size: int = 224, window: int | None = None,
                 sink: int = 4, skip: int = 1, timings: bool = True, attention: bool = False):
        if mode not in STREAM_MODES:
            raise ValueError(f"a stream runs in mode {' or '.join(STREAM_MODES)}, not {mode!r} (coarse_fine reads "
                             f"the whole clip twice)")
        if model.visual.run_mode(mode) != mode:
            model.visual.require_queries(f"a stream in mode {mode}")
        if model.layout != "video_first":
            raise ValueError(f"a stream needs the video_first layout (this model: {model.layout!r}, which puts the "
                             f"question before the frames)")
        check_frame_size(frame_size, model.encoder.dino.patch_size, f"frame_size {frame_size}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frame (or None: keep every frame), got {window}")
        if sink < 0 or skip < 1:
            raise ValueError(f"sink must be >= 0 and skip >= 1, got sink={sink}, skip={skip}")
        if window is not None:
            _check_rope(model)
        self.model, self.mode, self.frame_size = model, mode, frame_size
        self.window, self.sink, self.skip, self.timings = window, sink, skip, timings
        self.attention = attention  # keep the last added frame and its query's attention (`last`)
        self.device = model.device
        self.per_frame = model.visual.per_frame  # visual tokens each frame appends
        self.reset()

    def reset(self):
        """Forget every frame: an empty cache, the next frame read with q_init."""
        self.cache = self.model.new_cache(1)  # every slot real here: frames, then a question while it is asked
        self.query = self.model.first_query(1)  # where the next frame is looked at (autoregressive)
        self.frames_seen = 0  # given to add_frame, skipped ones included
        self.frames_added = 0  # encoded and appended
        self.evicted = 0  # frames dropped from the window
        self.answering = False  # a streamed answer is being read: its tokens are in the cache
        # with attention=True: the last added frame (uint8 [3, S, S]) and where its query looked, the
        # backbone's attention [blocks, heads, keys] (None for the pooled baseline: no query)
        self.last = None
        self.stats = {"encode_ms": deque(maxlen=100), "llm_ms": deque(maxlen=100), "ttft_ms": None,
                      "tokens_per_s": None}

    @property
    def frames_in_cache(self) -> int:
        return self.cache.length // self.per_frame

    @property
    def cache_tokens(self) -> int:
        return self.cache.length

    # ---- frames ----------------------------------------------------------------------------------

    def pixels(self, frame) -> torch.Tensor:
        """A frame as the encoder takes it: uint8 [1, 3, S, S] on the model's device (squashed to the
        square as benchmark.py and training read frames). frame: uint8 [3, H, W] tensor, PIL image or
        [H, W, 3] uint8 array."""
        if isinstance(frame, Image.Image):
            frame = pil_to_tensor(frame)
        elif isinstance(frame, np.ndarray):
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"an array frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
            frame = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
        if not torch.is_tensor(frame) or frame.dim() != 3 or frame.shape[0] != 3 or frame.dtype != torch.uint8:
            raise ValueError(f"a frame must be a uint8 [3, H, W] tensor, a PIL image or a uint8 [H, W, 3] array, got "
                             f"{getattr(frame, 'dtype', type(frame).__name__)} {tuple(getattr(frame, 'shape', ()))}")
        if frame.shape[1:] != (self.frame_size, self.frame_size):
            frame = resize(frame.contiguous(), self.frame_size)
        return frame[None].to(self.device)

    @torch.no_grad()
    def add_frame(self, frame) -> bool:
        """Read one frame into the stream; False when frame skipping passed over it."""
        if self.answering:
            raise RuntimeError("add_frame during a streamed answer: finish reading it (or close() it) first")
        self.frames_seen += 1
        if (self.frames_seen - 1) % self.skip:
            return False
        model = self.model
        pixels = self.pixels(frame)
        start = time.perf_counter()
        with autocast(self.device):
            kv = model.encode_frames(pixels)
            # autoregressive: the query formed after the last frame; coarse_only: the glance (static query)
            query = self.query if self.mode == "autoregressive" else None
            tokens, attn = model.look(kv, query, return_attention=self.attention)  # [1, per_frame, D]
            if self.attention:
                self.last = (pixels[0], None if attn is None else attn[0])
            self._lap("encode_ms", start)
            start = time.perf_counter()
            if self.window is not None and self.frames_in_cache >= self.sink + self.window:
                self._evict_oldest()
            h = model.append(self.cache, tokens, self.cache.length + torch.arange(self.per_frame, device=self.device)[None])
            if self.mode == "autoregressive":
                self.query = model.next_query(h[:, -1])  # where to look in the next frame
        self._lap("llm_ms", start)
        self.frames_added += 1
        return True

    def _evict_oldest(self):
        """Drop the oldest frame after the sink; the later frames move down by its token count (their
        keys rotated back by as many positions: shift_keys)."""
        n, first = self.per_frame, self.sink * self.per_frame
        inv_freq = self.model.llm.model.rotary_emb.inv_freq
        for layer in self.cache.kv.layers:
            keys, values = layer.keys, layer.values
            layer.keys = torch.cat([keys[:, :, :first], shift_keys(keys[:, :, first + n:], -n, inv_freq)], dim=2)
            layer.values = torch.cat([values[:, :, :first], values[:, :, first + n:]], dim=2)
        self.cache.valid = self.cache.valid[:, n:]  # all real: which n slots go does not matter
        self.evicted += 1

    # ---- questions -------------------------------------------------------------------------------

    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            stream: bool = False):
        """Answer from the frames so far (the reply, or with stream=True an iterator of text pieces).
        The question and answer are removed from the cache afterwards (see the module docstring)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pieces = self._answer(question, max_new_tokens, temperature, top_p)
        return pieces if stream else "".join(pieces)

    @torch.no_grad()
    def _answer(self, question, max_new_tokens, temperature, top_p):
        model = self.model
        kept = self.cache.length
        ids = torch.tensor([model.chat_ids([{"role": "user", "content": question}])], device=self.device)
        start = time.perf_counter()
        first, tokens = None, 0

        def timed(steps):  # the decoding steps, with the first token's time and the token count noted
            nonlocal first, tokens
            for step in steps:
                if first is None:
                    first = time.perf_counter()
                    self.stats["ttft_ms"] = 1000 * (first - start)
                tokens += step[0][0] is not None
                yield step

        self.answering = True
        try:
            with autocast(self.device):
                pos = kept + torch.arange(ids.shape[1], device=self.device)[None]
                h = model.append(self.cache, model.embed(ids), pos)
                logits = model.llm.lm_head(h[:, -1])
                steps = decode(model, logits, self.cache, pos[:, -1] + 1, max_new_tokens, temperature, top_p)
                yield from stream_text(model.tokenizer, timed(steps))  # token ids -> text pieces, as generate streams
        finally:  # also when a streamed answer is abandoned (closed): the frames' cache is left as it was
            self.cache.crop(kept)
            self.answering = False
            if first is not None and tokens > 1:
                self.stats["tokens_per_s"] = (tokens - 1) / max(time.perf_counter() - first, 1e-9)

    # ---- statistics ------------------------------------------------------------------------------

    def _lap(self, key, start):
        if self.timings:
            if self.device.type == "cuda":  # a host sync, only for the statistics (timings=False skips it)
                torch.cuda.synchronize(self.device)
            self.stats[key].append(1000 * (time.perf_counter() - start))

    def summary(self) -> dict:
        """Counters and recent timings: frames seen / added / in the cache / evicted, cache tokens, mean
        encode and LLM ms per frame over the last 100 frames, the last answer's TTFT and tokens/s."""
        mean = lambda d: sum(d) / len(d) if d else None  # noqa: E731
        return {"frames_seen": self.frames_seen, "frames_added": self.frames_added,
                "frames_in_cache": self.frames_in_cache, "evicted": self.evicted, "cache_tokens": self.cache_tokens,
                "encode_ms": mean(self.stats["encode_ms"]), "llm_ms": mean(self.stats["llm_ms"]),
                "ttft_ms": self.stats["ttft_ms"], "tokens_per_s": self.stats["tokens_per_s"]}


def shift_keys(keys: torch.Tensor, by: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Cached RoPE keys [..., L, head_dim] at positions p -> the same keys at positions p + by. RoPE
    rotates each pair of dimensions (i, i + head_dim / 2) by p * inv_freq[i]; rotations compose, so one
    more rotation by `by` * inv_freq[i] moves the key to p + by (exact, up to rounding: done in fp32)."""
    angle = by * inv_freq.to(keys.device, torch.float32)
    angle = torch.cat([angle, angle])
    cos, sin = angle.cos(), angle.sin()
    k = keys.float()
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)  # transformers' rotate_half
    return (k * cos + rotated * sin).to(keys.dtype)


def _check_rope(model):
    """Eviction re-rotates cached keys, which is exact for plain RoPE (rotations compose); refuse a
    scaled variant (e.g. dynamic NTK), where a key's rotation is not a function of its position alone."""
    rope = getattr(model.llm.model, "rotary_emb", None)
    plain = getattr(rope, "rope_type", "default") == "default" and getattr(rope, "attention_scaling", 1.0) == 1.0
    if rope is None or not plain:
        raise ValueError("a windowed stream re-rotates cached keys and needs the LLM's plain RoPE "
                         f"(rope_type default; this LLM: {getattr(rope, 'rope_type', None)!r}); use window=None")
