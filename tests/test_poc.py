"""scripts/poc.py end to end on a tiny configuration: the clips are made, the vision backbone pretrained,
one next-frame run per seed trained, the improvement summarised against the references and the bar, and
report.py run on the best seed; and a config of another stage is refused before anything is made."""

import json
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
    mean = fine["improvement"][0]  # the summary is the mean over the seeds of each run's final validation
    runs = [report["runs"][s]["coarse_fine"] for s in (0, 1)]
    assert mean == pytest.approx(sum(r["improvement"] for r in runs) / 2)
    for r in runs:
        assert r["improvement"] == pytest.approx((r["loss_coarse"] - r["loss_fine"]) / r["loss_coarse"], rel=1e-4)
    table = (out / "table.md").read_text()
    assert "coarse_fine: improvement" in table and ("guide" in table or "no improvement" in table)
    assert (out / "runs" / f"seed{report['best_seed']}" / "report.md").is_file()
    assert json.loads((out / "results.json").read_text())["steps"] == 2
