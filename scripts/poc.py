"""The proof of concept on the testbed: does looking help predict the next frame? One command makes the
clips (scripts/make_synthetic.py), pretrains the vision backbone (scripts/pretrain_vision.py, cached, as
the study does), trains stage next_frame once per seed from the config's base, and reports the final
validation of every mode: loss_fine (the LLM-chosen queries), loss_coarse (the static query), the
improvement (coarse - fine) / coarse against the guide's bar (5-15 % solid, > 15 % strong), the copy and
batch-mean references, and (a model with queries) the static and dynamic attention entropy, each as the
mean over seeds with its 95 % t interval (intervals.over_seeds); then
scripts/report.py on the best seed's run (its figures: learning curves, where the queries looked,
predictions).

    python scripts/poc.py --config configs/poc_testbed.yaml --out runs/poc
    python scripts/poc.py --config configs/poc_testbed_pooled.yaml --out runs/poc_pooled   # the positive control

The config (PocConfig): `base` (a next_frame train config, relative to this file), `steps`, `seeds`,
`probe` (make_synthetic's arguments: ablate.ProbeConfig), `vision` (pretrain_vision's settings, or
a folder) and `train` (train config keys every run gets, checked with the base before anything is made:
the positive control is the base with {model.tokens_per_frame: 16, mode: coarse_only, ...}, the
pooled baseline, which sees the whole frame and has no queries). Every mode is also measured
against copying frame t: over_copy = (copy_loss - loss) / copy_loss of its prediction (loss_fine, or
loss_coarse where there is no fine pass), > 0 when it predicts some of the motion. Rerunning resumes:
finished runs are kept. Writes table.md and results.json under --out.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import ablate  # noqa: E402
import intervals  # noqa: E402
import pretrain_vision  # noqa: E402
from config import ConfigError, load_config  # noqa: E402

METRICS = ("loss_fine", "loss_coarse", "improvement", "copy_loss", "mean_loss", "over_copy", "static_entropy",
           "dynamic_entropy")


@dataclass
class PocConfig:
    base: str  # the next_frame train config, relative to this config's folder
    steps: int = 1000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    probe: ablate.ProbeConfig = field(default_factory=lambda: ablate.ProbeConfig(
        size=20000, held_out=200, frames=8, tasks=["mcolour"], splits=["alignment", "val_alignment"]))
    vision: typing.Union[pretrain_vision.Settings, str, None] = None
    train: dict[str, str] = field(default_factory=dict)  # train config keys every run gets (dotted key -> YAML)


def train_seed(args, poc: PocConfig, data: Path, seed: int) -> Path:
    run_dir = args.out / "runs" / f"seed{seed}"
    if ablate.finished(run_dir, args.steps):
        return run_dir
    print(f"training seed {seed}", flush=True)
    keys = {"run_dir": str(run_dir), "seed": seed, "optim.steps": args.steps,
            "data.train": f"[{{name: clips, shards: '{data / 'alignment'}'}}]",
            "data.val": f"[{{name: clips, shards: '{data / 'val_alignment'}'}}]"}
    if args.dino:
        keys["model.dino"] = f"'{args.dino}'"
    keys.update(poc.train)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"seed{seed}.log", "a") as log:
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", poc.base,
                        *[f"{k}={v}" for k, v in keys.items()]], check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    return run_dir


def final_validation(run_dir: Path, steps: int) -> dict:
    """{mode: {metric: value}} of the last validation (at `steps`), with over_copy: the prediction's
    (the fine pass's, else the coarse one's) gain over copying frame t."""
    rows = [r for r in ablate.read_csv(run_dir / "val.csv") if int(r["step"]) == steps and r["source"] == "all"]
    out = {r["mode"]: {m: float(r[m]) for m in METRICS if r.get(m) not in (None, "")} for r in rows}
    for v in out.values():  # still clips (copy_loss 0) have nothing to predict: no gain to give
        v["over_copy"] = (v["copy_loss"] - predicted(v)) / v["copy_loss"] if v["copy_loss"] else float("nan")
    return out


def predicted(v: dict) -> float:
    """The loss of a mode's prediction: the fine pass's, or the one pass's (coarse_only, the pooled baseline)."""
    return v.get("loss_fine", v["loss_coarse"])


def bar(improvement: float) -> str:
    """Where an improvement sits against the guide's bar."""
    if improvement > 0.15:
        return "strong (> 15 %)"
    if improvement > 0.05:
        return "solid (5-15 %)"
    return "below the guide's 5 %" if improvement > 0 else "no improvement (the fine pass is not better)"


def table(runs: dict, summary: dict, args) -> str:
    lines = ["| mode | seed | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for mode, per_seed in summary.items():
        for seed in args.seeds:
            v = runs[seed].get(mode, {})
            lines.append(f"| {mode} | {seed} | " + " | ".join(f"{v[m]:.5g}" if m in v else "–" for m in METRICS) + " |")
        lines.append(f"| {mode} | mean ± std | " + " | ".join(
            f"{per_seed[m]['mean']:.5g} ± {per_seed[m]['std']:.2g}" if m in per_seed else "–" for m in METRICS) + " |")
        if len(args.seeds) > 1:
            lines.append(f"| {mode} | 95 % interval | " + " | ".join(
                f"[{per_seed[m]['low']:.5g}, {per_seed[m]['high']:.5g}]" if m in per_seed else "–" for m in METRICS) + " |")
    seeds = ", ".join(map(str, args.seeds))
    verdicts = []
    for mode, s in ((m, s) for m, s in summary.items() if "over_copy" in s):  # modes every seed validated
        against = (f"against copying frame t {s['copy_loss']['mean']:.5g} (over_copy {percent(s['over_copy'])}) and "
                   f"the batch mean {s['mean_loss']['mean']:.5g}")
        if "improvement" in s:
            verdicts.append(f"{mode}: improvement {percent(s['improvement'])} (seeds {seeds}): "
                            f"{bar(s['improvement']['mean'])}; loss_fine {s['loss_fine']['mean']:.5g} {against}")
        else:  # one pass (the pooled baseline): what the control must show is a gain over copying
            verdicts.append(f"{mode}: one pass (seeds {seeds}): loss {s['loss_coarse']['mean']:.5g} {against}")
    note = ("95 % interval: Student's t over the seeds' final validations (training noise; the held-out clips are "
            "the same for every seed)." if len(args.seeds) > 1 else "One seed: no interval.")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n\n" + note + "\n"


def percent(ci: dict) -> str:
    """A fraction's mean over seeds in percent, with its 95 % interval when there is one."""
    if math.isnan(ci["low"]):  # one seed
        return f"{100 * ci['mean']:+.3g} %"
    return f"{100 * ci['mean']:+.3g} % [{100 * ci['low']:+.3g}, {100 * ci['high']:+.3g}]"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "poc_testbed.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/poc"))
    parser.add_argument("--backbones", type=Path, default=Path("runs/backbones"))
    parser.add_argument("--steps", type=int, help="instead of the config's")
    parser.add_argument("--seeds", type=int, nargs="+", help="instead of the config's")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="the training runs' threads (fewer when something else shares the cores)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("need --threads >= 1")
    try:
        poc = ablate.load_study(args.config, PocConfig)
        args.base = load_config(poc.base, [f"{k}={v}" for k, v in poc.train.items()])
        if args.base.stage != "next_frame":
            raise ConfigError(f"{poc.base}: the proof of concept trains stage next_frame, not {args.base.stage!r}")
        args.steps, args.seeds = args.steps or poc.steps, list(dict.fromkeys(args.seeds or poc.seeds))
        # what tells the PoC's runs apart: a run of another config under --out is an error, before any work
        expected = {"mode": args.base.mode, "model.tokens_per_frame": args.base.model.tokens_per_frame, **poc.train}
        for seed in args.seeds:
            ablate.check_run(args.out / "runs" / f"seed{seed}", expected, args.config)
        args.dino = ablate.vision_folder(poc, args)
        args.out.mkdir(parents=True, exist_ok=True)
        data = ablate.ensure_data(args, poc)
    except ConfigError as e:
        raise SystemExit(f"poc.py: error: {e}") from None
    runs = {seed: final_validation(train_seed(args, poc, data, seed), args.steps) for seed in args.seeds}
    modes = sorted({mode for r in runs.values() for mode in r})
    summary = {mode: {m: intervals.over_seeds([runs[s][mode][m] for s in args.seeds]) for m in METRICS
                      if all(m in runs[s].get(mode, {}) for s in args.seeds)} for mode in modes}
    # the best seed: the lowest prediction loss in the mode it trained in (else the first validated)
    mode = args.base.mode if args.base.mode in summary else modes[0]
    best = min(args.seeds, key=lambda s: predicted(runs[s][mode]) if mode in runs[s] else float("inf"))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(args.out / "runs" / f"seed{best}")],
                   check=True)
    report = {"config": str(args.config), "poc": dataclasses.asdict(poc), "steps": args.steps, "seeds": args.seeds,
              "vision": args.dino, "runs": runs, "summary": summary, "best_seed": best}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    text = table(runs, summary, args)
    (args.out / "table.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
