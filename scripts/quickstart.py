"""The CPU quickstart: make the synthetic foveation dataset, train tiny random backbones through stage
1 (alignment) -> 2 (SFT) -> 3 (DPO) with train.py and configs/tiny_stage{1,2,3}.yaml, and print the
validation curves, score each stage's final model on the held-out SFT questions in all three forward
modes (loss, and answer accuracy against chance), and run the synthetic benchmark (benchmark.py) on
the final model. About 13 minutes on 2 CPU cores.

    python scripts/quickstart.py [--fresh] [--dino tiny-dinov3]

Rerunning resumes: finished stages are not trained again (--fresh starts over). The runs land in
runs/tiny_stage{1,2,3} (final/ holds each stage's save_pretrained export); the data in data/synthetic.
--dino picks another random vision-backbone preset (backbones.py; e.g. tiny-dinov3: 16-px patches,
registers, RoPE); its runs land in runs/tiny_<preset>_stage{1,2,3}.
"""

import argparse
import csv
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
import distributed  # noqa: E402
import make_synthetic  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from config import MODES  # noqa: E402
from model import FoveatedVLM  # noqa: E402
from objectives import TextCE  # noqa: E402
from validation import validate  # noqa: E402

DATA = Path("data/synthetic")
SYNTHETIC_ARGS = ["--size", "4000", "--frames", "4", "--frame-size", "112", "--object-scale", "0.25",
                  "--distractors", "0", "2"]
STAGES = [(1, "alignment (captions)"), (2, "SFT (questions)"), (3, "DPO (right vs wrong answer)")]
# answer accuracy of a model that knows the answer sentence but guesses the value: colour 1/8, shape 1/4,
# direction 1/4, the three tasks in equal parts
CHANCE = (1 / len(make_synthetic.PALETTE) + 1 / len(make_synthetic.SHAPES) + 1 / len(make_synthetic.DIRECTIONS)) / 3


def ensure_data():
    readme = DATA / "README.json"
    expected = make_synthetic.recorded(make_synthetic.build_parser().parse_args(["--out", str(DATA), *SYNTHETIC_ARGS]))
    if readme.is_file():
        if json.loads(readme.read_text())["arguments"] != expected:
            sys.exit(f"{DATA} holds a synthetic dataset made with other settings; move it away or delete it")
        print(f"synthetic data: {DATA} (already there)")
        return
    start = time.perf_counter()
    make_synthetic.main(["--out", str(DATA), *SYNTHETIC_ARGS])
    print(f"synthetic data: {DATA} written in {time.perf_counter() - start:.0f}s")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="delete this quickstart's runs first")
    parser.add_argument("--dino", default="tiny", help="random vision-backbone preset (backbones.DINO_PRESETS)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs = "runs/tiny" if args.dino == "tiny" else f"runs/tiny_{args.dino}"
    ensure_data()
    for n, what in STAGES:
        run_dir = Path(f"{runs}_stage{n}")
        if args.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        print(f"\n=== stage {n}: {what} ===", flush=True)
        overrides = [] if args.dino == "tiny" else [f"model.dino=random:{args.dino}", f"run_dir={run_dir}"] + (
            [f"init_from={runs}_stage{n - 1}/final"] if n > 1 else [])
        train.main(["--config", str(ROOT / "configs" / f"tiny_stage{n}.yaml"), *overrides])

    print("\n=== validation during training (held-out synthetic clips; loss of the stage's objective) ===")
    for n, what in STAGES:
        val = [r for r in read_csv(Path(f"{runs}_stage{n}/val.csv")) if r["source"] == "all"]
        mode = val[0]["mode"]
        column = "dpo_loss" if n == 3 else "loss"
        curve = "  ".join(f"{r['step']}: {float(r[column]):.3f}" for r in val if r["mode"] == mode)
        print(f"stage {n} {what:28s} {mode} {'DPO loss' if n == 3 else 'loss'} by step  {curve}")

    print("\n=== the final models on the held-out SFT questions (data/synthetic/val_sft) ===")
    print("answer accuracy = every token of the answer right under teacher forcing; a model that only guesses "
          f"the colour / shape / direction scores {CHANCE:.2f}")
    results = {n: evaluate_final(f"{runs}_stage{n}") for n in (1, 2, 3)}
    modes = list(results[2]["modes"])
    print(f"{'after stage':12s}" + "".join(f"{m + ' loss':>22s}{'acc':>7s}" for m in modes))
    for n, res in results.items():
        print(f"{n:<12d}" + "".join(f"{res['modes'][m]['all']['loss']:22.3f}{res['modes'][m]['all']['answer_acc']:7.3f}"
                                    for m in modes))
    for n in (2, 3):
        by_task = results[n]["modes"]["coarse_fine"]["by_source"]
        print(f"stage {n} coarse_fine accuracy per task: " + ", ".join(
            f"{k.split('/')[-1]} {v['answer_acc']:.3f}" for k, v in by_task.items()))
    print("\n=== the synthetic benchmark of the final model (benchmark.py; held-out eval clips) ===")
    print("generate: the greedy reply to the open question names the right value (chance 0.21); likelihood: "
          "the option letter of the multiple-choice prompt (a format these tiny models never saw; chance 0.25)")
    report = benchmark.main(["--checkpoint", f"{runs}_stage3", "--bench", "synthetic", "--data-root", "data",
                             "--frame-size", "112", "--max-frames", "8", "--workers", "1",
                             "--output", f"{runs}_stage3/benchmark.json"])
    by_task = report["results"]["synthetic"]["coarse_fine"]["per_category"]["task"]
    print("coarse_fine generate accuracy per task: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in by_task.items()))
    print(f"\nfinal weights: {runs}_stage3/final (FoveatedVLM.from_pretrained); "
          f"total {time.perf_counter() - start:.0f}s")


def evaluate_final(run_dir: str) -> dict:
    """A stage's final export scored on val_sft with SFT masks, in all three modes."""
    cfg = load_config(ROOT / "configs" / "tiny_stage2.yaml")
    model = FoveatedVLM.from_pretrained(f"{run_dir}/final")
    dist = distributed.setup("cpu")
    loader = train.make_loader(cfg, model, dist, train.sources(cfg.data.val), resampled=False,
                               batch_size=cfg.eval.batch_size, pin=False, budgets=False)
    return validate(model, loader, objectives=[(TextCE(), 1.0)], modes=MODES, to_device=lambda b: b,
                    autocast=nullcontext(), max_samples=cfg.eval.max_samples)

if __name__ == "__main__":
    main()
