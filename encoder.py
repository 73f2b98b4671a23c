"""The foveal encoder: any vision backbone (vit.py) plus the learned query path around it.

Phase 1 (`encode`) runs the frames' patch tokens through the backbone once and keeps each block's
K/V (of the last block only its K/V are computed: nothing reads its outputs). Phase 2 (`query`) projects query vectors into the backbone's width, pushes them
through every block against that cache and projects the result: one token per query, so one patch
pass serves any number of queries (the static glance, the LLM-chosen foveal queries, every forward
mode and every prompt). The backbone is chosen by its transformers config's `model_type`
(`BACKBONES`); adding one is a ViTBackbone subclass and an entry here.
"""

import torch
from torch import nn

from dino import Dinov2Backbone, Dinov3Backbone
from vit import ViTBackbone

BACKBONES: dict[str, type[ViTBackbone]] = {cls.model_type: cls for cls in (Dinov2Backbone, Dinov3Backbone)}


def backbone_class(config) -> type[ViTBackbone]:
    """The ViTBackbone subclass for a transformers config (by its model_type)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        raise ValueError(f"vision backbone model_type {model_type!r} is not supported; supported: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


class FoveatedEncoder(nn.Module):
    """backbone + deep query: `encode(pixels)` -> per-block K/V; `query(q, kv)` -> one token per query."""

    def __init__(self, backbone_config, query_dim: int = 384, queries: bool = True):
        """queries=False: the backbone alone (the pooled multi-token baseline reads no queries)."""
        super().__init__()
        self.dino = backbone_class(backbone_config).from_config(backbone_config)  # any ViTBackbone
        d = self.dino.dim
        if queries:
            # No bias: a bias would dominate small queries and make attention query-independent.
            self.query_input_proj = nn.Linear(query_dim, d, bias=False)
            self.output_proj = nn.Linear(d, d)

    def encode(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pixels [N, 3, H, W] (uint8 RGB, or float normalised with the backbone's statistics) -> per
        block (K, V), each [N, heads, keys, head_dim] (keys: the backbone's prefix tokens + patches)."""
        return self.dino.encode(pixels)

    def query(self, queries: torch.Tensor, kv, frame_ids: torch.Tensor | None = None,
              return_attention: bool = False):
        """queries [M, query_dim] -> (tokens [M, dim], attention [M, blocks, heads, keys] or None).

        Query m reads frame `frame_ids[m]` of `kv`; without `frame_ids`, query m reads frame m
        (then M must equal the number of encoded frames, and no K/V is copied).
        """
        z, attn = self.dino.query(self.query_input_proj(queries), kv, frame_ids, return_attention)
        return self.output_proj(z), attn
