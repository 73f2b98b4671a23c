"""The proof-of-concept objective: frame_states (no text) sees only the past, is batch-independent in
every mode; the head; NextFrame's loss, normaliser and references against hand computations; the
coarse-pass weight of the text CE; configs and bad input."""

import pytest
import torch

from collate import pack_frames
from conftest import make_model
from model import MODES
from objectives import NextFrame, TextCE, coarse_fine_gain
from predict import NextFrameHead

SIZE = 28


def clip(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


@pytest.fixture
def model(tiny_backbones):
    return make_model(tiny_backbones, next_frame=[3, 4, 4], next_frame_width=16)


@pytest.fixture
def pooled(tiny_backbones):
    """The positive control's model: 4 pooled patch tokens a frame (the 2 x 2 grid at 28 px), no queries."""
    return make_model(tiny_backbones, tokens_per_frame=4, next_frame=[3, 4, 4], next_frame_width=16)


def packed(clips):
    frames, index = pack_frames(clips)
    return {"frames": frames, "frame_index": index}


@pytest.mark.parametrize("which", ["model", "pooled"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_a_state_sees_only_its_frame_and_the_ones_before(request, which, mode):
    """Changing frame 3 changes no state before it (coarse, fine and autoregressive; the pooled
    baseline's state after each frame's last token): a prediction of frame t + 1 never sees frame t + 1."""
    model = request.getfixturevalue(which)
    a = clip(6, 1)
    b = a.clone()
    b[3] = clip(1, 2)[0]
    sa, sb = (model.frame_states(x[None], mode=mode) for x in (a, b))
    for kind in ("coarse", "fine"):
        if sa[kind] is None:
            continue
        torch.testing.assert_close(sa[kind][:, :3], sb[kind][:, :3], atol=1e-5, rtol=1e-5)
        assert (sa[kind][:, 3] - sb[kind][:, 3]).abs().max() > 1e-3, kind


@pytest.mark.parametrize("which", ["model", "pooled"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_frame_states_of_a_clip_alone_equal_its_place_in_a_padded_batch(request, which, mode):
    model = request.getfixturevalue(which)
    clips = [clip(3, 1), clip(5, 2), clip(2, 3)]
    batch = model.frame_states(**packed(clips), mode=mode)
    for i, c in enumerate(clips):
        alone = model.frame_states(c[None], mode=mode)
        for kind in ("coarse", "fine"):
            if alone[kind] is not None:
                torch.testing.assert_close(batch[kind][i, :len(c)], alone[kind][0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_pooled_state_of_frame_t_is_the_last_state_after_reading_frames_0_to_t(pooled):
    """Frame t's state is the LLM's state after its last pooled token: the clip cut after frame t, read
    token by token by hand, ends in it; the pooled baseline has one pass and no attention."""
    c = clip(4, 5)
    states = pooled.frame_states(c[None], mode="coarse_fine")
    assert states["fine"] is None and states["attention"] == {"static": None, "dynamic": None}
    for t in range(4):
        tokens, _ = pooled.look(pooled.encode_frames(c[:t + 1]))  # [t + 1, 4, D]
        seq = tokens.flatten(0, 1)[None]
        hidden = pooled.llm.model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).last_hidden_state
        torch.testing.assert_close(states["coarse"][0, t], hidden[0, -1], atol=1e-5, rtol=1e-5)


def test_the_pooled_baseline_trains_next_frame_in_coarse_only(pooled, tmp_path):
    import yaml

    from config import ConfigError, load_config

    unit = NextFrame("pixels", 4, 0.0, 0.0, "coarse_only", residual=True)
    unit.setup(pooled, None)
    loss, metrics = unit.loss(pooled, packed([clip(4, 1), clip(3, 2)]), "coarse_only")
    assert set(metrics) == {"loss_coarse", "copy_loss", "mean_loss"}  # no queries: no entropies
    loss.backward()
    assert pooled.next_frame.out.weight.grad.abs().sum() > 0 and pooled.dino_to_llm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pooled baseline .* trains in mode coarse_only"):
        NextFrame("pixels", 4, 0.0, 0.0, "coarse_fine").setup(pooled, None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage": "next_frame", "run_dir": "r", "model": {"tokens_per_frame": 4,
                                    "next_frame": [3, 16, 16]}, "data": {"train": [{"name": "a", "shards": "a"}]}}))
    with pytest.raises(ConfigError, match="key 'mode' must be coarse_only for the pooled baseline"):
        load_config(path)
    assert load_config(path, ["mode=coarse_only"]).model.tokens_per_frame == 4
    with pytest.raises(ConfigError, match="key 'next_frame.entropy_weight' sharpens the queries' attention"):
        load_config(path, ["mode=coarse_only", "next_frame.entropy_weight=0.1"])


def test_head_shape_and_size():
    head = NextFrameHead(576, (4, 32, 32), 256)
    assert head(torch.randn(2, 7, 576)).shape == (2, 7, 4, 32, 32)
    assert 4.5e6 < sum(p.numel() for p in head.parameters()) < 5.5e6  # the guide's ~5M
    assert NextFrameHead(64, (3, 12, 12), 8).start == (3, 3)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_next_frame_loss_equals_a_hand_computation(model, mode, residual):
    from latents import pixel_target

    clips = [clip(4, 1), clip(2, 2), clip(3, 3)]
    batch = packed(clips)
    unit = NextFrame("pixels", 4, coarse_weight=0.5, entropy_weight=0.0, mode=mode, residual=residual)
    unit.setup(model, None)
    assert unit.normaliser(batch) == 3 + 1 + 2
    loss, metrics = unit.loss(model, batch, mode)
    states = [model.frame_states(c[None], mode=mode) for c in clips]
    fine = coarse = copy = 0.0
    for c, st in zip(clips, states):
        target = pixel_target(c, 4)
        for t in range(len(c) - 1):
            base = target[t] if residual else 0  # residual: the head gives the change from frame t
            coarse += ((base + model.next_frame(st["coarse"][0, t]) - target[t + 1]) ** 2).mean()
            if st["fine"] is not None:
                fine += ((base + model.next_frame(st["fine"][0, t]) - target[t + 1]) ** 2).mean()
            copy += ((target[t] - target[t + 1]) ** 2).mean()
    expected = coarse if mode == "coarse_only" else fine + 0.5 * coarse
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["loss_coarse"], coarse.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["copy_loss"], copy, atol=1e-6, rtol=1e-6)
    assert ("loss_fine" in metrics) == (mode != "coarse_only") and ("dynamic_entropy" in metrics) == (mode != "coarse_only")
    loss.backward()
    assert model.next_frame.out.weight.grad.abs().sum() > 0 and model.q_static.grad.abs().sum() > 0


def test_references_and_gain():
    assert coarse_fine_gain({"loss_fine": 0.8, "loss_coarse": 1.0}) == pytest.approx({"ratio": 1.25, "improvement": 0.2})
    unit = NextFrame("pixels", 4, 1.0, 0.0, "coarse_fine")
    static = torch.full((3, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    batch = packed([static])
    target = unit._targets(batch)
    assert target.shape == (1, 3, 3, 4, 4) and torch.allclose(target[0, 0], target[0, 2])


def test_latents_must_fit_the_head(model):
    unit = NextFrame("vae", 4, 1.0, 0.0, "coarse_fine")
    unit.setup(model, None)
    host = {**packed([clip(3, 1)]), "latents": torch.zeros(3, 4, 32, 32)}
    with pytest.raises(ValueError, match=r"latents are \[4, 32, 32\] per frame but the head .* predicts \[3, 4, 4\]"):
        unit.prepare(host)


@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_text_coarse_weight_adds_the_coarse_only_loss(tiny_backbones, mode):
    from test_model import SAMPLES, make_batch

    model = make_model(tiny_backbones)
    dense = make_batch(model, SAMPLES)
    clips = [s[0] for s in SAMPLES]
    frames, index = pack_frames([None if c is None else (c * 40 + 128).clamp(0, 255).to(torch.uint8) for c in clips])
    from collate import target_index

    batch = dict(frames=frames, frame_index=index, input_ids=dense["input_ids"],
                 attention_mask=dense["attention_mask"], loss_mask=dense["loss_mask"],
                 target_index=target_index(dense["loss_mask"], dense["attention_mask"]))
    plain, _ = TextCE(0.0, mode).loss(model, batch, mode)
    weighted, metrics = TextCE(0.25, mode).loss(model, batch, mode)
    coarse, _ = TextCE(0.0, "coarse_only").loss(model, batch, "coarse_only")
    torch.testing.assert_close(metrics["loss_fine"], plain.detach())
    torch.testing.assert_close(metrics["loss_coarse"], coarse.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted, plain + 0.25 * coarse, atol=1e-5, rtol=1e-5)
    assert TextCE(0.25, "coarse_only").coarse_weight == 0  # no second loss where there is no fine pass


def test_configs_for_next_frame(tmp_path):
    import yaml

    from config import ConfigError, load_config

    tree = {"stage": "next_frame", "run_dir": "r", "coarse_weight": 1.0,
            "data": {"train": [{"name": "a", "shards": "a"}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="model.next_frame' is required by stage next_frame"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"must be \[3, next_frame.pixels_size"):
        load_config(path, ["model.next_frame=[3, 8, 8]"])
    assert load_config(path, ["model.next_frame=[3, 16, 16]"]).model.next_frame == [3, 16, 16]
    with pytest.raises(ConfigError, match="latents' 4 channels"):
        load_config(path, ["model.next_frame=[3, 32, 32]", "next_frame.target=vae"])
    tree.update(stage="dpo")
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="coarse_weight' applies to the text CE"):
        load_config(path)


def test_entropy_weight_adds_the_dynamic_attention_entropy(model):
    batch = packed([clip(4, 1), clip(3, 2)])
    plain, metrics = NextFrame("pixels", 4, 1.0, 0.0, "coarse_fine").loss(model, batch, "coarse_fine")
    sharpened, _ = NextFrame("pixels", 4, 1.0, 0.1, "coarse_fine").loss(model, batch, "coarse_fine")
    torch.testing.assert_close(sharpened, plain + 0.1 * metrics["dynamic_entropy"], atol=1e-5, rtol=1e-5)


def test_near_uniform_dynamic_attention_twice_in_a_row_is_a_warning(model, caplog):
    import math
    import types

    import train

    run = types.SimpleNamespace(model=model, cfg=types.SimpleNamespace(data=types.SimpleNamespace(frame_size=SIZE)),
                                uniform_validations=0)
    uniform = math.log(model.encoder.dino.num_prefix + 4)  # 28 px: 2 x 2 patches
    with caplog.at_level("WARNING", logger="fvlm.train"):
        train.warn_if_uniform(run, uniform * 0.999)
        assert not caplog.records
        train.warn_if_uniform(run, uniform * 0.5)  # a sharp validation resets the count
        train.warn_if_uniform(run, uniform * 0.999)
        assert not caplog.records
        train.warn_if_uniform(run, uniform)
    assert len(caplog.records) == 1 and "near uniform for 2 validations" in caplog.text


def test_a_text_model_starts_a_next_frame_run_with_a_fresh_head(tiny_backbones, tmp_path):
    """init_from a model without the head: everything else is loaded, the head is freshly initialised;
    any other missing weight is still an error."""
    import yaml

    from config import load_config
    from train import build_model

    llm, dino = tiny_backbones
    tree = {"stage": "next_frame", "run_dir": "r", "model": {"llm": str(llm), "dino": str(dino), "query_dim": 24,
                                                            "next_frame": [3, 8, 8], "next_frame_width": 16},
            "next_frame": {"pixels_size": 8}, "data": {"train": [{"name": "a", "shards": "a"}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    text = make_model(tiny_backbones, seed=1).state_dict()
    model = build_model(load_config(path), (text, "the text model"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in text.items())
    assert {k for k in state if k not in text} == {k for k in state if k.startswith("next_frame.")} != set()
    del text["q_static"]
    with pytest.raises(ValueError, match="(?s)does not fit the model of this config.*q_static"):
        build_model(load_config(path), (text, "the text model"))
