"""Models through the Hugging Face Hub, offline: a Hub cache laid out here (huggingface_hub's own
layout: models--owner--name/{refs/main, snapshots/<commit>/, blobs/}) with HF_HUB_OFFLINE on, so the
real snapshot_download path finds the files. A save_pretrained export and a checkpoint.pt-only repo
load by id (FoveatedVLM.from_pretrained, model.load_model, benchmark.py --checkpoint, train.py
init_from); a missing id fails clearly; a pickled payload is refused; scripts/push.py --dry-run writes
the folder to upload and its model card."""

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml

import benchmark
import loading
import train
from config import ConfigError, load_config
from conftest import load_script, make_model
from model import FoveatedVLM, load_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT, ref: str = "main"):
    """source's files as repo's snapshot at commit: content-addressed blobs, snapshot symlinks, the ref."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hub cache. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is
    imported, so its constants are patched too (the environment is for anything started later)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def exported(tiny_backbones, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "model"
    model = make_model(tiny_backbones, seed=3)
    model.save_pretrained(folder)
    return model, folder


def outputs(model):
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (1, 2, 3, 28, 28), dtype=torch.uint8)
    ids = torch.randint(0, 100, (1, 6))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        return model(frames=frames, input_ids=ids, attention_mask=ones, loss_mask=ones, mode="coarse_fine")["logits"]


def test_the_id_rule(tmp_path, monkeypatch):
    assert loading.hub_id("sanps/fVLM-135M") == ("sanps/fVLM-135M", None)
    assert loading.hub_id("sanps/fVLM-135M@v1.0") == ("sanps/fVLM-135M", "v1.0")
    assert loading.hub_id(f"owner/name@{COMMIT}") == ("owner/name", COMMIT)
    for path in ("random:tiny", "/abs/path", "./runs/x", "runs/a/b", "~/x/y", "../x", "x", "checkpoint.pt", "a/../b"):
        assert loading.hub_id(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "stage3").mkdir(parents=True)
    assert loading.hub_id("runs/stage3") is None  # a path that exists wins
    assert loading.hub_id("runs/stage4") == ("runs/stage4", None)


def test_an_export_loads_by_id_and_equals_the_original(hub, exported):
    model, folder = exported
    put_in_cache(hub, "me/tiny-fvlm", folder)
    loaded = FoveatedVLM.from_pretrained("me/tiny-fvlm").eval()
    assert loaded.config == dataclasses.replace(model.config, pretrained=False)  # as from a folder
    assert torch.equal(outputs(loaded), outputs(model))
    by_revision = FoveatedVLM.from_pretrained(f"me/tiny-fvlm@{COMMIT}").eval()
    assert torch.equal(outputs(by_revision), outputs(model))
    again, what = load_model("me/tiny-fvlm")
    assert COMMIT in what and torch.equal(outputs(again.eval()), outputs(model))


def test_a_checkpoint_pt_repo_loads_with_backbones_given_named_or_from_the_table(hub, exported, tiny_backbones,
                                                                                 tmp_path, monkeypatch):
    model, _ = exported
    llm, dino = map(str, tiny_backbones)
    repo = tmp_path / "repo"
    repo.mkdir()
    torch.save({"model": model.state_dict(), "step": 10, "config": {"stage": 3, "llm": None}}, repo / "checkpoint.pt")
    put_in_cache(hub, "me/published", repo)
    loaded, _ = load_model("me/published", llm, dino)
    assert torch.equal(outputs(loaded.eval()), outputs(model))
    with pytest.raises(ValueError, match="needs --llm and --dino"):  # not in the table: the backbones must be named
        load_model("me/published")
    monkeypatch.setitem(loading.PUBLISHED_BACKBONES, "me/published", (llm, dino))
    from_table = FoveatedVLM.from_pretrained("me/published").eval()
    assert torch.equal(outputs(from_table), outputs(model))
    # a non-export config.json in the repo names them too
    (repo / "config.json").write_text(json.dumps({"llm": llm, "dino": dino}))
    put_in_cache(hub, "me/with-config", repo)
    assert torch.equal(outputs(load_model("me/with-config")[0].eval()), outputs(model))
    assert loading.PUBLISHED_BACKBONES["sanps/fvlm-135m"] == ("HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/dinov2-small")


def test_a_pickled_payload_from_the_hub_is_refused(hub, tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    repo = tmp_path / "evil"
    repo.mkdir()
    torch.save({"model": {"q_static": torch.zeros(1, 8)}, "extra": Payload()}, repo / "checkpoint.pt")
    put_in_cache(hub, "bad/actor", repo)
    with pytest.raises(loading.UntrustedCheckpoint, match=loading.TRUST_FLAG):
        load_model("bad/actor", "random:tiny", "random:tiny")
    with pytest.raises(loading.UntrustedCheckpoint):
        FoveatedVLM.from_pretrained("bad/actor", llm="random:tiny", dino="random:tiny")
    assert not (tmp_path / "ran").exists()


def test_an_id_not_in_the_cache_is_a_clear_error(hub, tmp_path):
    for call in (lambda: FoveatedVLM.from_pretrained("nobody/nothing"), lambda: loading.load_weights("nobody/nothing@v2")):
        with pytest.raises(FileNotFoundError, match=r"nobody/nothing.*Hub id.*offline") as err:
            call()
        assert "HF_HUB_OFFLINE" in str(err.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    put_in_cache(hub, "me/empty", empty)
    with pytest.raises(FileNotFoundError, match="neither a save_pretrained export .* nor a checkpoint.pt"):
        load_model("me/empty")


# ---- the command lines: a tiny training run, then its export through the Hub -------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step SFT run on a tiny synthetic set (as tests/test_train.py makes them)."""
    root = tmp_path_factory.mktemp("hubrun")
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(root / "synthetic"), "--size", "8", "--frames", "2", "--frame-size", "96",
              "--object-scale", "0.2", "--distractors", "0", "1"])
    tree = {
        "stage": "sft", "run_dir": str(root / "run"), "seed": 0,
        "model": {"llm": "random:tiny", "dino": "random:tiny", "query_dim": 16},
        "data": {"train": [{"name": "synth", "shards": str(root / "synthetic" / "sft")}], "val": [],
                 "frame_size": 28, "max_frames": 2, "max_text_tokens": 128, "batch_size": 2, "num_workers": 0},
        "optim": {"steps": 2, "lr": {"connector": 1e-3, "dino": 1e-3, "llm": 1e-3}},
        "eval": {"every_steps": 0, "at_start": False},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
        "log": {"every_steps": 1},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(tree))
    train.main(["--config", str(root / "cfg.yaml")])
    tree["run_dir"] = str(root / "next")
    (root / "next.yaml").write_text(yaml.safe_dump(tree))
    return root


def test_benchmark_and_train_init_from_take_an_id(hub, run_dir, tmp_path):
    put_in_cache(hub, "me/stage1", run_dir / "run" / "final")
    report = benchmark.main(["--checkpoint", "me/stage1", "--data-root", str(run_dir), "--bench", "synthetic",
                             "--output", str(tmp_path / "r.json"), "--frame-size", "28", "--max-frames", "2",
                             "--workers", "0", "--mode", "coarse_only", "--limit", "2"])
    assert report["results"]["synthetic"]["coarse_only"]["items"] > 0
    settings = json.loads((tmp_path / "r.json.items.jsonl").read_text().splitlines()[0])["settings"]
    assert settings["checkpoint"] == "me/stage1" and settings["checkpoint_files"] == COMMIT

    from safetensors.torch import load_file

    cfg = load_config(str(run_dir / "next.yaml"), ["init_from=me/stage1"])
    model = train.build_model(cfg, train.initial_weights(cfg))
    stage1 = load_file(str(run_dir / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stage1.items())
    cfg = load_config(str(run_dir / "next.yaml"), ["init_from=nobody/nothing"])
    with pytest.raises(ConfigError, match="init_from: nobody/nothing .*offline"):
        train.initial_weights(cfg)


def test_push_dry_run_writes_the_export_and_its_model_card(run_dir, tmp_path):
    push = load_script("push")
    out = push.main([str(run_dir / "run"), "me/tiny-fvlm", "--dry-run", str(tmp_path / "up"), "--license", "CC-BY-4.0"])
    final = run_dir / "run" / "final"
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == sorted(
        [Path("README.md")] + [p.relative_to(final) for p in final.rglob("*") if p.is_file()])
    card = (out / "README.md").read_text()
    n = sum(p.numel() for p in FoveatedVLM.from_pretrained(final).parameters())
    for text in ("# me/tiny-fvlm", "## Architecture", f"Parameters: {n:,}", "Language model: `random:tiny` (llama",
                 "Vision encoder: `random:tiny` (dinov2", "Query width: 16", '"query_dim": 16', "stage: sft",
                 f"| synth | `{run_dir / 'synthetic' / 'sft'}` |", "Licence of the training data: CC-BY-4.0",
                 'FoveatedVLM.from_pretrained("me/tiny-fvlm")'):
        assert text in card, text
    assert "## Benchmarks" not in card
    # a results.json (benchmark.py's) adds the benchmark table; the licence has a default that says to set it
    report = {"modes": ["coarse_only"], "timings": {},
              "results": {"synthetic": {"total": 4, "skipped": {"count": 0},
                                        "coarse_only": {"accuracy": 0.75, "likelihood_accuracy": 0.5, "items": 4}}}}
    (tmp_path / "results.json").write_text(json.dumps(report))
    out = push.main([str(run_dir / "run"), "me/tiny-fvlm", "--dry-run", str(tmp_path / "up2"), "--results",
                     str(tmp_path / "results.json")])
    card = (out / "README.md").read_text()
    assert "## Benchmarks" in card and "| synthetic | 75.0 / 50.0 | 4 / 4 | 0 |" in card
    assert f"Licence of the training data: {push.NO_LICENSE}" in card
    with pytest.raises(FileExistsError):
        push.main([str(run_dir / "run"), "me/tiny-fvlm", "--dry-run", str(tmp_path / "up2")])
