"""The memory a training run needs on each rank: an estimate from the model's shapes and the config
(scripts/plan_memory.py prints it, train.py warns with it before a run that will not fit its GPU),
and `LiveBytes`, a count of live tensor storage that measures a CPU run to check the estimate.

The estimate, per rank, for one micro-batch of `data.batch_size` samples at the config's maxima
(`data.max_text_tokens` text tokens, `data.max_frames` frames, within data.max_batch_frames /
max_batch_tokens: an upper bound):
- weights in fp32 (the optimizer's master copy), gradients in fp32 and AdamW's two fp32 states for
  the trainable ones: all whole under ddp, divided by the ranks under fsdp, which also holds the
  root unit (everything but the LLM's decoder layers) and two decoder layers unsharded in the compute
  dtype (the one computing and the one prefetched); bf16 autocast under ddp keeps a bf16 copy of the
  weights for the forward; DPO's frozen reference model is whole on every rank.
- activations: what autograd saves per token of one LLM decoder layer and per frame of the vision
  backbone, counted on an fp32 probe (halved for bf16, where autocast keeps a few tensors in fp32:
  an approximation) (`probe`: one and two decoder layers on a few tokens, the backbone
  on one frame, with and without gradient checkpointing) and scaled by the micro-batch's tokens: the
  LLM reads each sample's text plus one token per frame (the frame tokens, no K/V cache), twice in
  coarse_fine (the coarse pass, then the fine one); the logits of the loss tokens (every text token,
  at most) in the compute dtype plus their fp32 log-softmax, and their gradient in the backward.
- the peak: with one micro-batch per step the gradients fill while the activations drain, so it is
  the larger of (activations + the gradients of the head, computed first) and (all gradients + a
  second head gradient: a tied embedding's two contributions are summed);
  with grad_accum > 1 the later micro-batches run on top of the first one's whole gradients.
"""
import copy
import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30
# what a GPU loses before training: the CUDA context, allocator fragmentation (a rule of thumb)
RESERVE = 1.5 * GiB
PROBE_TOKENS = 32


@dataclass
class Shapes:
    """The model's sizes the estimate reads: parameter counts and the probe's bytes."""
    params: int  # all of them
    trainable: int
    layers: int  # LLM decoder layers (fsdp's units)
    layer_params: int  # one decoder layer's
    head_params: int  # the output head (the tied embedding): its gradient comes first
    vocab: int
    token_bytes: dict  # {checkpointing: bytes autograd keeps per token per decoder layer}
    pass_bytes: dict  # {checkpointing: bytes per token of one LLM pass outside its layers}
    frame_bytes: dict  # {checkpointing: bytes the vision backbone keeps per frame}
    compute_bytes: int  # 2 for bf16, 4 for fp32


def shapes(model, cfg, compute_dtype: torch.dtype) -> Shapes:
    """model's Shapes (a built FoveatedVLM, on any device, meta included; optim.freeze honoured from cfg)."""
    trainable = sum(p.numel() for part, named in model.parameter_groups().items() if part not in cfg.optim.freeze
                    for _, p in named)
    layer = model.llm.model.layers[0]
    scale = torch.finfo(compute_dtype).bits / 32  # the probe runs in fp32; bf16 activations take half
    tokens, passes, frames = ({k: v * scale for k, v in d.items()} for d in probe(model, cfg.data.frame_size))
    return Shapes(params=sum(p.numel() for p in model.parameters()), trainable=trainable,
                  layers=len(model.llm.model.layers), layer_params=sum(p.numel() for p in layer.parameters()),
                  head_params=model.llm.get_output_embeddings().weight.numel(), vocab=model.llm.config.vocab_size,
                  token_bytes=tokens, pass_bytes=passes, frame_bytes=frames,
                  compute_bytes=torch.finfo(compute_dtype).bits // 8)


def saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves while fn runs, leaving out those of `exclude`
    (the parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def probe(model, frame_size: int) -> tuple[dict, dict, dict]:
    """({checkpointing: bytes per token per decoder layer}, {checkpointing: bytes per token of a pass
    outside the layers}, {checkpointing: bytes per frame of the vision backbone}) counted on uninitialised CPU copies
    of one and two of model's decoder layers (4 tokens' vocabulary, PROBE_TOKENS tokens) and of its
    backbone (one frame of frame_size pixels), in fp32 (fast on any CPU)."""
    from transformers import AutoModel

    from encoder import FoveatedEncoder

    dtype = torch.float32

    tokens, passes, frames = {}, {}, {}
    for ckpt in (False, True):
        per_depth = []
        for depth in (1, 2):
            config = copy.deepcopy(model.llm.config)
            config.num_hidden_layers, config.vocab_size = depth, 4
            with torch.device("meta"):  # uninitialised weights: the sizes are all that counts
                llm = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
            llm = llm.to_empty(device="cpu").train()
            if ckpt:
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            x = torch.randn(1, PROBE_TOKENS, config.hidden_size, dtype=dtype, requires_grad=True)
            positions = torch.arange(PROBE_TOKENS)[None]
            per_depth.append(saved_bytes(functools.partial(llm, inputs_embeds=x, position_ids=positions),
                                         llm.parameters()))
        tokens[ckpt] = (per_depth[1] - per_depth[0]) / PROBE_TOKENS
        passes[ckpt] = max(per_depth[0] - tokens[ckpt] * PROBE_TOKENS, 0) / PROBE_TOKENS
        with torch.device("meta"):
            encoder = FoveatedEncoder(model.dino_config, model.config.query_dim,
                                      queries=model.config.tokens_per_frame is None).to(dtype)
        encoder = encoder.to_empty(device="cpu")
        encoder.dino.gradient_checkpointing = ckpt
        pixels = torch.randn(1, 3, frame_size, frame_size, dtype=dtype)

        queries = 2 if model.config.tokens_per_frame is None else 0  # the static and the fine query
        frames[ckpt] = saved_bytes(functools.partial(vision, encoder, pixels, queries, model.config.query_dim),
                                   encoder.parameters())
    return tokens, passes, frames


def vision(encoder, pixels, queries: int, query_dim: int):
    """The backbone's passes over frames: encode, then `queries` query passes."""
    kv = encoder.encode(pixels)
    for _ in range(queries):
        encoder.query(torch.randn(pixels.shape[0], query_dim, dtype=pixels.dtype), kv)


@dataclass
class Plan:
    """One strategy's per-rank bytes by part, for one micro-batch shape."""
    strategy: str  # "ddp" or "fsdp"
    ranks: int
    batch_size: int
    grad_accum: int
    checkpointing: bool
    parts: dict  # name -> bytes

    @property
    def total(self) -> float:
        return self.parts["peak"]


def micro_batch(cfg, batch_size: int, text_tokens: int, frames: int) -> tuple[int, int, int]:
    """(LLM passes, tokens per pass, frames encoded) of a micro-batch of samples of text_tokens text and
    frames frames: each frame one token (KV-free), coarse_fine a coarse and a fine pass, DPO both
    replies; budget batching (data.max_batch_frames / max_batch_tokens) caps the frames and tokens."""
    passes = (2 if cfg.mode == "coarse_fine" and frames else 1) * (2 if cfg.stage == "dpo" else 1)
    encoded = min(batch_size * frames, cfg.data.max_batch_frames or batch_size * frames)
    tokens = batch_size * text_tokens + encoded
    return passes, min(tokens, cfg.data.max_batch_tokens or tokens), encoded


def estimate(s: Shapes, cfg, strategy: str, ranks: int, batch_size: int, grad_accum: int, checkpointing: bool,
             text_tokens: int | None = None, frames: int | None = None, targets: int | None = None,
             amp: bool | None = None) -> Plan:
    """The per-rank Plan of micro-batches of batch_size samples with text_tokens text tokens, frames
    frames and targets loss tokens each (default: the config's maxima; targets: every text token).
    amp: bf16 autocast (default: a compute dtype of 2 bytes)."""
    text_tokens = cfg.data.max_text_tokens if text_tokens is None else text_tokens
    frames = cfg.data.max_frames if frames is None else frames
    targets = text_tokens if targets is None else targets
    amp = s.compute_bytes == 2 if amp is None else amp
    shard = ranks if strategy == "fsdp" else 1
    parts = {"weights": 4 * s.params / shard, "gradients": 4 * s.trainable / shard,
             "optimizer": 8 * s.trainable / shard}
    if strategy == "fsdp":  # the root unit and two layers whole, in the compute dtype
        root = s.params - s.layers * s.layer_params
        parts["gathered"] = s.compute_bytes * (root + 2 * s.layer_params)
    elif amp:
        parts["gathered"] = 2 * s.params  # autocast's bf16 weight copies
    if cfg.stage == "dpo" and cfg.dpo.reference == "model":
        parts["reference"] = s.params * (2 if amp else 4)
    passes, tokens, encoded = micro_batch(cfg, batch_size, text_tokens, frames)
    sequences = 2 if cfg.stage == "dpo" else 1
    llm = passes * tokens * (s.layers * s.token_bytes[checkpointing] + s.pass_bytes[checkpointing])
    if checkpointing:  # the layer being recomputed in the backward
        llm += tokens * s.token_bytes[False]
    logits = sequences * batch_size * targets * s.vocab * (s.compute_bytes + 4 + (4 if amp else 0))
    parts["activations"] = llm + logits + encoded * s.frame_bytes[checkpointing]
    parts["frame_tokens_per_sample"] = frames * (2 if cfg.mode == "coarse_fine" else 1)
    parts["logits_grad"] = 2 * 4 * sequences * batch_size * targets * s.vocab
    fixed = parts["weights"] + parts["optimizer"] + parts.get("gathered", 0) + parts.get("reference", 0)
    head_grad = 4 * s.head_params / shard
    if grad_accum > 1:
        moving = parts["gradients"] + parts["activations"] + parts["logits_grad"]
    else:
        # the tied head's gradient arrives twice (the head's, then the embedding's, summed into it)
        moving = max(parts["activations"] + parts["logits_grad"] + head_grad, parts["gradients"] + head_grad)
    parts["peak"] = fixed + moving
    return Plan(strategy, ranks, batch_size, grad_accum, checkpointing, parts)


def fits(plan: Plan, gpu_bytes: float) -> bool:
    return plan.total + RESERVE <= gpu_bytes


def options(s: Shapes, cfg, gpu_bytes: float, ranks: list[int], effective: int) -> list[Plan]:
    """For each strategy (ddp; fsdp from 2 ranks) and rank count, with and without checkpointing, the
    largest micro-batch (a divisor of effective / ranks) that fits, with the grad_accum that keeps the
    effective batch: the settings that fit, best first (fewest ranks, no checkpointing, largest batch)."""
    out = []
    for n in ranks:
        if effective % n:
            continue
        per_rank = effective // n
        for strategy in ("ddp", "fsdp") if n > 1 else ("ddp",):
            for ckpt in (False, True):
                for b in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
                    plan = estimate(s, cfg, strategy, n, b, per_rank // b, ckpt)
                    if fits(plan, gpu_bytes):
                        out.append(plan)
                        break
    return sorted(out, key=lambda p: (p.ranks, p.checkpointing, -p.batch_size, p.strategy))


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created while active and still alive, and their peak:
    an allocator's view of a CPU run. Storages made before (the model's weights) are counted by `add`."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def add(self, tensors):
        for t in tensors:
            self._track(t.untyped_storage())

    def _track(self, storage):
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        n = storage.nbytes()
        self.live.add(key)
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key, n):
        if key in self.live:
            self.live.discard(key)
            self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out


def fits_message(plan: Plan, gpu_bytes: float) -> str:
    return (f"{plan.strategy} on {plan.ranks} rank(s), micro-batch {plan.batch_size}, checkpointing "
            f"{'on' if plan.checkpointing else 'off'}: {gib(plan.total)} per rank + {gib(RESERVE)} reserve "
            f"against {gib(gpu_bytes)}")

