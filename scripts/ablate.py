"""Does looking beat a static glance? One command trains a grid of matched models on the synthetic
detail probe (same data, steps, learning rates and seeds; configs/ablate_probe.yaml plus one variant's
keys) and scores each on the held-out probe questions, the validation loss and where its queries look.

    python scripts/ablate.py --out runs/ablate                       # the whole grid, 3 seeds
    python scripts/ablate.py --out runs/ablate --steps 300 --seeds 0  # a quick look
    python scripts/ablate.py --out runs/ablate --variants static coarse_fine pooled_64

Variants (VARIANTS): static (the static query only, trained in coarse_only), coarse_fine (as published),
coarse_fine+coarse_loss (coarse_weight 1: the static path trained too), prompt_first (the question
before the frames, so the queries can depend on it) and pooled_N (the "frames as images" baseline,
model.tokens_per_frame = N average-pooled patch tokens per frame, no queries; N = 1 is the 1-token
mean-pooled frame, the largest N the full patch grid). Rerunning resumes: a finished run or score is
kept, a half-trained run continues from its checkpoint (train.py resumes its run directory).

Writes, under --out: data/synthetic/ (the probe, made here unless --data names one), runs/VARIANT/seedS/
(each run: train.py's run directory plus probe.json, benchmark.py's synthetic scores, and looked.json),
results.json (every figure), table.md, accuracy_vs_tokens.png and looked_VARIANT.png (attention of a few
clips with the target's box outlined).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import looked  # noqa: E402
import make_synthetic  # noqa: E402
from backbones import vision_config  # noqa: E402
from config import load_config  # noqa: E402

BASE = ROOT / "configs" / "ablate_probe.yaml"
# the detail probe at the base config's frame size: objects of 1/12 of the side (10 px at 112 px,
# 19 px at 224 px) among 6-12 distractors, 4 frames
PROBE_ARGS = ["--size", "3000", "--frames", "4", "--object-scale", str(1 / 12), "--distractors", "6", "12"]
FOVEATED = {  # variant -> (config overrides, the mode it is trained and scored in)
    "static": ({"mode": "coarse_only"}, "coarse_only"),
    "coarse_fine": ({"mode": "coarse_fine"}, "coarse_fine"),
    "coarse_fine+coarse_loss": ({"mode": "coarse_fine", "coarse_weight": 1.0}, "coarse_fine"),
    "prompt_first": ({"mode": "coarse_fine", "model.layout": "prompt_first"}, "coarse_fine"),
}
POOLED = (1, 4, 16, 64)
TASKS = ("colour", "shape", "motion")
LOOKED_CLIPS = 48  # probe clips scored for "where it looked"
DRAWN_CLIPS = 3


def variants(grid: int) -> dict:
    """Every variant at a patch grid of grid x grid: the foveated ones, then pooled_N for N in POOLED
    up to the full grid (and the full grid itself)."""
    out = dict(FOVEATED)
    for n in sorted({n for n in POOLED if n <= grid * grid} | {grid * grid}):
        out[f"pooled_{n}"] = ({"mode": "coarse_only", "model.tokens_per_frame": n}, "coarse_only")
    return out


def chance() -> dict:
    """The answer accuracy of guessing, per task: colours, shapes, directions."""
    return {"colour": 1 / len(make_synthetic.PALETTE), "shape": 1 / len(make_synthetic.SHAPES),
            "motion": 1 / len(make_synthetic.DIRECTIONS)}


def ensure_data(args) -> Path:
    """The probe folder (a make_synthetic output); made with PROBE_ARGS when absent."""
    folder = args.data or args.out / "data" / "synthetic"
    if not (folder / "README.json").is_file():
        print(f"making the probe in {folder}", flush=True)
        make_synthetic.main(["--out", str(folder), "--frame-size", str(args.base.data.frame_size), *PROBE_ARGS])
    return folder


def overrides(args, data: Path, run_dir: Path, seed: int, keys: dict, mode: str) -> list[str]:
    base = {"run_dir": str(run_dir), "seed": seed, "optim.steps": args.steps, "eval.modes": f"[{mode}]",
            "data.train": f"[{{name: probe, shards: '{data / 'sft'}'}}]",
            "data.val": f"[{{name: probe, shards: '{data / 'val_sft'}'}}]"}
    return [f"{k}={v}" for k, v in {**base, **keys}.items()]


def finished(run_dir: Path, steps: int) -> bool:
    rows = read_csv(run_dir / "val.csv")
    return (run_dir / "final" / "config.json").is_file() and any(int(r["step"]) == steps for r in rows)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_one(args, data: Path, bench_root: Path, name: str, keys: dict, mode: str, seed: int) -> Path:
    """Train (or resume) one run, then its probe scores and, for a model with queries, where it looked."""
    run_dir = args.out / "runs" / name / f"seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = args.out / "runs" / name / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        if not finished(run_dir, args.steps):
            print(f"training {name} seed {seed}", flush=True)
            cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(args.config),
                   *overrides(args, data, run_dir, seed, keys, mode)]
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=env)
        if not (run_dir / "probe.json").is_file():
            cfg = args.base
            cmd = [sys.executable, str(ROOT / "benchmark.py"), "--checkpoint", str(run_dir / "final"),
                   "--data-root", str(bench_root), "--bench", "synthetic", "--mode", mode,
                   "--frame-size", str(cfg.data.frame_size), "--max-frames", str(cfg.data.max_frames),
                   "--output", str(run_dir / "probe.json.part"), *(["--limit", str(args.limit)] if args.limit else [])]
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=env)
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
    (run_dir / "looked.json").write_text(json.dumps({"mode": mode, "summary": looked.summarise(scores),
                                                     "drawn": drawn}))


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample std over seeds; 0 for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(args, grid: dict) -> dict:
    """Every run's figures, and per variant their mean and std over the seeds."""
    cfg = args.base
    results = {}
    for name, (keys, mode) in grid.items():
        runs = []
        for seed in args.seeds:
            run_dir = args.out / "runs" / name / f"seed{seed}"
            probe = json.loads((run_dir / "probe.json").read_text())["results"]["synthetic"][mode]
            metrics, val = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "val.csv")
            final = [r for r in val if int(r["step"]) == args.steps and r["source"] == "all"][-1]
            per_task = probe["per_category"]["task"]
            run = {"seed": seed, "accuracy": probe["accuracy"], "likelihood_accuracy": probe["likelihood_accuracy"],
                   **{t: per_task[t]["accuracy"] for t in TASKS if t in per_task},
                   "val_loss": float(final["loss"]), "val_answer_acc": float(final["answer_acc"]),
                   "train_flops_per_sample": sum(float(r["flops"]) for r in metrics) / int(metrics[-1]["samples"]),
                   "train_seconds": float(metrics[-1]["elapsed_s"])}
            if (run_dir / "looked.json").is_file():
                summary = json.loads((run_dir / "looked.json").read_text())["summary"]
                run["looked"] = {k: summary[k]["share"][0] for k in looked.KINDS if k in summary}
                run["looked"]["chance"] = summary["chance"][0]
            runs.append(run)
        tokens = keys.get("model.tokens_per_frame", 1)
        agg = {k: spread([r[k] for r in runs]) for k in runs[0] if k not in ("seed", "looked")}
        if "looked" in runs[0]:
            agg["looked"] = {k: spread([r["looked"][k] for r in runs]) for k in runs[0]["looked"]}
        results[name] = {"overrides": keys, "mode": mode, "tokens_per_frame": tokens,
                         "tokens_per_clip": tokens * cfg.data.max_frames, "runs": runs, "mean_std": agg}
    return results


def pm(value, digits=1, scale=100.0) -> str:
    mean, std = value
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def table(results: dict, args) -> str:
    head = ("| variant | tokens / frame | tokens / clip | colour | shape | motion | overall | likelihood | "
            "val loss | train GFLOP / sample | train min | looked: static | looked: dynamic | chance |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        a = r["mean_std"]
        look = a.get("looked", {})
        cell = lambda k: pm(look[k]) if k in look else "–"  # noqa: E731
        lines.append(f"| {name} | {r['tokens_per_frame']} | {r['tokens_per_clip']} | "
                     + " | ".join(pm(a[t]) if t in a else "–" for t in TASKS)
                     + f" | **{pm(a['accuracy'])}** | {pm(a['likelihood_accuracy'])} | {pm(a['val_loss'], 3, 1)} | "
                     f"{a['train_flops_per_sample'][0] / 1e9:.2f} | {a['train_seconds'][0] / 60:.1f} | "
                     f"{cell('static')} | {cell('dynamic')} | {cell('chance')} |")
    c = chance()
    seeds = ", ".join(map(str, args.seeds))
    return ("\n".join(lines) + f"\n\nAnswer accuracy (%) of the generated reply on the held-out probe questions, mean ± "
            f"std over seeds {seeds}; chance: colour {100 * c['colour']:.1f}, shape {100 * c['shape']:.1f}, motion "
            f"{100 * c['motion']:.1f}. likelihood: the 4-way multiple-choice pick by likelihood (chance 25). "
            f"{args.steps} steps each. looked: the share (%) of the query's last-block attention on the target "
            f"object's patches (mean over heads and {LOOKED_CLIPS} clips), and the share its area gets by chance.\n")


def plot(results: dict, path: Path):
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    pooled = [(r["tokens_per_frame"], r["mean_std"]["accuracy"]) for n, r in results.items() if n.startswith("pooled_")]
    if pooled:
        x, acc = zip(*pooled)
        ax.errorbar(x, [100 * a[0] for a in acc], [100 * a[1] for a in acc], marker="o", capsize=3,
                    label="frames as images (pooled N tokens)")
    markers = iter("s^Dv")
    for i, (name, r) in enumerate((n, r) for n, r in results.items() if not n.startswith("pooled_")):
        m, s = r["mean_std"]["accuracy"]
        ax.errorbar([1.0 * 1.08 ** (i - 1.5)], [100 * m], [100 * s], marker=next(markers), capsize=3, ls="none",
                    label=f"foveated: {name}")
    c = chance()
    ax.axhline(100 * sum(c.values()) / len(c), color="grey", ls=":", label="chance (mean over tasks)")
    ax.set_ylim(0, max(50.0, ax.get_ylim()[1] + 5))  # from 0: a few points must not look like a gap
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens per frame")
    ax.set_ylabel("probe answer accuracy (%)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_looking(args, data: Path, grid: dict):
    """looked_VARIANT.png of the first seed's run, for every variant with queries."""
    cfg = args.base
    probe = looked.read_probe(data / "val_sft", cfg.data.frame_size, cfg.data.max_frames, DRAWN_CLIPS)
    for name, (keys, mode) in grid.items():
        path = args.out / "runs" / name / f"seed{args.seeds[0]}" / "looked.json"
        if not path.is_file():
            continue
        drawn = json.loads(path.read_text())["drawn"]
        for i, ((sample, meta), maps) in enumerate(zip(probe, drawn)):
            boxes = [looked.scale_box(b, meta["frame_size"], cfg.data.frame_size) for b in meta["boxes"]]
            get = lambda k: torch.tensor(maps["maps"][k]) if k in maps["maps"] else None  # noqa: E731
            looked.draw_looked(args.out / f"looked_{name}_clip{i}.png", sample["frames"], get("static"),
                               get("dynamic"), boxes, f"{name} (seed {args.seeds[0]}, {mode}): {sample['question']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/ablate"), help="the study's folder")
    parser.add_argument("--data", type=Path, help="a make_synthetic.py output to use (default: made under --out)")
    parser.add_argument("--config", type=Path, default=BASE,
                        help="the settings every run shares (configs/ablate_probe_gpu.yaml: pretrained backbones, 224 px)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1200, help="training steps of every run")
    parser.add_argument("--variants", nargs="+", help="a subset of the variants (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each with cores / jobs threads)")
    parser.add_argument("--limit", type=int, help="score only the first N probe questions (default: all)")
    args = parser.parse_args(argv)
    cfg = args.base = load_config(args.config)  # the settings every run shares
    grid = variants(cfg.data.frame_size // vision_config(cfg.model.dino).patch_size)
    if args.variants:
        unknown = sorted(set(args.variants) - set(grid))
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; known: {list(grid)}")
        grid = {k: v for k, v in grid.items() if k in args.variants}
    if args.steps < 1 or args.jobs < 1 or not args.seeds:
        parser.error("need --steps >= 1, --jobs >= 1 and at least one seed")
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args)
    bench_root = args.out / "bench"  # benchmark.py reads DATA_ROOT/synthetic
    if not (bench_root / "synthetic").exists():
        bench_root.mkdir(exist_ok=True)
        (bench_root / "synthetic").symlink_to(data.resolve())
    start = time.perf_counter()
    # seed-major: a grid stopped early has every variant at the first seeds
    jobs = [(name, keys, mode, seed) for seed in args.seeds for name, (keys, mode) in grid.items()]
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(run_one, args, data, bench_root, *job) for job in jobs]:
            f.result()
    results = collect(args, grid)
    report = {"steps": args.steps, "seeds": args.seeds, "probe": json.loads((data / "README.json").read_text())["arguments"],
              "base_config": str(args.config), "wall_seconds_this_call": time.perf_counter() - start,
              "variants": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "table.md").write_text(table(results, args))
    plot(results, args.out / "accuracy_vs_tokens.png")
    draw_looking(args, data, grid)
    print(table(results, args))
    return report


if __name__ == "__main__":
    main()
