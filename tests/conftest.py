"""Shared fixtures: tiny random backbones saved to temp folders (never downloaded from a hub)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from backbones import DINO_PRESETS, build_backbones, offline_tokenizer
from model import FoveatedVLM


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return offline_tokenizer()


def random_dino(seed=0, **overrides) -> Dinov2Model:
    """The tiny DINOv2 (5x5 position grid; 28-px frames use an interpolated 2x2 grid)."""
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**dict(DINO_PRESETS["tiny"][1], **overrides))).eval()
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
    llm_dir, dino_dir = build_backbones(root, tokenizer=smollm2_tokenizer)
    random_dino().save_pretrained(dino_dir)  # peaked attention, non-trivial layer scales
    return llm_dir, dino_dir


def make_model(backbones, seed=0, **kwargs) -> FoveatedVLM:
    llm_dir, dino_dir = backbones
    torch.manual_seed(seed)
    kwargs.setdefault("query_dim", 24)
    return FoveatedVLM(llm_name=llm_dir, dino_name=dino_dir, **kwargs).eval()


def lively_llm(model: FoveatedVLM, seed: int = 0) -> FoveatedVLM:
    """Stronger LLM layers: the random tiny LLM's tied embeddings otherwise echo the prompt's last token
    ("\n") whatever it is shown; with these its replies vary with the prompt, the frames and the mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture
def tiny_model(tiny_backbones):
    return make_model(tiny_backbones)


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
