"""Encoder parity with transformers' Dinov2Model, the deep-query math, and weight-name mapping."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import random_dino
from dino import Dinov2Backbone
from encoder import FoveatedEncoder

dino_state_from_hf = Dinov2Backbone.state_from_hf


def build_encoder(hf, query_dim=24, seed=1):
    torch.manual_seed(seed)
    enc = FoveatedEncoder(hf.config, query_dim).eval()
    enc.dino.load_state_dict(dino_state_from_hf(hf.state_dict()))
    return enc


def hf_kv(hf, pixels):
    """Per-block K/V computed from transformers' own hidden states and weights: [N, heads, P, hd]."""
    sd, cfg = hf.state_dict(), hf.config
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    out = []
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        h = F.layer_norm(hidden[i], (cfg.hidden_size,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.layer_norm_eps)
        split = lambda x: x.view(x.shape[0], x.shape[1], cfg.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
        k = split(F.linear(h, sd[p + "attention.k_proj.weight"], sd[p + "attention.k_proj.bias"]))
        v = split(F.linear(h, sd[p + "attention.v_proj.weight"], sd[p + "attention.v_proj.bias"]))
        out.append((k, v))
    return out


def reference_query(hf, enc, pixels, query):
    """The deep query written out naively from transformers' weights: the query is one extra token
    that attends to each block's patch K/V (not to itself) and goes through the whole block."""
    sd, cfg = hf.state_dict(), hf.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    ln = lambda x, n: F.layer_norm(x, (d,), sd[n + ".weight"], sd[n + ".bias"], cfg.layer_norm_eps)  # noqa: E731
    lin = lambda x, n: F.linear(x, sd[n + ".weight"], sd[n + ".bias"])  # noqa: E731
    x = query @ enc.query_input_proj.weight.T  # [N, D]
    for i, (k, v) in enumerate(hf_kv(hf, pixels)):
        p = f"encoder.layer.{i}."
        q = lin(ln(x, p + "norm1"), p + "attention.q_proj").view(-1, heads, 1, d // heads)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        a = (w @ v).reshape(-1, d)
        x = x + lin(a, p + "attention.o_proj") * sd[p + "layer_scale1.lambda1"]
        m = lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        x = x + m * sd[p + "layer_scale2.lambda1"]
    return enc.output_proj(ln(x, "layernorm"))


@pytest.mark.parametrize("size", [(70, 70), (28, 28), (42, 56)], ids=["native-grid", "interpolated", "non-square"])
def test_kv_matches_transformers_hidden_states(size):
    hf = random_dino()
    enc = build_encoder(hf)
    pixels = torch.randn(3, 3, *size)
    with torch.no_grad():
        ours = enc.encode(pixels)
    ref = hf_kv(hf, pixels)
    assert len(ours) == len(ref)
    for (k, v), (rk, rv) in zip(ours, ref):
        assert k.shape == rk.shape
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)


def test_518_grid_interpolated_to_224_like_transformers():
    """The real geometry: DINOv2's 37x37 position grid used at 224 px (16x16 patches)."""
    hf = random_dino(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=518)
    enc = build_encoder(hf)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        (k, _), = enc.encode(pixels)
    (rk, _), = hf_kv(hf, pixels)
    assert k.shape[2] == 257
    torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(70, 70), (28, 28)])
def test_query_matches_naive_reference(size):
    hf = random_dino()
    enc = build_encoder(hf)
    pixels, query = torch.randn(4, 3, *size), torch.randn(4, 24)
    with torch.no_grad():
        z, _ = enc.query(query, enc.encode(pixels))
        ref = reference_query(hf, enc, pixels, query)
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)


def test_frame_ids_gather_and_attention_weights():
    hf = random_dino()
    enc = build_encoder(hf)
    pixels, query = torch.randn(3, 3, 28, 28), torch.randn(5, 24)
    frame_ids = torch.tensor([2, 0, 2, 1, 1])
    with torch.no_grad():
        kv = enc.encode(pixels)
        z, none = enc.query(query, kv, frame_ids)
        z_attn, attn = enc.query(query, kv, frame_ids, return_attention=True)
        one_by_one = torch.stack([enc.query(query[i:i + 1], enc.encode(pixels[f:f + 1]))[0][0]
                                  for i, f in enumerate(frame_ids.tolist())])
    torch.testing.assert_close(z, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_attn, z, atol=1e-5, rtol=1e-5)
    assert none is None
    assert attn.shape == (5, 3, 4, 5)  # [queries, blocks, heads, 1 + patches]
    torch.testing.assert_close(attn.sum(-1), torch.ones(5, 3, 4))


def test_different_queries_give_clearly_different_tokens():
    hf = random_dino()
    enc = build_encoder(hf)
    pixels = torch.randn(6, 3, 28, 28)
    with torch.no_grad():
        kv = enc.encode(pixels)
        (za, _), (zb, _) = enc.query(torch.randn(6, 24), kv), enc.query(torch.randn(6, 24), kv)
        _, attn_a = enc.query(torch.randn(6, 24), kv, return_attention=True)
        _, attn_b = enc.query(torch.randn(6, 24), kv, return_attention=True)
    cos = F.cosine_similarity(za, zb, dim=-1)
    assert cos.max() < 0.9, cos
    assert (attn_a - attn_b).abs().sum(-1).mean() > 0.1  # the attention maps move, not just the output


def test_swiglu_giant_style_block_matches_transformers():
    hf = random_dino(use_swiglu_ffn=True)
    enc = build_encoder(hf)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = enc.encode(pixels)
    for (k, v), (rk, rv) in zip(ours, hf_kv(hf, pixels)):
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)


def to_transformers4_names(state):
    """transformers-5 Dinov2 names -> the transformers-4 names the published checkpoints use."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"attention\.(q|k|v)_proj", lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)], key)
        key = key.replace("attention.o_proj", "attention.output.dense")
        out[key] = value
    gate = [k for k in out if "mlp.gate_proj" in k]
    for g in gate:
        up = g.replace("gate_proj", "up_proj")
        out[g.replace("gate_proj", "weights_in")] = torch.cat([out.pop(g), out.pop(up)])
    for k in [k for k in out if "mlp.down_proj" in k]:
        out[k.replace("down_proj", "weights_out")] = out.pop(k)
    return out


@pytest.mark.parametrize("swiglu", [False, True])
def test_transformers4_and_5_names_map_to_the_same_weights(swiglu):
    hf = random_dino(use_swiglu_ffn=swiglu)
    v5 = hf.state_dict()
    v4 = to_transformers4_names(v5)
    assert any("attention.attention.query" in k for k in v4)
    a, b = dino_state_from_hf(v5), dino_state_from_hf(v4)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    enc = FoveatedEncoder(hf.config, 24)
    enc.dino.load_state_dict(b)  # strict: every backbone weight is named, nothing left over
