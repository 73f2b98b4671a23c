"""Run-directory files: atomic training checkpoints (keep the last N and the best), RNG states, exports,
and reading weights (`init_from`) or a whole model (evaluation) from any of the forms we or the
published model produce.

A checkpoint `RUN/checkpoints/step_00001000.pt` holds everything a resume needs: model, optimizer,
step, every rank's data position and RNG states, counters, and the resolved config. Files are
written to a temporary name and renamed, so a run killed at any moment leaves either the old set
of checkpoints or the new one, never a torn file. `best.json` names the checkpoint with the lowest
validation loss; pruning never deletes it. A sharded run (distributed: fsdp) writes a folder
`step_00001000/` instead: every rank's shards of the model and optimizer through
torch.distributed.checkpoint (DCP), and `extra.pt` (the rest, plain data); `load_sharded_weights`
reads its model on one process without torch.distributed, at any world size.

Files from others (a published checkpoint.pt, someone's run directory) are untrusted: pickle files
are read with torch's weights_only loader, so nothing in them can execute; only an explicit
trust=True (`--trust-checkpoint` on the command lines) unpickles arbitrary objects.

Wherever a model or weights are read (load_weights, load_model, FoveatedVLM.from_pretrained, train.py's
init_from, benchmark.py --checkpoint), a Hugging Face Hub id works too (`hub_id` tells it apart from a
path: a path that exists always wins; otherwise `owner/name` or `owner/name@revision`). The repo's
save_pretrained export is fetched if it holds one (config.json of format "fvlm"), else its checkpoint.pt,
whose backbones come from --llm / --dino, else the repo's config.json (`llm` / `dino` keys), else the
table of published repos, PUBLISHED_BACKBONES. Downloads go to the Hub cache (HF_HUB_CACHE / HF_HOME);
with HF_HUB_OFFLINE=1 only the cache is read.
"""

import dataclasses
import functools
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

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

    reader, planner = _safe_dcp(path)
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

    reader, planner = _safe_dcp(path)
    metadata = reader.read_metadata()
    model = {fqn[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype)
             for fqn, md in metadata.state_dict_metadata.items()
             if fqn.startswith("model.") and hasattr(md, "size")}
    with warnings.catch_warnings():  # DCP warns that no_dist loads in one process: what we ask for
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load({"model": model}, storage_reader=reader, planner=planner, no_dist=True)
    return model


# What a DCP .metadata file may name: its own dataclasses, tensor properties, paths. Anything else (a
# function to call while unpickling) makes the file unreadable instead of running it.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = {(_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = super().find_class(module, name) if (module, name) in _DCP_GLOBALS or module == "torch" else None
        if (module, name) in _DCP_GLOBALS or isinstance(found, torch.dtype):
            return found
        raise UntrustedCheckpoint(f"{self.path}: the sharded checkpoint's metadata names {module}.{name}, which a "
                                  f"checkpoint's metadata never needs; it was not loaded")


@functools.cache
def _dcp_classes():
    """(SafeReader, TensorsOnly): DCP's reader and load planner, made safe for files from others. Built
    on first use, so that only sharded runs import torch.distributed.checkpoint."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """The metadata unpickled through an allow-list (DCP itself uses pickle.load)."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.path} is not a sharded checkpoint (no {os.path.basename(path)})")
            with open(path, "rb") as f:
                unpickler = _MetadataUnpickler(f)
                unpickler.path = path
                metadata = unpickler.load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class TensorsOnly(DefaultLoadPlanner):
        """Loads tensors only: DCP would torch.load a non-tensor entry with weights_only=False."""

        def load_bytes(self, read_item, value):
            raise UntrustedCheckpoint(f"the sharded checkpoint stores {read_item.dest_index.fqn} as pickled "
                                      f"Python data, where a tensor was expected; it was not loaded")

    return SafeReader, TensorsOnly


def _safe_dcp(path):
    """(reader, planner) for reading the sharded checkpoint at path."""
    reader, planner = _dcp_classes()
    return reader(str(path)), planner()


TRUST_FLAG = "--trust-checkpoint"


class UntrustedCheckpoint(ValueError):
    """A checkpoint file that holds pickled Python objects besides tensors, refused because
    unpickling them could run code from the file."""


def _safe_globals() -> list:
    """Beyond tensors and plain containers, what training scripts commonly store as numbers: numpy
    scalars and dtypes (rebuilt from bytes; nothing is called). Under their numpy 1 names too."""
    import numpy as np

    scalar = np._core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def read_torch_file(path, trust: bool = False):
    """torch.load a file from someone else. Only tensors, plain containers and numbers are unpickled
    (weights_only with a short allow-list); anything else is an UntrustedCheckpoint naming the file,
    the objects and the opt-in: trust=True (the command lines' --trust-checkpoint) unpickles
    everything, which runs whatever code the file carries."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types on foreign or damaged files
        error = e
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  not a zip-format torch file at all
        unsafe = []
    allowed = {name for g in _safe_globals() for name in ([g[1]] if isinstance(g, tuple) else
                                                           [f"{g.__module__}.{g.__qualname__}"])}
    unsafe = [g for g in unsafe if g not in allowed]
    if unsafe:
        raise UntrustedCheckpoint(
            f"{path} holds pickled Python objects besides tensors ({', '.join(unsafe[:5])}"
            f"{', ...' if len(unsafe) > 5 else ''}); they were not loaded, because unpickling them can run code "
            f"from the file. If you trust the file, pass {TRUST_FLAG} (trust=True in Python)") from None
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})") from None


HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# The backbones of the published repos that hold only a checkpoint.pt (their model cards name them).
PUBLISHED_BACKBONES = {
    "sanps/fvlm-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/dinov2-small"),
    "sanps/fvlm-1.7b": ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "facebook/dinov2-small"),
}
EXPORT_FILES = ["config.json", "model.safetensors", "llm/*", "dino/*"]


def hub_id(spec) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if spec names a Hub repo, else None. A path that exists is never an
    id; otherwise `owner/name` or `owner/name@revision` (a branch, tag or commit) is one."""
    spec = str(spec)
    if os.path.exists(spec) or ".." in spec:
        return None
    m = HUB_ID.match(spec)
    return (m["repo"], m["revision"]) if m else None


def _hub_error(spec: str, error: Exception) -> FileNotFoundError:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        why = (f"offline mode is on (HF_HUB_OFFLINE) and it is not in the local Hub cache {constants.HF_HUB_CACHE}; "
               f"download it once online or unset HF_HUB_OFFLINE")
    else:
        why = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return FileNotFoundError(f"{spec} is no local path, and as a Hugging Face Hub id (owner/name[@revision]) it could "
                             f"not be fetched: {why}")


def _snapshot(spec: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise _hub_error(spec, e) from None


def hub_commit(spec) -> str | None:
    """The commit a Hub id resolves to now (fetching only its config.json), or None for a path."""
    found = hub_id(spec)
    return _snapshot(str(spec), *found, ["config.json"]).name if found else None


def fetch(spec) -> tuple[Path, tuple[str | None, str | None]]:
    """(a local path, (llm, dino) defaults) for spec. A path comes back as it is, with no defaults. A Hub
    id is downloaded (to the Hub cache): its save_pretrained export if it holds one (the folder comes
    back), else its checkpoint.pt (the file comes back, with the backbones named by the repo's
    config.json `llm` / `dino`, else by PUBLISHED_BACKBONES; None where neither names one)."""
    found = hub_id(spec)
    if not found:
        return Path(spec), (None, None)
    spec, (repo, revision) = str(spec), found
    folder = _snapshot(spec, repo, revision, ["config.json"])
    revision = folder.name  # the commit the id resolved to: the files below come from that same commit
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError:
            config = None
    config = config if isinstance(config, dict) else {}
    if "format" in config:  # our export (read_export_config checks the format)
        folder = _snapshot(spec, repo, revision, EXPORT_FILES)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{spec}: the Hub repo's config.json is an fvlm export's, but model.safetensors is "
                                    f"missing from {folder}")
        return folder, (None, None)
    folder = _snapshot(spec, repo, revision, ["checkpoint.pt"])
    if not (folder / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{spec}: the Hub repo holds neither a save_pretrained export (config.json of format "
                                f"'fvlm', model.safetensors, llm/, dino/) nor a checkpoint.pt (looked in {folder})")
    table = PUBLISHED_BACKBONES.get(repo.lower(), (None, None))
    llm, dino = (config.get(k) if isinstance(config.get(k), str) else None for k in ("llm", "dino"))
    return folder / "checkpoint.pt", (llm or table[0], dino or table[1])


def load_weights(path, trust: bool = False) -> tuple[dict, dict | None, str]:
    """A model state dict from: a save_pretrained folder, a run directory (its final export), a
    training checkpoint or published `checkpoint.pt` (its "model" entry, or a bare state dict), or a
    .safetensors file. Returns (state dict, the model settings stored with it (config.json, or a
    training checkpoint's config.model) or None, what was read). A missing path is an error; a
    pickle file is read with `read_torch_file` (trust as there). path may be a Hub id (`fetch`)."""
    path, _ = fetch(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file

            from config import read_export_config

            settings = dataclasses.asdict(read_export_config(path)) if (path / "config.json").is_file() else None
            return load_file(str(path / "model.safetensors")), settings, f"{path} (save_pretrained export)"
        if (path / "final" / "model.safetensors").is_file():
            return load_weights(path / "final")
        raise FileNotFoundError(f"{path} is neither a save_pretrained folder nor a finished run directory "
                                f"(no model.safetensors, no final/)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None, str(path)
    obj = read_torch_file(path, trust)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        config = obj.get("config")
        settings = config.get("model") if isinstance(config, dict) else None
        return obj["model"], settings, f"{path} ('model' entry)"
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj, None, str(path)
    raise ValueError(f"{path} holds neither a state dict nor a dict with a 'model' state dict")


def load_model(path, llm: str | None = None, dino: str | None = None, trust: bool = False):
    """(FoveatedVLM, what was read) from any form load_weights reads, built with the settings stored
    with the weights: an export's config.json, a training checkpoint's config.model. A bare state dict
    (the published checkpoint.pt) gets the published settings, with the query width read from the
    weights, and needs llm / dino (hub ids or folders of the backbones); given otherwise, they replace
    the stored backbone sources of a checkpoint file. trust: as in `read_torch_file`. path may be a Hub
    id: see `fetch`, whose backbones stand in for llm / dino not given to a checkpoint.pt without settings."""
    return build_fetched(fetch(path), llm, dino, trust)


def build_fetched(fetched, llm: str | None = None, dino: str | None = None, trust: bool = False):
    """load_model's work on what `fetch` returned: (a local path, the Hub's (llm, dino) defaults)."""
    from config import ModelConfig, expand_path, model_config
    from model import FoveatedVLM

    path, (hub_llm, hub_dino) = fetched
    if path.is_dir():
        if llm or dino:
            raise ValueError(f"{path} is an export folder, which carries its own backbones: --llm / --dino only "
                             f"apply to checkpoint files")
        folder = path if (path / "config.json").is_file() else path / "final"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no save_pretrained export (config.json) there or in final/")
        return FoveatedVLM.from_pretrained(folder), str(folder)
    state, settings, what = load_weights(path, trust)
    if settings is None:
        llm, dino = llm or hub_llm, dino or hub_dino
        if not llm or not dino:
            raise ValueError(f"{what} stores no model settings: it needs --llm and --dino (hub ids or folders of "
                             f"the backbones)")
        q_static = next((v for k, v in state.items() if k.endswith("q_static")), None)
        if q_static is None:
            raise ValueError(f"{what} holds no FoveatedVLM weights (no q_static)")
        cfg = ModelConfig(query_dim=q_static.shape[-1])
    else:
        cfg = model_config(settings, what)
    sources = {"llm": llm or expand_path(cfg.llm), "dino": dino or expand_path(cfg.dino)}
    model = FoveatedVLM(cfg, pretrained=False, **sources)
    model.load_state_dict(state)
    return model, what
