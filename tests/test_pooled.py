"""The "frames as images" baseline (model.tokens_per_frame = N): each frame is N average-pooled final patch
tokens, no queries. Its loss equals a naive concatenation; mixed clip lengths and padding change nothing;
every mode is the same pass; cached generation equals uncached; save/load and checkpoints round-trip; the
FLOP count equals torch's; bad settings are clear errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml

from collate import pack_frames
from config import ConfigError, load_config, model_config
from decoding import prompt_ids
from conftest import make_model
from flops import FlopCount
from layout import frame_inputs, make_layout
from model import MODES
from test_flops import counted, sft_batch
from test_model import SAMPLES, greedy_without_cache, make_batch, per_sample_loss, video
from objectives import TextCE

GRID = 4  # the test DINO at 56 px: a 4 x 4 patch grid


def big(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, 3, 14 * GRID, 14 * GRID, generator=g)


@pytest.fixture(params=[1, 4, 16], ids=lambda n: f"N{n}")
def pooled(request, tiny_backbones):
    return make_model(tiny_backbones, tokens_per_frame=request.param)


@torch.no_grad()
def test_tokens_are_the_pooled_final_patches(pooled):
    frames = big(2, 0)
    tokens = pooled.encode_frames(frames)
    n = pooled.visual.per_frame
    assert tokens.shape == (2, n, pooled.encoder.dino.dim)
    patches = pooled.encoder.dino.features(frames)[:, pooled.encoder.dino.num_prefix:]  # [2, 16, D], row-major
    s, cell = pooled.visual.side, GRID // pooled.visual.side
    grid = patches.view(2, GRID, GRID, -1)
    for i in range(s):  # token i * s + j is the mean of the cell-by-cell block (i, j) of the patch grid
        for j in range(s):
            block = grid[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].mean((1, 2))
            torch.testing.assert_close(tokens[:, i * s + j], block, atol=1e-5, rtol=1e-5)
    assert not hasattr(pooled, "q_static") and not hasattr(pooled.encoder, "query_input_proj")


@torch.no_grad()
def test_loss_equals_a_naive_concatenation(pooled):
    """[every frame's N tokens in order; text] through the plain LLM, the answer tokens' mean CE."""
    from test_model import sample_ids

    frames = big(3, 1)
    ids, lm = sample_ids(pooled, "What moves?", "A red ball.")
    ids, lm = torch.tensor([ids]), torch.tensor([lm], dtype=torch.float)
    z = pooled.dino_to_llm(pooled.encode_frames(frames)).flatten(0, 1)[None] * pooled.visual_scale  # [1, 3N, D]
    text = pooled.llm.get_input_embeddings()(ids)
    h = pooled.llm.model(inputs_embeds=torch.cat([z, text], 1)).last_hidden_state[:, z.shape[1]:]
    logits = pooled.llm.lm_head(h)
    want = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")[lm[0, 1:].bool()].mean()
    for mode in MODES:  # no queries: every mode is this one pass
        out = pooled(frames=frames[None], input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=lm, mode=mode)
        torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["video_first", "prompt_first"])
@torch.no_grad()
def test_one_sample_alone_equals_its_place_in_a_padded_batch(tiny_backbones, layout):
    model = make_model(tiny_backbones, layout=layout, tokens_per_frame=4)
    samples = [(big(3, 1), *SAMPLES[0][1:]), (big(5, 2), *SAMPLES[1][1:]), SAMPLES[2]]
    # make_batch draws 28-px frames: our 56-px clips go in packed (frame_index) instead
    dense = make_batch(model, [(None, q, a) for _, q, a in samples])
    pixels, index = pack_frames([f for f, _, _ in samples])
    batch = model(**dict(dense, frame_mask=None, frames=pixels, frame_index=index))
    for i, (f, q, a) in enumerate(samples):
        one = make_batch(model, [(None, q, a)])
        p, ix = pack_frames([f])
        alone = model(**dict(one, frame_mask=None, frames=p, frame_index=ix))
        torch.testing.assert_close(per_sample_loss(batch)[i], alone["loss"], atol=1e-5, rtol=1e-5)
        s = alone["logits"].shape[1]
        torch.testing.assert_close(batch["logits"][i, :s], alone["logits"][0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prompt_first_puts_the_n_tokens_per_frame_after_the_question(tiny_backbones):
    model = make_model(tiny_backbones, layout="prompt_first", tokens_per_frame=4)
    b = make_batch(model, [(None, "What moves?", "A ball.")])
    frames = big(2, 3)[None]
    vis = frame_inputs(frames, None, None, 1)
    valid = vis.valid.repeat_interleave(model.visual.per_frame, 1)  # each frame is 4 consecutive visual tokens
    lay = make_layout(b["input_ids"], b["attention_mask"], valid, model.layout, model.marks)
    assert lay.n_visual.tolist() == [8] and vis.token_frame[0].tolist() == [0, 1]
    # decode the text around the video: it sits right after the question, before <|im_end|>
    first = b["input_ids"][0][lay.text_rank[0] < lay.visual_start[0]]
    assert model.tokenizer.decode(first).endswith("What moves?")
    assert lay.visual_pos[0].tolist() == list(range(len(first), len(first) + 8))


@pytest.mark.parametrize("layout", ["video_first", "prompt_first"])
def test_cached_generation_equals_uncached(tiny_backbones, layout):
    model = make_model(tiny_backbones, layout=layout, tokens_per_frame=4, image_frames=2)
    cases = [(big(3, 5), "Describe the video."), (big(1, 6)[0], "What is shown?"), (None, "Tell me a joke.")]
    expected = [greedy_without_cache(model, f, p, "coarse_only", steps=6) for f, p in cases]
    assert all(expected)
    for (f, p), want in zip(cases, expected):
        for mode in MODES:
            assert model.generate(f, p, max_new_tokens=6, mode=mode) == want
    assert model.generate([f for f, _ in cases], [p for _, p in cases], max_new_tokens=6) == expected
    # the evaluation path: frames encoded once (encode_frames), passed as kv
    pixels, index = pack_frames([cases[0][0]])
    ids, am = prompt_ids(model, [[{"role": "user", "content": cases[0][1]}]])
    out = model.generate_ids(ids, am, pixels, index, kv=model.encode_frames(pixels), max_new_tokens=6)
    assert model.tokenizer.decode(out["tokens"][0], skip_special_tokens=True) == expected[0]


@torch.no_grad()
def test_save_load_round_trip(tiny_backbones, tmp_path):
    from model import load_model

    model = make_model(tiny_backbones, tokens_per_frame=4)
    model.save_pretrained(tmp_path / "export")
    loaded = type(model).from_pretrained(tmp_path / "export")
    assert dataclasses.replace(loaded.config, pretrained=True) == model.config and loaded.visual.per_frame == 4
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = make_batch(model, [(None, "What moves?", "A ball.")])
    pixels, index = pack_frames([big(2, 4)])
    batch.update(frames=pixels, frame_index=index, frame_mask=None)
    assert torch.equal(model(**batch)["logits"], loaded(**batch)["logits"])
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)}}, tmp_path / "c.pt")
    from_file, _ = load_model(tmp_path / "c.pt")
    assert from_file.visual.per_frame == 4 and torch.equal(from_file(**batch)["logits"], model(**batch)["logits"])


def test_flops_equal_the_counted_ones(tiny_backbones):
    model = make_model(tiny_backbones, tokens_per_frame=4)
    host = sft_batch(model, [big(3, 0).mul(60).add(128).clamp(0, 255).to(torch.uint8)])
    batch = {k: v for k, v in host.items() if k not in ("keys", "sources")}
    real = counted(lambda: TextCE().loss(model, batch, "coarse_fine"))
    assert TextCE().flops(FlopCount(model, 14 * GRID), host, "coarse_fine") == 3 * real


def test_training_backward_reaches_the_projection_and_backbone(tiny_backbones):
    model = make_model(tiny_backbones, tokens_per_frame=4).train()
    batch = make_batch(model, [(None, "What moves?", "A ball.")])
    pixels, index = pack_frames([big(2, 4)])
    model(**dict(batch, frames=pixels, frame_index=index, frame_mask=None))["loss"].backward()
    assert model.dino_to_llm.weight.grad.abs().sum() > 0
    assert model.encoder.dino.blocks[-1].fc2.weight.grad.abs().sum() > 0  # the last block is read in full


def test_bad_settings(tiny_backbones, tmp_path):
    with pytest.raises(ConfigError, match="tokens_per_frame' must be a square"):
        model_config({"tokens_per_frame": 8}, "here")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage": "sft", "run_dir": "r", "coarse_weight": 1.0,
                                    "model": {"tokens_per_frame": 4}, "data": {"train": [{"name": "a", "shards": "a"}]}}))
    with pytest.raises(ConfigError, match="coarse_weight' needs the foveated model"):
        load_config(path)
    model = make_model(tiny_backbones, tokens_per_frame=16)
    with pytest.raises(ValueError, match=r"tokens_per_frame 16 pools to 4 x 4, but frames of \(28, 28\) px have a 2 x 2"):
        model.encode_frames(video(1, 0))
    with pytest.raises(ValueError, match="queries= needs the foveated model"):
        b = make_batch(model, [(None, "Hi", "Yo")])
        model(**b, queries=torch.zeros(1, 0, 24))
