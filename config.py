"""Training configuration: a YAML stage file plus `key=value` overrides -> a typed, validated Config.

Every key is declared below with its type and default. Unknown or misspelled keys, wrong types and
out-of-range values are errors that name the key and the file (or the command line), raised before
anything heavy starts. YAML quirk handled: PyYAML reads `1e-3` (no dot) as a string, so float keys
also accept strings that spell a number. Shard patterns, run_dir and init_from expand environment
variables (`${DATA}/openvid/*.tar`), so the stage configs work unchanged once DATA is set.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STAGES = ("alignment", "sft", "dpo", "next_frame")  # next_frame: the self-supervised proof of concept
MODES = ("coarse_only", "coarse_fine", "autoregressive")
LAYOUTS = ("video_first", "prompt_first")
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."  # the published model's
GROUPS = ("connector", "dino", "llm")
SCHEDULES = ("constant", "cosine", "converging")
RESIZE_MODES = ("squash", "crop", "pad")  # to the square frames the model reads (media.resize)
PRECISIONS = ("bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
# ddp: every rank a full replica, gradients summed once per step (distributed.py); fsdp: FSDP2 shards
# parameters, gradients and optimizer states across the torchrun ranks (docs/scale.md)
DISTRIBUTED = ("ddp", "fsdp")
REFERENCES = ("model", "precomputed")
TARGETS = ("pixels", "vae", "taesd")  # what the next-frame head predicts (latents.py)


class ConfigError(ValueError):
    """A bad configuration; the message names the key and where it came from."""


@dataclass
class ModelConfig:
    """The model's settings: FoveatedVLM is built from it, save_pretrained writes it as config.json."""
    llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id, folder, .gguf, or random:<preset> (backbones.py)
    dino: str = "facebook/dinov2-small"  # vision backbone (DINOv2 or DINOv3 ViT): hub id, folder, or random:<preset>
    query_dim: int = 384
    visual_scale: float = 0.14  # visual tokens are scaled by this before entering the LLM
    layout: str = "video_first"  # or prompt_first: the frames follow the first user message
    image_frames: int = 8  # an image is shown as this many visual tokens (encoded once)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    pretrained: bool = True  # load the backbones' weights (False: random init from their configs)
    # the next-frame prediction head (predict.py): the [C, H, W] it predicts, or null for no head
    next_frame: typing.Optional[list[int]] = None
    next_frame_width: int = 256  # its channels
    # null: the foveated token (one per frame, the published model). N = s * s: the "frames as images"
    # baseline, each frame read as N tokens (its final patch tokens average-pooled to an s x s grid),
    # no queries and no foveation
    tokens_per_frame: typing.Optional[int] = None


@dataclass
class SourceConfig:
    name: str
    shards: typing.Union[str, list[str]]
    weight: float = 1.0
    text: bool = False  # a text-only retention source (shares data.text_ratio of the samples)


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    text_ratio: float = 0.14
    resampled: bool = True  # False: exact passes over the shards (data.epochs of them), then stop
    epochs: int = 1
    frame_size: int = 224
    max_frames: int = 64
    max_text_tokens: int = 1024
    resize: str = "squash"
    target_fps: typing.Optional[float] = 1.0
    batch_size: int = 8  # samples per micro-batch (per rank)
    max_batch_frames: typing.Optional[int] = None  # budget batching: encoded frames per micro-batch
    max_batch_tokens: typing.Optional[int] = None  # budget batching: padded sequence positions
    num_workers: int = 4
    prefetch_factor: int = 2


@dataclass
class OptimConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    lr: dict[str, float] = field(default_factory=lambda: {"connector": 1e-4, "dino": 1e-5, "llm": 1e-5})
    freeze: list[str] = field(default_factory=list)  # parameter groups not trained
    weight_decay: float = 0.01  # not applied to norms, biases and the learned queries
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of each group's LR
    target_lr: typing.Optional[float] = None  # converging: the LR every group ends at
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 10  # stop after this many skipped steps in a row (non-finite gradients or CUDA OOM)


@dataclass
class DPOConfig:
    beta: float = 0.1
    reference: str = "model"  # model: a frozen copy of the initial weights; precomputed: a pre-pass


@dataclass
class NextFrameConfig:
    """Stage next_frame: predict frame t + 1's target from the LLM state at frame t (no text)."""
    target: str = "pixels"  # pixels: frames area-downsampled on the fly; vae / taesd: precomputed KEY.latents.npy
    pixels_size: int = 16  # the pixels target's side
    entropy_weight: float = 0.0  # + weight x the dynamic queries' attention entropy (guide section 12; 0 = off)
    # true: the head predicts the change from frame t's target (prediction = target_t + head(state)), so a
    # head that outputs zero scores copy_loss and only what moves has to be learned
    residual: bool = False


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the start and the end
    at_start: bool = True
    max_samples: int = 1000
    batch_size: int = 16
    modes: list[str] = field(default_factory=list)  # default: the training mode; the text loss of the first one picks the best


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 2


@dataclass
class LogConfig:
    every_steps: int = 10
    wandb: bool = False
    wandb_project: str = "fvlm"
    wandb_mode: str = "offline"


@dataclass
class Config:
    stage: str
    run_dir: str
    init_from: typing.Optional[str] = None
    seed: int = 0
    mode: str = "coarse_fine"
    device: str = "auto"
    precision: str = "bf16"  # bf16: autocast on CUDA over fp32 master weights (CPU always computes in fp32)
    gradient_checkpointing: bool = False
    compile: bool = False
    distributed: str = "ddp"  # how torchrun ranks share the model: ddp (replicas) or fsdp (sharded)
    # weight of the coarse pass's (static query's) loss beside the fine pass's, for the text CE and
    # next_frame: > 0 trains the coarse-only path, a fair static baseline (0: the published recipe)
    coarse_weight: float = 0.0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    next_frame: NextFrameConfig = field(default_factory=NextFrameConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value, tp, key: str, where: str):
    """Check (and minimally convert) value against the annotation tp."""
    def fail(expected):
        raise ConfigError(f"{where}: key '{key}' must be {expected}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        fail(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail("a mapping")
        return _build(tp, value, key, where)
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        return [_coerce(v, args[0], f"{key}.{i}", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if not math.isfinite(value):  # YAML's .inf / .nan: no setting means either
            fail("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"config type {tp} of key {key} is not supported")


def _build(cls, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{_join(prefix, k)}'{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.name in data:
            values[f.name] = _coerce(data[f.name], hints[f.name], key, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required key '{key}' is missing")
    return cls(**values)


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else str(name)


def apply_override(tree: dict, assignment: str):
    """'optim.lr.llm=3e-5' -> set tree['optim']['lr']['llm'] (the value is read as YAML); list items
    by index ('data.train.0.weight=2')."""
    if "=" not in assignment:
        raise ConfigError(f"command line: override {assignment!r} must look like key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node[int(k)] if isinstance(node, list) and k.isdigit() and int(k) < len(node) else (
            node.get(k) if isinstance(node, dict) else None)
        if nxt is None:
            nxt = {}
            if isinstance(node, dict):
                node[k] = nxt
            else:
                raise ConfigError(f"command line: '{'.'.join(keys[:i + 1])}' is not a list index in {path!r}")
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"command line: '{path}' indexes past the end of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path, overrides=()) -> Config:
    """Read a YAML stage file, apply overrides, type-check and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for o in overrides:
        apply_override(tree, o)
    where = f"{path}" + (" (with command-line overrides)" if overrides else "")
    cfg = _build(Config, tree, "", where)
    validate(cfg, where)
    return cfg


def config_from_dict(tree: dict, where: str = "stored config") -> Config:
    cfg = _build(Config, tree, "", where)
    validate(cfg, where)
    return cfg


def build_dataclass(cls, tree: dict, where: str):
    """Any settings dataclass (a study's, a pretraining's) from a mapping, type-checked like the stage
    configs: unknown keys, wrong types and missing required keys are errors naming `where`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: must be a mapping, got {tree!r}")
    return _build(cls, tree, "", where)


def add_dataclass_flags(parser, cls):
    """One command-line flag per field of a settings dataclass with scalar or list defaults
    (`steps` -> --steps N, `scale: [0.09, 0.16]` -> --scale A B, a list of strings -> one or more)."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        many = isinstance(default, list)
        kind = type(default[0]) if many else type(default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                            nargs=("+" if kind is str else len(default)) if many else None)


def dataclass_from_flags(args, cls):
    """The settings dataclass from the flags add_dataclass_flags made."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def model_config(tree: dict, where: str) -> ModelConfig:
    """A ModelConfig from a mapping (config.json, a checkpoint's stored config), type-checked and
    validated; unknown keys are errors naming `where`."""
    cfg = _build(ModelConfig, tree, "", where)
    validate_model(cfg, where, prefix="")
    return cfg


EXPORT_FORMAT = "fvlm"  # the `format` of a save_pretrained folder's config.json


def read_export_config(directory) -> ModelConfig:
    """The ModelConfig in a save_pretrained folder's config.json. Older exports stored neither `llm`
    nor `dino` (the folder's own llm/ and dino/ then stand for them) and a `deep_query: true`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a folder written by save_pretrained)")
    settings = json.loads(path.read_text())
    if not isinstance(settings, dict) or settings.pop("format", None) != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an fvlm config")
    if settings.pop("deep_query", True) is not True:
        raise ValueError(f"{path}: deep_query=false is not supported")
    for part in ("llm", "dino"):
        settings.setdefault(part, str(Path(directory) / part))
    return model_config(settings, str(path))


def validate_model(m: ModelConfig, where: str, prefix: str = "model."):
    if m.layout not in LAYOUTS:
        raise ConfigError(f"{where}: key '{prefix}layout' must be one of {list(LAYOUTS)}, got {m.layout!r}")
    for key in ("query_dim", "image_frames", "next_frame_width"):
        if getattr(m, key) < 1:
            raise ConfigError(f"{where}: key '{prefix}{key}' must be >= 1, got {getattr(m, key)}")
    n = m.tokens_per_frame
    if n is not None and (n < 1 or math.isqrt(n) ** 2 != n):
        raise ConfigError(f"{where}: key '{prefix}tokens_per_frame' must be a square (1, 4, 16, 64, ...: an s x s "
                          f"grid of pooled patch tokens) or null (the foveated token), got {n}")
    if m.next_frame is not None and (len(m.next_frame) != 3 or min(m.next_frame) < 1):
        raise ConfigError(f"{where}: key '{prefix}next_frame' must be [channels, height, width] (>= 1), "
                          f"got {m.next_frame}")


def _checks(where: str):
    """(check(ok, key, message), choice(value, key, options)): each raises a ConfigError naming the key."""
    def check(ok, key, message):
        if not ok:
            raise ConfigError(f"{where}: key '{key}' {message}")

    def choice(value, key, options):
        check(value in options, key, f"must be one of {list(options)}, got {value!r}")

    return check, choice


def validate(cfg: Config, where: str):
    check, choice = _checks(where)
    choice(cfg.stage, "stage", STAGES)
    choice(cfg.mode, "mode", MODES)
    choice(cfg.device, "device", DEVICES)
    choice(cfg.precision, "precision", PRECISIONS)
    choice(cfg.distributed, "distributed", DISTRIBUTED)
    choice(cfg.data.resize, "data.resize", RESIZE_MODES)
    choice(cfg.optim.schedule, "optim.schedule", SCHEDULES)
    choice(cfg.dpo.reference, "dpo.reference", REFERENCES)
    choice(cfg.log.wandb_mode, "log.wandb_mode", ("offline", "online"))
    check(cfg.stage != "dpo" or cfg.mode != "autoregressive", "mode",
          "cannot be autoregressive for DPO training (use coarse_fine or coarse_only)")
    for i, m in enumerate(cfg.eval.modes):
        choice(m, f"eval.modes.{i}", MODES)
    _validate_data(cfg.data, check)
    validate_model(cfg.model, where)
    _validate_optim(cfg.optim, check, choice)
    check(cfg.dpo.beta > 0, "dpo.beta", f"must be > 0, got {cfg.dpo.beta}")
    check(cfg.coarse_weight >= 0, "coarse_weight", f"must be >= 0, got {cfg.coarse_weight}")
    check(cfg.coarse_weight == 0 or cfg.stage in ("alignment", "sft", "next_frame"), "coarse_weight",
          "applies to the text CE (alignment, sft) and next_frame")
    check(cfg.coarse_weight == 0 or cfg.model.tokens_per_frame is None, "coarse_weight",
          "needs the foveated model: with model.tokens_per_frame there is no coarse pass")
    n = cfg.next_frame
    choice(n.target, "next_frame.target", TARGETS)
    check(n.pixels_size >= 1 and n.entropy_weight >= 0, "next_frame", "pixels_size must be >= 1, entropy_weight >= 0")
    if cfg.stage == "next_frame":
        check(cfg.model.tokens_per_frame is None or cfg.mode == "coarse_only", "mode",
              f"must be coarse_only for the pooled baseline (model.tokens_per_frame): it has one pass, got {cfg.mode}")
        check(cfg.model.tokens_per_frame is None or n.entropy_weight == 0, "next_frame.entropy_weight",
              "sharpens the queries' attention: the pooled baseline (model.tokens_per_frame) has none")
        shape = cfg.model.next_frame
        want = "[3, next_frame.pixels_size, next_frame.pixels_size]" if n.target == "pixels" else "[4, H, W]"
        check(shape is not None, "model.next_frame", f"is required by stage next_frame: the head's output, {want}")
        check(n.target != "pixels" or shape == [3, n.pixels_size, n.pixels_size], "model.next_frame",
              f"must be {want} = {[3, n.pixels_size, n.pixels_size]} for the pixels target, got {shape}")
        check(n.target == "pixels" or shape[0] == 4, "model.next_frame",
              f"must have the latents' 4 channels for target {n.target}, got {shape}")
    e = cfg.eval
    check(e.every_steps >= 0 and e.max_samples >= 1 and e.batch_size >= 1, "eval",
          "every_steps must be >= 0, max_samples and batch_size >= 1")
    c = cfg.checkpoint
    check(c.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    check(cfg.log.every_steps >= 1, "log.every_steps", "must be >= 1")


def _validate_data(d, check):
    check(bool(d.train), "data.train", "must list at least one source")
    for part in ("train", "val"):
        names = [s.name for s in getattr(d, part)]
        check(len(set(names)) == len(names), f"data.{part}", f"source names must be unique, got {names}")
        for i, s in enumerate(getattr(d, part)):
            check(s.weight > 0, f"data.{part}.{i}.weight", f"must be > 0, got {s.weight}")
    check(0 <= d.text_ratio < 1, "data.text_ratio", f"must be in [0, 1), got {d.text_ratio}")
    check(not d.resampled or d.epochs == 1, "data.epochs",
          "only applies to exact passes (data.resampled: false); resampled streams never end")
    for key in ("frame_size", "max_frames", "max_text_tokens", "batch_size", "epochs", "prefetch_factor"):
        check(getattr(d, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    for key in ("max_batch_frames", "max_batch_tokens"):
        v = getattr(d, key)
        check(v is None or v >= 1, f"data.{key}", f"must be >= 1 or null, got {v}")
    check(d.target_fps is None or d.target_fps > 0, "data.target_fps", "must be > 0 or null")


def _validate_optim(o, check, choice):
    check(o.steps >= 1, "optim.steps", f"must be >= 1, got {o.steps}")
    check(o.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {o.grad_accum}")
    check(sorted(o.lr) == sorted(GROUPS), "optim.lr", f"must give an LR for each of {list(GROUPS)}, got {sorted(o.lr)}")
    for g, lr in o.lr.items():
        check(lr >= 0, f"optim.lr.{g}", f"must be >= 0, got {lr}")
    for i, g in enumerate(o.freeze):
        choice(g, f"optim.freeze.{i}", GROUPS)
    check(len(set(o.freeze)) < len(GROUPS), "optim.freeze", "cannot freeze every parameter group")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    check(o.weight_decay >= 0 and o.eps > 0, "optim.weight_decay", "and optim.eps must be >= 0 and > 0")
    check(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    check(o.schedule != "converging" or o.target_lr is not None, "optim.target_lr",
          "is required by the converging schedule")
    check(o.target_lr is None or o.schedule == "converging", "optim.target_lr",
          "is only used by the converging schedule")
    check(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
    check(o.max_bad_steps >= 1, "optim.max_bad_steps", "must be >= 1")


_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def expand_path(value: str, key: str | None = None) -> str:
    """Environment variables and ~ in a configured path. With key (the config key it comes from), a
    variable that is not set is a ConfigError naming it (os.path.expandvars would leave `${DATA}`
    in the path, to fail later as a pattern that matches nothing)."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if key is not None and (unset := _VARIABLE.search(expanded)):
        name = unset.group(1).strip("{}")
        raise ConfigError(f"key '{key}' ({value!r}): the environment variable {name} is not set "
                          f"(e.g. export {name}=/path/to/shards)")
    return expanded


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return tp.__name__


def defaults_text() -> str:
    """Every config key with its type and default, one per line (train.py --help)."""
    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = _join(prefix, f.name), hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, key)
                continue
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            yield f"  {key}: {json.dumps(default) if default != '(required)' else default}  ({_type_name(tp)})"

    return "\n".join(walk(Config, ""))
