"""scripts/poc.py end to end on a tiny configuration: the clips are made, the vision backbone pretrained,
one next-frame run per seed trained, the improvement summarised against the references and the bar, and
report.py run on the best seed; and a config of another stage is refused before anything is made."""

import argparse
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
poc = load_script("poc")


def poc_file(tmp_path, base_text, **keys) -> Path:
    (tmp_path / "base.yaml").write_text(base_text)
    path = tmp_path / "poc.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **keys}))
    return path


def test_only_next_frame_configs(tmp_path):
    config = poc_file(tmp_path, (ROOT / "configs" / "ablate_probe.yaml").read_text())
    with pytest.raises(SystemExit, match="trains stage next_frame, not 'sft'"):
        poc.main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("train, message", [
    ({"model.tokens_per_frame": "16", "coarse_weight": "0.0"},
     "key 'mode' must be coarse_only for the pooled baseline"),
    ({"optim.stepz": "3"}, "unknown key 'optim.stepz'"),
])
def test_the_configs_train_keys_are_checked_before_anything_is_made(tmp_path, train, message):
    config = poc_file(tmp_path, (ROOT / "configs" / "poc_testbed_train.yaml").read_text(), train=train)
    with pytest.raises(SystemExit, match=message):
        poc.main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_run_of_the_other_poc_config_under_out_is_an_error(tmp_path):
    """The positive control pointed at the foveated PoC's folder: its runs are not reused as the control's."""
    out = tmp_path / "out"
    (out / "runs" / "seed0").mkdir(parents=True)
    (out / "runs" / "seed0" / "config.yaml").write_text(yaml.safe_dump({"mode": "coarse_fine", "model": {}}))
    with pytest.raises(SystemExit, match=r"seed0 was trained with mode: 'coarse_fine', not 'coarse_only' as .*pooled"):
        poc.main(["--config", str(ROOT / "configs" / "poc_testbed_pooled.yaml"), "--out", str(out), "--seeds", "0"])
    assert not (out / "data").exists()


def test_over_copy_is_the_predictions_gain_over_copying(tmp_path):
    (tmp_path / "val.csv").write_text("step,source,mode,loss_fine,loss_coarse,copy_loss,mean_loss\n"
                                      "5,all,coarse_fine,0.8,0.9,1.0,2.0\n5,all,coarse_only,,0.75,1.0,2.0\n"
                                      "4,all,coarse_only,,0.5,1.0,2.0\n")
    final = poc.final_validation(tmp_path, 5)
    assert final["coarse_fine"]["over_copy"] == pytest.approx(0.2)  # the fine pass's prediction
    assert final["coarse_only"]["over_copy"] == pytest.approx(0.25) and "loss_fine" not in final["coarse_only"]
    (tmp_path / "val.csv").write_text("step,source,mode,loss_coarse,copy_loss,mean_loss\n"
                                      "5,all,coarse_only,0.1,0.0,2.0\n")
    assert math.isnan(poc.final_validation(tmp_path, 5)["coarse_only"]["over_copy"])  # still clips: nothing to gain


def test_the_table_gives_each_mean_with_its_interval_over_seeds():
    """Three seeds of a foveated run: the verdict states the improvement's mean and t interval in percent,
    and the interval row the same numbers as intervals.over_seeds."""
    improvements = {0: 0.01, 1: 0.02, 2: 0.03}
    runs = {s: {"coarse_fine": {"loss_fine": 1 - i, "loss_coarse": 1.0, "improvement": i, "copy_loss": 1.0,
                                "mean_loss": 2.0, "over_copy": i}} for s, i in improvements.items()}
    summary = {"coarse_fine": {m: poc.intervals.over_seeds([runs[s]["coarse_fine"][m] for s in runs])
                               for m in runs[0]["coarse_fine"]}}
    text = poc.table(runs, summary, argparse.Namespace(seeds=[0, 1, 2]))
    half = 100 * poc.intervals.t_quantile(0.975, 2) * 0.01 / math.sqrt(3)  # std 0.01 over 3 seeds
    assert f"improvement +2 % [{2 - half:+.3g}, {2 + half:+.3g}] (seeds 0, 1, 2): below the guide's 5 %" in text
    assert f"| coarse_fine | 95 % interval | [{0.98 - half / 100:.5g}, {0.98 + half / 100:.5g}]" in text  # loss_fine's row
    one = poc.table({0: runs[0]}, {"coarse_fine": {m: poc.intervals.over_seeds([v]) for m, v in
                                                   runs[0]["coarse_fine"].items()}}, argparse.Namespace(seeds=[0]))
    assert "improvement +1 % (seeds 0)" in one and "95 % interval" not in one.split("\n\n")[0]


@pytest.mark.slow
def test_a_tiny_poc_runs_and_reports(tmp_path):
    base = (ROOT / "configs" / "poc_testbed_train.yaml").read_text().replace("random:small", "random:tiny")
    config = poc_file(tmp_path, base, steps=2, seeds=[0, 1],
                      probe={"size": 24, "held_out": 8, "frames": 4, "object_scale": 0.143, "distractors": [2, 3],
                             "tasks": ["mcolour"], "splits": ["alignment", "val_alignment"]},
                      vision={"width": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, "steps": 2, "batch": 2})
    out = tmp_path / "out"
    report = poc.main(["--config", str(config), "--out", str(out), "--backbones", str(tmp_path / "backbones")])
    assert set(report["runs"]) == {0, 1} and report["vision"].startswith(str(tmp_path / "backbones"))
    fine = report["summary"]["coarse_fine"]
    assert {"loss_fine", "loss_coarse", "improvement", "copy_loss", "mean_loss"} <= set(fine)
    mean = fine["improvement"]["mean"]  # the summary is the mean over the seeds of each run's final validation
    runs = [report["runs"][s]["coarse_fine"] for s in (0, 1)]
    assert mean == pytest.approx(sum(r["improvement"] for r in runs) / 2)
    for r in runs:
        assert r["improvement"] == pytest.approx((r["loss_coarse"] - r["loss_fine"]) / r["loss_coarse"], rel=1e-4)
    table = (out / "table.md").read_text()
    assert "coarse_fine: improvement" in table and ("guide" in table or "no improvement" in table)
    assert (out / "runs" / f"seed{report['best_seed']}" / "report.md").is_file()
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    # the positive control: the pooled baseline through the config's train keys, one pass, no queries
    control = poc_file(tmp_path, base, steps=2, seeds=[0], probe=yaml.safe_load(config.read_text())["probe"],
                       vision=yaml.safe_load(config.read_text())["vision"],
                       train={"model.tokens_per_frame": "4", "mode": "coarse_only", "coarse_weight": "0.0",
                              "eval.modes": "[coarse_only]"})
    pooled = poc.main(["--config", str(control), "--out", str(tmp_path / "pooled"),
                       "--backbones", str(tmp_path / "backbones")])
    one = pooled["summary"]["coarse_only"]
    assert "improvement" not in one and "loss_fine" not in one
    run = pooled["runs"][0]["coarse_only"]
    assert one["over_copy"]["mean"] == pytest.approx((run["copy_loss"] - run["loss_coarse"]) / run["copy_loss"])
    assert "coarse_only: one pass (seeds 0): loss" in (tmp_path / "pooled" / "table.md").read_text()
