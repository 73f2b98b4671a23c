"""Data-parallel plumbing for torchrun: rank, world size and device from the environment, and the few
collectives training needs.

The model is not wrapped in DistributedDataParallel. Instead gradients are summed across ranks once
per optimizer step (`all_reduce_grads`), after every rank has reported how its micro-batches went
(`agree`). So a step skipped on one rank (CUDA OOM, no data left) is skipped on all of them without
a hang; text-only batches, which leave the encoder without gradients, need no
find_unused_parameters; and DPO's policy/reference step is synchronised like every other stage. The
price is that the all-reduce does not overlap the backward pass: one bucketed all-reduce of the
gradients per optimizer step, not per micro-batch.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_BYTES = 128 * 2**20


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group: NCCL with
    one GPU per process (cuda:LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                **({"device_id": dev} if use_cuda else {}))
    return Dist(rank, world, dev)


def teardown(d: Dist):
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def agree(d: Dist, values: list[float], ops: list[str]) -> list[float]:
    """Combine a few host-side numbers across ranks ('min', 'max' or 'sum' each): one small
    collective."""
    if not d.active:
        return list(values)
    out = []
    for op_name in ("min", "max", "sum"):
        idx = [i for i, op in enumerate(ops) if op == op_name]
        if not idx:
            continue
        t = torch.tensor([float(values[i]) for i in idx], dtype=torch.float64, device=_comm_device(d))
        dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op_name])
        out += list(zip(idx, t.tolist()))
    return [v for _, v in sorted(out)]


def all_reduce_sum_(d: Dist, tensors: list[torch.Tensor]):
    """Sum tensors across ranks in place (device tensors; one flat buffer per dtype)."""
    if not d.active or not tensors:
        return
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        for bucket in _buckets(group):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def all_reduce_grads(d: Dist, params: list[torch.nn.Parameter]):
    """Sum every trainable parameter's gradient across ranks. A parameter without a gradient on this
    rank (e.g. the encoder after a text-only batch) contributes zeros, so every rank steps the same
    parameters with the same gradients."""
    if not d.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum_(d, [p.grad for p in params])


def _buckets(tensors):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def broadcast_model(d: Dist, model: torch.nn.Module):
    """Rank 0's parameters and buffers everywhere (identical starting points whatever each rank
    loaded or initialised)."""
    if not d.active:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def all_gather_object(d: Dist, obj) -> list:
    if not d.active:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist):
    if d.active:
        dist.barrier()


def _comm_device(d: Dist) -> torch.device:
    return d.device if d.device.type == "cuda" else torch.device("cpu")
