"""Reading and writing models: Hugging Face Hub ids, downloads, safe reading of files from others, every
form weights come in (`load_weights`, `read_model`), and the save_pretrained export (`save_pretrained`).
Run-directory checkpoints (training state, resume, pruning) are checkpoint.py's; building the model
from what is read here is model.py's (`FoveatedVLM.from_pretrained`, `load_model`), so this module
never imports the model.

Files from others (a published checkpoint.pt, someone's run directory) are untrusted: pickle files
are read with torch's weights_only loader, so nothing in them can execute; only an explicit
trust=True (`--trust-checkpoint` on the command lines) unpickles arbitrary objects. A sharded
checkpoint (DCP folder) is read through `safe_dcp`: its metadata through an allow-list, tensors only.

Wherever a model or weights are read (load_weights, read_model, so FoveatedVLM.from_pretrained,
model.load_model, train.py's init_from, benchmark.py --checkpoint), a Hugging Face Hub id works too
(`hub_id` tells it apart from a path: a path that exists always wins; otherwise `owner/name` or
`owner/name@revision`). The repo's save_pretrained export is fetched if it holds one (config.json of
format "fvlm"), else its checkpoint.pt, whose backbones come from --llm / --dino, else the repo's
config.json (`llm` / `dino` keys), else the table of published repos, PUBLISHED_BACKBONES. Downloads go
to the Hub cache (HF_HUB_CACHE / HF_HOME); with HF_HUB_OFFLINE=1 only the cache is read.
"""

import dataclasses
import functools
import json
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch

from config import EXPORT_FORMAT, ModelConfig, expand_path, model_config, read_export_config

TRUST_FLAG = "--trust-checkpoint"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# The backbones of the published repos that hold only a checkpoint.pt (their model cards name them).
PUBLISHED_BACKBONES = {
    "sanps/fvlm-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/dinov2-small"),
    "sanps/fvlm-1.7b": ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "facebook/dinov2-small"),
}
EXPORT_FILES = ["config.json", "model.safetensors", "llm/*", "dino/*"]


# ---- safe reading -------------------------------------------------------------------------------------

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


def safe_dcp(path):
    """(reader, planner): torch.distributed.checkpoint's, for reading the sharded checkpoint (a DCP folder)
    at path, someone else's included: its metadata through an allow-list, tensors only."""
    reader, planner = _dcp_classes()
    return reader(str(path)), planner()


# ---- the Hub ------------------------------------------------------------------------------------------

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


# ---- every form of weights ----------------------------------------------------------------------------

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


class Stored(NamedTuple):
    """A model as read (read_model): what FoveatedVLM.from_stored builds."""
    config: ModelConfig  # the settings the model reports (llm / dino: where its backbones first came from)
    llm: str  # where to build the backbones from now (a folder of an export, or config.llm)
    dino: str
    state: dict
    what: str  # what was read, for messages and reports


def read_model(spec, llm: str | None = None, dino: str | None = None, trust: bool = False,
               overrides: dict | None = None) -> Stored:
    """A model from any form load_weights reads, with the settings stored with it: an export's
    config.json (overrides replace its settings), a training checkpoint's config.model. A bare state
    dict (the published checkpoint.pt) gets the published settings, with the query width read from the
    weights, and needs llm / dino (hub ids or folders of the backbones); given otherwise, they replace
    the stored backbone sources of a checkpoint file (an export carries its own). trust: as in
    `read_torch_file`. spec may be a Hub id: see `fetch`, whose backbones stand in for llm / dino not
    given to a checkpoint.pt without settings."""
    overrides = overrides or {}
    path, (hub_llm, hub_dino) = fetch(spec)
    if path.is_dir():
        if llm or dino:
            raise ValueError(f"{path} is an export folder, which carries its own backbones: --llm / --dino only "
                             f"apply to checkpoint files")
        folder = path if (path / "config.json").is_file() else path / "final"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no save_pretrained export (config.json) there or in final/")
        stored = read_export_config(folder)
        config = model_config({**dataclasses.asdict(stored), **overrides}, str(folder / "config.json"))
        from safetensors.torch import load_file

        return Stored(config, str(folder / "llm"), str(folder / "dino"), load_file(str(folder / "model.safetensors")),
                      str(folder))
    if overrides:
        raise ValueError(f"{spec} holds a checkpoint file: only llm / dino may be overridden, not {sorted(overrides)}")
    state, settings, what = load_weights(path, trust)
    if settings is None:
        llm, dino = llm or hub_llm, dino or hub_dino
        if not llm or not dino:
            raise ValueError(f"{what} stores no model settings: it needs --llm and --dino (hub ids or folders of "
                             f"the backbones)")
        q_static = next((v for k, v in state.items() if k.endswith("q_static")), None)
        if q_static is None:
            raise ValueError(f"{what} holds no FoveatedVLM weights (no q_static)")
        config = ModelConfig(query_dim=q_static.shape[-1])
    else:
        config = model_config(settings, what)
    llm, dino = llm or expand_path(config.llm), dino or expand_path(config.dino)
    return Stored(dataclasses.replace(config, llm=llm, dino=dino), llm, dino, state, what)


# ---- writing ------------------------------------------------------------------------------------------

def normalize_state(state: dict, dino_state_from_hf, tied: bool) -> dict:
    """A state dict in our layout or the published one -> ours: `_orig_mod.` / `module.` prefixes
    (torch.compile, DDP) stripped, vision-backbone weights in transformers' names renamed
    (dino_state_from_hf, the backbone's own), a tied lm_head (tied: the LLM ties it) filled in."""
    out, dino = {}, {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("encoder.dino."):
            dino[key[len("encoder.dino."):]] = value
        else:
            out[key] = value
    out.update({"encoder.dino." + k: v for k, v in dino_state_from_hf(dino).items()})
    embed, head = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
    if tied and head not in out and embed in out:
        out[head] = out[embed]
    return out


def save_pretrained(model, directory, state: dict | None = None):
    """directory/config.json (the model's ModelConfig) + model.safetensors, with the backbones' configs
    and the tokenizer in llm/ and dino/, so that read_model needs nothing else. state: the weights to
    write instead of the model's own (a sharded training run's, gathered)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.llm.config.save_pretrained(directory / "llm")
    model.tokenizer.save_pretrained(directory / "llm")
    model.dino_config.save_pretrained(directory / "dino")
    settings = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "pretrained"}
    (directory / "config.json").write_text(json.dumps(dict(settings, format=EXPORT_FORMAT), indent=2))
    state = dict(model.state_dict() if state is None else state)
    if model.llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors"))
