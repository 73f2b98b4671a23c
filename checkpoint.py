"""Run-directory files: atomic training checkpoints (keep the last N and the best), RNG states and the
run's exports. Reading models and weights in every other form (exports, published files, Hub ids) is
loading.py's.

A checkpoint `RUN/checkpoints/step_00001000.pt` holds everything a resume needs: model, optimizer,
step, every rank's data position and RNG states, counters, and the resolved config. Files are
written to a temporary name and renamed, so a run killed at any moment leaves either the old set
of checkpoints or the new one, never a torn file. `best.json` names the checkpoint with the lowest
validation loss; pruning never deletes it.

A checkpoint is read with loading.read_torch_file, as every file from someone else is: a planted
checkpoint in a run directory cannot run code either.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from loading import read_torch_file

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_replace(tmp: Path, final: Path):
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_checkpoint(run_dir, step: int, state: dict) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp"
    torch.save(state, tmp)
    _fsync_replace(tmp, final)
    return final


def load_checkpoint(path) -> dict:
    return read_torch_file(path)


def write_json(path, data):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    _fsync_replace(tmp, path)


def read_best(run_dir) -> dict | None:
    path = checkpoint_dir(run_dir) / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def prune(run_dir, keep_last: int):
    """Delete all but the newest keep_last checkpoints and the best one; leftover temporary files of
    an interrupted save go too."""
    best = read_best(run_dir)
    keep_name = best["file"] if best else None
    found = list_checkpoints(run_dir)
    for _, path in found[:-keep_last]:
        if path.name != keep_name:
            path.unlink()
    for tmp in checkpoint_dir(run_dir).glob(".step_*.tmp"):
        tmp.unlink()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def export_pretrained(model, folder):
    """model.save_pretrained into folder, replacing an earlier export only once the new one is whole."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    model.save_pretrained(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
