"""The FLOP estimate behind MFU (flops.py, ViTBackbone.flops, the objectives' flops) equals what torch's
FLOP counter counts on real forwards: every mode and layout, DPO's shared visual tokens, both
backbones. Attention runs on SDPA's math kernel here, so that the counter sees its matmuls."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from collate import collate
from config import LAYOUTS, MODES
from conftest import make_model
from flops import FlopCount
from objectives import DPO, TextCE
from tokenization import tokenize, tokenize_dpo


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


def frames(t, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, size, size), dtype=torch.uint8, generator=g)


def sft_batch(model, media):
    samples = []
    for i, m in enumerate(media):
        messages = [{"role": "user", "content": "What moves" + "?" * i}, {"role": "assistant", "content": "A dot."}]
        ids, mask = tokenize(model.tokenizer, messages, "sft", 256, model.system_prompt)
        samples.append(dict(key=str(i), source="s", frames=m, input_ids=ids, loss_mask=mask))
    return collate(samples, model.pad_id, model.image_frames)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_flops_equal_the_counted_ones(tiny_backbones, layout, mode):
    model = make_model(tiny_backbones, layout=layout)
    host = sft_batch(model, [frames(3)])  # one sample: no padding, whose work the estimate leaves out
    batch = {k: v for k, v in host.items() if k not in ("keys", "sources")}
    real = counted(lambda: TextCE().loss(model, batch, mode))
    assert TextCE().flops(FlopCount(model, 28), host, mode) == 3 * real  # training: backward ~ 2x forward


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine"])
def test_dpo_flops_count_the_visual_tokens_once(tiny_backbones, mode):
    model = make_model(tiny_backbones)
    (c, cm), (r, rm) = tokenize_dpo(model.tokenizer, [{"role": "user", "content": "Which way?"}], "Left.", "Up.",
                                    256, model.system_prompt)
    assert len(c) == len(r)  # equal lengths: no padding in the pair's batch
    host = collate([dict(key="k", source="s", frames=frames(4), chosen_ids=c, chosen_mask=cm, rejected_ids=r,
                         rejected_mask=rm)], model.pad_id)
    batch = {k: v for k, v in host.items() if k not in ("keys", "sources")}
    dpo = DPO(0.1, mode)
    real = counted(lambda: model.dpo_logps(batch["frames"], batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                           batch["chosen_loss_mask"], batch["rejected_input_ids"],
                                           batch["rejected_attention_mask"], batch["rejected_loss_mask"],
                                           frame_index=batch["frame_index"], mode=mode,
                                           chosen_target_index=batch["chosen_target_index"],
                                           rejected_target_index=batch["rejected_target_index"]))
    assert dpo.flops(FlopCount(model, 28), host, mode) == 3 * real


@pytest.mark.parametrize("preset", ["tiny", "tiny-dinov3"])
def test_backbone_flops_equal_the_counted_ones(preset):
    from backbones import dino_config
    from encoder import FoveatedEncoder

    enc = FoveatedEncoder(dino_config(preset), query_dim=8)
    backbone, size = enc.dino, (64 if preset == "tiny-dinov3" else 56)
    pixels = torch.randn(2, 3, size, size)
    patch_pass, query = backbone.flops(size, size)
    assert counted(lambda: backbone.encode(pixels)) == 2 * patch_pass
    kv = backbone.encode(pixels)
    assert counted(lambda: backbone.query(torch.randn(2, backbone.dim), kv)) == 2 * query


@pytest.mark.parametrize("mode", MODES)
def test_next_frame_flops_equal_the_counted_ones(tiny_backbones, mode):
    from objectives import NextFrame

    model = make_model(tiny_backbones, next_frame=[3, 8, 8], next_frame_width=8)
    host = sft_batch(model, [frames(4)])
    batch = {k: v for k, v in host.items() if k not in ("keys", "sources")}
    unit = NextFrame("pixels", 8, 1.0, 0.0, mode)
    unit.setup(model, None)
    real = counted(lambda: unit.loss(model, batch, mode))
    assert unit.flops(FlopCount(model, 28), host, mode) == 3 * real


def test_next_frame_flops_of_the_pooled_baseline_count_its_tokens(tiny_backbones):
    from objectives import NextFrame

    model = make_model(tiny_backbones, tokens_per_frame=4, next_frame=[3, 8, 8], next_frame_width=8)
    host = sft_batch(model, [frames(4)])
    batch = {k: v for k, v in host.items() if k not in ("keys", "sources")}
    unit = NextFrame("pixels", 8, 0.0, 0.0, "coarse_only")
    unit.setup(model, None)
    real = counted(lambda: unit.loss(model, batch, "coarse_only"))
    assert unit.flops(FlopCount(model, 28), host, "coarse_only") == 3 * real


@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_text_flops_with_the_coarse_pass_weighted_in(tiny_backbones, mode):
    model = make_model(tiny_backbones)
    host = sft_batch(model, [frames(3)])
    batch = {k: v for k, v in host.items() if k not in ("keys", "sources")}
    unit = TextCE(0.5, mode)
    assert unit.flops(FlopCount(model, 28), host, mode) == 3 * counted(lambda: unit.loss(model, batch, mode))
