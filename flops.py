"""Forward FLOPs of a batch, for the MFU estimate: counted from the model's shapes and the batch's sizes
(host-side, no device sync), following what the forward executes in each mode and layout.

Matmul FLOPs only (2 per multiply-add; the patch convolution included), attention counted over every
(query, key) pair it computes, masked or not (the PaLM / nanoGPT convention); norms, softmaxes and
elementwise ops are not counted. Sizes are each sequence's real tokens: padding is not useful work.
tests/test_flops.py checks the count against torch's FLOP counter on real forwards.
"""

from dataclasses import dataclass


@dataclass
class Row:
    """One sequence: its real text tokens and real visual tokens."""
    text: int
    visual: int


class FlopCount:
    def __init__(self, model, frame_size: int):
        llm = model.llm
        # a frame's encode, a token's look (a query through the backbone), an LLM state into a query
        # (the pooled baseline: every block in full, then no queries: visual.py)
        self.patch_pass, self.query, self.to_query = model.visual.flops(frame_size)
        self.per_frame = model.visual.per_frame  # visual tokens per frame
        self.run_mode = model.visual.run_mode  # the mode a requested one runs as (pooled: always coarse_only)
        self.project = 2 * model.dino_to_llm.weight.numel()  # a visual token into the LLM
        c = llm.config
        self.llm_token = 2 * sum(p.numel() for p in llm.model.layers.parameters() if p.dim() == 2)
        width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        self.llm_pair = 4 * c.num_hidden_layers * width  # q.k and the weighted sum of v, per (query, key)
        self.head = 2 * llm.lm_head.weight.numel()  # logits of one target
        self.next_frame = model.next_frame.flops() if model.next_frame is not None else 0.0  # one prediction
        # prompt_first runs the whole text through the coarse pass (the text after the question as
        # padding) and, autoregressively, twice (the question's pass, then the rest's)
        self.prompt_first = model.layout == "prompt_first"

    def rows(self, attention_mask, frame_index) -> list[Row]:
        """The rows of a host batch (a text mask [B, S], frame_index [B, T]): visual tokens, not frames."""
        return [Row(t, v * self.per_frame) for t, v in zip(attention_mask.sum(1).tolist(),
                                                           (frame_index >= 0).sum(1).tolist())]

    def llm(self, tokens: int, pairs: int) -> float:
        """An LLM pass over `tokens` tokens computing `pairs` (query, key) attention pairs."""
        return tokens * self.llm_token + pairs * self.llm_pair

    def forward(self, rows: list[Row], frames: int, targets: int, mode: str, coarse_rows: list[Row] | None = None):
        """One forward of `rows` with `frames` encoded frames and `targets` logits. coarse_rows: the
        rows whose visual tokens are computed (default: rows; DPO computes them once for two replies)."""
        coarse_rows = rows if coarse_rows is None else coarse_rows
        mode = self.run_mode(mode)
        visual = sum(r.visual for r in coarse_rows)
        total = frames * self.patch_pass + targets * self.head
        if mode != "autoregressive":  # the static query: once per encoded frame, projected per token
            total += frames * self.query + visual * self.project
        if mode != "coarse_only":  # the fine queries: one per visual token, from an LLM state
            total += visual * (self.query + self.project + self.to_query)
        if mode == "coarse_fine":  # the coarse pass: the visual tokens (after the question with prompt_first)
            n = [r.visual + (r.text if self.prompt_first else 0) for r in coarse_rows]
            total += self.llm(sum(n), sum(x * x for x in n))
        for r in rows:
            t, v = r.text, r.visual
            if mode != "autoregressive":
                total += self.llm(t + v, (t + v) ** 2)
            elif self.prompt_first:  # whole text (prefix real), v one-token steps, whole text again
                total += self.llm(2 * t + v, t * t + v * t + v * (v + 1) // 2 + t * (2 * t + v))
            else:  # v one-token steps, each attending to the steps so far; then the text over everything
                total += self.llm(t + v, v * (v + 1) // 2 + t * (v + t))
        return float(total)
