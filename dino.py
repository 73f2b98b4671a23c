"""DINOv2 and DINOv3 (ViT) as vision backbones: their token embeddings, and their weights loaded by name
from transformers' state dicts.

DINOv2: CLS + learned absolute position embeddings (resampled bicubically for other grids, as
transformers does); no registers. Weight names of transformers 4 and 5 are both read.
DINOv3 ViT: CLS + register tokens, no absolute position embeddings; 2-D RoPE on the patch queries
and keys only (CLS and registers are not rotated). Patch coordinates are the centres of the grid
cells in [-1, 1]; transformers jitters/rescales them in training mode (an augmentation), we never
do: the encoder always uses the eval-mode coordinates. A foveal query is treated like CLS (no
RoPE) and attends, like CLS, to CLS, the registers and the patches. No key bias (configurable, as
in transformers); LayerNorm eps from the config. Weight names of transformers 5 (`model.layer.N`)
and of the hub files (`layer.N`) are both read.
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from vit import Block, ViTBackbone


class Dinov2Backbone(ViTBackbone):
    model_type = "dinov2"

    def __init__(self, cfg):
        if cfg.num_channels != 3:
            raise ValueError(f"dinov2 config has num_channels={cfg.num_channels}; frames are RGB")
        d = cfg.hidden_size
        super().__init__(dim=d, num_heads=cfg.num_attention_heads, patch_size=cfg.patch_size, num_prefix=1)
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        hidden = int(d * cfg.mlp_ratio)
        if cfg.use_swiglu_ffn:  # DINOv2-giant: fused [gate; up] then down, as in the original release
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.blocks = nn.ModuleList(
            Block(d, hidden, eps=cfg.layer_norm_eps, act="silu" if cfg.use_swiglu_ffn else cfg.hidden_act,
                  gated=cfg.use_swiglu_ffn, layerscale=cfg.layerscale_value, bias=(cfg.qkv_bias,) * 3)
            for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def embed(self, pixels):
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding(gh, gw).to(x.dtype), None

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

    @staticmethod
    def state_from_hf(state: dict) -> dict:
        """A transformers Dinov2 state dict (v4 or v5 names, no prefix) -> our names."""
        return rename_state(state, _DINOV2_RENAMES, _DINOV2_FUSED, r"embeddings\.mask_token")


class Dinov3Backbone(ViTBackbone):
    model_type = "dinov3_vit"

    def __init__(self, cfg):
        patch = cfg.patch_size
        if not isinstance(patch, int):
            if len(set(patch)) != 1:
                raise ValueError(f"dinov3_vit config has non-square patches {patch}")
            patch = patch[0]
        if cfg.num_channels != 3:
            raise ValueError(f"dinov3_vit config has num_channels={cfg.num_channels}; frames are RGB")
        d, n_heads = cfg.hidden_size, cfg.num_attention_heads
        if (d // n_heads) % 4:
            raise ValueError(f"dinov3_vit: 2-D RoPE needs a head dim divisible by 4, got {d // n_heads}")
        super().__init__(dim=d, num_heads=n_heads, patch_size=patch, num_prefix=1 + cfg.num_register_tokens)
        self.patch_embed = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.intermediate_size, eps=cfg.layer_norm_eps, act=cfg.hidden_act, gated=cfg.use_gated_mlp,
                  layerscale=cfg.layerscale_value, bias=(cfg.query_bias, cfg.key_bias, cfg.value_bias),
                  proj_bias=cfg.proj_bias, mlp_bias=cfg.mlp_bias)
            for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        # head_dim / 4 frequencies per axis: each of y and x rotates a quarter of the pairs
        freqs = 1 / cfg.rope_theta ** torch.arange(0, 1, 4 / (d // n_heads), dtype=torch.float32)
        self.register_buffer("rope_freqs", freqs, persistent=False)

    def embed(self, pixels):
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        n = x.shape[0]
        prefix = [self.cls_token.expand(n, -1, -1), self.register_tokens.expand(n, -1, -1)]
        return torch.cat([p.to(x.dtype) for p in prefix] + [x], dim=1), self.rope(gh, gw)

    def rope(self, gh: int, gw: int):
        """(cos, sin) [gh * gw, head_dim] float32: patch centres in [-1, 1] (row-major, y then x)
        times 2 pi times each frequency; the y and x angles fill the first and second quarter of
        the head dims and repeat in the second half (rotate-half pairing)."""
        device = self.rope_freqs.device
        ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh * 2 - 1
        xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [P, 2]
        angles = (2 * math.pi * coords[:, :, None] * self.rope_freqs).flatten(1)  # [P, head_dim / 2]
        angles = angles.repeat(1, 2)
        return angles.cos(), angles.sin()

    @staticmethod
    def state_from_hf(state: dict) -> dict:
        """A transformers DINOv3ViT state dict (transformers-5 `model.layer.N` or hub `layer.N` names,
        no prefix) -> our names. The key bias DINOv3 does not have is stored as zeros (and masked)."""
        gated = any(".mlp.gate_proj." in k for k in state)
        state = dict(state)
        for key in [k for k in state if k.endswith(".attention.q_proj.weight")]:
            biases = [key[: -len("q_proj.weight")] + f"{p}_proj.bias" for p in "qkv"]
            present = [state[b] for b in biases if b in state]
            for b in biases if present else []:  # the projections without a bias: zeros in the fused bias
                state.setdefault(b, torch.zeros_like(present[0]))
        return rename_state(state, _DINOV3_RENAMES + ([] if gated else _DINOV3_PLAIN_UP),
                            _DINOV3_FUSED + (_DINOV3_GATED_UP if gated else []), r"embeddings\.mask_token")


def rename_state(state: dict, renames, fused, unused: str) -> dict:
    """Map transformers' names to ours: `renames` are (pattern, target); `fused` are (pattern, target,
    part index, number of parts), concatenated once all parts are present (a missing part leaves the
    fused key missing, so a strict load reports it); keys matching `unused` are dropped; keys already
    in our naming pass through."""
    out, parts = {}, {}
    for key, value in state.items():
        if re.fullmatch(unused, key):
            continue
        for pattern, target, index, count in fused:
            m = re.fullmatch(pattern, key)
            if m:
                parts.setdefault(m.expand(target), [None] * count)[index] = value
                break
        else:
            for pattern, target in renames:
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


def _block_names(layer: str, out_proj: str, qkv: tuple) -> tuple[list, list]:
    """(renames, fused parts) of the block weights both DINO generations name alike: `layer` matches
    the block prefix (its index captured), `out_proj` the attention output, `qkv` the q / k / v."""
    renames = [(layer + r"norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
               (layer + rf"attention\.(?:{out_proj})\.(weight|bias)", r"blocks.\1.proj.\2"),
               (layer + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2")]
    fused = [(layer + rf"attention\.(?:{name})\.(weight|bias)", r"blocks.\1.qkv.\2", i, 3) for i, name in enumerate(qkv)]
    return renames, fused


def _gated(layer: str) -> list:
    """A gated MLP's gate and up projections, stored fused as fc1 = [gate; up]."""
    return [(layer + r"mlp\.gate_proj\.(weight|bias)", r"blocks.\1.fc1.\2", 0, 2),
            (layer + r"mlp\.up_proj\.(weight|bias)", r"blocks.\1.fc1.\2", 1, 2)]


# DINOv2: transformers-4 and transformers-5 spellings both listed
_L2 = r"encoder\.layer\.(\d+)\."
_V2_BLOCK, _V2_QKV = _block_names(_L2, r"output\.dense|o_proj",
                                  (r"attention\.query|q_proj", r"attention\.key|k_proj", r"attention\.value|v_proj"))
_DINOV2_RENAMES = _V2_BLOCK + [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (_L2 + r"mlp\.fc([12])\.(weight|bias)", r"blocks.\1.fc\2.\3"),
    (_L2 + r"mlp\.weights_in\.(weight|bias)", r"blocks.\1.fc1.\2"),
    (_L2 + r"mlp\.(?:weights_out|down_proj)\.(weight|bias)", r"blocks.\1.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_DINOV2_FUSED = _V2_QKV + _gated(_L2)

# DINOv3 ViT: the hub files' `layer.N.` and transformers-5's `model.layer.N.`
_L3 = r"(?:model\.)?layer\.(\d+)\."
_V3_BLOCK, _DINOV3_FUSED = _block_names(_L3, "o_proj", ("q_proj", "k_proj", "v_proj"))
_DINOV3_RENAMES = _V3_BLOCK + [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"patch_embed.\1"),
    (_L3 + r"mlp\.down_proj\.(weight|bias)", r"blocks.\1.fc2.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
_DINOV3_PLAIN_UP = [(_L3 + r"mlp\.up_proj\.(weight|bias)", r"blocks.\1.fc1.\2")]
_DINOV3_GATED_UP = _gated(_L3)
