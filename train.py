"""Train FoveatedVLM: alignment, SFT or DPO from a YAML stage config, on a CPU, a GPU, or under torchrun.

    python train.py --config configs/stage2_1.7B.yaml [key=value ...]
    torchrun --nproc_per_node 8 train.py --config configs/stage2_1.7B.yaml

The run directory (`run_dir`) receives config.yaml (the resolved config), train.log, metrics.csv (a
row per logged step), val.csv (a row per validation, mode and source), checkpoints/, and at the end
final/ (and best/, when there is validation data) as save_pretrained exports. Rerunning the same
command on an existing run directory resumes from its latest checkpoint (model, optimizer, step,
every rank's data position and RNG states), so the losses continue exactly as if it had not stopped.

Each optimizer step: the ranks draw grad_accum micro-batches each, run forward and backward on the
*summed* loss (losses.py), agree that every rank had data and no CUDA OOM, sum the gradients across
ranks and divide them by the effective batch's target-token (or pair) count — the token-weighted
mean over the whole effective batch — then clip and step. A non-finite gradient norm (identical on
every rank) or an OOM anywhere skips the step on every rank; too many non-finite steps in a row abort.
"""

import argparse
import contextlib
import copy
import csv
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import checkpoint as ckpt
import distributed
from config import ConfigError, config_from_dict, expand_path, load_config
from data import Loader, SampleSpec, ShardStream, Source
from losses import DPO_METRICS, dpo_logps, micro_batch_loss, weight
from model import FoveatedVLM
from schedule import lr_at, warmup_steps
from validation import best_metric, validate

log = logging.getLogger("fvlm.train")

# Keys that may differ when a run is resumed: they change neither the data nor the math.
RESUME_MAY_CHANGE = ("log", "checkpoint", "eval", "compile", "gradient_checkpointing")
# Dense bf16 tensor-core peak FLOP/s by GPU name, for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 5090": 209e12,
              "RTX 4090": 165e12, "A10G": 70e12, "L4": 121e12}


# ---- model, optimizer, data -----------------------------------------------------------------------

def _preset(spec: str, kind: str, presets: dict) -> str | None:
    """'random:<preset>' -> the preset's name (checked); None for a hub id or a path."""
    if not spec.startswith("random:"):
        return None
    preset = spec.split(":", 1)[1]
    if preset not in presets:
        raise ConfigError(f"model.{kind}: unknown random preset {preset!r}; one of {sorted(presets)}")
    return preset


def build_model(cfg) -> FoveatedVLM:
    """The model of cfg.model (seeded), with cfg.init_from's weights loaded when given. Backbones named
    random:<preset> are built from that preset's config (backbones.py) with random weights."""
    from backbones import DINO_PRESETS, LLM_PRESETS, build_backbones, offline_tokenizer

    m = cfg.model
    llm_preset, dino_preset = _preset(m.llm, "llm", LLM_PRESETS), _preset(m.dino, "dino", DINO_PRESETS)
    randoms = [llm_preset is not None, dino_preset is not None]
    if any(randoms) and not all(randoms) and m.pretrained and not cfg.init_from:
        raise ConfigError("model: with one random:<preset> backbone the other cannot load pretrained weights; "
                          "set model.pretrained: false or make both random")
    with tempfile.TemporaryDirectory() as tmp:
        llm, dino = expand_path(m.llm), expand_path(m.dino)
        if any(randoms):
            llm_dir, dino_dir = build_backbones(tmp, llm=llm_preset or "tiny", dino=dino_preset or "tiny",
                                                weights=False, tokenizer=offline_tokenizer())
            llm, dino = (llm_dir if randoms[0] else llm), (dino_dir if randoms[1] else dino)
        torch.manual_seed(cfg.seed)
        model = FoveatedVLM(llm_name=llm, dino_name=dino, query_dim=m.query_dim, visual_scale=m.visual_scale,
                            layout=m.layout, image_frames=m.image_frames, system_prompt=m.system_prompt,
                            pretrained=m.pretrained and not cfg.init_from and not any(randoms))
    if cfg.init_from:
        state, what = ckpt.load_weights(expand_path(cfg.init_from))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"init_from {what} does not fit the model of this config: {e}") from e
        log.info("initialised from %s", what)
    return model


def make_optimizer(model: FoveatedVLM, cfg, device) -> torch.optim.AdamW:
    """AdamW over connector / dino / llm groups, each with its own LR and an optional freeze; no weight
    decay on norms, biases (1-D parameters) and the learned queries."""
    groups = []
    for part, named in model.parameter_groups().items():
        frozen = part in cfg.optim.freeze
        for _, p in named:
            p.requires_grad_(not frozen)
        if frozen:
            continue
        decays = [p.dim() >= 2 and n not in ("q_static", "q_init") for n, p in named]
        decay = [p for (_, p), d in zip(named, decays) if d]
        plain = [p for (_, p), d in zip(named, decays) if not d]
        for params, wd in ((decay, cfg.optim.weight_decay), (plain, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "part": part, "lr": cfg.optim.lr[part]})
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             fused=device.type in ("cuda", "cpu"))


def set_lrs(optimizer, cfg, step: int) -> dict:
    warm = warmup_steps(cfg.optim.steps, cfg.optim.warmup_ratio)
    lrs = {part: lr_at(step, base, cfg.optim.schedule, cfg.optim.steps, warm, cfg.optim.min_lr_ratio,
                       cfg.optim.target_lr) for part, base in cfg.optim.lr.items()}
    for g in optimizer.param_groups:
        g["lr"] = lrs[g["part"]]
    return lrs


def sources(configs) -> list[Source]:
    return [Source.from_patterns(s.name, [expand_path(p) for p in ([s.shards] if isinstance(s.shards, str)
                                                                    else s.shards)], s.weight, s.text)
            for s in configs]


def sample_spec(cfg) -> SampleSpec:
    d = cfg.data
    return SampleSpec(stage=cfg.stage, frame_size=d.frame_size, max_frames=d.max_frames,
                      max_text_tokens=d.max_text_tokens, system_prompt=cfg.model.system_prompt, resize=d.resize,
                      target_fps=d.target_fps, image_frames=cfg.model.image_frames)


def make_loader(cfg, tokenizer, dist, srcs, resampled: bool, batch_size: int, pin: bool, budgets=True) -> Loader:
    d = cfg.data
    stream = ShardStream(srcs, sample_spec(cfg), tokenizer, batch_size=batch_size,
                         max_batch_frames=d.max_batch_frames if budgets else None,
                         max_batch_tokens=d.max_batch_tokens if budgets else None, resampled=resampled,
                         text_ratio=d.text_ratio, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    return Loader(stream, num_workers=d.num_workers, prefetch_factor=d.prefetch_factor, pin_memory=pin)


def host_stats(batch: dict, stage: str) -> dict:
    """Sizes of a host batch, read before it moves (no device sync): samples, frames encoded, visual
    tokens, text tokens per row (for tokens/s and the FLOP estimate), loss targets."""
    prefix = "chosen_" if stage == "dpo" else ""
    text = batch[prefix + "attention_mask"].sum(1)
    if stage == "dpo":
        text = text + batch["rejected_attention_mask"].sum(1)
    visual = (batch["frame_index"] >= 0).sum(1)
    targets = (batch["chosen_target_index"].numel() + batch["rejected_target_index"].numel() if stage == "dpo"
               else batch["target_index"].numel())
    return {"samples": len(batch["keys"]), "frames": 0 if batch["frames"] is None else batch["frames"].shape[0],
            "visual": int(visual.sum()), "text": int(text.sum()),
            "seq_sq": float(((text + visual * (2 if stage == "dpo" else 1)).float() ** 2).sum()), "targets": targets}


# ---- the FLOP estimate for MFU ---------------------------------------------------------------------

def flops_per_sample_terms(model: FoveatedVLM, frame_size: int):
    """(DINO patch-pass FLOPs per frame, query-pass FLOPs per visual token, LLM FLOPs per token,
    LLM attention FLOPs per squared sequence position, lm_head FLOPs per target), forward only."""
    dino_blocks = sum(p.numel() for p in model.encoder.dino.blocks.parameters())
    cfg = model.dino_config
    keys = (frame_size // cfg.patch_size) ** 2 + 1
    dino_frame = 2 * dino_blocks * keys + 4 * cfg.num_hidden_layers * keys ** 2 * cfg.hidden_size
    query = 2 * dino_blocks + 4 * cfg.num_hidden_layers * keys * cfg.hidden_size
    lc = model.llm.config
    embed = model.llm.get_input_embeddings().weight.numel()
    llm_body = sum(p.numel() for p in model.llm.model.parameters()) - embed
    head = 2 * lc.hidden_size * lc.vocab_size
    return dino_frame, query, 2 * llm_body, 2 * lc.num_hidden_layers * lc.hidden_size, head


def step_flops(terms, s: dict, mode: str, stage: str, with_reference: bool) -> float:
    """Training FLOPs of one micro-batch: 3x the forward (backward ~ 2x forward), plus the reference's
    forward for DPO. An estimate: it counts matmuls and attention, not norms or softmaxes."""
    dino_frame, query, llm_tok, attn, head = terms
    passes = 2 if mode == "coarse_fine" else 1
    fwd = (s["frames"] * (dino_frame + query) + passes * s["visual"] * query
           + llm_tok * (s["text"] + (2 if stage == "dpo" else 1) * s["visual"])
           + (llm_tok * s["visual"] if mode == "coarse_fine" else 0)
           + attn * s["seq_sq"] + head * s["targets"])
    return 3 * fwd + (fwd if with_reference else 0)


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---- logging ---------------------------------------------------------------------------------------

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


# ---- the run ---------------------------------------------------------------------------------------

def check_resume_config(cfg, stored: dict, path):
    new, old = cfg.to_dict(), config_from_dict(stored, f"{path}").to_dict()
    changed = [k for k in _flat(new) if k.split(".")[0] not in RESUME_MAY_CHANGE
               and _flat(new).get(k) != _flat(old).get(k)]
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


def precompute_reference(model, cfg, dist, tokenizer, to_device, autocast, path: Path) -> dict:
    """{(source, key): (chosen logp, rejected logp)} of the stage's initial weights over every train and
    val pair (one exact pass, split over ranks), saved to path; read back when it exists."""
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored["init_from"] == cfg.init_from:
            return stored["logps"]
    table, duplicates = {}, []
    model.eval()
    for srcs in (sources(cfg.data.train), sources(cfg.data.val)):
        if not srcs:
            continue
        loader = make_loader(cfg, tokenizer, dist, srcs, resampled=False, batch_size=cfg.data.batch_size,
                             pin=False, budgets=True)
        with torch.no_grad(), autocast:
            for host in loader:
                out = dpo_logps(model, to_device(host), cfg.mode)
                for src, key, c, r in zip(host["sources"], host["keys"], out["chosen_logps"].tolist(),
                                          out["rejected_logps"].tolist()):
                    if (src, key) in table:
                        duplicates.append((src, key))
                    table[(src, key)] = (c, r)
    model.train()
    merged = {}
    for part, dups in distributed.all_gather_object(dist, (table, duplicates)):
        duplicates += [k for k in part if k in merged] + dups
        merged.update(part)
    if duplicates:
        raise ValueError(f"dpo.reference: precomputed needs unique (source, key) per sample; "
                         f"{len(set(duplicates))} repeat, e.g. {sorted(set(duplicates))[:3]}; use reference: model")
    if dist.is_main:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"logps": merged, "init_from": cfg.init_from}, tmp)
        tmp.replace(path)
    distributed.barrier(dist)
    log.info("reference log-probs of %d pairs precomputed -> %s", len(merged), path)
    return merged


def train(cfg, dist) -> dict:
    run_dir = Path(expand_path(cfg.run_dir))
    setup_logging(run_dir, dist)
    device = dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = device.type == "cuda" and cfg.precision == "bf16"
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()  # noqa: E731

    latest = ckpt.latest_checkpoint(run_dir)
    resume = ckpt.load_checkpoint(latest) if latest else None
    if resume:
        check_resume_config(cfg, resume["config"], latest)
    if cfg.init_from and not Path(expand_path(cfg.init_from)).exists():
        raise ConfigError(f"init_from: {cfg.init_from} does not exist")
    train_sources, val_sources = sources(cfg.data.train), sources(cfg.data.val)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    model = build_model(cfg).to(device)
    tokenizer = model.tokenizer
    distributed.broadcast_model(dist, model)
    reference = None
    if cfg.stage == "dpo" and cfg.dpo.reference == "model":  # the stage's initial weights, frozen
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        if amp:
            reference.to(torch.bfloat16)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pin = device.type == "cuda"

    ref_table = None

    def to_device(host):
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in host.items()}
        if ref_table is not None:
            try:
                pairs = [ref_table[(s, k)] for s, k in zip(host["sources"], host["keys"])]
            except KeyError as e:
                raise KeyError(f"no precomputed reference log-probs for sample {e}; delete "
                               f"{run_dir / 'reference_logps.pt'} to recompute them") from e
            ref = torch.tensor(pairs, dtype=torch.float32).to(device, non_blocking=True)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch

    if cfg.stage == "dpo" and cfg.dpo.reference == "precomputed":
        ref_table = precompute_reference(model, cfg, dist, tokenizer, to_device, autocast(),
                                         run_dir / "reference_logps.pt")

    loader = make_loader(cfg, tokenizer, dist, train_sources, cfg.data.resampled, cfg.data.batch_size, pin)
    modes = cfg.eval.modes or [cfg.mode]
    counters = {"step": 0, "samples": 0, "tokens": 0, "skipped_nonfinite": 0, "skipped_oom": 0,
                "train_seconds": 0.0, "best": None}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        loader.load_state_dict(resume["data"][dist.rank])
        ckpt.set_rng_state(resume["rng"][dist.rank])
        counters.update(resume["counters"])
        log.info("resumed from %s (step %d)", latest, counters["step"])
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # runtime randomness (dropout) differs per rank

    forward_loss = torch.compile(micro_batch_loss) if cfg.compile else micro_batch_loss
    metric_cols = ["step", "samples", "tokens", "loss", *[f"lr_{g}" for g in cfg.optim.lr], "grad_norm",
                   "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb", "skipped_nonfinite", "skipped_oom",
                   "data_skipped", "elapsed_s"] + (list(DPO_METRICS) if cfg.stage == "dpo" else [])
    val_cols = ["step", "mode", "source", "samples", "tokens", "loss", "token_acc", "answer_acc", "static_entropy",
                "dynamic_entropy"] + (["dpo_loss", *DPO_METRICS] if cfg.stage == "dpo" else [])
    resume_step = counters["step"] if resume else None
    metrics = CsvLog(run_dir / "metrics.csv", metric_cols, resume_step) if dist.is_main else None
    val_log = CsvLog(run_dir / "val.csv", val_cols, resume_step) if dist.is_main and val_sources else None
    wandb_run = _wandb(cfg, run_dir) if dist.is_main and cfg.log.wandb else None

    terms = flops_per_sample_terms(model, cfg.data.frame_size)
    peak = peak_flops(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s stage, %s mode | %.1fM parameters (%.1fM trained) | %d rank(s) on %s | %d steps x %d micro-batches "
             "of <= %d samples", cfg.stage, cfg.mode, n_params / 1e6, sum(p.numel() for p in params) / 1e6,
             dist.world_size, device, cfg.optim.steps, cfg.optim.grad_accum, cfg.data.batch_size)

    def run_validation(step):
        if not val_sources:
            return None
        val_loader = make_loader(cfg, tokenizer, dist, val_sources, resampled=False, batch_size=cfg.eval.batch_size,
                                 pin=pin, budgets=False)
        res = validate(model, val_loader, stage=cfg.stage, modes=modes, to_device=to_device, autocast=autocast(),
                       max_samples=cfg.eval.max_samples, dist=dist, dpo_mode=cfg.mode, beta=cfg.dpo.beta,
                       reference=reference)
        metric = best_metric(res, cfg.stage, modes)
        parts = [f"{m} loss {r['all']['loss']:.4f} answer acc {r['all']['answer_acc']:.3f}"
                 for m, r in res["modes"].items()]
        if cfg.stage == "dpo":
            parts.insert(0, f"dpo loss {res['dpo']['loss']:.4f} reward acc {res['dpo']['rewards/accuracies']:.3f}")
        first = res["modes"][modes[0]]["all"]
        log.info("val @ step %d (%d samples): %s | attention entropy static %.3f dynamic %.3f", step, res["samples"],
                 " | ".join(parts), first["static_entropy"], first["dynamic_entropy"])
        if val_log:
            for m, r in res["modes"].items():
                for src, row in [("all", r["all"]), *r["by_source"].items()]:
                    extra = ({"dpo_loss": res["dpo"]["loss"], **{k: res["dpo"][k] for k in DPO_METRICS}}
                             if cfg.stage == "dpo" and src == "all" else {})
                    val_log.write({"step": step, "mode": m, "source": src, **row, **extra})
        if wandb_run:
            wandb_run.log({f"val/{m}/{k}": v for m, r in res["modes"].items() for k, v in r["all"].items()}, step=step)
        return metric

    def save(step, metric=None):
        states = distributed.all_gather_object(dist, (loader.state_dict(), ckpt.rng_state()))
        if dist.is_main:
            if metric is not None and (counters["best"] is None or metric < counters["best"]["metric"]):
                counters["best"] = {"step": step, "metric": metric, "file": f"step_{step:08d}.pt"}
            path = ckpt.save_checkpoint(run_dir, step, {
                "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "data": [s for s, _ in states], "rng": [r for _, r in states], "counters": dict(counters),
                "config": cfg.to_dict(), "versions": {"torch": str(torch.__version__)}})
            if counters["best"] is not None:
                ckpt.write_json(ckpt.checkpoint_dir(run_dir) / "best.json", counters["best"])
            ckpt.prune(run_dir, cfg.checkpoint.keep_last)
            log.info("checkpoint %s", path)
        distributed.barrier(dist)

    def batches():
        while cfg.data.resampled or loader.stream.epoch < cfg.data.epochs:
            yield from loader
        while True:
            yield None

    if not resume and cfg.eval.at_start and val_sources:
        run_validation(0)
    data = batches()
    step = counters["step"]
    window = _new_window()
    bad_in_row, stopped_early, saved_step = 0, False, step
    start_time = time.perf_counter()
    while step < cfg.optim.steps:
        t0 = time.perf_counter()
        lrs = set_lrs(optimizer, cfg, step)
        loss_sum = torch.zeros((), device=device)
        dpo_sums = {k: torch.zeros((), device=device) for k in DPO_METRICS}
        have, oom, local_weight = 1.0, 0.0, 0
        stats = dict(samples=0, tokens=0, flops=0.0)
        for _ in range(cfg.optim.grad_accum):
            host = next(data)
            if host is None:
                have = 0.0
                break
            if oom:
                continue  # keep consuming this step's data so that every rank stays in step
            s = host_stats(host, cfg.stage)
            try:
                with autocast():
                    ls, extra = forward_loss(model, to_device(host), cfg.stage, cfg.mode, cfg.dpo.beta, reference)
                ls.backward()
            except torch.OutOfMemoryError:
                oom = 1.0
                optimizer.zero_grad(set_to_none=True)
                ls = extra = None
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory at step %d (%d samples, %d frames); skipping the step",
                            step, s["samples"], s["frames"])
                continue
            loss_sum += ls.detach()
            for k, v in extra.items():
                dpo_sums[k] += v
            local_weight += weight(host, cfg.stage)
            stats["samples"] += s["samples"]
            stats["tokens"] += s["text"] + s["visual"]
            stats["flops"] += step_flops(terms, s, cfg.mode, cfg.stage, reference is not None)
        have_all, any_oom, total_weight = distributed.agree(dist, [have, oom, local_weight], ["min", "max", "sum"])
        if have_all < 1:
            log.info("the training data ran out (on at least one rank) at step %d; stopping", step)
            optimizer.zero_grad(set_to_none=True)
            stopped_early = True
            break
        if any_oom:
            counters["skipped_oom"] += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        distributed.all_reduce_grads(dist, params)
        sums = torch.stack([loss_sum, *dpo_sums.values()])
        distributed.all_reduce_sum_(dist, [sums])
        scale = 1.0 / max(total_weight, 1.0)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or float("inf"))
        values = torch.cat([norm.reshape(1).float(), sums]).tolist()  # the step's one host sync
        if not math.isfinite(values[0]):
            counters["skipped_nonfinite"] += 1
            bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("non-finite gradient norm at step %d (%d in a row); step skipped", step, bad_in_row)
            if bad_in_row >= cfg.optim.max_bad_steps:
                raise RuntimeError(f"{bad_in_row} non-finite steps in a row; aborting (see optim.max_bad_steps)")
            continue
        bad_in_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        totals = distributed.agree(dist, [stats["samples"], stats["tokens"], stats["flops"]], ["sum"] * 3)
        counters["step"], counters["samples"] = step, counters["samples"] + int(totals[0])
        counters["tokens"] += int(totals[1])
        elapsed = time.perf_counter() - t0
        counters["train_seconds"] += elapsed
        window["loss"] += values[1]
        window["weight"] += total_weight
        window["steps"] += 1
        window["samples"] += totals[0]
        window["tokens"] += totals[1]
        window["flops"] += totals[2]
        window["seconds"] += elapsed
        window["norm"] += values[0]
        for k, v in zip(DPO_METRICS, values[2:]):
            window["dpo"][k] += v
        if step % cfg.log.every_steps == 0 or step == cfg.optim.steps:
            _log_step(cfg, step, window, lrs, counters, loader, peak, metrics, wandb_run, dist, device)
            window = _new_window()
        last = step == cfg.optim.steps
        metric = None
        if val_sources and (last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)):
            metric = run_validation(step)
        if last or step % cfg.checkpoint.every_steps == 0:
            save(step, metric)
            saved_step = step
    if stopped_early and step > saved_step:  # the data ran out between checkpoints
        save(step, run_validation(step))
    return _finish(cfg, model, run_dir, counters, loader, dist, start_time, wandb_run)


def _new_window() -> dict:
    """Sums over the steps since the last log line."""
    return dict(loss=0.0, weight=0.0, steps=0, samples=0, tokens=0, flops=0.0, seconds=0.0, norm=0.0,
                dpo={k: 0.0 for k in DPO_METRICS})


def _log_step(cfg, step, w, lrs, counters, loader, peak, metrics, wandb_run, dist, device):
    skipped = loader.counts()["skipped"]
    data_skipped = sum(n for reasons in skipped.values() for n in reasons.values())
    loss = w["loss"] / max(w["weight"], 1.0)
    sps = w["samples"] / max(w["seconds"], 1e-9)
    tps = w["tokens"] / max(w["seconds"], 1e-9)
    mfu = w["flops"] / max(w["seconds"], 1e-9) / (peak * dist.world_size) if peak else None
    per_step = counters["train_seconds"] / max(step, 1)
    eta = per_step * (cfg.optim.steps - step)
    norm = w["norm"] / max(w["steps"], 1)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"step": step, "samples": counters["samples"], "tokens": counters["tokens"], "loss": loss,
           **{f"lr_{g}": v for g, v in lrs.items()}, "grad_norm": norm, "samples_per_s": sps, "tokens_per_s": tps,
           "mfu": mfu, "peak_mem_gb": mem, "skipped_nonfinite": counters["skipped_nonfinite"],
           "skipped_oom": counters["skipped_oom"], "data_skipped": data_skipped, "elapsed_s": counters["train_seconds"]}
    if cfg.stage == "dpo":
        row.update({k: v / max(w["weight"], 1.0) for k, v in w["dpo"].items()})
    extra = (f" | reward acc {row['rewards/accuracies']:.3f} margin {row['rewards/margins']:.3f}"
             if cfg.stage == "dpo" else "")
    log.info("step %d/%d | loss %.4f | lr %s | grad norm %.3f | %.1f samples/s | %.0f tokens/s%s%s%s | eta %s",
             step, cfg.optim.steps, loss, " ".join(f"{v:.2e}" for v in lrs.values()), norm, sps, tps,
             f" | mfu {mfu:.1%}" if mfu is not None else "", f" | peak mem {mem:.1f} GiB" if mem is not None else "",
             extra, _duration(eta))
    if metrics:
        metrics.write(row)
    if wandb_run:
        wandb_run.log({f"train/{k}": v for k, v in row.items() if v is not None and k != "step"}, step=step)


def _finish(cfg, model, run_dir, counters, loader, dist, start_time, wandb_run) -> dict:
    counts = distributed.all_gather_object(dist, loader.counts())
    skipped = {}
    for c in counts:
        for src, reasons in c["skipped"].items():
            for reason, n in reasons.items():
                skipped.setdefault(src, {}).setdefault(reason, 0)
                skipped[src][reason] += n
    summary = {"steps": counters["step"], "samples": counters["samples"], "tokens": counters["tokens"],
               "train_seconds": round(counters["train_seconds"], 1),
               "wall_seconds": round(time.perf_counter() - start_time, 1),
               "samples_per_s": counters["samples"] / max(counters["train_seconds"], 1e-9),
               "skipped_nonfinite": counters["skipped_nonfinite"], "skipped_oom": counters["skipped_oom"],
               "data_skipped": skipped, "best": counters["best"], "final": str(run_dir / "final")}
    if dist.is_main:
        ckpt.export_pretrained(model, run_dir / "final")
        best = counters["best"]
        if best:  # training is over: the model can take the best weights for their export
            model.load_state_dict(ckpt.load_checkpoint(ckpt.checkpoint_dir(run_dir) / best["file"])["model"])
            ckpt.export_pretrained(model, run_dir / "best")
            summary["best_export"] = str(run_dir / "best")
        ckpt.write_json(run_dir / "summary.json", summary)
        log.info("done: %d steps, %d samples in %s (%.2f samples/s) | skipped steps: %d non-finite, %d OOM | "
                 "data skipped: %s | best val %s | final weights: %s", summary["steps"], summary["samples"],
                 _duration(summary["train_seconds"]), summary["samples_per_s"], summary["skipped_nonfinite"],
                 summary["skipped_oom"], skipped or "none",
                 f"{best['metric']:.4f} at step {best['step']}" if best else "n/a", run_dir / "final")
    if wandb_run:
        wandb_run.finish()
    distributed.barrier(dist)
    return summary


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML stage config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value with dotted keys, e.g. optim.lr.llm=3e-5")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    dist = distributed.setup(cfg.device)
    try:
        return train(cfg, dist)
    finally:
        distributed.teardown(dist)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
