"""The vision-backbone seam: the ViT math every backbone shares, behind the small interface that the
encoder, the model, the FLOP count and the data code talk to.

A backbone encodes frames once, keeping each block's attention K/V (`encode`), then pushes any number
of query tokens through its blocks against that cache (`query`). A query reads the K/V of its frame
(CLS, registers and patches), never itself and never another query, so one patch pass serves every
query. The last block's patch attention and MLP and the final patch norm are never read by a query,
so `encode` does not compute them; `features` runs the whole ordinary forward (for tests, and for
baselines that read the final patch tokens).

A backbone says what the rest of the project needs to know: `patch_size`, `dim`, `num_heads`,
`num_blocks`, `num_prefix` (CLS + register tokens before the patches in every K/V), its pixel
statistics (`pixel_mean` / `pixel_std`; uint8 frames are normalised here) and `flops`. A subclass
(dino.py) supplies the token embedding (`embed`: CLS, registers, position embeddings or RoPE), its
transformers `model_type`, how to build itself from a transformers config and how to rename
transformers' weights into ours.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
    """Weights of one pre-norm ViT block with layer scale. q, k and v are one fused matrix (one GEMM
    for the patches). `bias` says which of q / k / v have a bias: the slices of those without one are
    multiplied by zero, so they neither act nor receive gradient (DINOv3 has no key bias)."""

    def __init__(self, dim: int, hidden: int, *, eps: float, act: str, gated: bool, layerscale: float,
                 bias=(True, True, True), proj_bias: bool = True, mlp_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=any(bias))
        mask = torch.tensor([float(b) for b in bias]).repeat_interleave(dim)
        self.register_buffer("qkv_bias_mask", None if all(bias) or not any(bias) else mask, persistent=False)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.ls1 = nn.Parameter(torch.full((dim,), float(layerscale)))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.gated = gated  # fc1 holds [gate; up]
        self.fc1 = nn.Linear(dim, 2 * hidden if gated else hidden, bias=mlp_bias)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, dim, bias=mlp_bias)
        self.ls2 = nn.Parameter(torch.full((dim,), float(layerscale)))

    def qkv_bias(self):
        if self.qkv.bias is None or self.qkv_bias_mask is None:
            return self.qkv.bias
        return self.qkv.bias * self.qkv_bias_mask

    def project(self, x, part: slice = slice(None)):
        """x through the rows `part` of the fused q|k|v projection (all of them by default)."""
        if part == slice(None) and self.qkv_bias_mask is None:
            return self.qkv(x)
        bias = self.qkv_bias()
        return F.linear(x, self.qkv.weight[part], None if bias is None else bias[part])

    def ffn(self, x):
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(self.act(gate) * up)
        return self.fc2(self.act(h))


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[N, S, D] -> [N, H, S, D/H]."""
    n, s, d = x.shape
    return x.view(n, s, n_heads, d // n_heads).transpose(1, 2)


def apply_rope(x: torch.Tensor, rope, start: int) -> torch.Tensor:
    """Rotate the head dims of tokens start: (the patches) by their positions; the tokens before them
    (CLS, registers) keep theirs. x [N, H, L, hd]; rope = (cos, sin) [L - start, hd], float32."""
    if rope is None:
        return x
    cos, sin = rope
    prefix, patches = x[..., :start, :], x[..., start:, :]
    half = patches.shape[-1] // 2
    rotated = torch.cat([-patches[..., half:], patches[..., :half]], dim=-1)
    return torch.cat([prefix, (patches * cos + rotated * sin).to(x.dtype)], dim=-2)


class ViTBackbone(nn.Module):
    """A ViT in our own flat naming. Subclasses build themselves from a transformers config, implement
    `embed` and `state_from_hf` and set `model_type`; the block math below is shared."""

    model_type: str = ""  # the transformers config.model_type this class reads
    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(self, *, dim: int, num_heads: int, patch_size: int, num_prefix: int):
        """Subclasses then register their embedding parameters, `blocks` (a ModuleList of Block) and the
        final `norm`, in that order (the parameter order the optimizer and the published weights see)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.patch_size, self.num_prefix = dim, num_heads, patch_size, num_prefix
        self.gradient_checkpointing = False  # recompute patch blocks in backward (training memory)
        # uint8 -> normalised, on the frames' device (buffers: no per-call host copies)
        self.register_buffer("_mean", 255 * torch.tensor(self.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("_std", 255 * torch.tensor(self.pixel_std).view(3, 1, 1), persistent=False)

    # ---- what a backbone supplies ------------------------------------------------------------------

    def embed(self, pixels: torch.Tensor):
        """Normalised pixels [N, 3, H, W] -> (tokens [N, num_prefix + patches, D] entering block 0,
        rope: (cos, sin) [patches, head_dim] for the patch queries/keys, or None)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config) -> "ViTBackbone":
        """Built from its transformers config (subclasses take it as their one argument)."""
        return cls(config)

    @staticmethod
    def state_from_hf(state: dict) -> dict:
        """transformers' state dict of this architecture (no prefix) -> our names."""
        raise NotImplementedError

    # ---- what the rest of the project reads -------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """The uint8 colour that normalises to ~0 (letterbox padding)."""
        return tuple(round(255 * m) for m in self.pixel_mean)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of a frame (the patch convolution drops any remainder, as transformers does)."""
        return height // self.patch_size, width // self.patch_size

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB -> normalised float; float frames are taken as already normalised."""
        if pixels.dtype == torch.uint8:  # frames travel as uint8 until here (a quarter of the bytes)
            return (pixels.float() - self._mean.float()) / self._std.float()
        return pixels

    def encode(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pixels [N, 3, H, W] (uint8 RGB, or float normalised) -> per block (K, V), each
        [N, heads, num_prefix + patches, head_dim], keys after RoPE where the backbone has it."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode expects pixels [N, 3, H, W], got shape {tuple(pixels.shape)}")
        x, rope = self.embed(self.normalize(pixels))
        kv = []
        for blk in self.blocks[:-1]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # keep only each block's input (and its K/V, which the queries read anyway)
                x, k, v = checkpoint(self._patch_block, blk, x, rope, use_reentrant=False)
            else:
                x, k, v = self._patch_block(blk, x, rope)
            kv.append((k, v))
        last = self.blocks[-1]  # only its K/V: nothing reads its patch outputs
        k, v = (heads(t, self.num_heads) for t in last.project(last.norm1(x), slice(self.dim, None)).chunk(2, -1))
        kv.append((apply_rope(k, rope, self.num_prefix), v))
        return kv

    def _patch_block(self, blk, x, rope):
        q, k, v = (heads(t, self.num_heads) for t in blk.project(blk.norm1(x)).chunk(3, dim=-1))
        q, k = apply_rope(q, rope, self.num_prefix), apply_rope(k, rope, self.num_prefix)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + blk.proj(a) * blk.ls1
        return x + blk.ffn(blk.norm2(x)) * blk.ls2, k, v

    def query(self, x: torch.Tensor, kv, frame_ids: torch.Tensor | None = None, return_attention: bool = False):
        """Query tokens x [M, D] (already in the backbone's width) -> (their final-normed outputs [M, D],
        attention [M, blocks, heads, num_prefix + patches] or None).

        Query m reads frame `frame_ids[m]` of `kv`; without `frame_ids`, query m reads frame m (then M
        must equal the number of encoded frames, and no K/V is copied). Queries get no RoPE: like
        CLS, they have no position.
        """
        d = self.dim
        x = x.unsqueeze(1)  # [M, 1, D]
        attn = []
        for blk, (k, v) in zip(self.blocks, kv):
            if frame_ids is not None:
                k, v = k.index_select(0, frame_ids), v.index_select(0, frame_ids)
            q = heads(blk.project(blk.norm1(x), slice(0, d)), self.num_heads)
            if return_attention:
                w = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
                attn.append(w[:, :, 0])
                a = w.to(v.dtype) @ v
            else:
                a = F.scaled_dot_product_attention(q, k, v)
            x = x + blk.proj(a.transpose(1, 2).reshape(x.shape)) * blk.ls1
            x = x + blk.ffn(blk.norm2(x)) * blk.ls2
        return self.norm(x).squeeze(1), (torch.stack(attn, dim=1) if return_attention else None)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ordinary full forward: final-normed hidden states [N, num_prefix + patches, D]."""
        x, rope = self.embed(self.normalize(pixels))
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._patch_block, blk, x, rope, use_reentrant=False)[0]
            else:
                x = self._patch_block(blk, x, rope)[0]
        return self.norm(x)

    def _flop_terms(self, height: int, width: int):
        """(keys, the patch embedding's FLOPs, each block's linear FLOPs per token, one token attending
        to every key: q.k, then the weighted sum of v) of one frame at this size."""
        gh, gw = self.grid(height, width)
        keys = self.num_prefix + gh * gw
        embed = 2 * gh * gw * self.patch_size ** 2 * 3 * self.dim
        linear = [2 * sum(m.weight.numel() for m in (b.qkv, b.proj, b.fc1, b.fc2)) for b in self.blocks]
        return keys, embed, linear, 4 * keys * self.dim

    def flops(self, height: int, width: int) -> tuple[float, float]:
        """Forward matmul FLOPs (2 per multiply-add; attention counted in full) of `encode` for one
        frame, and of `query` for one query token, at this frame size."""
        keys, embed, linear, attend = self._flop_terms(height, width)
        kv_only = 2 * 2 * self.dim * self.dim  # a token through the k and v projections
        patch_pass = embed + sum(keys * (w + attend) for w in linear[:-1]) + keys * kv_only  # last block: K/V only
        query = sum(w - kv_only + attend for w in linear)  # a query needs no k, v of its own
        return float(patch_pass), float(query)

    def features_flops(self, height: int, width: int) -> float:
        """Forward matmul FLOPs of `features` (every block in full) for one frame at this size."""
        keys, embed, linear, attend = self._flop_terms(height, width)
        return float(embed + sum(keys * (w + attend) for w in linear))
