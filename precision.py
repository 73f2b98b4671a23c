"""The one mixed-precision rule: bf16 autocast over fp32 master weights on CUDA (config `precision: bf16`,
generation, evaluation, streaming); a CPU computes in fp32."""

import torch


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast over fp32 weights on CUDA; a no-op on CPU, which computes in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")
