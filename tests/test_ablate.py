"""scripts/ablate.py end to end on a tiny probe: the grid trains, is scored (probe answers, validation
loss, training FLOPs, where the queries looked), writes its table, JSON and figures, and a rerun resumes
without training anything again."""

import json
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_variants_cover_the_foveated_family_and_the_pooled_grid():
    ablate = load_script("ablate")
    grid = ablate.variants(8)  # 112-px frames, 14-px patches
    assert list(grid) == ["static", "coarse_fine", "coarse_fine+coarse_loss", "prompt_first", "pooled_1", "pooled_4",
                          "pooled_16", "pooled_64"]
    assert list(ablate.variants(4))[-1] == "pooled_16" and "pooled_36" in ablate.variants(6)  # the full grid
    assert grid["static"] == ({"mode": "coarse_only"}, "coarse_only")
    assert grid["coarse_fine+coarse_loss"][0]["coarse_weight"] == 1.0
    assert grid["prompt_first"][0]["model.layout"] == "prompt_first"
    with pytest.raises(SystemExit):
        ablate.main(["--variants", "nonsense"])


def test_the_base_config_sets_the_grid(tmp_path, capsys):
    """--config: another base (here 56-px frames, a 4 x 4 patch grid) gives its own grid."""
    ablate = load_script("ablate")
    text = (ROOT / "configs" / "ablate_probe.yaml").read_text().replace("frame_size: 112", "frame_size: 56")
    (tmp_path / "base.yaml").write_text(text)
    with pytest.raises(SystemExit):
        ablate.main(["--config", str(tmp_path / "base.yaml"), "--variants", "nonsense"])
    known = capsys.readouterr().err
    assert "'pooled_16']" in known and "pooled_64" not in known


@pytest.mark.slow
def test_a_tiny_grid_runs_scores_and_resumes(tmp_path):
    make_synthetic, ablate = load_script("make_synthetic"), load_script("ablate")
    data = tmp_path / "probe"
    make_synthetic.main(["--out", str(data), "--size", "40", "--frames", "4", "--frame-size", "112",
                         "--object-scale", str(1 / 12), "--distractors", "6", "12"])
    args = ["--out", str(tmp_path / "study"), "--data", str(data), "--steps", "2", "--seeds", "0", "1",
            "--variants", "coarse_fine", "pooled_4", "--limit", "6"]
    report = ablate.main(args)
    fine, pooled = report["variants"]["coarse_fine"], report["variants"]["pooled_4"]
    assert [r["seed"] for r in fine["runs"]] == [0, 1] and pooled["tokens_per_clip"] == 16
    for run in fine["runs"] + pooled["runs"]:
        assert 0 <= run["accuracy"] <= 1 and run["train_flops_per_sample"] > 0 and run["val_loss"] > 0
    # the pooled baseline reads 4x the LLM tokens and the whole backbone: more FLOPs per sample
    assert pooled["mean_std"]["train_flops_per_sample"][0] > fine["mean_std"]["train_flops_per_sample"][0]
    shares = fine["runs"][0]["looked"]
    assert set(shares) == {"static", "dynamic", "chance"} and 0 < shares["chance"] < 1
    assert "looked" not in pooled["runs"][0]  # no queries, nothing to score
    study = tmp_path / "study"
    table = (study / "table.md").read_text()
    assert "| coarse_fine | 1 | 4 |" in table and "| pooled_4 | 4 | 16 |" in table
    assert (study / "accuracy_vs_tokens.png").stat().st_size > 0 and (study / "looked_coarse_fine_clip0.png").is_file()
    assert json.loads((study / "results.json").read_text())["steps"] == 2
    final = study / "runs" / "coarse_fine" / "seed0" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    again = ablate.main(args)  # everything is there: nothing is trained or scored again
    assert final.stat().st_mtime_ns == before and again["variants"]["coarse_fine"]["runs"] == fine["runs"]
