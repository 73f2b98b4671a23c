"""Does looking beat a static glance? One command runs the controlled study on the testbed: it makes
the probe (scripts/make_synthetic.py), pretrains the vision backbone (scripts/pretrain_vision.py, cached),
trains a grid of matched models (the study config's base train config plus one variant's keys: same
data, steps, learning rates and seeds) and scores each on the held-out probe questions, the validation
loss and where its queries look.

    python scripts/ablate.py --config configs/study_cpu.yaml --out runs/study            # the grid
    python scripts/ablate.py --config configs/study_cpu.yaml --out runs/study --quick    # a first look
    python scripts/ablate.py --config configs/study_cpu.yaml --out runs/study --variants pooled_64 --seeds 0
    python scripts/ablate.py --config configs/study_cpu.yaml --out runs/study --report-only  # after a stop

The study config (StudyConfig; every key checked): `base` (the train config every run shares, relative
to the study file), `steps`, `seeds`, `variants`, `quick` (the variants of --quick), `probe`
(make_synthetic's arguments: clips, tasks, object size, distractors), `vision` (pretrain_vision's
settings, or a folder holding a vision backbone), `llm` (a model.llm for every run, or null for the
base config's), `captions` (the probe's captions mixed into every run's training with this weight) and
`train` (train config keys every run gets, e.g. {optim.freeze: "[]"}: configs/study_cpu_dino.yaml).

Variants (variants()): static (the static query only, trained in coarse_only), coarse_fine (as
published), coarse_fine+coarse_loss (coarse_weight 1: the static path trained too), autoregressive
(trained frame by frame through the KV cache), prompt_first (the question before the frames, so the
queries can depend on it) and pooled_N (the "frames as images" baseline, model.tokens_per_frame = N
average-pooled patch tokens per frame, no queries; N = 1 is the 1-token mean-pooled frame, the largest
N the full patch grid). Rerunning resumes: a finished run or score is kept, a half-trained run
continues from its checkpoint (train.py resumes its run directory).

The probe check: the full-grid baseline (the largest pooled_N) sees every patch, so it must answer the
probe's tasks (study_report.PROBE_BAR) before a comparison on them means something; the report says
"probe check: passed / partial / failed", gives verdicts on the tasks that passed only and, when none
did, no verdict about looking.

Writes, under --out: data/probe/ (the probe), runs/VARIANT/seedS/ (each run: train.py's run directory
plus probe.json, benchmark.py's synthetic scores, and looked.json), then scripts/study_report.py's
results.json (every figure, intervals and paired comparisons), table.md, accuracy_vs_tokens.png,
accuracy_vs_difficulty.png and attention_TASK.png (where the static, dynamic and question-conditioned
queries looked on a question-dependent clip, the target outlined). The report covers every run in --out
trained to --steps and scored, whichever call made it: a grid built up over several calls (more seeds
for some variants) reports all of it, the seeds of each variant in its own column, and pairs two
variants on the seeds both ran. Pretrained backbones go to --backbones (shared by studies).
"""

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import yaml  # noqa: E402

import looked  # noqa: E402
import make_synthetic  # noqa: E402
import pretrain_vision  # noqa: E402
import study_report  # noqa: E402
from backbones import vision_config  # noqa: E402
from config import ConfigError, build_dataclass, load_config  # noqa: E402

FOVEATED = {  # variant -> (config overrides, the mode it is trained and scored in)
    "static": ({"mode": "coarse_only"}, "coarse_only"),
    "coarse_fine": ({"mode": "coarse_fine"}, "coarse_fine"),
    "coarse_fine+coarse_loss": ({"mode": "coarse_fine", "coarse_weight": 1.0}, "coarse_fine"),
    "autoregressive": ({"mode": "autoregressive"}, "autoregressive"),
    "prompt_first": ({"mode": "coarse_fine", "model.layout": "prompt_first"}, "coarse_fine"),
}
POOLED = (1, 4, 16, 64)
LOOKED_CLIPS = 60  # probe clips scored for "where it looked" (tasks in turn: 10 of each of 6)
DRAWN_CLIPS = len(make_synthetic.TASKS)  # the first clip of each task keeps its maps (study_report draws them)


@dataclass
class ProbeConfig:
    """make_synthetic.py's arguments for the probe (frames at the base config's frame size)."""
    size: int = 60000  # training clips
    held_out: int = 600  # eval questions (and validation clips)
    frames: int = 4
    object_scale: float = 1 / 7
    distractors: list[int] = field(default_factory=lambda: [2, 6])
    tasks: list[str] = field(default_factory=lambda: list(make_synthetic.TASKS))
    seed: int = 0
    splits: list[str] = field(default_factory=lambda: ["sft", "val_sft", "eval"])  # the ones the runs read

    def args(self, frame_size: int) -> list[str]:
        return ["--size", str(self.size), "--held-out", str(self.held_out), "--frames", str(self.frames),
                "--frame-size", str(frame_size), "--object-scale", str(self.object_scale),
                "--distractors", *map(str, self.distractors), "--tasks", *self.tasks, "--seed", str(self.seed),
                "--splits", *self.splits]


@dataclass
class StudyConfig:
    base: str  # the train config every run shares, relative to the study config's folder
    steps: int = 3000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=list)  # empty: every variant
    quick: list[str] = field(default_factory=lambda: ["static", "prompt_first", "pooled_1", "pooled_64"])
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # scripts/pretrain_vision.py's settings (pretrained here, cached), a folder with a vision backbone,
    # or null (the base config's model.dino)
    vision: typing.Union[pretrain_vision.Settings, str, None] = None
    llm: typing.Optional[str] = None  # model.llm of every run (null: the base config's)
    # > 0: the probe's captions (its alignment split: every object named, what moves) are mixed into the
    # training data with this weight against the questions' 1 (the same mix for every variant)
    captions: float = 0.0
    # train config keys every run gets on top of the base config (dotted key -> YAML value, e.g.
    # {optim.freeze: "[]"}): a study's setting without a second base config; checked with the base
    train: dict[str, str] = field(default_factory=dict)


def variants(grid: int) -> dict:
    """Every variant at a patch grid of grid x grid: the foveated ones, then pooled_N for N in POOLED
    up to the full grid (and the full grid itself)."""
    out = dict(FOVEATED)
    for n in sorted({n for n in POOLED if n <= grid * grid} | {grid * grid}):
        out[f"pooled_{n}"] = ({"mode": "coarse_only", "model.tokens_per_frame": n}, "coarse_only")
    return out


def load_study(path: Path, cls=StudyConfig):
    """A study config (StudyConfig, or another dataclass with base, steps, seeds, probe and vision: the
    proof of concept's), every key type-checked (config.build_dataclass); base made absolute."""
    if not path.is_file():
        raise ConfigError(f"study config {path} not found")
    study = build_dataclass(cls, yaml.safe_load(path.read_text()) or {}, str(path))
    study.base = str((path.parent / study.base).resolve())
    for key, given, known in (("tasks", study.probe.tasks, make_synthetic.TASKS),
                              ("splits", study.probe.splits, make_synthetic.SPLITS)):
        if sorted(set(given) - set(known)):
            raise ConfigError(f"{path}: key 'probe.{key}' has unknown {key} {sorted(set(given) - set(known))}; "
                              f"known: {list(known)}")
    if study.steps < 1 or not study.seeds:
        raise ConfigError(f"{path}: need steps >= 1 and at least one seed")
    if getattr(study, "captions", 0) and "alignment" not in study.probe.splits:
        raise ConfigError(f"{path}: key 'captions' mixes in the probe's alignment split: add it to 'probe.splits'")
    if isinstance(study.vision, pretrain_vision.Settings):
        try:
            study.vision.check()
        except ValueError as e:
            raise ConfigError(f"{path}: key 'vision': {e}") from None
    return study


def vision_folder(study: StudyConfig, args, log=print) -> str | None:
    """model.dino for every run: the pretrained folder (made unless cached) or the configured folder,
    checked to hold a vision backbone before anything trains."""
    if study.vision is None:
        return None
    if isinstance(study.vision, str):
        folder = Path(study.vision)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{args.config}: key 'vision': no vision backbone folder at {folder} (no config.json)")
    else:
        folder = pretrain_vision.ensure(study.vision, args.backbones, threads=1, log=log)
    try:
        vision_config(str(folder), key="vision")
    except (ValueError, OSError) as e:
        raise ConfigError(f"{args.config}: {e}") from None
    return str(folder.resolve())


def check_object_size(study: StudyConfig, base, dino: str):
    """A probe whose objects are smaller than a patch is legal, but a patch then mixes an object with its
    neighbourhood: say so, naming both sizes."""
    size = make_synthetic.object_size(base.data.frame_size, study.probe.object_scale)
    patch = vision_config(dino).patch_size
    if size < patch:
        print(f"warning: probe.object_scale {study.probe.object_scale:.3g} gives {size}-px objects at "
              f"{base.data.frame_size} px, below the vision backbone's {patch}-px patches", flush=True)


def ensure_data(args, study: StudyConfig) -> Path:
    """The probe folder (a make_synthetic output); made when absent, refused when made otherwise."""
    folder = args.out / "data" / "probe"
    argv = study.probe.args(args.base.data.frame_size)
    expected = make_synthetic.recorded(make_synthetic.build_parser().parse_args(["--out", str(folder), *argv]))
    readme = folder / "README.json"
    if readme.is_file():
        if json.loads(readme.read_text())["arguments"] != expected:
            raise ConfigError(f"{folder} holds a probe made with other settings than {args.config}'s 'probe'; "
                              f"use another --out")
        return folder
    print(f"making the probe in {folder}", flush=True)
    make_synthetic.main(["--out", str(folder), *argv, "--workers", str(os.cpu_count() or 1)])
    return folder


def overrides(args, study, data: Path, run_dir: Path, seed: int, keys: dict, mode: str) -> list[str]:
    train = f"{{name: probe, shards: '{data / 'sft'}'}}"
    if study.captions:
        train += f", {{name: captions, shards: '{data / 'alignment'}', weight: {study.captions}}}"
    base = {"run_dir": str(run_dir), "seed": seed, "optim.steps": args.steps, "eval.modes": f"[{mode}]",
            "data.train": f"[{train}]", "data.val": f"[{{name: probe, shards: '{data / 'val_sft'}'}}]"}
    if args.dino:
        base["model.dino"] = f"'{args.dino}'"
    if study.llm:
        base["model.llm"] = f"'{study.llm}'"
    # the study's train keys over the base ones, the variant's own keys (what it compares) over both
    return [f"{k}={v}" for k, v in {**base, **study.train, **keys}.items()]


def finished(run_dir: Path, steps: int) -> bool:
    """Trained to `steps` (its config says so: a longer run's validation at `steps` does not count) and
    validated there, its final model written."""
    if not (run_dir / "final" / "config.json").is_file():
        return False
    trained = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("optim", {}).get("steps")
    return trained == steps and any(int(r["step"]) == steps for r in read_csv(run_dir / "val.csv"))


def check_run(run_dir: Path, keys: dict, config: Path):
    """A run already in the folder must have been trained with `keys` (dotted train config keys -> values
    or YAML text: the study's train keys and the variant's): one trained under another config is an
    error, never resumed, reused or reported."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    tree = yaml.safe_load(saved.read_text()) or {}
    for key, want in keys.items():
        got = tree
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        want = yaml.safe_load(want) if isinstance(want, str) else want
        if got != want:
            raise ConfigError(f"{run_dir} was trained with {key}: {got!r}, not {want!r} as {config} sets it; "
                              f"use another --out")


def scored_seeds(args, study, grid: dict) -> dict:
    """{variant: the seeds with a run in the study folder trained to --steps and scored}: what the report
    covers, whichever call trained them, so a grid built up over several calls (or stopped early) reports
    every finished cell and the table says which seeds each variant has. Every run found must have been
    trained with this study's settings (check_run)."""
    out = {}
    for name, (keys, _) in grid.items():
        seeds = []
        for run_dir in (args.out / "runs" / name).glob("seed*"):
            number = run_dir.name.removeprefix("seed")
            if not (number.isdigit() and run_dir.name == f"seed{int(number)}"):
                continue  # not a run directory of ours
            check_run(run_dir, {**study.train, **keys}, args.config)
            done = finished(run_dir, args.steps) and (run_dir / "probe.json").is_file()
            looks = "model.tokens_per_frame" in keys or (run_dir / "looked.json").is_file()  # pooled: no queries
            if done and looks:
                seeds.append(int(number))
        if seeds:
            out[name] = sorted(seeds)
    return out


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_one(args, study, data: Path, bench_root: Path, name: str, keys: dict, mode: str, seed: int) -> Path:
    """Train (or resume) one run, then its probe scores and, for a model with queries, where it looked."""
    run_dir = args.out / "runs" / name / f"seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = args.out / "runs" / name / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        if not finished(run_dir, args.steps):
            print(f"training {name} seed {seed}\n", end="", flush=True)  # one write: the jobs' lines stay whole
            cmd = [sys.executable, str(ROOT / "train.py"), "--config", study.base,
                   *overrides(args, study, data, run_dir, seed, keys, mode)]
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=env)
        if not (run_dir / "probe.json").is_file():
            cfg = args.base
            cmd = [sys.executable, str(ROOT / "benchmark.py"), "--checkpoint", str(run_dir / "final"),
                   "--data-root", str(bench_root), "--bench", "synthetic", "--mode", mode,
                   "--frame-size", str(cfg.data.frame_size), "--max-frames", str(cfg.data.max_frames),
                   "--output", str(run_dir / "probe.json.part"), *(["--limit", str(args.limit)] if args.limit else [])]
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=env)
            items = run_dir / "probe.json.part.items.jsonl"  # benchmark.py's item-by-item log, kept beside it
            if items.is_file():
                items.rename(run_dir / "probe.json.items.jsonl")
            (run_dir / "probe.json.part").rename(run_dir / "probe.json")
    if "model.tokens_per_frame" not in keys and not (run_dir / "looked.json").is_file():
        score_looking(args, run_dir, data, mode)
    return run_dir


@torch.no_grad()
def score_looking(args, run_dir: Path, data: Path, mode: str):
    """looked.json: the target's share of the static and dynamic queries' attention on LOOKED_CLIPS
    held-out clips (with their own questions), against chance; and the first clips' maps."""
    from model import FoveatedVLM

    cfg = args.base
    model = FoveatedVLM.from_pretrained(run_dir / "final").eval()
    probe = looked.read_probe(data / "val_sft", cfg.data.frame_size, cfg.data.max_frames, LOOKED_CLIPS)
    scores = [looked.clip_scores(model, sample, meta, mode) for sample, meta in probe]
    drawn = [{"key": s["key"], "maps": {k: v.tolist() for k, v in s["maps"].items()}} for s in scores[:DRAWN_CLIPS]]
    per_task = {t: looked.summarise([s for s in scores if s["task"] == t]) for t in sorted({s["task"] for s in scores})}
    (run_dir / "looked.json").write_text(json.dumps({"mode": mode, "summary": looked.summarise(scores),
                                                     "per_task": per_task, "drawn": drawn}))


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample std over seeds; 0 for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_figures(args, run_dir: Path, mode: str, tasks) -> dict:
    """One run's figures: probe accuracy (overall, per task), validation loss, training cost, where it looked."""
    probe = json.loads((run_dir / "probe.json").read_text())["results"]["synthetic"][mode]
    metrics, val = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "val.csv")
    final = [r for r in val if int(r["step"]) == args.steps and r["source"] == "all"][-1]
    per_task = probe["per_category"]["task"]
    run = {"accuracy": probe["accuracy"], "likelihood_accuracy": probe["likelihood_accuracy"],
           **{t: per_task[t]["accuracy"] for t in tasks if t in per_task},
           "val_loss": float(final["loss"]), "val_answer_acc": float(final["answer_acc"]),
           "train_flops_per_sample": sum(float(r["flops"]) for r in metrics) / int(metrics[-1]["samples"]),
           "train_seconds": float(metrics[-1]["elapsed_s"]),
           "train_samples_per_second": int(metrics[-1]["samples"]) / float(metrics[-1]["elapsed_s"])}
    if (run_dir / "looked.json").is_file():
        scored = json.loads((run_dir / "looked.json").read_text())
        parts = [("looked", scored["summary"])] + [(f"looked_{t}", v) for t, v in scored["per_task"].items()]
        for key, summary in parts:
            run[key] = {k: summary[k]["share"][0] for k in looked.KINDS if k in summary}
            run[key]["chance"] = summary["chance"][0]
    return run


def collect(args, study, grid: dict, seeds: dict) -> dict:
    """Every run's figures, and per variant their mean and std over its seeds."""
    cfg = args.base
    results = {}
    for name, (keys, mode) in grid.items():
        runs = [{"seed": seed, **run_figures(args, args.out / "runs" / name / f"seed{seed}", mode, study.probe.tasks)}
                for seed in seeds[name]]
        tokens = keys.get("model.tokens_per_frame", 1)
        agg = {k: spread([r[k] for r in runs]) for k in runs[0] if k != "seed" and not k.startswith("looked")}
        for key in (k for k in runs[0] if k.startswith("looked")):  # where it looked: overall and per task
            agg[key] = {kind: spread([r[key][kind] for r in runs]) for kind in runs[0][key]}
        results[name] = {"overrides": keys, "mode": mode, "seeds": seeds[name], "tokens_per_frame": tokens,
                         "tokens_per_clip": tokens * cfg.data.max_frames, "runs": runs, "mean_std": agg}
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "study_cpu.yaml", help="the study config")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="the study's folder")
    parser.add_argument("--backbones", type=Path, default=Path("runs/backbones"),
                        help="the cache of pretrained vision backbones (scripts/pretrain_vision.py)")
    parser.add_argument("--quick", action="store_true",
                        help="train the first seed and the config's quick variants only (the report covers every "
                             "finished run in --out)")
    parser.add_argument("--seeds", type=int, nargs="+", help="instead of the config's seeds")
    parser.add_argument("--steps", type=int, help="instead of the config's training steps")
    parser.add_argument("--variants", nargs="+", help="a subset of the variants (default: the config's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each with cores / jobs threads)")
    parser.add_argument("--limit", type=int, help="score only the first N probe questions (default: all)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and score nothing: report every finished run in --out (a grid stopped early)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.config)
        # the settings every run shares (a bad key in the study's `train` is an error here, before any work)
        args.base = load_config(study.base, [f"{k}={v}" for k, v in study.train.items()])
    except ConfigError as e:
        parser.error(str(e))
    grid = variants(args.base.data.frame_size // vision_config(args.base.model.dino).patch_size)
    # each once (a cell named twice would be trained twice at once)
    args.variants = list(dict.fromkeys(args.variants or (study.quick if args.quick else study.variants) or grid))
    unknown = sorted(set(args.variants) - set(grid))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(grid)}")
    args.seeds = list(dict.fromkeys(args.seeds or (study.seeds[:1] if args.quick else study.seeds)))
    args.steps = args.steps or study.steps
    if args.steps < 1 or args.jobs < 1 or min(args.seeds) < 0:
        parser.error("need --steps >= 1, --jobs >= 1 and seeds >= 0")
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    return args, study, grid


def main(argv=None) -> dict:
    args, study, grid = parse_args(argv)
    try:
        args.dino = vision_folder(study, args)  # before anything is made: a bad folder is one error
        check_object_size(study, args.base, args.dino or args.base.model.dino)
        args.out.mkdir(parents=True, exist_ok=True)
        data = ensure_data(args, study)
        scored_seeds(args, study, grid)  # a run of another config in the folder: an error before any training
    except ConfigError as e:
        raise SystemExit(f"ablate.py: error: {e}") from None
    bench_root = args.out / "bench"  # benchmark.py reads DATA_ROOT/synthetic
    if not (bench_root / "synthetic").exists():
        bench_root.mkdir(exist_ok=True)
        (bench_root / "synthetic").symlink_to(data.resolve())
    start = time.perf_counter()
    # seed-major: a grid stopped early has every variant at the first seeds
    jobs = [] if args.report_only else [(name, *grid[name], seed) for seed in args.seeds for name in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(run_one, args, study, data, bench_root, *job) for job in jobs]:
            f.result()
    seeds = scored_seeds(args, study, grid)  # every finished run in the folder, not only this call's
    shown = {name: grid[name] for name in seeds}
    results = collect(args, study, shown, seeds)
    check = study_report.probe_check(results)
    analysis = study_report.write(args, data, shown, results, check, study.probe.tasks)
    report = {"steps": args.steps, "seeds": seeds, "study_config": str(args.config),
              "study": dataclasses.asdict(study), "probe": json.loads((data / "README.json").read_text())["arguments"],
              "vision": args.dino, "wall_seconds_this_call": time.perf_counter() - start, "probe_check": check,
              "analysis": analysis, "variants": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print((args.out / "table.md").read_text())
    return report


if __name__ == "__main__":
    main()
