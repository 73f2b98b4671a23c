"""Configs: every shipped YAML loads; unknown keys, wrong types and bad values are errors naming the key
and the file; dotted overrides; environment variables in paths. Schedules and checkpoint files."""

import math
from pathlib import Path

import pytest
import torch
import yaml

import checkpoint as ckpt
import loading
from config import ConfigError, apply_override, load_config
from conftest import load_script
from schedule import lr_at, warmup_steps

ROOT = Path(__file__).resolve().parents[1]
# configs that describe a study over train configs (their `base`), not a train run: script and dataclass
STUDY_CONFIGS = {"study_cpu.yaml": ("ablate", "StudyConfig"), "study_gpu.yaml": ("ablate", "StudyConfig"),
                 "study_cpu_dino.yaml": ("ablate", "StudyConfig"),
                 **{f"poc_testbed{kind}.yaml": ("poc", "PocConfig")
                    for kind in ("", "_pooled", "_4frames", "_4frames_pooled", "_4frames_pooled1",
                                 "_4frames_pooled4")}}
MINIMAL = {"stage": "sft", "run_dir": "runs/x", "data": {"train": [{"name": "a", "shards": "a/*.tar"}]}}


def write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name in STUDY_CONFIGS:
        script, cls = STUDY_CONFIGS[path.name]
        study = load_script("ablate").load_study(path, getattr(load_script(script), cls))
        # the train config every run of the study shares, with the study's own keys
        cfg = load_config(Path(study.base), [f"{k}={v}" for k, v in getattr(study, "train", {}).items()])
    else:
        assert "base" not in yaml.safe_load(path.read_text()), f"{path.name}: a study config not in STUDY_CONFIGS"
        cfg = load_config(path)
    assert cfg.to_dict()["stage"] in ("alignment", "sft", "dpo", "next_frame")


# the PoC's controls and the foveated config each compares with: a control means something only on the same
# clips, backbone, base, steps and seeds, and each control file repeats those blocks
POC_CONTROLS = {"poc_testbed_pooled.yaml": "poc_testbed.yaml",
                "poc_testbed_4frames_pooled.yaml": "poc_testbed_4frames.yaml",
                "poc_testbed_4frames_pooled1.yaml": "poc_testbed_4frames.yaml",
                "poc_testbed_4frames_pooled4.yaml": "poc_testbed_4frames.yaml"}


@pytest.mark.parametrize("control", sorted(POC_CONTROLS))
def test_poc_controls_match_their_foveated_config(control):
    load = lambda name: yaml.safe_load((ROOT / "configs" / name).read_text())  # noqa: E731
    ours, theirs = load(control), load(POC_CONTROLS[control])
    for key in ("base", "steps", "seeds", "probe", "vision"):
        assert ours.get(key) == theirs.get(key), f"{control}: '{key}' differs from {POC_CONTROLS[control]}'s"


def test_published_recipe_values():
    s1 = load_config(ROOT / "configs" / "stage1_135M.yaml")
    assert (s1.optim.schedule, s1.optim.lr, s1.optim.target_lr) == ("converging", {"connector": 1e-3, "dino": 1e-5,
                                                                                   "llm": 1e-5}, 3e-5)
    assert (s1.optim.steps, s1.data.batch_size * s1.optim.grad_accum, s1.data.text_ratio) == (31250, 32, 0.14)
    s3 = load_config(ROOT / "configs" / "stage3_1.7B.yaml")
    assert (s3.stage, s3.dpo.beta, s3.optim.lr["llm"], s3.optim.steps, s3.gradient_checkpointing) == \
        ("dpo", 0.1, 5e-7, 2593, True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_24gb_recipe_keeps_the_published_effective_batch_on_4_ranks(stage):
    """configs/stage*_1.7B_24gb.yaml: the published recipe sharded over 4 ranks, the same samples (and
    budget-batched frames) per optimizer step through grad_accum, the rest unchanged."""
    one = load_config(ROOT / "configs" / f"stage{stage}_1.7B.yaml")
    four = load_config(ROOT / "configs" / f"stage{stage}_1.7B_24gb.yaml")
    assert four.distributed == "fsdp"
    assert one.data.batch_size * one.optim.grad_accum == 4 * four.data.batch_size * four.optim.grad_accum
    if one.data.max_batch_frames:
        assert one.data.max_batch_frames * one.optim.grad_accum == \
            4 * four.data.max_batch_frames * four.optim.grad_accum
    same = ("stage", "mode", "model", "optim.lr", "optim.steps", "optim.schedule", "data.train", "data.max_frames")
    for key in same:
        a, b = one.to_dict(), four.to_dict()
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key


@pytest.mark.parametrize("change, message", [
    ({"optim": {"lrr": 1}}, r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ({"optim": {"steps": "ten"}}, r"key 'optim.steps' must be an integer"),
    ({"optim": {"steps": True}}, r"key 'optim.steps' must be an integer"),
    ({"data": {"train": "a.tar"}}, r"key 'data.train' must be a list"),
    ({"data": {"train": [{"name": "a"}]}}, r"required key 'data.train.0.shards' is missing"),
    ({"stage": "pretrain"}, r"key 'stage' must be one of"),
    ({"stage": "dpo", "mode": "autoregressive"}, r"key 'mode' cannot be autoregressive"),
    ({"optim": {"schedule": "converging"}}, r"key 'optim.target_lr' is required"),
    ({"optim": {"lr": {"connector": 1e-3}}}, r"key 'optim.lr' must give an LR for each"),
    ({"optim": {"freeze": ["vision"]}}, r"key 'optim.freeze.0' must be one of"),
    ({"data": {"epochs": 3}}, r"key 'data.epochs' only applies"),
    ({"eval": {"modes": ["fine"]}}, r"key 'eval.modes.0' must be one of"),
    ({"data": {"val": [{"name": "v", "shards": "a"}, {"name": "v", "shards": "b"}]}},
     r"key 'data.val' source names must be unique"),
    ({"model": {"layout": "video_last"}}, r"key 'model.layout' must be one of"),
    ({"model": {"image_frames": 0}}, r"key 'model.image_frames' must be >= 1"),
])
def test_bad_configs_name_the_key_and_the_file(tmp_path, change, message):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key].update(value)
        else:
            tree[key] = value
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_missing_required_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="required key 'run_dir' is missing"):
        load_config(write(tmp_path, {"stage": "sft"}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_types_and_yaml_float_strings(tmp_path):
    path = write(tmp_path, dict(MINIMAL, optim={"lr": {"connector": "1e-3", "dino": 1, "llm": 2.5e-5}}))
    cfg = load_config(path, ["optim.steps=12", "data.train.0.weight=2", "optim.freeze=[dino]", "eval.modes=[coarse_only]",
                             "model.layout=prompt_first"])
    assert cfg.optim.lr == {"connector": 1e-3, "dino": 1.0, "llm": 2.5e-5}  # PyYAML reads 1e-3 as a string
    assert (cfg.optim.steps, cfg.data.train[0].weight, cfg.optim.freeze, cfg.eval.modes, cfg.model.layout) == \
        (12, 2.0, ["dino"], ["coarse_only"], "prompt_first")
    with pytest.raises(ConfigError, match="command-line overrides.*unknown key 'optim.stpes'"):
        load_config(path, ["optim.stpes=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["optim.steps"])
    with pytest.raises(ConfigError, match="past the end"):
        apply_override({"a": [1]}, "a.3=2")


def test_environment_variables_in_shard_paths(tmp_path, monkeypatch):
    import train

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "x.tar").write_bytes(b"")
    monkeypatch.setenv("DATA", str(tmp_path))
    cfg = load_config(write(tmp_path, dict(MINIMAL, data={"train": [{"name": "a", "shards": "${DATA}/shards"}]})))
    assert train.sources(cfg.data.train)[0].shards == (str(tmp_path / "shards" / "x.tar"),)
    monkeypatch.delenv("DATA")  # unset: the error says so and names the key, not a pattern that matches nothing
    with pytest.raises(ConfigError, match=r"key 'data.train.0.shards' .*the environment variable DATA is not set"):
        train.sources(cfg.data.train)
    cfg.data.train[0].shards = str(tmp_path / "nothing" / "*.tar")
    with pytest.raises(ConfigError, match=r"data.train.0.shards \(source 'a'\): .*matches no file"):
        train.sources(cfg.data.train)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])  # YAML floats, then strings
def test_non_finite_numbers_are_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="key 'optim.lr.llm' must be a (finite )?number"):
        load_config(write(tmp_path, MINIMAL), [f"optim.lr.llm={value}"])


def test_every_key_is_listed_with_its_default():
    import dataclasses

    from config import Config, defaults_text

    text = defaults_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, type) and dataclasses.is_dataclass(f.type)):
                yield from keys(f.type, prefix + f.name + ".")
            else:
                yield prefix + f.name
    listed = [line.split(":")[0].strip() for line in text.splitlines()]
    assert listed == list(keys(Config)) and "optim.max_bad_steps" in listed
    assert "  optim.lr: {\"connector\": 0.0001, \"dino\": 1e-05, \"llm\": 1e-05}  (mapping to float)" in text


def test_schedules():
    total, warm = 100, warmup_steps(100, 0.1)
    assert warm == 10
    for kind in ("constant", "cosine", "converging"):
        ramp = [lr_at(s, 1e-3, kind, total, warm, 0.1, 3e-5) for s in range(warm)]
        assert ramp == pytest.approx([1e-3 * (s + 1) / warm for s in range(warm)])  # from 0, linear, step 0 > 0
    assert lr_at(50, 1e-3, "constant", total, warm) == 1e-3
    cosine = [lr_at(s, 1e-3, "cosine", total, warm, 0.1) for s in range(warm, total + 5)]
    assert cosine[0] == pytest.approx(1e-3) and cosine[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert lr_at(55, 1e-3, "cosine", total, warm, 0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    down = [lr_at(s, 1e-3, "converging", total, warm, target_lr=3e-5) for s in range(warm, total + 1)]
    up = [lr_at(s, 1e-5, "converging", total, warm, target_lr=3e-5) for s in range(warm, total + 1)]
    assert down[0] == pytest.approx(1e-3) and up[0] == pytest.approx(1e-5)
    assert down[-1] == pytest.approx(3e-5) == up[-1]  # the connector falls to, the backbones rise to, the target
    assert all(a >= b for a, b in zip(down, down[1:])) and all(a <= b for a, b in zip(up, up[1:]))
    assert math.isclose(lr_at(55, 1e-5, "converging", total, warm, target_lr=3e-5), 2e-5)
    assert lr_at(0, 1e-3, "cosine", 10, 0) == pytest.approx(1e-3)  # no warmup


def test_checkpoints_are_pruned_to_the_last_and_the_best(tmp_path):
    for step, metric in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))})
        if step == 2:
            ckpt.write_json(ckpt.checkpoint_dir(tmp_path) / "best.json", {"step": 2, "metric": metric,
                                                                          "file": "step_00000002.pt"})
        ckpt.prune(tmp_path, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 4
    assert not list(ckpt.checkpoint_dir(tmp_path).glob(".*"))


def test_load_weights_reads_every_form(tmp_path, tiny_model):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.save_pretrained(tmp_path / "run" / "final")
    torch.save({"model": state, "step": 3}, tmp_path / "checkpoint.pt")
    torch.save(state, tmp_path / "bare.pt")
    for source in ("run", "run/final", "checkpoint.pt", "bare.pt"):
        loaded, settings, _ = loading.load_weights(tmp_path / source)
        tiny_model.load_state_dict(loaded)
        assert all(torch.equal(tiny_model.state_dict()[k], v) for k, v in state.items()), source
        assert (settings is not None) == source.startswith("run"), source  # an export carries its config.json
        if settings is not None:
            assert settings["query_dim"] == tiny_model.config.query_dim
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.load_weights(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a save_pretrained folder"):
        loading.load_weights(tmp_path / "empty")


def test_reading_a_config_imports_neither_torch_nor_the_model():
    import subprocess
    import sys

    code = ("import sys, config; config.load_config(sys.argv[1]); "
            "assert not {'torch', 'transformers', 'model'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "stage2_135M.yaml")], check=True, cwd=ROOT)
