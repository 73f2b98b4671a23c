"""train.py end to end on CPU with tiny random backbones and a small synthetic dataset: run directory
contents, the token-weighted mean over an accumulated batch, DPO at step 0, skipped steps, freezing,
the final export, resume after a kill, and torchrun with two gloo processes."""

import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import checkpoint as ckpt
import train
from config import ConfigError, load_config
from model import MODES, FoveatedVLM
from conftest import load_script
from objectives import TextCE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("synthetic")
    mod.main(["--out", str(out), "--size", "48", "--frames", "3", "--frame-size", "96", "--object-scale", "0.2",
              "--distractors", "0", "2"])
    return out


def config_tree(root, run_dir, stage="sft"):
    split = {"alignment": "alignment", "sft": "sft", "dpo": "dpo"}[stage]
    return {
        "stage": stage, "run_dir": str(run_dir), "seed": 0,
        "model": {"llm": "random:tiny", "dino": "random:tiny", "query_dim": 16},
        "data": {"train": [{"name": "main", "shards": str(root / split)}],
                 "val": [{"name": "val", "shards": str(root / f"val_{split}")}],
                 "frame_size": 56, "max_frames": 4, "max_text_tokens": 256, "batch_size": 4, "num_workers": 0},
        "optim": {"steps": 4, "lr": {"connector": 1e-3, "dino": 1e-3, "llm": 1e-3}, "warmup_ratio": 0.25},
        "eval": {"every_steps": 0, "at_start": False, "max_samples": 8, "batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
        "log": {"every_steps": 1},
    }


def write_config(path, tree) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def run(tmp_path, tree, *overrides):
    return train.main(["--config", write_config(tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*')))}.yaml", tree),
                       *overrides])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def assert_resumed_like_uninterrupted(whole, killed, steps: int):
    """A killed and resumed run's logged metrics (every step 1..steps), validations and final weights
    equal the uninterrupted run's."""
    a, b = read_csv(whole / "metrics.csv"), read_csv(killed / "metrics.csv")
    assert [r["step"] for r in b] == [str(s) for s in range(1, steps + 1)]
    for ra, rb in zip(a, b):
        for column in ("samples", "tokens", "loss", "lr_llm", "grad_norm"):
            assert float(ra[column]) == pytest.approx(float(rb[column]), rel=1e-6, abs=1e-9), (ra["step"], column)
    va, vb = read_csv(whole / "val.csv"), read_csv(killed / "val.csv")
    assert [(r["step"], r["source"], r["loss"]) for r in va] == [(r["step"], r["source"], r["loss"]) for r in vb]
    sa, sb = final_state(whole), final_state(killed)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sft_run_writes_metrics_checkpoints_and_a_loadable_export(synthetic, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tmp_path, config_tree(synthetic, run_dir), "eval.at_start=true", "eval.every_steps=2")
    assert summary["steps"] == 4 and summary["samples"] == 16
    rows = read_csv(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for column in ("samples", "loss", "lr_connector", "lr_dino", "lr_llm", "grad_norm", "samples_per_s",
                   "tokens_per_s"):
        assert all(r[column] != "" and math.isfinite(float(r[column])) for r in rows), column
    assert [float(r["lr_llm"]) for r in rows] == pytest.approx([1e-3, 1e-3, 0.1e-3 + 0.9e-3 * 0.75, 0.1e-3 + 0.9e-3 * 0.25])
    val = read_csv(run_dir / "val.csv")
    assert sorted({int(r["step"]) for r in val}) == [0, 2, 4] and {"all", "synthetic/colour"} <= {r["source"] for r in val}
    start, end = (float(next(r["loss"] for r in val if r["source"] == "all" and int(r["step"]) == s)) for s in (0, 4))
    assert end < start  # it learns
    # keep_last 1 + the best by validation loss; no temporary files
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == sorted({"best.json", best["file"], "step_00000004.pt"})
    assert best["metric"] == pytest.approx(min(float(r["loss"]) for r in val if r["source"] == "all" and r["step"] != "0"))
    last = ckpt.load_checkpoint(run_dir / "checkpoints" / "step_00000004.pt")
    assert last["config"]["optim"]["steps"] == 4 and last["step"] == 4 and len(last["data"]) == 1
    model = FoveatedVLM.from_pretrained(run_dir / "final")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in last["model"].items())
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "config.yaml").is_file()


def test_accumulated_micro_batches_equal_one_batch(synthetic, tmp_path):
    """The loss is the token-weighted mean over the whole effective batch: 2 x 2 samples with
    accumulation train exactly like 1 x 4 (same samples, different padding)."""
    tree = config_tree(synthetic, tmp_path / "a")
    tree["data"]["val"] = []
    run(tmp_path, tree, "optim.steps=2", "data.batch_size=2", "optim.grad_accum=2")
    tree["run_dir"] = str(tmp_path / "b")
    run(tmp_path, tree, "optim.steps=2", "data.batch_size=4", "optim.grad_accum=1")
    a, b = read_csv(tmp_path / "a" / "metrics.csv"), read_csv(tmp_path / "b" / "metrics.csv")
    for ra, rb in zip(a, b):
        assert ra["samples"] == rb["samples"] == str(4 * int(ra["step"]))
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5)
        assert float(ra["grad_norm"]) == pytest.approx(float(rb["grad_norm"]), rel=1e-4)
    sa, sb = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_dpo_starts_at_ln2_and_learns_the_pairs(synthetic, tmp_path, reference):
    run_dir = tmp_path / "dpo"
    tree = config_tree(synthetic, run_dir, stage="dpo")
    run(tmp_path, tree, f"dpo.reference={reference}", "optim.steps=6", "eval.at_start=true",
        "optim.lr={connector: 3e-3, dino: 3e-3, llm: 3e-3}")
    rows = read_csv(run_dir / "metrics.csv")
    tol = 1e-6 if reference == "model" else 1e-5  # precomputed: other batches, other padding
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=tol)
    assert float(rows[0]["rewards/margins"]) == pytest.approx(0, abs=tol)
    assert float(rows[-1]["rewards/margins"]) > 0 and float(rows[-1]["loss"]) < math.log(2)
    val = [r for r in read_csv(run_dir / "val.csv") if r["source"] == "all"]
    assert float(val[0]["dpo_loss"]) == pytest.approx(math.log(2), abs=tol)
    assert (run_dir / "reference_logps.pt").is_file() == (reference == "precomputed")


class PerSampleCE(TextCE):
    """The text CE averaged per sample instead of per token: a second objective for the tests."""
    name = "per_sample"

    def normaliser(self, host):
        return len(host["keys"])


def test_train_step_weights_each_objective_over_its_own_effective_batch(synthetic, tmp_path):
    """train_step alone, two objectives, two micro-batches: the gradient is that of
    sum_k w_k * (objective k summed over both micro-batches) / (its normaliser over both)."""
    tree = config_tree(synthetic, tmp_path / "run")
    tree["data"]["val"] = []
    cfg = load_config(write_config(tmp_path / "c.yaml", tree), ["optim.grad_accum=2", "optim.max_grad_norm=0"])
    run_ = train.setup(cfg, train.distributed.setup("cpu"))
    run_.objectives = [(TextCE(), 0.3), (PerSampleCE(), 2.0)]
    micro = train.draw_micro_batches(run_)
    tokens, samples = (sum(f(h) for h in micro) for f in (TextCE().normaliser, PerSampleCE().normaliser))
    assert tokens != samples
    model = run_.model
    expected_loss = 0.0
    for host in micro:
        ce, _ = TextCE().loss(model, run_.to_device(host), cfg.mode)
        (0.3 * ce / tokens + 2.0 * ce / samples).backward()
        expected_loss += ce.item()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seen = {}
    run_.optimizer.step = lambda: seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
    result = train.train_step(run_, micro)
    assert result.status == "ok" and result.normalisers == [tokens, samples]
    assert result.loss_sums == pytest.approx([expected_loss] * 2, rel=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_every_active_objective_is_logged(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(train.objective_units, "build", lambda cfg: [(TextCE(), 1.0), (PerSampleCE(), 0.5)])
    tree = config_tree(synthetic, tmp_path / "run")
    run(tmp_path, tree, "optim.steps=2")
    for row in read_csv(tmp_path / "run" / "metrics.csv"):
        text, per_sample = float(row["text_loss"]), float(row["per_sample_loss"])
        assert float(row["loss"]) == pytest.approx(text + 0.5 * per_sample) and per_sample > text
    val = read_csv(tmp_path / "run" / "val.csv")
    assert val and all(r["loss"] != "" for r in val)


def test_dpo_pairs_are_validated_in_the_training_mode_whatever_the_eval_modes(synthetic, tmp_path):
    """eval.modes without the training mode: DPO's pairs (whose reference lives in the training mode)
    are still scored there, so the best checkpoint has a finite criterion."""
    run_dir = tmp_path / "dpo"
    summary = run(tmp_path, config_tree(synthetic, run_dir, stage="dpo"), "eval.modes=[coarse_only]", "optim.steps=2")
    assert math.isfinite(summary["best"]["metric"])
    rows = [r for r in read_csv(run_dir / "val.csv") if r["source"] == "all"]
    assert {r["mode"] for r in rows} == {"coarse_only", "coarse_fine"}
    assert all((r["dpo_loss"] != "") == (r["mode"] == "coarse_fine") for r in rows)


def test_oom_and_non_finite_steps_are_skipped(synthetic, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.micro_batch_losses

    def flaky(model, batch, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("simulated")
        [(loss, extra)] = real(model, batch, *args)
        return [(loss * float("nan") if calls["n"] == 4 else loss, extra)]

    monkeypatch.setattr(train, "micro_batch_losses", flaky)
    run_dir = tmp_path / "run"
    tree = config_tree(synthetic, run_dir)
    tree["data"]["val"] = []
    summary = run(tmp_path, tree)
    assert summary["steps"] == 4 and summary["skipped_oom"] == 1 and summary["skipped_nonfinite"] == 1
    assert calls["n"] == 6 and summary["samples"] == 16
    assert all(torch.isfinite(v).all() for v in final_state(run_dir).values())

    monkeypatch.setattr(train, "micro_batch_losses", lambda m, b, *a: [(l * float("nan"), e) for l, e in real(m, b, *a)])
    tree["run_dir"] = str(tmp_path / "nan")
    with pytest.raises(RuntimeError, match="3 steps in a row skipped"):
        run(tmp_path, tree, "optim.max_bad_steps=3")


def test_an_oom_on_every_retry_stops_the_run(synthetic, tmp_path, monkeypatch):
    """A batch shape that runs out of memory every time does not loop for ever: max_bad_steps skipped
    steps in a row (of any kind) stop the run with a clear message."""
    calls = {"n": 0}

    def always_oom(*args):
        calls["n"] += 1
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(train, "micro_batch_losses", always_oom)
    tree = config_tree(synthetic, tmp_path / "run")
    tree["data"]["val"] = []
    with pytest.raises(RuntimeError, match=r"4 steps in a row skipped \(oom last\).*optim.max_bad_steps"):
        run(tmp_path, tree, "optim.max_bad_steps=4")
    assert calls["n"] == 4
    assert "error: 4 steps in a row skipped (oom last)" in (tmp_path / "run" / "train.log").read_text()


def test_a_run_that_trains_nothing_is_an_error(synthetic, tmp_path):
    """Exact (resampled: false) data where every sample is unusable: an error naming the skips, not
    "0 steps" with exit 0 and an untrained final/ export."""
    from shards import ShardWriter

    with ShardWriter(tmp_path / "broken") as writer:
        for i in range(6):  # fewer than the loader's fail-fast threshold
            writer.write(f"s{i}", {"json": b"{not json", "000.jpg": b"garbage"})
    tree = config_tree(synthetic, tmp_path / "run")
    tree["data"]["train"] = [{"name": "broken", "shards": str(tmp_path / "broken")}]
    tree["data"]["resampled"] = False
    with pytest.raises(RuntimeError, match=r"no usable batch \(skipped samples: \{'broken': \{'bad_json': 6\}\}\)"):
        run(tmp_path, tree)
    assert not (tmp_path / "run" / "final").exists()
    assert "a run that trains nothing is an error" in (tmp_path / "run" / "train.log").read_text()


def test_bad_paths_fail_before_the_run_directory_is_touched(synthetic, tmp_path):
    """run_dir that is a file, init_from that is not a checkpoint (or carries a pickle payload), a
    shard pattern that matches nothing: ConfigErrors naming the key, raised before anything loads and
    before run_dir/train.log exists."""
    tree = config_tree(synthetic, tmp_path / "file")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="run_dir: .*file exists and is not a directory"):
        run(tmp_path, tree)
    tree["run_dir"] = str(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"init_from: .*notes.txt is not a checkpoint.*not a readable PyTorch"):
        run(tmp_path, tree, f"init_from={tmp_path / 'notes.txt'}")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    torch.save({"model": {}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="init_from: .*evil.pt holds pickled Python objects.*--trust-checkpoint"):
        run(tmp_path, tree, f"init_from={tmp_path / 'evil.pt'}")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(ValueError, match="does not fit the model"):  # the opt-in reaches the loader, which runs it
        train.main(["--config", write_config(tmp_path / "c.yaml", tree), "--trust-checkpoint",
                    f"init_from={tmp_path / 'evil.pt'}"])
    assert (tmp_path / "ran").exists()
    shutil.rmtree(tmp_path / "run")
    tree["data"]["val"] = [{"name": "val", "shards": str(tmp_path / "nothing" / "*.tar")}]
    with pytest.raises(ConfigError, match=r"data.val.0.shards \(source 'val'\): shard pattern .*matches no file"):
        run(tmp_path, tree)
    assert not (tmp_path / "run").exists()


def test_help_shows_examples_and_every_default(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "examples:" in out and "torchrun --nproc_per_node" in out
    assert "optim.max_bad_steps: 10  (int)" in out and "--trust-checkpoint" in out


@pytest.mark.parametrize("mode", [pytest.param("coarse_only", marks=pytest.mark.slow), "coarse_fine",
                                  pytest.param("autoregressive", marks=pytest.mark.slow)])
def test_a_dinov3_backbone_trains_in_every_mode(synthetic, tmp_path, mode):
    """model.dino: random:tiny-dinov3 (16-px patches, registers, RoPE) through train.py: it learns, and
    its export loads back with the DINOv3 backbone."""
    from dino import Dinov3Backbone

    tree = config_tree(synthetic, tmp_path / "run")
    tree["model"]["dino"] = "random:tiny-dinov3"
    with pytest.raises(ConfigError, match="data.frame_size 56 is not a multiple of the vision backbone's 16-px"):
        run(tmp_path, tree, f"mode={mode}")
    tree["data"]["frame_size"] = 64
    tree["run_dir"] = str(tmp_path / "run64")
    summary = run(tmp_path, tree, f"mode={mode}", "eval.at_start=true", "optim.steps=6")
    assert summary["steps"] == 6
    val = [float(r["loss"]) for r in read_csv(tmp_path / "run64" / "val.csv") if r["source"] == "all"]
    assert val[-1] < val[0]  # it learns
    model = FoveatedVLM.from_pretrained(tmp_path / "run64" / "final")
    assert isinstance(model.encoder.dino, Dinov3Backbone) and model.config.dino == "random:tiny-dinov3"


def test_parameter_groups_freeze_and_weight_decay(synthetic, tmp_path):
    tree = config_tree(synthetic, tmp_path / "run")
    tree["data"]["val"] = []
    cfg = load_config(write_config(tmp_path / "c.yaml", tree), ["optim.freeze=[dino]"])
    model = train.build_model(cfg)
    train.freeze(model, cfg)
    optimizer = train.make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["part"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    connector = groups[("connector", 0.01)] | groups[("connector", 0.0)]
    assert connector == {"q_static", "q_init", "encoder.query_input_proj.weight", "encoder.output_proj.weight",
                         "encoder.output_proj.bias", "dino_to_llm.weight", "dino_to_llm.bias",
                         "llm_to_query.weight", "llm_to_query.bias"}
    no_decay = set().union(*(v for (part, wd), v in groups.items() if wd == 0))
    assert {"q_static", "q_init", "encoder.output_proj.bias", "llm.model.norm.weight"} <= no_decay
    assert all(model.get_parameter(n).dim() >= 2 for (_, wd), v in groups.items() if wd > 0 for n in v)
    assert not any(part == "dino" for part, _ in groups)
    assert not any(p.requires_grad for _, p in model.parameter_groups()["dino"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    run(tmp_path, tree, "optim.freeze=[dino]", "optim.steps=2")
    final = final_state(tmp_path / "run")
    assert all(torch.equal(final[k], initial[k]) for k in final if k.startswith("encoder.dino."))
    assert not torch.equal(final["dino_to_llm.weight"], initial["dino_to_llm.weight"])


def test_bad_configs_fail_before_training(synthetic, tmp_path):
    tree = config_tree(synthetic, tmp_path / "run")
    with pytest.raises(ConfigError, match="init_from: .*nowhere does not exist"):
        run(tmp_path, tree, f"init_from={tmp_path / 'nowhere'}")
    run(tmp_path, tree, "optim.steps=2")
    with pytest.raises(ConfigError, match="different config.*optim.lr.llm"):
        run(tmp_path, tree, "optim.steps=2", "optim.lr.llm=1e-4")


@pytest.mark.slow
def test_init_from_continues_from_an_earlier_stage(synthetic, tmp_path):
    tree = config_tree(synthetic, tmp_path / "s1", stage="alignment")
    tree["data"]["val"] = []
    run(tmp_path, tree, "optim.steps=2")
    tree = config_tree(synthetic, tmp_path / "s2", stage="sft")
    tree["data"]["val"] = []
    for source in (tmp_path / "s1", tmp_path / "s1" / "final", tmp_path / "s1" / "checkpoints" / "step_00000002.pt"):
        cfg = load_config(write_config(tmp_path / "c.yaml", tree), [f"init_from={source}"])
        model = train.build_model(cfg, train.initial_weights(cfg))
        s1 = final_state(tmp_path / "s1")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in s1.items()), source


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    from test_model import SAMPLES, make_batch

    batch = make_batch(tiny_model, SAMPLES[:2])
    tiny_model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny_model.gradient_checkpointing_enable()
        tiny_model.zero_grad()
        tiny_model(**batch, mode="coarse_fine")["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("encoder.dino.blocks") for k in grads[0])
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_compile_compiles_the_training_function(synthetic, tmp_path, stage):
    """The function train.py compiles (objectives.micro_batch_losses) is one graph with no breaks, and
    gives the eager loss."""
    from objectives import build, micro_batch_losses

    tree = config_tree(synthetic, tmp_path / "run", stage=stage)
    cfg = load_config(write_config(tmp_path / "c.yaml", tree))
    run_ = train.setup(cfg, train.distributed.setup("cpu"))
    units = tuple(o for o, _ in run_.objectives)
    batch = run_.to_device(next(iter(run_.loader)))
    assert [type(o) for o in units] == [type(o) for o, _ in build(cfg)]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(micro_batch_losses, backend="aot_eager")
    [(loss, _)] = compiled(run_.model, batch, units, "coarse_fine")
    [(eager, _)] = micro_batch_losses(run_.model, batch, units, "coarse_fine")
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_compiled_training_matches_eager(synthetic, tmp_path):
    """compile: true (inductor) trains like eager, through a handful of graphs (shapes vary per batch
    and become dynamic after the first recompile) and no graph breaks."""
    tree = config_tree(synthetic, tmp_path / "eager")
    tree["data"]["val"] = []
    tree["optim"]["steps"] = 6
    run(tmp_path, tree)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    tree["run_dir"] = str(tmp_path / "compiled")
    run(tmp_path, tree, "compile=true")
    assert 1 <= counters["stats"]["unique_graphs"] <= 4 and not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(read_csv(tmp_path / "eager" / "metrics.csv"), read_csv(tmp_path / "compiled" / "metrics.csv")):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


@pytest.mark.slow
def test_metrics_resume_after_a_kill_continue_like_an_uninterrupted_run(synthetic, tmp_path):
    """Kill -9 a run at a random moment after its step-4 checkpoint; rerunning the same command
    finishes with exactly the losses of a run that was never stopped."""
    tree = config_tree(synthetic, tmp_path / "whole")
    tree["data"]["num_workers"] = 1
    tree["optim"]["steps"] = 8
    tree["eval"]["every_steps"] = 4
    whole = write_config(tmp_path / "whole.yaml", tree)
    tree["run_dir"] = str(tmp_path / "killed")
    killed = write_config(tmp_path / "killed.yaml", tree)
    cmd = lambda c: [sys.executable, str(ROOT / "train.py"), "--config", c]  # noqa: E731
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd(whole), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step_00000004.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    time.sleep(torch.rand(()).item() * 0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd(killed), check=True, env=env, capture_output=True)
    assert_resumed_like_uninterrupted(tmp_path / "whole", tmp_path / "killed", steps=8)


def test_a_signal_saves_and_the_resumed_run_equals_an_uninterrupted_one(synthetic, tmp_path, monkeypatch):
    """SIGTERM in the middle of step 3 (checkpoints every 4): the step finishes, a checkpoint is
    written, train raises Stopped. The run directory is then moved and resumed under its new name
    (with a trailing slash): losses, weights and the RNG streams equal an uninterrupted run's. The
    loss draws from torch's and Python's RNGs, as dropout or augmentation would."""
    import random

    real, calls = train.micro_batch_losses, {"n": 0, "signal_at": None}

    def noisy(model, batch, *args):
        calls["n"] += 1
        if calls["n"] == calls["signal_at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        noise = 1 + 0.1 * torch.rand(()) + 0.1 * random.random()
        return [(loss * noise, extra) for loss, extra in real(model, batch, *args)]

    monkeypatch.setattr(train, "micro_batch_losses", noisy)
    tree = config_tree(synthetic, tmp_path / "whole")
    tree["data"]["num_workers"] = 1
    tree["optim"]["steps"] = 6
    tree["eval"]["every_steps"] = 2
    tree["checkpoint"]["every_steps"] = 4
    run(tmp_path, tree)
    calls.update(n=0, signal_at=3)
    tree["run_dir"] = str(tmp_path / "stopped")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(train.Stopped):
        run(tmp_path, tree)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "stopped")] == [3]
    assert "stopped by a signal after step 3" in (tmp_path / "stopped" / "train.log").read_text()
    assert not (tmp_path / "stopped" / "final").exists()
    (tmp_path / "stopped").rename(tmp_path / "moved")
    calls.update(signal_at=None)
    tree["run_dir"] = str(tmp_path / "moved") + "/"
    run(tmp_path, tree)
    assert "resumed from" in (tmp_path / "moved" / "train.log").read_text()
    a, b = read_csv(tmp_path / "whole" / "metrics.csv"), read_csv(tmp_path / "moved" / "metrics.csv")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 7)]
    assert [(r["loss"], r["grad_norm"], r["samples"]) for r in a] == [(r["loss"], r["grad_norm"], r["samples"]) for r in b]
    va, vb = read_csv(tmp_path / "whole" / "val.csv"), read_csv(tmp_path / "moved" / "val.csv")
    assert [(r["step"], r["loss"]) for r in va] == [(r["step"], r["loss"]) for r in vb]
    sa, sb = final_state(tmp_path / "whole"), final_state(tmp_path / "moved")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resumed_dpo_run_keeps_init_from_as_its_reference(synthetic, tmp_path, monkeypatch):
    """dpo.reference: model is a frozen copy of the stage's initial weights (init_from). Stopped after
    step 2 and resumed, the run's losses and weights equal an uninterrupted run's: the resumed run
    rebuilds its reference from init_from, not from the random weights the model is built with."""
    tree = config_tree(synthetic, tmp_path / "init", stage="dpo")
    start = train.build_model(load_config(write_config(tmp_path / "i.yaml", tree)))
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05 * torch.randn_like(p))  # weights no random initialisation gives
    start.save_pretrained(tmp_path / "start")
    real, calls = train.micro_batch_losses, {"n": 0, "signal_at": None}

    def stopping(model, batch, *args):
        calls["n"] += 1
        if calls["n"] == calls["signal_at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, *args)

    monkeypatch.setattr(train, "micro_batch_losses", stopping)
    tree.update(init_from=str(tmp_path / "start"), run_dir=str(tmp_path / "whole"))
    tree["data"]["val"] = []
    run(tmp_path, tree)
    calls.update(n=0, signal_at=2)
    tree["run_dir"] = str(tmp_path / "stopped")
    with pytest.raises(train.Stopped):
        run(tmp_path, tree)
    calls.update(signal_at=None)
    run(tmp_path, tree)
    a, b = read_csv(tmp_path / "whole" / "metrics.csv"), read_csv(tmp_path / "stopped" / "metrics.csv")
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]
    assert [(r["loss"], r["rewards/margins"]) for r in a] == [(r["loss"], r["rewards/margins"]) for r in b]
    sa, sb = final_state(tmp_path / "whole"), final_state(tmp_path / "stopped")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_sigterm_exits_75_after_saving_and_a_second_signal_exits_at_once(synthetic, tmp_path):
    """The command line as a cluster sees it: SIGTERM to the whole process group (the DataLoader
    worker too, as torchrun and schedulers send it) -> checkpoint, exit code 75; the same command
    resumes; two Ctrl-Cs in a row end the process at once, without saving."""
    tree = config_tree(synthetic, tmp_path / "run")
    tree["optim"]["steps"] = 400
    tree["checkpoint"]["every_steps"] = 1000
    tree["eval"]["at_start"] = False
    tree["data"]["val"] = []
    tree["data"]["num_workers"] = 1
    config = write_config(tmp_path / "c.yaml", tree)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", config]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start_and_wait_for(step):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.time() + 180
        while not (tmp_path / "run" / "metrics.csv").exists() or len(read_csv(tmp_path / "run" / "metrics.csv")) < step:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        return proc

    proc = start_and_wait_for(2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == train.EXIT_STOPPED, proc.stderr.read()
    [(step, _)] = ckpt.list_checkpoints(tmp_path / "run")
    assert 2 <= step < 400 and not (tmp_path / "run" / "final").exists()
    proc = start_and_wait_for(step + 2)  # the same command resumes
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    os.killpg(proc.pid, signal.SIGINT)
    while "finishing the current step" not in proc.stderr.readline():  # the first one has been handled
        assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [step]  # the second signal did not wait to save


WORKER = ROOT / "tests" / "torchrun_worker.py"


def torchrun(tmp_path, config, *overrides, fault=""):
    env = dict(os.environ, PYTHONPATH=str(ROOT), FVLM_TEST_FAULT=fault, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "--config", config, *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((Path(tmp_path) / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_stay_in_step(synthetic, tmp_path):
    """Two CPU processes under torchrun: after SFT with an OOM on rank 0 and a NaN on rank 1, and
    after DPO, both ranks hold identical weights and counted the same skipped steps; with exact
    (finite) data both stop at the same step."""
    from shards import ShardWriter, expand, read_samples

    with ShardWriter(tmp_path / "small_shards", max_samples=6) as writer:  # 8 shards: 4 per rank
        for path in expand(synthetic / "sft"):
            for key, files in read_samples(path):
                writer.write(key, files)
    tree = config_tree(synthetic, tmp_path / "sft")
    tree["data"]["train"] = [{"name": "main", "shards": str(tmp_path / "small_shards")}]
    tree["data"]["resampled"] = False
    tree["optim"]["steps"] = 50  # more than the data holds: 48 samples / 2 ranks / 4 per batch
    tree["eval"]["every_steps"] = 2
    results = torchrun(tmp_path, write_config(tmp_path / "sft.yaml", tree), fault="oom:0:2,nan:1:4")
    a, b = results
    assert a["digest"] == b["digest"] and a["digest"] != a["initial_digest"]
    assert a["summary"]["skipped_oom"] == b["summary"]["skipped_oom"] == 1
    assert a["summary"]["skipped_nonfinite"] == b["summary"]["skipped_nonfinite"] == 1
    assert a["summary"]["steps"] == b["summary"]["steps"] < 6
    assert a["summary"]["samples"] == b["summary"]["samples"] > 0
    assert len(read_csv(tmp_path / "sft" / "metrics.csv")) == a["summary"]["steps"]

    tree = config_tree(synthetic, tmp_path / "dpo", stage="dpo")
    tree["optim"]["steps"] = 2
    a, b = torchrun(tmp_path, write_config(tmp_path / "dpo.yaml", tree))
    assert a["digest"] == b["digest"] != a["initial_digest"]
    assert float(read_csv(tmp_path / "dpo" / "metrics.csv")[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_torchrun_ranks_agree_to_stop_on_a_signal_and_resume_exactly(synthetic, tmp_path):
    """SIGTERM reaches rank 0 only, in step 3: both ranks stop after that step with one checkpoint;
    the same command then finishes with the weights of an uninterrupted run."""
    tree = config_tree(synthetic, tmp_path / "whole")
    tree["optim"]["steps"] = 5
    tree["checkpoint"]["every_steps"] = 4
    whole = torchrun(tmp_path, write_config(tmp_path / "whole.yaml", tree))
    tree["run_dir"] = str(tmp_path / "stopped")
    config = write_config(tmp_path / "stopped.yaml", tree)
    assert torchrun(tmp_path, config, fault="term:0:3") == [{"stopped_at": 3}, {"stopped_at": 3}]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "stopped")] == [3]
    resumed = torchrun(tmp_path, config)
    assert resumed[0]["digest"] == resumed[1]["digest"] == whole[0]["digest"]
    assert resumed[0]["summary"]["samples"] == whole[0]["summary"]["samples"]


@pytest.mark.slow
def test_wandb_mirror_is_optional_and_resumes_its_run(synthetic, tmp_path, monkeypatch):
    """log.wandb: true hands the metrics to wandb (offline by default) under one run id that a resume
    reuses; without the package it is a clear error."""
    import types

    calls = []
    run_stub = types.SimpleNamespace(log=lambda data, step: calls.append(("log", step, sorted(data))),
                                     finish=lambda: calls.append(("finish",)))
    stub = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: "abc123"),
                                 init=lambda **kw: calls.append(("init", kw["mode"], kw["id"], kw["resume"])) or run_stub)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    tree = config_tree(synthetic, tmp_path / "run")
    run(tmp_path, tree, "log.wandb=true", "optim.steps=2")
    assert calls[0] == ("init", "offline", "abc123", "allow") and calls[-1] == ("finish",)
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "train/loss" in c[2]] == [1, 2]
    assert any("val/coarse_fine/loss" in c[2] for c in logged)
    calls.clear()
    stub.util.generate_id = lambda: "other"
    run(tmp_path, tree, "log.wandb=true", "optim.steps=2")  # the same command again: a resume
    assert calls[0] == ("init", "offline", "abc123", "allow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    tree["run_dir"] = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="needs the wandb package"):
        run(tmp_path, tree, "log.wandb=true", "optim.steps=2")


def test_next_frame_stage_trains_logs_its_metrics_and_exports_the_head(synthetic, tmp_path):
    """Stage next_frame (pixels target) end to end: metrics.csv and val.csv carry both losses, their
    ratio and improvement, the two reference losses and the entropies; the export keeps the head;
    text-only samples are skipped as not_video."""
    tree = config_tree(synthetic, tmp_path / "run", stage="alignment")
    tree.update(stage="next_frame", coarse_weight=1.0, next_frame={"target": "pixels", "pixels_size": 8})
    tree["model"].update(next_frame=[3, 8, 8], next_frame_width=16)
    tree["data"]["train"].append({"name": "text", "shards": str(synthetic / "text")})
    tree["eval"].update(modes=["coarse_fine", "autoregressive"], every_steps=2)
    summary = run(tmp_path, tree)
    assert summary["steps"] == 4 and summary["data_skipped"].get("text", {}).get("not_video", 0) > 0
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    for column in ("loss_fine", "loss_coarse", "ratio", "improvement", "copy_loss", "mean_loss", "static_entropy",
                   "dynamic_entropy"):
        assert all(r[column] != "" for r in rows), column
    r = rows[-1]
    assert float(r["loss"]) == pytest.approx(float(r["loss_fine"]) + float(r["loss_coarse"]), rel=1e-5)
    assert float(r["ratio"]) == pytest.approx(float(r["loss_coarse"]) / float(r["loss_fine"]), rel=1e-6)
    val = [v for v in read_csv(tmp_path / "run" / "val.csv") if v["source"] == "all"]
    assert {v["mode"] for v in val} == {"coarse_fine", "autoregressive"}
    assert all(float(v["loss"]) == pytest.approx(float(v["loss_fine"]) + float(v["loss_coarse"]), rel=1e-5)
               for v in val)
    model = FoveatedVLM.from_pretrained(tmp_path / "run" / "final")
    assert model.config.next_frame == [3, 8, 8] and model.next_frame is not None
    # phase 2: the text stages continue from phase 1's weights (the head carried along), with the coarse
    # pass trained as well
    tree = config_tree(synthetic, tmp_path / "phase2", stage="alignment")
    tree["model"].update(next_frame=[3, 8, 8], next_frame_width=16)
    tree.update(init_from=str(tmp_path / "run"), coarse_weight=1.0)
    run(tmp_path, tree, "optim.steps=2")
    rows = read_csv(tmp_path / "phase2" / "metrics.csv")
    assert all(float(r["loss"]) == pytest.approx(float(r["loss_fine"]) + float(r["loss_coarse"]), rel=1e-5)
               for r in rows)


def test_the_pooled_multi_token_baseline_trains_validates_and_benchmarks(synthetic, tmp_path):
    """model.tokens_per_frame through the same trainer, validation (every eval mode), export and the
    benchmark harness; the FLOP column counts N tokens per frame."""
    import benchmark

    tree = config_tree(synthetic, tmp_path / "run")
    tree["model"]["tokens_per_frame"] = 4
    tree["eval"].update(modes=["coarse_only", "autoregressive"], at_start=True)
    summary = run(tmp_path, tree)
    assert summary["steps"] == 4
    val = [v for v in read_csv(tmp_path / "run" / "val.csv") if v["source"] == "all"]
    assert {v["mode"] for v in val} == {"coarse_only", "autoregressive"}
    last = [v for v in val if v["step"] == "4"]
    assert last[0]["loss"] == last[1]["loss"] and last[0]["dynamic_entropy"] == "nan"  # one pass, no queries
    model = FoveatedVLM.from_pretrained(tmp_path / "run" / "final")
    assert model.visual.per_frame == 4
    load_script("report").main([str(tmp_path / "run")])
    assert "nothing chooses where to look" in (tmp_path / "run" / "report.md").read_text()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "synthetic").symlink_to(synthetic)
    report = benchmark.main(["--checkpoint", str(tmp_path / "run" / "final"), "--data-root", str(tmp_path / "benchmarks"),
                             "--bench", "synthetic", "--limit", "8", "--frame-size", "56", "--max-frames", "4",
                             "--output", str(tmp_path / "bench.json")])
    scores = report["results"]["synthetic"]
    assert [scores[m]["items"] for m in MODES] == [8, 8, 8]
    answers = {m: [(r["reply"], r["likelihood"]) for r in scores[m]["raw"]] for m in MODES}
    assert answers["coarse_only"] == answers["autoregressive"]  # no queries: every mode is one pass


def test_the_val_line_leaves_out_the_entropies_a_pooled_model_has_not():
    """The pooled baseline has no queries: its entropies are NaN, and the val line shows none of them
    (it printed "attention entropy static nan dynamic nan")."""
    nan = float("nan")
    assert train.entropy_text({"static_entropy": 2.5, "dynamic_entropy": 1.25}) == \
        " | attention entropy static 2.500 dynamic 1.250"
    assert train.entropy_text({"static_entropy": 2.5, "dynamic_entropy": nan}) == " | attention entropy static 2.500"
    assert train.entropy_text({"static_entropy": nan, "dynamic_entropy": nan}) == ""
    assert train.entropy_text({"loss": 1.0}) == ""
