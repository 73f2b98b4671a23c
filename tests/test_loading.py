"""Reading files from others (loading.py): nothing in them executes unless the user opts in, the
published checkpoint.pt's format loads safely, and files that are not checkpoints fail clearly."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import loading
from model import load_model

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates a file: the visible stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def weights():
    return {"q_static": torch.randn(1, 8), "llm.w": torch.randn(4, 4)}


def test_a_payload_never_runs_and_the_error_names_the_file_and_the_flag(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"model": weights(), "extra": Payload(marker)}, path)
    with pytest.raises(loading.UntrustedCheckpoint) as err:
        loading.load_weights(path)
    assert str(path) in str(err.value) and loading.TRUST_FLAG in str(err.value)
    assert not marker.exists()
    with pytest.raises(loading.UntrustedCheckpoint):
        load_model(path, "random:tiny", "random:tiny")
    assert not marker.exists()
    with pytest.raises(loading.UntrustedCheckpoint):  # resuming from a planted checkpoint is no way around it
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    state, _, _ = loading.load_weights(path, trust=True)  # the explicit opt-in unpickles (and so runs) it
    assert marker.exists() and set(state) == set(weights())


@pytest.mark.parametrize("entry", ["bare", "whole"])
def test_the_published_checkpoint_format_loads_with_the_safe_loader(tmp_path, entry):
    """A stand-in for the predecessor's checkpoint.pt: model, optimizer, AMP scaler and LR scheduler
    states, step, data position, a numpy metric, the config dict, a timestamp string."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    state = weights()
    obj = state if entry == "bare" else {
        "model": state, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "scheduler": sched.state_dict(),
        "step": 2593, "data_position": 123456, "metric": np.float64(0.1234), "best_metric": np.float32(0.1),
        "epoch": np.int64(3), "config": {"stage": 3, "lr": 1e-5, "shards": ["a", "b"], "llm": None},
        "timestamp": "2026-02-01T12:00:00"}
    torch.save(obj, tmp_path / "checkpoint.pt")
    loaded, settings, _ = loading.load_weights(tmp_path / "checkpoint.pt")
    assert settings is None and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"these are my notes, not a checkpoint\n" * 20)
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint") as err:
        loading.load_weights(path)
    assert not isinstance(err.value, loading.UntrustedCheckpoint)


def test_benchmark_refuses_a_payload_from_the_command_line(tmp_path):
    """The benchmark CLI: one line naming the file and the flag; nothing ran."""
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"model": weights(), "extra": Payload(marker)}, path)
    from shards import ShardWriter

    with ShardWriter(tmp_path / "data" / "val") as writer:  # valid benchmark data: the checkpoint is what fails
        writer.write("a", {"json": {"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}})
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--checkpoint", str(path), "--llm",
                           "random:tiny", "--dino", "random:tiny", "--bench", "val", "--data-root",
                           str(tmp_path / "data")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and not marker.exists()
    assert "Traceback" not in done.stderr, done.stderr
    assert loading.TRUST_FLAG in done.stderr and str(path) in done.stderr, done.stderr


def test_the_readme_usage_loads_a_published_style_checkpoint_into_the_model(tmp_path, tiny_backbones, tiny_model):
    """docs/model.md, Usage: FoveatedVLM(...) then load_weights("checkpoint.pt") -> load_state_dict, for a
    file written the predecessor's way (the model's state next to training state and numpy numbers)."""
    from conftest import make_model

    torch.save({"model": tiny_model.state_dict(), "step": 2593, "metric": np.float64(0.5),
                "config": {"stage": 3}}, tmp_path / "checkpoint.pt")
    fresh = make_model(tiny_backbones, seed=1)
    state, _, _ = loading.load_weights(tmp_path / "checkpoint.pt")
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tiny_model.state_dict().values()))
