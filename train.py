"""Train FoveatedVLM: alignment, SFT or DPO from a YAML stage config, on a CPU, a GPU, or under torchrun.

    python train.py --config configs/stage2_1.7B.yaml [key=value ...]
    torchrun --nproc_per_node 8 train.py --config configs/stage2_1.7B.yaml

The run directory (`run_dir`) receives config.yaml (the resolved config), train.log, metrics.csv (a
row per logged step), val.csv (a row per validation, mode and source), checkpoints/, and at the end
final/ (and best/, when there is validation data) as save_pretrained exports. Rerunning the same
command on an existing run directory resumes from its latest checkpoint (model, optimizer, step,
every rank's data position and RNG states), so the losses continue exactly as if it had not stopped.

Reading order: `train` is the loop; `setup` builds a Run (model, optimizer, objectives, data, logs);
`train_step` is one optimizer step; then logging, validation, checkpoints and `finish`.

One optimizer step (`train_step`): each rank draws grad_accum micro-batches; the ranks agree that all
had data and sum each objective's normaliser (objectives.py: target tokens, pairs, ...) over the
effective batch; the micro-batches' backward passes and the sum across ranks accumulate the weighted
summed losses, scaled so that each term is its mean over the whole effective batch; then clip and
step. A CUDA OOM anywhere or a non-finite gradient norm (identical on every rank) skips the step on
every rank; optim.max_bad_steps skipped steps in a row stop the run.

SIGTERM (what clusters and spot instances send before they stop a job) or Ctrl-C: the current step
finishes, the ranks agree to stop after it, a checkpoint is written and the process exits with code
75 (EXIT_STOPPED); rerunning the command resumes exactly. A second signal exits at once.
"""

import argparse
import contextlib
import csv
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.distributed.tensor import DTensor

import checkpoint as ckpt
import distributed
import loading
import memory
import objectives as objective_units
from config import ConfigError, config_from_dict, defaults_text, expand_path, load_config
from data import Loader, SampleSpec, ShardStream, Source
from flops import FlopCount
from frames import check_frame_size
from model import FoveatedVLM
from objectives import micro_batch_losses
from precision import autocast
from schedule import lr_at, warmup_steps
from validation import validate

log = logging.getLogger("fvlm.train")

# Keys that may differ when a run is resumed: they change neither the data nor the optimisation
# (compile may change bf16 rounding slightly); run_dir and init_from are paths (a moved run
# directory resumes; init_from is not read again, the checkpoint holds the weights).
RESUME_MAY_CHANGE = ("log", "checkpoint", "eval", "compile", "gradient_checkpointing", "run_dir", "init_from")
# Attention entropy above this fraction of ln(keys) counts as near uniform (warn_if_uniform).
UNIFORM = 0.98
# The exit code of a run stopped by SIGTERM / SIGINT after saving ("temporary failure", sysexits.h):
# rerun the same command to resume.
EXIT_STOPPED = 75
# Dense bf16 tensor-core peak FLOP/s by GPU name, for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 5090": 209e12,
              "RTX 4090": 165e12, "A10G": 70e12, "L4": 121e12}


# ---- the loop --------------------------------------------------------------------------------------

def train(cfg, dist, trust_checkpoint: bool = False) -> dict:
    with StopSignals() as signals:
        run = setup(cfg, dist, trust_checkpoint)
        run.signals = signals
        if not run.resumed and cfg.eval.at_start:
            validate_and_log(run, 0)
        window, bad_in_row, saved = Steps(), 0, run.step
        while run.step < cfg.optim.steps:
            result = train_step(run, draw_micro_batches(run))
            if result.status == "out_of_data":
                if run.step == 0:
                    raise fail(run, f"the training data gave no usable batch (skipped samples: "
                                    f"{skipped_samples(run) or 'none'}); a run that trains nothing is an error")
                log.info("the training data ran out (on at least one rank) at step %d; stopping", run.step)
                if run.step > saved:  # the data ran out between checkpoints
                    save(run, validate_and_log(run, run.step))
                break
            saved_now = False
            if result.status == "ok":
                bad_in_row = 0
                run.counters["step"] += 1
                run.counters["samples"] += result.samples
                run.counters["tokens"] += result.tokens
                run.counters["train_seconds"] += result.seconds
                window.add(result)
                step, last = run.step, run.step == cfg.optim.steps
                if step % cfg.log.every_steps == 0 or last:
                    log_step(run, window)
                    window = Steps()
                metric = validate_and_log(run, step) if last or (
                    cfg.eval.every_steps and step % cfg.eval.every_steps == 0) else None
                if last or step % cfg.checkpoint.every_steps == 0:
                    save(run, metric)
                    saved, saved_now = step, True
            else:  # skipped on every rank: OOM or a non-finite gradient norm
                run.counters[f"skipped_{result.status}"] += 1
                bad_in_row += 1
                log.warning("%s at step %d (%d skipped step(s) in a row); step skipped", result.status, run.step,
                            bad_in_row)
                if bad_in_row >= cfg.optim.max_bad_steps:
                    raise fail(run, f"{bad_in_row} steps in a row skipped ({result.status} last); aborting "
                                    f"(see optim.max_bad_steps)")
            if result.stop and run.step < cfg.optim.steps:
                if window.steps:  # the steps since the last log line
                    log_step(run, window)
                if not saved_now:  # the data position and counters moved since the last checkpoint
                    save(run)
                log.info("stopped by a signal after step %d; the checkpoint holds everything: rerun the same "
                         "command to resume (exit code %d)", run.step, EXIT_STOPPED)
                raise Stopped(run.step)
        return finish(run)


class Stopped(Exception):
    """The run stopped on SIGTERM / SIGINT after writing a checkpoint (exit code EXIT_STOPPED)."""


class StopSignals:
    """While active (in the main thread), SIGTERM and SIGINT only raise a flag that train_step reads
    between steps; the first one also restores the default actions, so a second one ends the
    process at once. Forked DataLoader workers inherit the handler and ignore it (only the process
    that installed it reacts)."""

    def __init__(self):
        self.received, self.previous, self.pid = None, {}, os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:
            return
        self.received = signum
        for s in self.previous:
            signal.signal(s, signal.SIG_DFL)
        # os.write, not logging: a handler may interrupt a write to the same buffered stream
        os.write(2, f"{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint and "
                    f"exiting; send it again to exit at once\n".encode())


def fail(run, message: str) -> RuntimeError:
    """A run-ending error that is in train.log as well as in the traceback."""
    log.error("error: %s", message)
    return RuntimeError(message)


# ---- setup -----------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds."""
    cfg: object
    dist: distributed.Dist
    run_dir: Path
    amp: bool  # bf16 autocast (CUDA)
    model: FoveatedVLM
    objectives: list  # [(Objective, weight)]
    loader: Loader
    val_sources: list
    modes: list  # validation modes; the text loss of the first one picks the best checkpoint
    counters: dict
    resumed: bool
    loss_fn: object  # objectives.micro_batch_losses, compiled with compile: true (ddp)
    flop_count: FlopCount
    peak_flops: float | None
    optimizer: "torch.optim.Optimizer | None" = None
    params: list = field(default_factory=list)
    root: "distributed.Sharded | None" = None  # distributed: fsdp: the FSDP root around model
    oom_attempts: set = field(default_factory=set)  # fsdp: steps (attempt numbers) to skip, see sharded_oom
    metrics_log: "CsvLog | None" = None
    val_log: "CsvLog | None" = None
    wandb: object = None
    data: object = None  # the micro-batch iterator
    signals: "StopSignals | None" = None
    uniform_validations: int = 0  # validations in a row with near-uniform dynamic attention
    start_time: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def step(self) -> int:
        return self.counters["step"]

    @property
    def attempt(self) -> int:
        """Optimizer steps tried so far: done and skipped (numbers each draw of micro-batches)."""
        return self.counters["step"] + self.counters["skipped_nonfinite"] + self.counters["skipped_oom"]

    def autocast(self):
        return autocast(self.device, self.amp)

    def losses(self, batch: dict, units: tuple, uneven: bool = False):
        """The objectives' [(summed loss, metrics)] on a device batch (through the FSDP root when sharded;
        uneven: see distributed.Sharded)."""
        if self.root is not None:
            return self.root(batch, units, self.cfg.mode, uneven)
        return self.loss_fn(self.model, batch, units, self.cfg.mode)

    def gathered(self):
        """Forwards may differ between ranks inside (validation): the sharded weights gathered."""
        return distributed.gathered(self.root) if self.root is not None else contextlib.nullcontext()

    def to_device(self, host: dict) -> dict:
        """A host batch, prepared by the objectives (e.g. reference log-probs), with what they read
        moved to the device."""
        for objective, _ in self.objectives:
            host = objective.prepare(host)
        keys = dict.fromkeys(k for objective, _ in self.objectives for k in objective.batch_keys)
        return {k: (host[k].to(self.device, non_blocking=True) if torch.is_tensor(host[k]) else host[k]) for k in keys}

    def exact_batches(self):
        """One exact pass over the train and then the val sources (this rank's share)."""
        for key in ("train", "val"):
            if configs := getattr(self.cfg.data, key):
                yield from make_loader(self.cfg, self.model, self.dist, sources(configs, f"data.{key}"), resampled=False,
                                       batch_size=self.cfg.data.batch_size, pin=False)

    def all_gather(self, obj) -> list:
        return distributed.all_gather_object(self.dist, obj)

    def barrier(self):
        distributed.barrier(self.dist)


@dataclass
class Preflight:
    """What setup reads and checks before it touches the run directory or loads anything heavy."""
    run_dir: Path
    latest: Path | None  # the checkpoint to resume from
    resume: dict | None  # its contents (of a sharded one, the plain-data part)
    init_state: tuple | None  # (state dict, what was read): init_from, or the initial weights DPO's reference needs
    objectives: list
    train_sources: list
    val_sources: list


def preflight(cfg, dist, trust_checkpoint: bool = False) -> Preflight:
    """The checks and the small reads: bad settings fail here, before the run directory is touched
    and before anything heavy loads."""
    run_dir = Path(expand_path(cfg.run_dir, "run_dir"))
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
    distributed.check_fsdp(cfg, dist)
    latest = ckpt.latest_checkpoint(run_dir)
    resume = ckpt.load_checkpoint(latest) if latest else None
    if resume:
        check_resume_config(cfg, resume["config"], latest)
        if len(resume["data"]) != dist.world_size:
            raise ConfigError(f"run_dir {run_dir}: {latest.name} was written by {len(resume['data'])} rank(s) and this "
                              f"run has {dist.world_size}: an exact resume needs the same number (each rank's data "
                              f"position and RNG state are its own). To go on with {dist.world_size} from its weights, "
                              f"start a new run_dir with init_from: {latest}")
    objectives = objective_units.build(cfg)
    train_sources, val_sources = sources(cfg.data.train, "data.train"), sources(cfg.data.val, "data.val")
    expand_path(cfg.model.llm, "model.llm"), expand_path(cfg.model.dino, "model.dino")
    # a resume reads the weights from the checkpoint; DPO's frozen reference still starts from init_from's
    reference = any(getattr(o, "reference", None) == "model" for o, _ in objectives)
    init_state = initial_weights(cfg, trust_checkpoint) if not resume or reference else None
    return Preflight(run_dir, latest, resume, init_state, objectives, train_sources, val_sources)


def setup(cfg, dist, trust_checkpoint: bool = False) -> Run:
    """The checks (preflight), then logging, the run directory, the model (resumed, or from
    init_from), objectives, the sharding (distributed: fsdp), optimizer, data and logs."""
    pre = preflight(cfg, dist, trust_checkpoint)
    setup_logging(pre.run_dir, dist)
    device = dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dist.is_main:
        (pre.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    random.seed(cfg.seed + dist.rank)  # Python's random (a resume restores its state below)
    model = prepare_model(cfg, dist, pre.init_state)
    amp = device.type == "cuda" and cfg.precision == "bf16"
    if device.type == "cuda" and dist.is_main:
        warning = memory_warning(cfg, model, dist.world_size, amp, torch.cuda.get_device_properties(device).total_memory)
        if warning:
            log.warning(warning)
    fsdp = cfg.distributed == "fsdp"
    counters = {"step": 0, "samples": 0, "tokens": 0, "skipped_nonfinite": 0, "skipped_oom": 0,
                "train_seconds": 0.0, "best": None}
    run = Run(cfg=cfg, dist=dist, run_dir=pre.run_dir, amp=amp,
              model=model, objectives=pre.objectives,
              loader=make_loader(cfg, model, dist, pre.train_sources, cfg.data.resampled, cfg.data.batch_size,
                                 pin=device.type == "cuda"),
              val_sources=pre.val_sources, modes=cfg.eval.modes or [cfg.mode], counters=counters,
              resumed=pre.resume is not None,
              # fsdp compiles each LLM layer instead (distributed.shard): FSDP's hooks break a whole-step graph
              loss_fn=torch.compile(micro_batch_losses) if cfg.compile and not fsdp else micro_batch_losses,
              flop_count=FlopCount(model, cfg.data.frame_size), peak_flops=peak_flops(device))
    for objective, _ in pre.objectives:  # on the whole model, before a resume overwrites the weights
        objective.setup(model, run)
    if fsdp:
        run.root = distributed.shard(model, micro_batch_losses, dist, bf16=run.amp, compile=cfg.compile)
        run.oom_attempts = ckpt.oom_attempts(pre.run_dir)
    run.optimizer = make_optimizer(model, cfg)
    run.params = [p for g in run.optimizer.param_groups for p in g["params"]]
    if pre.resume:
        _restore(run, pre.resume, pre.latest)
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # runtime randomness (dropout) differs per rank
    run.data = micro_batch_stream(run)
    if dist.is_main:
        _open_logs(run, counters["step"] if pre.resume else None)
    _log_setup(run)
    return run


def prepare_model(cfg, dist, init_state) -> FoveatedVLM:
    """The model on this rank's device, identical on every rank, with checkpointing and freezing set."""
    model = build_model(cfg, init_state).to(dist.device)
    check_frame_size(cfg.data.frame_size, model.encoder.dino.patch_size, f"data.frame_size {cfg.data.frame_size}",
                     ConfigError)
    distributed.broadcast_model(dist, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    freeze(model, cfg)
    model.train()
    return model


def memory_warning(cfg, model, world_size: int, amp: bool, gpu_bytes: int) -> str | None:
    """What to tell a user whose run, by memory.py's estimate, will not fit the GPU (None when it fits)."""
    s = memory.shapes(model, cfg, torch.bfloat16 if amp else torch.float32)
    plan = memory.estimate(s, cfg, cfg.distributed, world_size, cfg.data.batch_size, cfg.optim.grad_accum,
                           cfg.gradient_checkpointing, amp=amp)
    if memory.fits(plan, gpu_bytes):
        return None
    return (f"this run will probably run out of GPU memory: {memory.fits_message(plan, gpu_bytes)} (an estimate at "
            f"data.max_text_tokens / data.max_frames). Settings that fit: python scripts/plan_memory.py --config "
            f"CONFIG --gpu-mem {gpu_bytes / memory.GiB:.0f} --gpus {world_size}")


def _restore(run, resume: dict, latest: Path):
    """A run's weights, optimizer, data position, RNG states and counters from its latest checkpoint
    (sharded: every rank's shards, through DCP)."""
    if run.root is not None:
        tensors, _ = distributed.sharded_state(run.root, run.optimizer)
        ckpt.load_sharded(latest, tensors)
        distributed.load_sharded_state(run.root, run.optimizer, tensors, resume["param_groups"])
    else:
        run.model.load_state_dict(resume["model"])
        run.optimizer.load_state_dict(resume["optimizer"])
    run.loader.load_state_dict(resume["data"][run.dist.rank])
    ckpt.set_rng_state(resume["rng"][run.dist.rank])
    run.counters.update(resume["counters"])
    log.info("resumed from %s (step %d)", latest, run.counters["step"])


def _open_logs(run, resume_step: int | None):
    """metrics.csv, val.csv (with validation sources) and W&B (log.wandb), continued after resume_step."""
    run.metrics_log = CsvLog(run.run_dir / "metrics.csv", metric_columns(run), resume_step)
    if run.val_sources:
        val_columns = dict.fromkeys(c for o, _ in run.objectives for c in o.val_metrics)
        run.val_log = CsvLog(run.run_dir / "val.csv", ["step", "mode", "source", *val_columns], resume_step)
    run.wandb = _wandb(run.cfg, run.run_dir) if run.cfg.log.wandb else None


def _log_setup(run):
    cfg, model = run.cfg, run.model
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s stage (%s), %s | %.1fM parameters (%.1fM trained) | %d rank(s) on %s%s | %d steps x %d "
             "micro-batches of <= %d samples", cfg.stage, ", ".join(o.name for o, _ in run.objectives),
             model.visual.mode_text(cfg.mode),
             n_params / 1e6, sum(p.numel() for p in run.params) / 1e6, run.dist.world_size, run.dist.device,
             ", sharded (fsdp)" if run.root is not None else "", cfg.optim.steps, cfg.optim.grad_accum,
             cfg.data.batch_size)


def initial_weights(cfg, trust: bool = False) -> tuple[dict, str] | None:
    """(state dict, what was read) of cfg.init_from, or None. Read before the model is built: a path
    that is not a checkpoint fails before anything heavy loads. init_from may be a Hugging Face Hub id
    (owner/name[@revision]; a path that exists wins): loading.load_weights downloads it. A sharded
    checkpoint folder (distributed: fsdp) is read on this process alone."""
    if not cfg.init_from:
        return None
    path = expand_path(cfg.init_from, "init_from")
    try:
        if ckpt.is_sharded(path):  # a sharded run's checkpoint, whatever its world size
            return ckpt.load_sharded_weights(path), f"{path} (sharded checkpoint)"
        state, _, what = loading.load_weights(path, trust)
    except loading.UntrustedCheckpoint as e:
        raise ConfigError(f"init_from: {e}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"init_from: {e}") from None
    except ValueError as e:
        raise ConfigError(f"init_from: {cfg.init_from} is not a checkpoint, run directory or save_pretrained "
                          f"folder ({e})") from None
    return state, what


def build_model(cfg, init_state: tuple[dict, str] | None = None) -> FoveatedVLM:
    """The model of cfg.model (seeded), with init_state's weights (initial_weights) loaded when given."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = FoveatedVLM(m, llm=expand_path(m.llm), dino=expand_path(m.dino), pretrained=m.pretrained and not cfg.init_from)
    if init_state is not None:
        state, what = init_state
        # a text model may start a next_frame run: the prediction head it lacks starts fresh
        own = model.state_dict()
        fresh = {k: v for k, v in own.items() if k.startswith("next_frame.") and k not in state}
        try:
            model.load_state_dict({**fresh, **state})
        except RuntimeError as e:
            raise ValueError(f"init_from {what} does not fit the model of this config: {e}") from e
        log.info("initialised from %s%s", what, " (the next-frame head, which it lacks, starts fresh)" if fresh else "")
    return model


def freeze(model: FoveatedVLM, cfg):
    """optim.freeze: those parameter groups get no gradient (set before sharding: FSDP reads it)."""
    for part, named in model.parameter_groups().items():
        for _, p in named:
            p.requires_grad_(part not in cfg.optim.freeze)


def make_optimizer(model: FoveatedVLM, cfg) -> torch.optim.AdamW:
    """AdamW over connector / dino / llm groups (frozen ones left out), each with its own LR; no
    weight decay on norms, biases (1-D parameters) and the learned queries."""
    groups = []
    for part, named in model.parameter_groups().items():
        if part in cfg.optim.freeze:
            continue
        decays = [p.dim() >= 2 and n not in ("q_static", "q_init") for n, p in named]
        decay = [p for (_, p), d in zip(named, decays) if d]
        plain = [p for (_, p), d in zip(named, decays) if not d]
        for params, wd in ((decay, cfg.optim.weight_decay), (plain, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "part": part, "lr": cfg.optim.lr[part]})
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)


def set_lrs(optimizer, cfg, step: int) -> dict:
    warm = warmup_steps(cfg.optim.steps, cfg.optim.warmup_ratio)
    lrs = {part: lr_at(step, base, cfg.optim.schedule, cfg.optim.steps, warm, cfg.optim.min_lr_ratio,
                       cfg.optim.target_lr) for part, base in cfg.optim.lr.items()}
    for g in optimizer.param_groups:
        g["lr"] = lrs[g["part"]]
    return lrs


def sources(configs, key: str = "data.train") -> list[Source]:
    """Sources of data.train / data.val (key): their shard patterns expanded; a pattern that matches
    nothing is a ConfigError naming the key."""
    out = []
    for i, s in enumerate(configs):
        patterns = [s.shards] if isinstance(s.shards, str) else s.shards
        where = f"{key}.{i}.shards"
        try:
            out.append(Source.from_patterns(s.name, [expand_path(p, where) for p in patterns], s.weight, s.text))
        except FileNotFoundError as e:
            raise ConfigError(f"{where} (source {s.name!r}): {e}") from None
    return out


def sample_spec(cfg, model) -> SampleSpec:
    data = cfg.data
    return SampleSpec(stage=cfg.stage, frame_size=data.frame_size, max_frames=data.max_frames,
                      max_text_tokens=data.max_text_tokens, system_prompt=model.system_prompt, resize=data.resize,
                      pad_fill=model.encoder.dino.pad_fill, target_fps=data.target_fps,
                      image_frames=model.image_frames,
                      latents=cfg.stage == "next_frame" and cfg.next_frame.target != "pixels")


def make_loader(cfg, model, dist, srcs, resampled: bool, batch_size: int, pin: bool, budgets=True) -> Loader:
    data = cfg.data
    stream = ShardStream(srcs, sample_spec(cfg, model), model.tokenizer, batch_size=batch_size,
                         max_batch_frames=data.max_batch_frames if budgets else None,
                         max_batch_tokens=data.max_batch_tokens if budgets else None, resampled=resampled,
                         text_ratio=data.text_ratio, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    return Loader(stream, num_workers=data.num_workers, prefetch_factor=data.prefetch_factor, pin_memory=pin)


def micro_batch_stream(run):
    """Host batches for training, then None for ever once an exact (resampled: false) run's epochs end."""
    cfg = run.cfg
    while cfg.data.resampled or run.loader.stream.epoch < cfg.data.epochs:
        yield from run.loader
    while True:
        yield None


def draw_micro_batches(run) -> list[dict]:
    """This step's grad_accum host batches (fewer when the data ran out)."""
    batches = []
    for _ in range(run.cfg.optim.grad_accum):
        host = next(run.data)
        if host is None:
            break
        batches.append(host)
    return batches


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---- one optimizer step ----------------------------------------------------------------------------

@dataclass
class Steps:
    """What optimizer steps did, summed: one step (train_step's result) or the steps since the last
    log line (Steps().add(...))."""
    status: str = "ok"  # of a single step: ok | out_of_data | oom | nonfinite
    steps: int = 0
    loss_sums: list = field(default_factory=list)  # per objective, summed over the effective batch
    normalisers: list = field(default_factory=list)  # per objective, over the effective batch
    metrics: dict = field(default_factory=dict)  # summed over the effective batch
    grad_norm: float = 0.0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    lrs: dict = field(default_factory=dict)  # the last step's
    stop: bool = False  # a rank received SIGTERM / SIGINT: every rank stops after this step

    def add(self, r: "Steps") -> "Steps":
        if not self.steps:
            self.loss_sums, self.normalisers = [0.0] * len(r.loss_sums), [0.0] * len(r.normalisers)
        self.steps += r.steps
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, r.loss_sums)]
        self.normalisers = [a + b for a, b in zip(self.normalisers, r.normalisers)]
        for name, value in r.metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value
        self.grad_norm += r.grad_norm
        self.samples += r.samples
        self.tokens += r.tokens
        self.flops += r.flops
        self.seconds += r.seconds
        self.lrs = r.lrs
        return self


def train_step(run, micro_batches: list[dict]) -> Steps:
    """One optimizer step on this rank's micro-batches (host batches); every rank calls it together."""
    cfg, dist = run.cfg, run.dist
    start = time.perf_counter()
    units = tuple(objective for objective, _ in run.objectives)
    # Every rank had its data, and the effective batch's normaliser of each objective (and, sharded,
    # which micro-batches have frames on some ranks only): host numbers, one small collective.
    have = float(len(micro_batches) == cfg.optim.grad_accum)
    local = [sum(u.normaliser(h) for h in micro_batches) for u in units]
    videos = [float(h["frames"] is not None) for h in micro_batches] if run.root is not None else []
    if run.root is not None:  # one entry per micro-batch a step has, however many this rank drew
        videos += [0.0] * (cfg.optim.grad_accum - len(micro_batches))
    have_all, *rest = distributed.agree(dist, [have, *local, *videos], ["min"] + ["sum"] * (len(units) + len(videos)))
    if have_all < 1:
        return Steps("out_of_data")
    normalisers = rest[:len(units)]
    uneven = [0 < v < dist.world_size for v in rest[len(units):]] or [False] * len(micro_batches)
    lrs = set_lrs(run.optimizer, cfg, run.step)
    # The backward runs on sum_k w_k * loss_k * N_0 / N_k and the summed gradients are divided by N_0
    # once at the end (N_k: objective k's normaliser over the effective batch): the weighted mean of
    # every term; with one objective, the plain summed loss scaled once, as a token-weighted mean.
    base = max(normalisers[0], 1.0)
    scales = [w * base / max(n, 1.0) for (_, w), n in zip(run.objectives, normalisers)]
    if run.attempt in run.oom_attempts:  # the step that ran out of memory before a sharded run restarted
        log.warning("step %d ran out of memory before the restart: skipped on every rank", run.step)
        sums, done = None, dict(samples=0, tokens=0, flops=0, oom=1)
    else:
        sums, done = _backward(run, micro_batches, units, scales, uneven)
    # An OOM anywhere skips the step everywhere; a stop signal anywhere stops every rank after it
    # (agreed here, before the next step draws data, so the checkpoint's data position is exact).
    oom, stop = distributed.agree(dist, [done["oom"], run.signals is not None and run.signals.received is not None],
                                  ["max", "max"])
    stop = bool(stop)
    if oom:
        run.optimizer.zero_grad(set_to_none=True)
        return Steps("oom", stop=stop)
    return optimizer_step(run, sums, base, Steps(normalisers=normalisers, lrs=lrs, stop=stop, **{
        k: v for k, v in done.items() if k != "oom"}), start)


def _backward(run, micro_batches, units, scales, uneven) -> tuple[dict, dict]:
    """Forward and backward of each micro-batch (the gradients accumulate) -> ({"losses": per objective,
    metric: value} summed on the device, {samples, tokens, flops, oom} host counts). A CUDA OOM stops
    the loop (oom 1); under fsdp it ends the run instead (sharded_oom)."""
    cfg, device = run.cfg, run.device
    sums = {"losses": torch.zeros(len(units), device=device)}
    sums.update({name: torch.zeros((), device=device) for u in units for name in u.metrics})
    done = dict(samples=0, tokens=0, flops=0, oom=0)
    for host, odd in zip(micro_batches, uneven):
        try:
            with run.autocast():
                terms = run.losses(run.to_device(host), units, odd)
            sum(scale * loss for scale, (loss, _) in zip(scales, terms)).backward()
        except torch.OutOfMemoryError:
            terms = None  # drop the failed graph before returning its memory
            if run.root is not None:
                raise sharded_oom(run, host) from None
            run.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory at step %d (%d samples, %d frames)", run.step, len(host["keys"]),
                        0 if host["frames"] is None else host["frames"].shape[0])
            done["oom"] = 1
            break
        sums["losses"] += torch.stack([loss.detach().float() for loss, _ in terms])
        for _, metrics in terms:
            for name, value in metrics.items():
                sums[name] += value
        done["samples"] += len(host["keys"])
        done["tokens"] += batch_tokens(host)
        done["flops"] += sum(u.flops(run.flop_count, host, cfg.mode) for u in units)
    return sums, done


def sharded_oom(run, host) -> RuntimeError:
    """A CUDA OOM inside a sharded forward or backward cannot be skipped in place: the other ranks
    wait in FSDP's collectives for this one. The step is recorded (checkpoint.mark_oom), the run ends,
    and the rerun (or torchrun --max-restarts) resumes from the last checkpoint and skips this step on
    every rank, as ddp would have."""
    ckpt.mark_oom(run.run_dir, run.attempt, {"step": run.step, "rank": run.dist.rank, "samples": len(host["keys"])})
    return fail(run, f"CUDA out of memory at step {run.step} on rank {run.dist.rank} ({len(host['keys'])} samples, "
                     f"{0 if host['frames'] is None else host['frames'].shape[0]} frames) under distributed: fsdp, "
                     f"where a step cannot be skipped in place; rerun the same command (or use torchrun "
                     f"--max-restarts) to resume from the last checkpoint with this step skipped. To avoid it: "
                     f"smaller data.batch_size / data.max_batch_frames, gradient_checkpointing: true, more ranks "
                     f"(scripts/plan_memory.py)")


def optimizer_step(run, sums: dict, base: float, result: Steps, start: float) -> Steps:
    """Sum the gradients over the ranks (ddp; fsdp reduced them in the backward pass), scale them by
    1 / base, clip, and step unless the norm is not finite."""
    cfg, dist = run.cfg, run.dist
    if run.root is None:
        distributed.all_reduce_grads(dist, run.params)
    grads = [p.grad for p in run.params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, 1.0 / base)
    names = [k for k in sums if k != "losses"]
    flat = torch.cat([sums["losses"], torch.stack([sums[k] for k in names])]) if names else sums["losses"]
    distributed.all_reduce_sum_(dist, [flat])
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.max_grad_norm or float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the norm over every rank's shards: the same on every rank
    values = torch.cat([norm.reshape(1).float(), flat]).tolist()  # the step's one host sync
    if not math.isfinite(values[0]):
        run.optimizer.zero_grad(set_to_none=True)
        return Steps("nonfinite", stop=result.stop)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    samples, tokens, flops = distributed.agree(dist, [result.samples, result.tokens, result.flops], ["sum"] * 3)
    n = len(result.normalisers)
    return Steps("ok", steps=1, loss_sums=values[1:1 + n], normalisers=result.normalisers,
                 metrics=dict(zip(names, values[1 + n:])), grad_norm=values[0], samples=int(samples),
                 tokens=int(tokens), flops=flops, seconds=time.perf_counter() - start, lrs=result.lrs,
                 stop=result.stop)


def batch_tokens(host: dict) -> int:
    """Text tokens of every sequence of a host batch (both replies of a DPO pair) + visual tokens."""
    text = sum(int(v.sum()) for k, v in host.items() if k.endswith("attention_mask"))
    return text + int((host["frame_index"] >= 0).sum())


# ---- logging ---------------------------------------------------------------------------------------

def metric_columns(run) -> list[str]:
    per_objective = [f"{o.name}_loss" for o, _ in run.objectives] if len(run.objectives) > 1 else []
    return ["step", "samples", "tokens", "loss", *per_objective, *[f"lr_{g}" for g in run.cfg.optim.lr], "grad_norm",
            "samples_per_s", "tokens_per_s", "flops", "mfu", "peak_mem_gb", "skipped_nonfinite", "skipped_oom",
            "data_skipped", "elapsed_s", *[m for o, _ in run.objectives for m in (*o.metrics, *o.derived)]]


def log_step(run, w: Steps):
    cfg, counters, step = run.cfg, run.counters, run.step
    skipped = run.loader.counts()["skipped"]
    data_skipped = sum(n for reasons in skipped.values() for n in reasons.values())
    losses = [s / max(n, 1.0) for s, n in zip(w.loss_sums, w.normalisers)]  # each a mean over its normaliser
    loss = sum(weight * x for (_, weight), x in zip(run.objectives, losses))
    seconds = max(w.seconds, 1e-9)
    mfu = w.flops / seconds / (run.peak_flops * run.dist.world_size) if run.peak_flops else None
    eta = counters["train_seconds"] / max(step, 1) * (cfg.optim.steps - step)
    mem = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
    row = {"step": step, "samples": counters["samples"], "tokens": counters["tokens"], "loss": loss,
           **{f"lr_{g}": v for g, v in w.lrs.items()}, "grad_norm": w.grad_norm / max(w.steps, 1),
           "samples_per_s": w.samples / seconds, "tokens_per_s": w.tokens / seconds,
           "flops": w.flops, "mfu": mfu, "peak_mem_gb": mem,
           "skipped_nonfinite": counters["skipped_nonfinite"], "skipped_oom": counters["skipped_oom"],
           "data_skipped": data_skipped, "elapsed_s": counters["train_seconds"]}
    brief = []
    for i, (objective, _) in enumerate(run.objectives):
        if len(run.objectives) > 1:
            row[f"{objective.name}_loss"] = losses[i]
            brief.append(f"{objective.name} {losses[i]:.4f}")
        for name in objective.metrics:  # metrics are sums over the objective's normaliser
            row[name] = w.metrics[name] / max(w.normalisers[i], 1.0)
        row.update(objective.derive(row))
        brief += [f"{name} {row[name]:.3f}" for name in objective.brief]
    log.info("step %d/%d | loss %.4f%s | lr %s | grad norm %.3f | %.1f samples/s | %.0f tokens/s%s%s | eta %s",
             step, cfg.optim.steps, loss, "".join(f" | {b}" for b in brief),
             " ".join(f"{v:.2e}" for v in w.lrs.values()), row["grad_norm"], row["samples_per_s"],
             row["tokens_per_s"], f" | mfu {mfu:.1%}" if mfu is not None else "",
             f" | peak mem {mem:.1f} GiB" if mem is not None else "", _duration(eta))
    if run.metrics_log:
        run.metrics_log.write(row)
    if run.wandb:
        run.wandb.log({f"train/{k}": v for k, v in row.items() if v is not None and k != "step"}, step=step)


def entropy_text(scores: dict) -> str:
    """The val line's attention entropies (" | attention entropy static 2.631 dynamic 1.904"): the
    kinds measured, none for a model without queries (the pooled baseline scores them NaN)."""
    kinds = [k for k in ("static", "dynamic") if not math.isnan(scores.get(f"{k}_entropy", math.nan))]
    return (" | attention entropy" + "".join(f" {k} {scores[f'{k}_entropy']:.3f}" for k in kinds)) if kinds else ""


def validate_and_log(run, step: int) -> float | None:
    """Validate on the val sources; log the result (train.log, val.csv, wandb) and return the
    validation loss (the best checkpoint's criterion)."""
    if not run.val_sources:
        return None
    cfg = run.cfg
    loader = make_loader(cfg, run.model, run.dist, run.val_sources, resampled=False, batch_size=cfg.eval.batch_size,
                         pin=run.device.type == "cuda", budgets=False)
    with run.gathered():
        res = validate(run.model, loader, objectives=run.objectives, modes=run.modes, to_device=run.to_device,
                       autocast=run.autocast(), max_samples=cfg.eval.max_samples, dist=run.dist)
    brief = dict.fromkeys(k for o, _ in run.objectives for k in o.val_brief)
    parts = [f"{m}: " + ", ".join(f"{k} {r['all'][k]:.4f}" for k in brief if k in r["all"])
             for m, r in res["modes"].items()]
    first = res["modes"][run.modes[0]]["all"]
    log.info("val @ step %d (%d samples): %s%s", step, res["samples"], " | ".join(parts), entropy_text(first))
    if step > 0:  # at initialisation near-uniform attention is expected
        warn_if_uniform(run, first.get("dynamic_entropy"))
    if run.val_log:
        for m, r in res["modes"].items():
            for source, row in [("all", r["all"]), *r["by_source"].items()]:
                run.val_log.write({"step": step, "mode": m, "source": source, **row})
    if run.wandb:
        run.wandb.log({f"val/{m}/{k}": v for m, r in res["modes"].items() for k, v in r["all"].items()}, step=step)
    return res["loss"]


def warn_if_uniform(run, entropy: float | None):
    """Query collapse (guide 8.3): the dynamic queries' attention near uniform, i.e. its entropy within
    2 % of ln(keys), for two validations in a row, is worth a warning."""
    if entropy is None or not math.isfinite(entropy):
        return
    gh, gw = run.model.encoder.dino.grid(run.cfg.data.frame_size, run.cfg.data.frame_size)
    uniform = math.log(run.model.encoder.dino.num_prefix + gh * gw)
    run.uniform_validations = run.uniform_validations + 1 if entropy > UNIFORM * uniform else 0
    if run.uniform_validations >= 2:
        log.warning("the dynamic queries' attention has stayed near uniform for %d validations (entropy %.3f, "
                    "uniform %.3f): query collapse? Check that llm_to_query and q_init get gradients; "
                    "next_frame.entropy_weight sharpens it", run.uniform_validations, entropy, uniform)


def setup_logging(run_dir: Path, dist):
    fmt = logging.Formatter("%(asctime)s %(message)s" if dist.is_main else f"%(asctime)s [rank {dist.rank}] %(message)s",
                            "%H:%M:%S")
    root = logging.getLogger("fvlm")  # data.py's skip warnings included
    for handler in root.handlers:  # an earlier run in this process
        handler.close()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if dist.is_main else logging.WARNING)
    root.addHandler(console)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        root.addHandler(file)


class CsvLog:
    """A CSV file with fixed columns; on resume, rows after the checkpoint's step are dropped (the
    resumed run writes them again)."""

    def __init__(self, path: Path, columns, resume_step: int | None):
        self.path, self.columns = path, list(columns)
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: _fmt(row.get(k)) for k in self.columns})


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _wandb(cfg, run_dir: Path):
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("log.wandb: true needs the wandb package (pip install wandb)") from e
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode, id=run_id, resume="allow",
                      dir=str(run_dir), config=cfg.to_dict(), name=run_dir.name)


# ---- checkpoints and the end of a run -------------------------------------------------------------

def check_resume_config(cfg, stored: dict, path):
    new, old = _flat(cfg.to_dict()), _flat(config_from_dict(stored, f"{path}").to_dict())
    changed = [k for k in new if k.split(".")[0] not in RESUME_MAY_CHANGE and new.get(k) != old.get(k)]
    if changed:
        raise ConfigError(f"run_dir {cfg.run_dir} holds a run with a different config ({', '.join(changed)}); "
                          f"resume with the same settings or choose a new run_dir")


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def save(run, metric=None):
    """A checkpoint of the whole run (every rank's data position and RNG state; sharded, every rank's
    shards through DCP); the best one by validation loss is kept apart from pruning."""
    counters, step = run.counters, run.step
    states = run.all_gather((run.loader.state_dict(), ckpt.rng_state()))
    extra = {"step": step, "data": [s for s, _ in states], "rng": [r for _, r in states], "config": run.cfg.to_dict(),
             "versions": {"torch": str(torch.__version__)}}
    best = metric is not None and (counters["best"] is None or metric < counters["best"]["metric"])
    if best:
        name = f"step_{step:08d}" + ("" if run.root is not None else ".pt")
        counters["best"] = {"step": step, "metric": metric, "file": name}
    if run.root is not None:
        tensors, groups = distributed.sharded_state(run.root, run.optimizer)
        path = ckpt.save_sharded(run.run_dir, step, tensors, dict(extra, counters=dict(counters), param_groups=groups),
                                 run.dist.is_main, run.barrier)
    elif run.dist.is_main:
        path = ckpt.save_checkpoint(run.run_dir, step, dict(extra, counters=dict(counters), model=run.model.state_dict(),
                                                            optimizer=run.optimizer.state_dict()))
    if run.dist.is_main:
        if counters["best"] is not None:
            ckpt.write_json(ckpt.checkpoint_dir(run.run_dir) / "best.json", counters["best"])
        ckpt.prune(run.run_dir, run.cfg.checkpoint.keep_last)
        log.info("checkpoint %s", path)
    run.barrier()


def skipped_samples(run) -> dict:
    """{source: {reason: n}}: the samples the loader skipped, over all ranks (a collective)."""
    skipped = {}
    for c in run.all_gather(run.loader.counts()):
        for src, reasons in c["skipped"].items():
            for reason, n in reasons.items():
                skipped.setdefault(src, {}).setdefault(reason, 0)
                skipped[src][reason] += n
    return skipped


def finish(run) -> dict:
    """Exports (final/, best/), summary.json and the closing log line."""
    counters, run_dir = run.counters, run.run_dir
    skipped = skipped_samples(run)
    summary = {"steps": counters["step"], "samples": counters["samples"], "tokens": counters["tokens"],
               "train_seconds": round(counters["train_seconds"], 1),
               "wall_seconds": round(time.perf_counter() - run.start_time, 1),
               "samples_per_s": counters["samples"] / max(counters["train_seconds"], 1e-9),
               "skipped_nonfinite": counters["skipped_nonfinite"], "skipped_oom": counters["skipped_oom"],
               "data_skipped": skipped, "best": counters["best"], "final": str(run_dir / "final")}
    full = distributed.full_state_dict(run.root) if run.root is not None else None  # a collective
    if run.dist.is_main:
        ckpt.export_pretrained(run.model, run_dir / "final", state=full)
        best = counters["best"]
        if best:
            path = ckpt.checkpoint_dir(run_dir) / best["file"]
            state = ckpt.load_sharded_weights(path) if path.is_dir() else ckpt.load_checkpoint(path)["model"]
            ckpt.export_pretrained(run.model, run_dir / "best", state=state)
            summary["best_export"] = str(run_dir / "best")
        ckpt.write_json(run_dir / "summary.json", summary)
        log.info("done: %d steps, %d samples in %s (%.2f samples/s) | skipped steps: %d non-finite, %d OOM | "
                 "data skipped: %s | best val %s | final weights: %s", summary["steps"], summary["samples"],
                 _duration(summary["train_seconds"]), summary["samples_per_s"], summary["skipped_nonfinite"],
                 summary["skipped_oom"], skipped or "none",
                 f"{best['metric']:.4f} at step {best['step']}" if best else "n/a", run_dir / "final")
    if run.wandb:
        run.wandb.finish()
    run.barrier()
    return summary


EXAMPLES = """examples:
  python train.py --config configs/tiny_stage2.yaml                     # tiny models, synthetic data, CPU
  python train.py --config configs/stage2_135M.yaml optim.lr.llm=1e-5 data.batch_size=4
  torchrun --nproc_per_node 8 train.py --config configs/stage2_1.7B.yaml
Rerunning a command on an existing run_dir resumes it. SIGTERM / Ctrl-C: the current step finishes,
a checkpoint is written, the exit code is 75; a second signal exits at once.

config keys (YAML, or key=value overrides), their defaults and types:
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES + defaults_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML stage config (configs/*.yaml)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="let init_from unpickle arbitrary Python objects from a checkpoint file; that can run "
                             "code from the file, so only for files you trust (default: tensors and plain data only)")
    parser.add_argument("overrides", nargs="*", help="key=value with dotted keys, e.g. optim.lr.llm=3e-5")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    dist = distributed.setup(cfg.device)
    try:
        return train(cfg, dist, args.trust_checkpoint)
    finally:
        distributed.teardown(dist)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped:
        sys.exit(EXIT_STOPPED)
