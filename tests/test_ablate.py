"""scripts/ablate.py: the grid follows the study config, the study config is checked, the probe check
refuses a model that answers a constant, and (slow) a tiny study runs end to end: the probe is made,
the vision backbone pretrained, the grid trained and scored, its table, JSON and figures written, and
a rerun resumes without training anything again."""

import argparse
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

import bench_loaders
import bench_runner
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
ablate = load_script("ablate")
report = load_script("study_report")
make_synthetic = load_script("make_synthetic")


def study_file(tmp_path, base_text=None, **keys) -> Path:
    """A study config in tmp_path whose base is the repo's (optionally rewritten) base train config."""
    base = tmp_path / "base.yaml"
    base.write_text(base_text if base_text is not None else (ROOT / "configs" / "ablate_probe.yaml").read_text())
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **keys}))
    return path


def test_variants_cover_the_foveated_family_and_the_pooled_grid():
    grid = ablate.variants(8)  # 112-px frames, 14-px patches
    assert list(grid) == ["static", "coarse_fine", "coarse_fine+coarse_loss", "autoregressive", "prompt_first",
                          "pooled_1", "pooled_4", "pooled_16", "pooled_64"]
    assert list(ablate.variants(4))[-1] == "pooled_16" and "pooled_36" in ablate.variants(6)  # the full grid
    assert grid["static"] == ({"mode": "coarse_only"}, "coarse_only")
    assert grid["autoregressive"] == ({"mode": "autoregressive"}, "autoregressive")
    assert grid["coarse_fine+coarse_loss"][0]["coarse_weight"] == 1.0
    assert grid["prompt_first"][0]["model.layout"] == "prompt_first"


def test_the_base_config_sets_the_grid(tmp_path, capsys):
    """Another base (here 56-px frames, a 4 x 4 patch grid) gives its own grid."""
    text = (ROOT / "configs" / "ablate_probe.yaml").read_text().replace("frame_size: 112", "frame_size: 56")
    with pytest.raises(SystemExit):
        ablate.main(["--config", str(study_file(tmp_path, text)), "--variants", "nonsense"])
    known = capsys.readouterr().err
    assert "'pooled_16']" in known and "pooled_64" not in known


@pytest.mark.parametrize("keys, message", [
    ({"probe": {"tasks": ["colour", "smell"]}}, r"probe\.tasks.*smell"),
    ({"probe": {"size": "many"}}, r"probe\.size' must be an integer"),
    ({"vision": {"width": 30, "heads": 4}}, r"key 'vision'.*width % heads"),
    ({"stepz": 3}, r"unknown key 'stepz'"),
    ({"captions": 1.0}, r"'captions' mixes in the probe's alignment split"),
    ({"probe": {"splits": ["sft", "test"]}}, r"probe\.splits.*test"),
    ({"train": {"optim.frieze": "[]"}}, r"unknown key 'optim\.frieze'"),
])
def test_a_bad_study_config_is_named(tmp_path, capsys, keys, message):
    with pytest.raises(SystemExit):
        ablate.main(["--config", str(study_file(tmp_path, **keys)), "--out", str(tmp_path / "out")])
    assert re.search(message, capsys.readouterr().err)


def test_the_studys_train_keys_reach_every_run_and_a_variants_own_keys_win():
    study = ablate.StudyConfig(base="base.yaml", train={"optim.freeze": "[]", "mode": "coarse_fine"})
    args = argparse.Namespace(steps=10, dino=None)
    keys = ablate.overrides(args, study, Path("data"), Path("run"), 0, {"mode": "coarse_only"}, "coarse_only")
    assert "optim.freeze=[]" in keys and "mode=coarse_only" in keys and "mode=coarse_fine" not in keys


def test_a_bad_vision_folder_fails_before_anything_is_made(tmp_path, tiny_backbones):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"key 'vision': no vision backbone folder at .*nowhere"):
        ablate.main(["--config", str(study_file(tmp_path, vision=str(tmp_path / "nowhere"))), "--out", str(out)])
    llm_dir, _ = tiny_backbones  # a folder of another architecture
    with pytest.raises(SystemExit, match=r"vision: .* holds a 'llama' model, not a vision backbone"):
        ablate.main(["--config", str(study_file(tmp_path, vision=llm_dir)), "--out", str(out)])
    assert not (out / "data").exists()


def constant_results(tmp_path, reply: str) -> dict:
    """collect()'s shape for a full-grid baseline that gives the same reply to every probe question,
    scored by benchmark.py's own scoring on a real eval split."""
    data = tmp_path / "synthetic"
    make_synthetic.main(["--out", str(data), "--size", "12", "--held-out", "120", "--frames", "4", "--frame-size",
                         "112", "--object-scale", "0.143", "--distractors", "2", "4", "--tasks", *make_synthetic.TASKS,
                         "--splits", "eval"])
    per_task = defaultdict(list)
    for item in bench_loaders.synthetic_items(tmp_path):
        per_task[item.category["task"]].append(bench_runner.score(item, reply, "A")["correct"])
    means = {task: (sum(v) / len(v), 0.0) for task, v in per_task.items()}
    return {"pooled_1": {"tokens_per_frame": 1, "mean_std": {t: (1.0, 0.0) for t in means}},
            "pooled_64": {"tokens_per_frame": 64, "mean_std": means}}


def test_the_probe_check_fails_a_constant_answer(tmp_path):
    results = constant_results(tmp_path, "The circle is red. The red object is a square.")
    check = report.probe_check(results)
    assert check["variant"] == "pooled_64" and check["status"] == "failed"  # the largest grid is the baseline
    assert set(check["tasks"]) == set(report.PROBE_BAR) and check["verified"] == []
    assert all(not t["ok"] and t["accuracy"] < 0.4 for t in check["tasks"].values())
    assert "no verdict about looking" in report.check_line(check)
    passing = {"pooled_64": {"tokens_per_frame": 64, "mean_std": {t: (0.95, 0.01) for t in report.PROBE_BAR}}}
    assert report.probe_check(passing)["status"] == "passed"
    not_run = report.probe_check({"static": {"tokens_per_frame": 1}})
    assert not_run["status"] == "not run"
    assert report.verdict(check, {})[0].startswith("No verdict about looking: the probe check did not pass")
    assert "was not run (no pooled_N variant in this grid" in report.verdict(not_run, {})[0]


def test_a_partial_probe_check_gives_verdicts_on_its_verified_tasks_only():
    rng = np.random.default_rng(0)
    meta = {f"c{i}": {"task": "colour", "family": "content", "others": 2} for i in range(60)}
    meta.update({f"q{i}": {"task": "qshape", "family": "question", "others": 5} for i in range(60)})
    uids = sorted(meta)
    on_colour = np.array([meta[u]["task"] == "colour" for u in uids])
    # prompt_first beats static by far on qshape, where the full grid failed, and ties on colour
    matrices = {"static": np.stack([on_colour & (rng.random(120) < 0.9)] * 3),
                "prompt_first": np.stack([(on_colour & (rng.random(120) < 0.9)) | ~on_colour] * 3),
                "pooled_64": np.stack([on_colour | (rng.random(120) < 0.5)] * 3)}
    results = {"pooled_64": {"tokens_per_frame": 64, "mean_std": {"colour": (1.0, 0.0), "qshape": (0.5, 0.0)}}}
    check = report.probe_check(results)
    assert (check["status"], check["verified"]) == ("partial", ["colour"])
    assert "verdicts on the verified tasks only (colour)" in report.check_line(check)
    analysis = report.analyse(matrices, meta, uids, check["verified"])
    assert {c["group"] for c in analysis["comparisons"]} == {"all", "content"}  # qshape is not compared
    first = next(c for c in analysis["comparisons"] if (c["a"], c["b"], c["group"]) == ("prompt_first", "static", "all"))
    assert abs(first["difference"]) < 0.15  # colour only: the 50-point gap on qshape is left out
    assert "question" in analysis["intervals"]["prompt_first"]  # the table still shows every task
    lines = report.verdict(check, analysis)
    assert lines[0].startswith("content-findable (colour): best ")
    assert lines[1] == "question-dependent: no verdict (none of its tasks passed the probe check)"
    refused = report.verdict({"status": "failed"}, analysis)
    assert len(refused) == 1 and refused[0].startswith("No verdict about looking")


def test_a_comparison_pairs_runs_by_seed_and_skips_variants_that_share_none():
    """static ran seeds 0-2, prompt_first seeds 1 and 2: they pair on 1 and 2 by seed, not by row."""
    meta = {f"c{i}": {"task": "colour", "family": "content", "others": 2} for i in range(50)}
    uids = sorted(meta)
    rng = np.random.default_rng(1)
    shared = rng.random((2, 50)) < 0.6  # seeds 1 and 2: the two variants answer alike
    matrices = {"static": np.concatenate([np.zeros((1, 50), bool), shared]), "prompt_first": shared,
                "pooled_1": np.ones((1, 50), bool)}
    seeds = {"static": [0, 1, 2], "prompt_first": [1, 2], "pooled_1": [7]}
    analysis = report.analyse(matrices, meta, uids, ["colour"], seeds)
    pair = [c for c in analysis["comparisons"] if (c["a"], c["b"]) == ("prompt_first", "static")]
    assert {c["seeds"] == [1, 2] and c["difference"] == 0 for c in pair} == {True}
    assert not [c for c in analysis["comparisons"] if c["b"] == "pooled_1"]  # no seed in common: not compared
    by_row = report.analyse(matrices, meta, uids, ["colour"])  # rows taken as seeds 0, 1, ...: a different pairing
    assert next(c for c in by_row["comparisons"] if c["b"] == "static")["difference"] != 0


def fake_run(run_dir: Path, steps: int, probe=True, looked=True, trained=None, **keys):
    """The files a finished run leaves (train.py's config, final model and val.csv, the scores);
    trained: the steps its config says (default `steps`), keys: config keys (default: the variant's)."""
    tree = {"optim": {"steps": trained or steps}}
    for key, value in ablate.variants(8)[run_dir.parent.name][0].items():  # dotted keys -> the saved tree
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    tree.update(keys)
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    (run_dir / "final" / "config.json").write_text("{}")
    (run_dir / "val.csv").write_text(f"step,source,loss\n{steps},all,0.5\n")
    for name, present in (("probe.json", probe), ("looked.json", looked)):
        if present:
            (run_dir / name).write_text("{}")


def test_the_report_covers_every_scored_run_in_the_folder(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "static" / "seed0", 30)
    fake_run(runs / "static" / "seed4", 30)
    fake_run(runs / "static" / "seed1", 30, probe=False)  # trained, not scored yet
    fake_run(runs / "static" / "seed2", 20)  # trained to other steps
    fake_run(runs / "static" / "seed5", 30, trained=60)  # a longer run, validated at 30 on the way
    fake_run(runs / "prompt_first" / "seed0", 30, looked=False)  # where it looked not scored yet
    fake_run(runs / "pooled_4" / "seed3", 30, looked=False)  # no queries: nothing to look at
    (runs / "static" / "seed01").mkdir()  # not a run directory of ours
    study = ablate.StudyConfig(base="base.yaml")
    args = argparse.Namespace(out=tmp_path, steps=30, config=Path("study.yaml"))
    assert ablate.scored_seeds(args, study, ablate.variants(8)) == {"static": [0, 4], "pooled_4": [3]}
    # a run of another study config (here: the vision backbone trained) is an error, not a row
    fake_run(runs / "pooled_1" / "seed0", 30, optim={"steps": 30, "freeze": ["dino"]})
    frozen = ablate.StudyConfig(base="base.yaml", train={"optim.freeze": "[dino]"})
    pooled_1 = {"pooled_1": ablate.variants(8)["pooled_1"]}
    assert ablate.scored_seeds(args, frozen, pooled_1) == {"pooled_1": [0]}
    with pytest.raises(ablate.ConfigError, match=r"pooled_1/seed0 was trained with optim.freeze: \['dino'\], not \[\] "
                                                 r"as study.yaml sets it"):
        ablate.scored_seeds(args, ablate.StudyConfig(base="base.yaml", train={"optim.freeze": "[]"}), pooled_1)


@pytest.mark.slow
def test_a_tiny_study_runs_scores_and_resumes(tmp_path):
    config = study_file(tmp_path, steps=2, seeds=[0, 1], variants=["coarse_fine", "pooled_4"], captions=0.5,
                        probe={"size": 40, "held_out": 12, "frames": 4, "object_scale": 0.143, "distractors": [2, 4],
                               "splits": ["sft", "val_sft", "eval", "alignment"]},
                        vision={"width": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, "steps": 2, "batch": 2})
    study = tmp_path / "study"
    args = ["--config", str(config), "--out", str(study), "--backbones", str(tmp_path / "backbones"), "--limit", "6"]
    report = ablate.main(args)
    fine, pooled = report["variants"]["coarse_fine"], report["variants"]["pooled_4"]
    assert [r["seed"] for r in fine["runs"]] == [0, 1] and pooled["tokens_per_clip"] == 16
    assert report["vision"].startswith(str(tmp_path / "backbones"))  # every run read the pretrained backbone
    for run in fine["runs"] + pooled["runs"]:
        assert 0 <= run["accuracy"] <= 1 and run["train_flops_per_sample"] > 0 and run["val_loss"] > 0
        assert {"colour", "qcolour", "mcolour"} <= set(run)  # every task of the probe is scored
    # the pooled baseline reads 4x the LLM tokens and the whole backbone: more FLOPs per sample
    assert pooled["mean_std"]["train_flops_per_sample"][0] > fine["mean_std"]["train_flops_per_sample"][0]
    shares = fine["runs"][0]["looked"]
    assert set(shares) == {"static", "dynamic", "chance"} and 0 < shares["chance"] < 1
    assert "looked" not in pooled["runs"][0]  # no queries, nothing to score
    trained = yaml.safe_load((study / "runs" / "pooled_4" / "seed1" / "config.yaml").read_text())["data"]["train"]
    assert [(t["name"], t["weight"]) for t in trained] == [("probe", 1.0), ("captions", 0.5)]  # the captions mixed in
    table = (study / "table.md").read_text()
    assert "| coarse_fine | 0, 1 | 4 |" in table and "| pooled_4 | 0, 1 | 16 |" in table
    assert "probe check: failed" in table
    assert (study / "accuracy_vs_tokens.png").stat().st_size > 0 and sorted(study.glob("attention_*.png"))
    assert json.loads((study / "results.json").read_text())["steps"] == 2
    final = study / "runs" / "coarse_fine" / "seed0" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    again = ablate.main(args)  # everything is there: nothing is trained or scored again
    assert final.stat().st_mtime_ns == before and again["variants"]["coarse_fine"]["runs"] == fine["runs"]
    one = ablate.main(args + ["--variants", "pooled_4", "--seeds", "0"])  # a call for one cell reports them all
    assert one["seeds"] == {"coarse_fine": [0, 1], "pooled_4": [0, 1]} and one["variants"] == again["variants"]
    shutil.rmtree(study / "runs" / "pooled_4" / "seed1")  # as if a grid were stopped before this run finished
    (study / "results.json").unlink()
    only = ablate.main(args + ["--report-only"])  # the report on what finished; nothing trained again
    assert only["seeds"] == {"coarse_fine": [0, 1], "pooled_4": [0]}
    assert not (study / "runs" / "pooled_4" / "seed1").exists()
    assert only["variants"]["coarse_fine"] == again["variants"]["coarse_fine"] and (study / "results.json").is_file()
