"""visual.py, the one switch between foveated queries and pooled patches, and the per-frame steps the
model exposes (look, append, next_query): a copied model keeps its own strategy, the glance equals the
static query written out, the pooled baseline refuses queries with one message and runs every mode as
coarse_only."""

import copy

import pytest
import torch

from conftest import make_model
from test_model import SIZE, video


@pytest.fixture(scope="module")
def pooled(tiny_backbones):
    return make_model(tiny_backbones, tokens_per_frame=4)


@torch.no_grad()
def test_a_deep_copy_reads_its_own_weights(tiny_model):
    """DPO's reference model is a deep copy: its strategy must read the copy's parameters, not the original's."""
    twin = copy.deepcopy(tiny_model)
    assert twin.visual.model is twin and tiny_model.visual.model is tiny_model
    twin.q_static.add_(1.0)
    kv = tiny_model.encode_frames(video(2, 0))
    assert not torch.allclose(twin.look(kv)[0], tiny_model.look(kv)[0])


@torch.no_grad()
def test_look_is_the_static_or_the_given_query_through_the_encoder_projected(tiny_model):
    frames = video(3, 1)
    kv = tiny_model.encode_frames(frames)
    enc, scale = tiny_model.encoder, tiny_model.config.visual_scale
    static = tiny_model.dino_to_llm(enc.query(tiny_model.q_static.expand(3, -1), kv)[0]) * scale
    tokens, attn = tiny_model.look(kv, return_attention=True)
    assert tokens.shape == (3, 1, tiny_model.llm.config.hidden_size) and attn.shape[0] == 3
    torch.testing.assert_close(tokens[:, 0], static)
    torch.testing.assert_close(tiny_model.look(kv, frame_ids=torch.tensor([2, 0]))[0], tokens[[2, 0]])
    q = torch.randn(2, tiny_model.config.query_dim)
    given = tiny_model.dino_to_llm(enc.query(q, kv, torch.tensor([1, 2]))[0]) * scale
    torch.testing.assert_close(tiny_model.look(kv, q, torch.tensor([1, 2]))[0][:, 0], given)
    assert torch.equal(tiny_model.first_query(2), tiny_model.q_init.expand(2, -1))


@torch.no_grad()
def test_the_pooled_baseline_has_no_queries(pooled):
    frames = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    kv = pooled.encode_frames(frames)
    tokens, attn = pooled.look(kv)
    assert tokens.shape == (2, 4, pooled.llm.config.hidden_size) and attn is None
    assert pooled.first_query(1) is None and not pooled.visual.queries and pooled.visual.per_frame == 4
    assert {pooled.visual.run_mode(m) for m in ("coarse_only", "coarse_fine", "autoregressive")} == {"coarse_only"}
    for call in (lambda: pooled.look(kv, torch.zeros(2, 24)), lambda: pooled.visual.require_queries("--attention")):
        with pytest.raises(ValueError, match="needs the foveated model's queries; this is the pooled baseline"):
            call()


@torch.no_grad()
def test_encoding_in_chunks_equals_encoding_at_once(tiny_model, pooled):
    for model, size in ((tiny_model, SIZE), (pooled, 56)):
        frames = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
        whole, parts = model.encode_frames(frames), model.encode_frames(frames, chunk=2)
        flat = lambda kv: [kv] if torch.is_tensor(kv) else [t for block in kv for t in block]  # noqa: E731
        for a, b in zip(flat(whole), flat(parts)):
            torch.testing.assert_close(a, b)
