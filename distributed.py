"""Data parallelism for torchrun: rank, world size and device from the environment, the few
collectives training needs, and the two ways ranks share the model (config key `distributed`).

ddp (the default): every rank holds the whole model. It is not wrapped in DistributedDataParallel.
Instead gradients are summed across ranks once per optimizer step (`all_reduce_grads`), after every
rank has reported how its micro-batches went (`agree`). So a step skipped on one rank (CUDA OOM, no
data left) is skipped on all of them without a hang; text-only batches, which leave the encoder
without gradients, need no find_unused_parameters; and DPO's policy/reference step is synchronised
like every other stage. The price is that the all-reduce does not overlap the backward pass: one
bucketed all-reduce of the gradients per optimizer step, not per micro-batch (docs/scale.md: why,
and scripts/bench_dist.py measures what overlap would gain).

fsdp: PyTorch's FSDP2 (`fully_shard`) shards parameters, gradients and optimizer states. Each LLM
decoder layer is a unit; the root (`Sharded`, one forward per micro-batch) holds everything else:
embeddings and head, the vision backbone and the connector (the backbone is small and is called a
data-dependent number of times, see `Sharded`). FSDP's collectives run inside forward and backward,
so every rank must call the units the same number of times in the same order: `Sharded` evens out
the LLM passes of a micro-batch that has frames on some ranks and none on others, autoregressive
training (one LLM pass per frame) is refused, and validation runs on fully gathered weights
(`gathered`), where forwards issue no collectives.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from config import ConfigError

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


# ---- fsdp ------------------------------------------------------------------------------------------

def check_fsdp(cfg, d: Dist):
    """distributed: fsdp's preconditions, before anything heavy loads: ConfigErrors naming the key
    and the alternative."""
    if cfg.distributed != "fsdp":
        return
    if not d.active:
        how = "torchrun with a world size of 1" if "TORCHELASTIC_RUN_ID" in os.environ else "no torchrun"
        raise ConfigError(f"distributed: fsdp shards the model across torchrun processes, but this run is one "
                          f"process ({how}), where sharding saves nothing: use distributed: ddp (the default), "
                          f"or launch 2 or more processes with torchrun (docs/scale.md)")
    if cfg.mode == "autoregressive":
        raise ConfigError("mode: autoregressive runs the LLM once per frame, so ranks whose batches hold different "
                          "numbers of frames would call the sharded layers a different number of times (FSDP's "
                          "collectives would deadlock); train in coarse_fine (the published mode) or coarse_only, "
                          "or use distributed: ddp")


class Sharded(nn.Module):
    """The FSDP root: the model plus the training loss. One forward per micro-batch computes
    loss_fn(model, batch, units, mode), so every sharded call of a step happens inside it.

    FSDP all-gathers a layer at each call and reduce-scatters its gradient at each call's backward,
    so all ranks must make the same calls in the same order. In coarse_only / coarse_fine the number
    of LLM passes depends only on whether a micro-batch has frames (a text-only one skips the coarse
    pass). For a micro-batch with frames on some ranks and none on others (`uneven`), the ranks
    agree before each LLM pass that one is coming, and a rank whose own passes are done answers
    "done" and runs an idle pass (one zero token) for every pass the others still make. The idle
    passes are chained to the loss with weight 0: no effect on any value or gradient, and since they
    depend on the loss, the backward pass reaches them first, in the order the others' extra real
    passes come. The vision backbone is in the root's unit: it is called zero, one or many times per
    micro-batch without a collective.
    """

    def __init__(self, model, loss_fn, d: Dist):
        super().__init__()
        self.model, self.loss_fn, self.dist = model, loss_fn, d
        self.uneven = self.idle = False
        model.llm.model.register_forward_pre_hook(self._pass_coming)

    def _pass_coming(self, module, args):
        if self.uneven and not self.idle:
            agree(self.dist, [1.0], ["max"])

    def forward(self, batch=None, units=(), mode="coarse_fine", uneven: bool = False):
        """The objectives' [(summed loss, metrics)] on a device batch; without one, nothing (a call that
        only establishes the root, see `shard`)."""
        if batch is None:
            return None
        self.uneven = uneven
        try:
            terms = self.loss_fn(self.model, batch, units, mode)
            while uneven and agree(self.dist, [0.0], ["max"])[0] > 0:  # another rank makes one more pass
                terms = self._idle_pass(terms)
        finally:
            self.uneven = False
        return terms

    def _idle_pass(self, terms):
        (loss, metrics), rest = terms[0], terms[1:]
        llm = self.model.llm.model
        embeds = (loss * 0).reshape(1, 1, 1).expand(1, 1, llm.config.hidden_size)
        positions = torch.zeros(1, 1, dtype=torch.long, device=embeds.device)
        self.idle = True
        try:
            h = llm(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        finally:
            self.idle = False
        return [(loss + 0 * h.float().sum(), metrics), *rest]


def shard(model, loss_fn, d: Dist, bf16: bool, compile: bool = False) -> Sharded:
    """FSDP2 over d's ranks: each LLM decoder layer a unit (compiled first with compile), then the root
    (`Sharded`). bf16: parameters all-gathered and computed in bf16, gradients reduced in fp32 (the
    sharded fp32 weights stay the optimizer's). Gradients are summed, as ddp's: train_step divides
    them by the effective batch's normaliser. The model must be on d.device with identical weights on
    every rank (broadcast_model)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.llm.model.layers:
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    root = fully_shard(Sharded(model, loss_fn, d), mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for unit in _units(root):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        unit.set_reduce_scatter_unused_params(True)  # e.g. the encoder after a text-only micro-batch: zeros
    root()  # the first call through the root makes it FSDP's root (before any direct call of a layer)
    root.reshard()
    return root


def _units(root) -> list:
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(root: Sharded):
    """Every unit all-gathered (in one fixed order) for the duration and kept so: forwards inside
    issue no collective, so the ranks may run different numbers of them (validation over uneven
    shares of the data). The weights are resharded at the end. No backward inside."""
    units = _units(root)
    for unit in units:
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)
        # reshards, and forgets the forwards' call order, which FSDP keeps for the next backward's
        # prefetching and which differs between ranks here
        root.reset_iter_state()


def full_state_dict(root: Sharded) -> dict:
    """The model's full weights on rank 0's CPU (an empty dict elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def sharded_state(root: Sharded, optimizer) -> tuple[dict, list]:
    """({"model": ..., "optimizer": ...} this rank's shards (DTensors), the optimizer's param_groups
    (plain data)), keyed by the model's own parameter names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(root, optimizer)
    strip = lambda tree: {k.removeprefix("model."): v for k, v in tree.items()}  # noqa: E731
    groups = [dict(g, params=[n.removeprefix("model.") for n in g["params"]]) for g in optim["param_groups"]]
    return {"model": strip(model), "optimizer": strip(optim["state"])}, groups


def load_sharded_state(root: Sharded, optimizer, tensors: dict, param_groups: list):
    """Set the model and optimizer from sharded_state's form (tensors filled by a checkpoint load)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    add = lambda tree: {f"model.{k}": v for k, v in tree.items()}  # noqa: E731
    groups = [dict(g, params=[f"model.{n}" for n in g["params"]]) for g in param_groups]
    set_state_dict(root, optimizer, model_state_dict=add(tensors["model"]),
                   optim_state_dict={"state": add(tensors["optimizer"]), "param_groups": groups})
