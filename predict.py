"""The next-frame prediction head of the proof-of-concept experiment: an LLM hidden state -> the target
(VAE latent or downsampled pixels) of the next frame, [C, H, W].

A linear map turns the state into a small feature map (H and W halved until at most 4, or odd); each
upsampling block (nearest x2, 3x3 conv, group norm) is FiLM-conditioned on the same state (a per-channel
scale and shift computed from it), so the state steers every resolution, not only the start; a last 3x3
conv gives the C channels. At width 256 on SmolLM2-135M's 576-wide states and 4 x 32 x 32 VAE latents it
has ~5M parameters (the guide's size).
"""

import torch
import torch.nn.functional as F
from torch import nn


class FiLMBlock(nn.Module):
    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(min(32, width), width, affine=False)
        self.film = nn.Linear(cond_dim, 2 * width)

    def forward(self, x, cond):
        x = self.norm(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")))
        scale, shift = self.film(cond)[..., None, None].chunk(2, dim=1)
        return F.silu(x * (1 + scale) + shift)


class NextFrameHead(nn.Module):
    def __init__(self, cond_dim: int, shape, width: int = 256):
        super().__init__()
        c, h, w = (int(x) for x in shape)
        self.shape, self.width = (c, h, w), width
        ups = 0
        while h % 2 == 0 and w % 2 == 0 and max(h, w) > 4:  # start small: the blocks add the detail
            h, w, ups = h // 2, w // 2, ups + 1
        self.start = (h, w)
        self.inp = nn.Linear(cond_dim, width * h * w)
        self.blocks = nn.ModuleList(FiLMBlock(width, cond_dim) for _ in range(ups))
        self.out = nn.Conv2d(width, c, 3, padding=1)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """state [..., cond_dim] -> prediction [..., C, H, W]."""
        lead = state.shape[:-1]
        cond = state.reshape(-1, state.shape[-1])
        x = F.silu(self.inp(cond).view(-1, self.width, *self.start))
        for block in self.blocks:
            x = block(x, cond)
        return self.out(x).view(*lead, *self.shape)

    def flops(self) -> float:
        """Forward matmul FLOPs of one prediction (2 per multiply-add)."""
        h, w = self.start
        total = 2 * self.inp.weight.numel()
        for block in self.blocks:
            h, w = 2 * h, 2 * w
            total += 2 * block.conv.weight.numel() * h * w + 2 * block.film.weight.numel()
        return float(total + 2 * self.out.weight.numel() * h * w)
