"""DINOv3 ViT parity with transformers' DINOv3ViTModel (tiny random configs built here): per-block K/V
(keys after RoPE), the full forward, a query that copies CLS, eval-style RoPE in training mode, both
weight namings, the gated MLP, and the backbone inside FoveatedVLM.

A template for a new backbone: build a tiny random transformers model, then compare our encode /
query / features with what transformers computes."""

import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

from conftest import make_model
from dino import Dinov3Backbone
from encoder import FoveatedEncoder

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=16,
            image_size=64, num_register_tokens=4)


def random_dinov3(seed=0, **overrides) -> DINOv3ViTModel:
    """A tiny DINOv3 ViT with non-trivial layer scales, tokens and biases, and peaked attention."""
    torch.manual_seed(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**dict(TINY, **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name or "cls_token" in name or "register_tokens" in name or name.endswith("bias"):
                p.normal_(0, 0.5)
            elif ("q_proj" in name or "k_proj" in name) and name.endswith("weight"):
                p.normal_(0, 0.3)
    return model


def ours(hf) -> Dinov3Backbone:
    backbone = Dinov3Backbone(hf.config).eval()
    backbone.load_state_dict(Dinov3Backbone.state_from_hf(hf.state_dict()))
    return backbone


def hf_kv(hf, pixels):
    """Each block's K (after transformers' own RoPE) and V, from its own modules: [N, heads, keys, hd]."""
    captured = []
    hooks = [layer.attention.register_forward_hook(
        lambda mod, args, kwargs, out: captured.append((mod, args[0] if args else kwargs["hidden_states"],
                                                        kwargs["position_embeddings"])), with_kwargs=True)
        for layer in hf.model.layer]
    with torch.no_grad():
        out = hf(pixel_values=pixels)
    for h in hooks:
        h.remove()
    kv = []
    for attention, x, (cos, sin) in captured:
        split = lambda t: t.view(*x.shape[:2], attention.num_heads, -1).transpose(1, 2)  # noqa: E731
        k, v = split(attention.k_proj(x)), split(attention.v_proj(x))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        kv.append((k, v))
    return kv, out.last_hidden_state


@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["config-size", "non-square"])
def test_kv_and_hidden_states_match_transformers(size):
    hf = random_dinov3()
    backbone = ours(hf)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        kv, final = backbone.encode(pixels), backbone.features(pixels)
    ref_kv, ref_final = hf_kv(hf, pixels)
    patches = (size[0] // 16) * (size[1] // 16)
    assert len(kv) == len(ref_kv) == 3 and kv[0][0].shape == (2, 4, 1 + 4 + patches, 8)
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)
    assert backbone.num_prefix == 5 and backbone.patch_size == 16


def test_a_query_equal_to_the_cls_input_reproduces_the_cls_output():
    """The foveal query is treated like CLS: no RoPE, and it attends to CLS, the registers and the
    patches. Started from CLS's own input it follows CLS through every block."""
    hf = random_dinov3()
    backbone = ours(hf)
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z, attn = backbone.query(backbone.cls_token[0].expand(3, -1), backbone.encode(pixels), return_attention=True)
        cls = hf(pixel_values=pixels).pooler_output
    torch.testing.assert_close(z, cls, atol=1e-5, rtol=1e-5)
    assert attn.shape == (3, 3, 4, 1 + 4 + 16)  # [queries, blocks, heads, CLS + registers + patches]
    assert attn[..., 1:5].sum() > 0.05 * attn.sum()  # the registers are read


def test_rope_stays_eval_style_when_training():
    """transformers jitters / rescales the patch coordinates in training mode (an augmentation); our
    encoder never does: its K/V in train() equal transformers' eval-mode K/V."""
    hf = random_dinov3()
    backbone = ours(hf).train()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        kv = backbone.encode(pixels)
    ref_eval, _ = hf_kv(hf, pixels)
    ref_train, _ = hf_kv(hf.train(), pixels)
    torch.testing.assert_close(kv[1][0], ref_eval[1][0], atol=1e-5, rtol=1e-5)
    assert (kv[1][0] - ref_train[1][0]).abs().max() > 1e-3  # the augmentation is real, and not ours


def test_hub_names_and_transformers_5_names_load_the_same_weights():
    """The hub files name the blocks `layer.N.`, transformers 5 `model.layer.N.`; DINOv3 has no key
    bias (stored as masked zeros); the mask token is dropped; the load is strict."""
    hf = random_dinov3()
    v5 = hf.state_dict()
    assert not any("k_proj.bias" in k for k in v5)
    hub = {k.removeprefix("model."): v for k, v in v5.items()}
    assert any(k.startswith("layer.0.") for k in hub)
    a, b = Dinov3Backbone.state_from_hf(v5), Dinov3Backbone.state_from_hf(hub)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    backbone = Dinov3Backbone(hf.config)
    backbone.load_state_dict(b)  # strict: every weight named, nothing left over
    d = hf.config.hidden_size
    assert torch.equal(b["blocks.0.qkv.bias"][d:2 * d], torch.zeros(d))


def test_the_absent_key_bias_neither_acts_nor_learns():
    hf = random_dinov3()
    backbone = ours(hf).train()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        backbone.blocks[0].qkv.bias[32:64] = 5.0  # whatever sits in the key slice is masked out
    z, _ = backbone.query(torch.randn(2, 32), backbone.encode(pixels))
    z.sum().backward()
    assert torch.equal(backbone.blocks[0].qkv.bias.grad[32:64], torch.zeros(32))
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode(pixels)[1][0], hf_kv(hf, pixels)[0][1][0], atol=1e-5, rtol=1e-5)


def test_gated_mlp_matches_transformers():
    hf = random_dinov3(use_gated_mlp=True, hidden_act="silu")
    backbone = ours(hf)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(pixels), hf(pixel_values=pixels).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_foveated_encoder_and_model_pick_dinov3_by_model_type(tmp_path, tiny_backbones):
    hf = random_dinov3()
    assert isinstance(FoveatedEncoder(hf.config, query_dim=24).dino, Dinov3Backbone)
    hf.save_pretrained(tmp_path / "dinov3")
    model = make_model((tiny_backbones[0], str(tmp_path / "dinov3")))
    assert isinstance(model.encoder.dino, Dinov3Backbone)
    state = model.encoder.dino.state_dict()
    assert all(torch.equal(state[k], v) for k, v in Dinov3Backbone.state_from_hf(hf.state_dict()).items())
    ids = torch.tensor([model.chat_ids([{"role": "user", "content": "What moves?"}])])
    frames = torch.randint(0, 256, (1, 3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        for mode in ("coarse_only", "coarse_fine", "autoregressive"):
            out = model(frames=frames, input_ids=ids, mode=mode, return_attention=True)
            kind = "static" if mode == "coarse_only" else "dynamic"
            assert torch.isfinite(out["loss"]) and out["attention"][kind].shape == (1, 3, 3, 4, 1 + 4 + 16), mode


def test_unsupported_model_type_is_a_clear_error():
    from transformers import ViTConfig

    with pytest.raises(ValueError, match=r"model_type 'vit' is not supported; supported: \['dinov2', 'dinov3_vit'\]"):
        FoveatedEncoder(ViTConfig(), query_dim=8)
