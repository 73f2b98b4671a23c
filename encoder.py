"""Deep-query DINOv2 encoder: encode frames once, then squeeze each frame into one token per query.

Phase 1 (`encode`) runs the DINOv2 patch tokens through every block and keeps each block's
attention K/V. Phase 2 (`query`) pushes a query token through every block: it attends to that
block's cached patch K/V only (patches never see the query), so one patch pass serves any number of
queries. The block math is owned here; weights are loaded by name from transformers' Dinov2 state
dicts in either the transformers-4 or the transformers-5 naming (`dino_state_from_hf`).
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Dinov2Config
from transformers.activations import ACT2FN


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoBlock(nn.Module):
    """Weights of one pre-norm ViT block. q, k and v are one fused matrix (one GEMM for patches)."""

    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.ls1 = nn.Parameter(torch.full((d,), float(cfg.layerscale_value)))
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        hidden = int(d * cfg.mlp_ratio)
        if cfg.use_swiglu_ffn:  # DINOv2-giant: fused [gate; up] then down, as in the original release
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
            self.fc1 = nn.Linear(d, 2 * hidden)
            self.act = None
        else:
            self.fc1 = nn.Linear(d, hidden)
            self.act = ACT2FN[cfg.hidden_act]
        self.fc2 = nn.Linear(hidden, d)
        self.ls2 = nn.Parameter(torch.full((d,), float(cfg.layerscale_value)))

    def ffn(self, x):
        h = self.fc1(x)
        if self.act is None:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(self.act(h))


class DinoBackbone(nn.Module):
    """Parameters of a DINOv2 ViT (no registers), in our own flat naming."""

    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        if cfg.model_type != "dinov2":
            raise ValueError(f"dino config has model_type {cfg.model_type!r}; only 'dinov2' is supported")
        d = cfg.hidden_size
        grid = cfg.image_size // cfg.patch_size
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.blocks = nn.ModuleList(DinoBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid, resampled like transformers' Dinov2 does."""
        n = self.pos_embed.shape[1] - 1
        side = math.isqrt(n)
        if h * w == n and h == w:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid_pos.shape[-1]
        grid_pos = grid_pos.reshape(1, side, side, d).permute(0, 3, 1, 2)
        # bicubic in float32 (half precision shifts the embeddings), to the exact target size
        grid_pos = F.interpolate(grid_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, d)
        return torch.cat([cls_pos, grid_pos], dim=1)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[N, S, D] -> [N, H, S, D/H]."""
    n, s, d = x.shape
    return x.view(n, s, n_heads, d // n_heads).transpose(1, 2)


class FoveatedEncoder(nn.Module):
    """DINOv2 + deep query: `encode(pixels)` -> per-block K/V; `query(q, kv)` -> one token per query."""

    def __init__(self, dino_config: Dinov2Config, query_dim: int = 384):
        super().__init__()
        self.dino = DinoBackbone(dino_config)
        d = dino_config.hidden_size
        self.dim = d
        self.num_heads = dino_config.num_attention_heads
        # No bias: a bias would dominate small queries and make attention query-independent.
        self.query_input_proj = nn.Linear(query_dim, d, bias=False)
        self.output_proj = nn.Linear(d, d)
        self.gradient_checkpointing = False  # recompute patch blocks in backward (training memory)
        # uint8 -> ImageNet-normalised, on the frames' device (buffers: no per-call host copies)
        self.register_buffer("pixel_mean", 255 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", 255 * torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def encode(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pixels [N, 3, H, W] (uint8 RGB, or float ImageNet-normalised) -> per block (K, V), each
        [N, heads, 1+patches, head_dim].

        The last block only needs its K/V: its patch attention, patch MLP and the final patch norm
        are never read by the query, so they are not computed.
        """
        if pixels.dim() != 4:
            raise ValueError(f"encode expects pixels [N, 3, H, W], got shape {tuple(pixels.shape)}")
        dino, d = self.dino, self.dim
        if pixels.dtype == torch.uint8:  # frames travel as uint8 until here (a quarter of the bytes)
            pixels = (pixels.float() - self.pixel_mean.float()) / self.pixel_std.float()
        x = dino.patch_embed(pixels.to(dino.patch_embed.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([dino.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + dino.position_embedding(gh, gw).to(x.dtype)
        kv = []
        last = len(dino.blocks) - 1
        for i, blk in enumerate(dino.blocks):
            if i == last:
                k, v = F.linear(blk.norm1(x), blk.qkv.weight[d:], _slice(blk.qkv.bias, d, None)).chunk(2, dim=-1)
                kv.append((_heads(k, self.num_heads), _heads(v, self.num_heads)))
                break
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # keep only each block's input (and its K/V, which the query reads anyway)
                x, k, v = checkpoint(self._patch_block, blk, x, use_reentrant=False)
            else:
                x, k, v = self._patch_block(blk, x)
            kv.append((k, v))
        return kv

    def _patch_block(self, blk, x):
        q, k, v = (_heads(t, self.num_heads) for t in blk.qkv(blk.norm1(x)).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + blk.proj(a) * blk.ls1
        return x + blk.ffn(blk.norm2(x)) * blk.ls2, k, v

    def query(self, queries: torch.Tensor, kv, frame_ids: torch.Tensor | None = None,
              return_attention: bool = False):
        """queries [M, query_dim] -> (tokens [M, dim], attention [M, blocks, heads, 1+patches] or None).

        Query m reads frame `frame_ids[m]` of `kv`; without `frame_ids`, query m reads frame m
        (then M must equal the number of encoded frames, and no K/V is copied).
        """
        dino, d = self.dino, self.dim
        x = self.query_input_proj(queries).unsqueeze(1)  # [M, 1, D]
        attn = []
        for i, blk in enumerate(dino.blocks):
            k, v = kv[i]
            if frame_ids is not None:
                k, v = k.index_select(0, frame_ids), v.index_select(0, frame_ids)
            q = _heads(F.linear(blk.norm1(x), blk.qkv.weight[:d], _slice(blk.qkv.bias, 0, d)), self.num_heads)
            if return_attention:
                w = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
                attn.append(w[:, :, 0])
                a = w.to(v.dtype) @ v
            else:
                a = F.scaled_dot_product_attention(q, k, v)
            x = x + blk.proj(a.transpose(1, 2).reshape(x.shape)) * blk.ls1
            x = x + blk.ffn(blk.norm2(x)) * blk.ls2
        z = self.output_proj(dino.norm(x)).squeeze(1)
        return z, (torch.stack(attn, dim=1) if return_attention else None)


def _slice(bias, start, stop):
    return None if bias is None else bias[start:stop]


# --- weight loading from transformers' Dinov2 naming ------------------------------------------------

_RENAMES = [  # (transformers pattern, our name); transformers-4 and transformers-5 spellings both listed
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.fc\2.\3"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)", r"blocks.\1.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.(weight|bias)", r"blocks.\1.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
# Parts that we store fused: (transformers pattern, our name, part index, number of parts).
_FUSED = [
    (r"encoder\.layer\.(\d+)\.attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"blocks.\1.qkv.\2", 0, 3),
    (r"encoder\.layer\.(\d+)\.attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"blocks.\1.qkv.\2", 1, 3),
    (r"encoder\.layer\.(\d+)\.attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"blocks.\1.qkv.\2", 2, 3),
    (r"encoder\.layer\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blocks.\1.fc1.\2", 0, 2),
    (r"encoder\.layer\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blocks.\1.fc1.\2", 1, 2),
]
_UNUSED = re.compile(r"embeddings\.mask_token")  # only used by DINOv2's masked pre-training


def is_hf_dino_key(key: str) -> bool:
    """True if `key` (relative to the DINO backbone) is in transformers' Dinov2 naming."""
    return bool(_UNUSED.fullmatch(key)) or any(re.fullmatch(p, key) for p, *_ in _RENAMES + _FUSED)


def dino_state_from_hf(state: dict) -> dict:
    """Map a transformers Dinov2 state dict (v4 or v5 names, no prefix) to DinoBackbone names.

    Keys already in our naming pass through; fused parts (q/k/v, SwiGLU gate/up) are concatenated
    once all their parts are present (a missing part leaves the fused key missing, so a strict
    load reports it).
    """
    out, parts = {}, {}
    for key, value in state.items():
        if _UNUSED.fullmatch(key):
            continue
        for pattern, target, index, count in _FUSED:
            m = re.fullmatch(pattern, key)
            if m:
                parts.setdefault(m.expand(target), [None] * count)[index] = value
                break
        else:
            for pattern, target in _RENAMES:
                m = re.fullmatch(pattern, key)
                if m:
                    out[m.expand(target)] = value
                    break
            else:
                out[key] = value
    for key, pieces in parts.items():
        if all(p is not None for p in pieces):
            out[key] = torch.cat(pieces, dim=0)
    return out
