"""How a frame becomes visual tokens: the one switch between the foveated model and the "frames as
images" baseline, made once from the config (`visual_tokens`). Nothing else asks which one it is; the
model and its callers ask the strategy instead.

- FoveatedTokens (tokens_per_frame: null, the published model): one token per frame, a query vector
  pushed through every block of the vision backbone against the frame's cached K/V (encoder.py). The
  query is the static q_static (the glance: it does not depend on the LLM) or one the LLM formed from
  its hidden state (where to look next).
- PooledTokens (tokens_per_frame: s * s): the backbone's final patch tokens average-pooled to an s x s
  grid (area pooling, row-major). No queries, no foveation: every forward mode is the same single pass.

Both give: `per_frame` (visual tokens a frame becomes), `queries` (whether anything chooses where to
look), `encode` (what the tokens are computed from, once per frame: the `kv` every API takes; `join`
concatenates chunks of it), `check_kv`, `glance` (the query-free tokens of every encoded frame), `read` (a query's token),
`run_mode` (the mode a requested mode runs as), `require_queries` (a clear error where a feature needs
queries) and `flops`. The strategy holds the model and reads its parameters at call time (they may be
replaced: load_state_dict(assign=True), sharding), so it keeps no tensors of its own.
"""

import math

import torch
import torch.nn.functional as F


def visual_tokens(model, tokens_per_frame: int | None):
    """The model's strategy for its config's tokens_per_frame (None: foveated)."""
    return FoveatedTokens(model) if tokens_per_frame is None else PooledTokens(model, math.isqrt(tokens_per_frame))


class FoveatedTokens:
    per_frame = 1
    queries = True

    def __init__(self, model):
        self.model = model

    def encode(self, pixels: torch.Tensor):
        """The backbone's per-block K/V of each frame (encoder.encode)."""
        return self.model.encoder.encode(pixels)

    @staticmethod
    def join(parts: list):
        """encode's results for consecutive chunks of frames -> the result for all of them."""
        return [tuple(torch.cat([p[b][j] for p in parts]) for j in range(2)) for b in range(len(parts[0]))]

    def check_kv(self, kv, frames: int):
        blocks = self.model.encoder.dino.num_blocks
        if len(kv) != blocks or kv[0][0].shape[0] != frames:
            raise ValueError(f"kv holds {kv[0][0].shape[0]} encoded frames in {len(kv)} blocks; the frames need "
                             f"{frames} in {blocks} (kv = encode_frames(frames))")

    def glance(self, kv, return_attention: bool = False):
        """q_static through every encoded frame once -> (tokens [N, 1, D], attention [N, blocks, heads,
        keys] or None)."""
        n = kv[0][0].shape[0]
        z, attn = self.model.encoder.query(self.model.q_static.expand(n, -1), kv, return_attention=return_attention)
        return z[:, None], attn

    def read(self, kv, queries, frame_ids=None, return_attention: bool = False):
        """queries [M, query_dim] -> (tokens [M, D], attention or None); query m reads frame
        frame_ids[m] of kv (without frame_ids: frame m, no K/V copied)."""
        return self.model.encoder.query(queries, kv, frame_ids, return_attention)

    def first_query(self, batch: int) -> torch.Tensor:
        """[batch, query_dim]: where frame 0 is looked at before the LLM has seen anything (q_init)."""
        return self.model.q_init.expand(batch, -1)

    def run_mode(self, mode: str) -> str:
        return mode

    def require_queries(self, what: str):
        """Nothing to refuse: the foveated model has queries."""

    def mode_text(self, mode: str) -> str:
        return f"{mode} mode"

    def flops(self, frame_size: int) -> tuple[float, float, float]:
        """Forward FLOPs (flops.py) of one frame's encode, one token's look (a query through the blocks,
        into and out of the backbone's width) and one LLM state into a query."""
        model = self.model
        encode, through_blocks = model.encoder.dino.flops(frame_size, frame_size)
        enc = model.encoder
        look = through_blocks + 2 * (enc.query_input_proj.weight.numel() + enc.output_proj.weight.numel())
        return encode, look, 2.0 * model.llm_to_query.weight.numel()


class PooledTokens:
    queries = False

    def __init__(self, model, side: int):
        self.model, self.side = model, side
        self.per_frame = side * side

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The final patch tokens average-pooled to an s x s grid: [N, s * s, D] (row-major)."""
        dino, s = self.model.encoder.dino, self.side
        gh, gw = dino.grid(*pixels.shape[-2:])
        if s > min(gh, gw):
            raise ValueError(f"tokens_per_frame {s * s} pools to {s} x {s}, but frames of {tuple(pixels.shape[-2:])} px "
                             f"have a {gh} x {gw} patch grid")
        x = dino.features(pixels)[:, dino.num_prefix:]  # [N, gh * gw, D]: the patches, row-major
        x = x.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        # area pooling: each token is the mean of the patches of its cell (exact when s divides the grid)
        return F.adaptive_avg_pool2d(x, s).flatten(2).transpose(1, 2)

    @staticmethod
    def join(parts: list) -> torch.Tensor:
        return torch.cat(parts)

    def check_kv(self, kv, frames: int):
        if not torch.is_tensor(kv) or kv.shape[:2] != (frames, self.per_frame):
            raise ValueError(f"kv must be encode_frames(frames): [{frames}, {self.per_frame}, D] pooled tokens")

    def glance(self, kv, return_attention: bool = False):
        """The pooled tokens themselves: [N, s * s, D], no attention."""
        return kv, None

    def read(self, kv, queries, frame_ids=None, return_attention: bool = False):
        self.require_queries("a query")

    def first_query(self, batch: int):
        return None

    def run_mode(self, mode: str) -> str:
        return "coarse_only"  # no queries: every mode is the one pass over the pooled tokens

    def require_queries(self, what: str):
        raise ValueError(f"{what} needs the foveated model's queries; this is the pooled baseline (tokens_per_frame "
                         f"{self.per_frame}): each frame is read as {self.per_frame} pooled patch tokens and nothing "
                         f"chooses where to look (coarse_only is its one mode)")

    def mode_text(self, mode: str) -> str:
        return f"{self.per_frame} pooled tokens per frame (no queries), one mode"

    def flops(self, frame_size: int) -> tuple[float, float, float]:
        """Every block in full per frame (features), then no queries."""
        return self.model.encoder.dino.features_flops(frame_size, frame_size), 0.0, 0.0
