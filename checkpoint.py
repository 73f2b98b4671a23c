"""Run-directory files: atomic training checkpoints (keep the last N and the best), RNG states and the
run's exports. Reading models and weights in every other form (exports, published files, Hub ids) is
loading.py's.

A checkpoint `RUN/checkpoints/step_00001000.pt` holds everything a resume needs: model, optimizer,
step, every rank's data position and RNG states, counters, and the resolved config. Files are
written to a temporary name and renamed, so a run killed at any moment leaves either the old set
of checkpoints or the new one, never a torn file. `best.json` names the checkpoint with the lowest
validation loss; pruning never deletes it. A sharded run (distributed: fsdp) writes a folder
`step_00001000/` instead: every rank's shards of the model and optimizer through
torch.distributed.checkpoint (DCP), and `extra.pt` (the rest, plain data); `load_sharded_weights`
reads its model on one process without torch.distributed, at any world size.

A checkpoint is read with loading.read_torch_file (a sharded one through loading.safe_dcp), as every
file from someone else is: a planted checkpoint in a run directory cannot run code either.
"""

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from loading import UntrustedCheckpoint, read_torch_file, safe_dcp

_NAME = re.compile(r"^step_(\d+)(\.pt)?$")
SHARDED_EXTRA = "extra.pt"  # a sharded checkpoint's plain-data part (step, data positions, RNG, config, ...)


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """[(step, path)] oldest first: step_N.pt files and, of a sharded run, step_N/ folders (those whose
    save completed: extra.pt is written last)."""
    folder = checkpoint_dir(run_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := _NAME.match(p.name))
             and (p.is_file() if m.group(2) else (p / SHARDED_EXTRA).is_file())]
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
    """A checkpoint file's contents, or a sharded checkpoint's plain-data part (its model and optimizer
    shards are read by `load_sharded` into the sharded model)."""
    path = Path(path)
    return read_torch_file(path / SHARDED_EXTRA if path.is_dir() else path)


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
            _remove(path)
    for tmp in checkpoint_dir(run_dir).glob(".step_*"):
        _remove(tmp)


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


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


def export_pretrained(model, folder, state: dict | None = None):
    """model.save_pretrained into folder, replacing an earlier export only once the new one is whole.
    state: the weights to write instead of the model's own (a sharded model's, gathered)."""
    folder = Path(folder)
    tmp = _fresh(folder)
    model.save_pretrained(tmp, state=state)
    _swap_in(tmp, folder)


def _fresh(folder: Path) -> Path:
    """The temporary sibling a new version of folder is written to (stale leftovers removed)."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    return tmp


def _swap_in(tmp: Path, folder: Path):
    """Replace folder by the complete tmp: at any moment one whole version exists under one of the names."""
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def is_sharded(path) -> bool:
    """A sharded checkpoint folder (DCP's .metadata inside)?"""
    return (Path(path) / ".metadata").is_file()


def mark_oom(run_dir, attempt: int, info: dict):
    """Record that step attempt `attempt` ran out of memory in a sharded run (see train.sharded_oom)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"oom_{attempt:08d}.json", info)


def oom_attempts(run_dir) -> set[int]:
    """The step attempts mark_oom recorded: a resumed sharded run skips them on every rank."""
    return {int(p.stem[len("oom_"):]) for p in checkpoint_dir(run_dir).glob("oom_*.json") if p.stem[4:].isdigit()}


def save_sharded(run_dir, step: int, tensors: dict, extra: dict, is_main: bool, barrier) -> Path:
    """A sharded checkpoint RUN/checkpoints/step_N/: `tensors` (every rank's DTensor shards, a
    collective save through DCP) and, from rank 0, `extra` (plain data) written last, then the folder
    renamed into place. barrier: the ranks' barrier (rank 0 clears the temporary folder first)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    final = checkpoint_dir(run_dir) / f"step_{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main:
        _fresh(final)
        tmp.mkdir(parents=True)
    barrier()
    save(tensors, storage_writer=FileSystemWriter(tmp))  # every rank writes its shards; fsyncs its files
    if is_main:
        torch.save(extra, tmp / SHARDED_EXTRA)
        with open(tmp / SHARDED_EXTRA, "rb") as f:
            os.fsync(f.fileno())
        _swap_in(tmp, final)
    barrier()
    return final


def load_sharded(path, tensors: dict):
    """Fill `tensors` (the sharded model's and optimizer's state dicts, DTensors) in place from a
    sharded checkpoint; DCP reshards when the saving world size differed."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = safe_dcp(path)
    try:
        load(tensors, storage_reader=reader, planner=planner)
    except CheckpointException as e:  # DCP wraps each rank's error: a refused file is said plainly
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UntrustedCheckpoint)]
        if refused:
            raise UntrustedCheckpoint(f"{path}: {refused[0]}") from None
        raise


def load_sharded_weights(path) -> dict:
    """The model weights of a sharded checkpoint as full tensors, on this process alone (no
    torch.distributed, any world size): for init_from and the best/ export."""
    from torch.distributed.checkpoint import load

    reader, planner = safe_dcp(path)
    metadata = reader.read_metadata()
    model = {fqn[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype)
             for fqn, md in metadata.state_dict_metadata.items()
             if fqn.startswith("model.") and hasattr(md, "size")}
    with warnings.catch_warnings():  # DCP warns that no_dist loads in one process: what we ask for
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load({"model": model}, storage_reader=reader, planner=planner, no_dist=True)
    return model
