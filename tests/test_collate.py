"""Batching: packed frames, padding, loss targets, DPO pairs, the budget batcher; a collated uint8 batch
gives the model exactly what each sample gives alone."""

import pytest
import torch

from collate import budget_batches, collate, pack_frames, sample_cost
from config import DEFAULT_SYSTEM_PROMPT
from tokenization import tokenize, tokenize_dpo

g = torch.Generator().manual_seed(0)


def frames(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def text_sample(key, n, frames_=None):
    return dict(key=key, source="s", frames=frames_, input_ids=list(range(10, 10 + n)),
                loss_mask=[0] * (n // 2) + [1] * (n - n // 2))


def test_collate_packs_frames_and_pads_text():
    video, image = frames(3, 3, 28, 28), frames(3, 28, 28)
    batch = collate([text_sample("a", 5, video), text_sample("b", 7), text_sample("c", 4, image)], pad_id=2,
                    image_frames=4)
    assert torch.equal(batch["frames"], torch.cat([video, image[None]]))  # the image is stored once
    assert batch["frame_index"].tolist() == [[0, 1, 2, -1], [-1, -1, -1, -1], [3, 3, 3, 3]]
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, 14, 2, 2]
    assert batch["attention_mask"].sum(1).tolist() == [5, 7, 4]
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert not any(k.endswith("labels") for k in batch)  # the model reads loss_mask / target_index
    assert batch["keys"] == ["a", "b", "c"] and batch["frames"].dtype == torch.uint8
    # loss targets as flat indices into the [B, S-1] next-token grid: token j >= 1 is index b*(S-1) + j-1
    s = batch["input_ids"].shape[1]
    targets = [(i // (s - 1), i % (s - 1) + 1) for i in batch["target_index"].tolist()]
    assert targets == [(0, 2), (0, 3), (0, 4), (1, 3), (1, 4), (1, 5), (1, 6), (2, 2), (2, 3)]


def test_text_only_batch_has_no_frames():
    batch = collate([text_sample("a", 3), text_sample("b", 2)], pad_id=0)
    assert batch["frames"] is None and batch["frame_index"].shape == (2, 0)


def test_pack_frames_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sample 1"):
        pack_frames([None, frames(28, 28)])


def test_dpo_pairs_share_frames_and_pad_each_side():
    s = dict(key="k", source="s", frames=frames(2, 3, 28, 28), chosen_ids=[5, 6, 7], chosen_mask=[0, 1, 1],
             rejected_ids=[5, 6], rejected_mask=[0, 1])
    t = dict(s, key="l", frames=None, chosen_ids=[5], chosen_mask=[1], rejected_ids=[5, 8, 9, 9],
             rejected_mask=[0, 0, 1, 1])
    batch = collate([s, t], pad_id=0)
    assert batch["frame_index"].tolist() == [[0, 1], [-1, -1]]
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["rejected_input_ids"].tolist() == [[5, 6, 0, 0], [5, 8, 9, 9]]
    assert batch["rejected_loss_mask"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]
    assert sample_cost(s) == (2, 2 + 3, 2)


def random_media(gen, below: int):
    """(t, media): t drawn from 0 .. below - 1; no media for 0, an image for 1, else a t-frame video."""
    t = int(torch.randint(0, below, (1,), generator=gen))
    return t, None if t == 0 else (frames(3, 4, 4) if t == 1 else frames(t, 3, 4, 4))


def test_budget_batches_respect_every_budget_and_lose_nothing():
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(60):
        t, f = random_media(gen, 9)
        samples.append(text_sample(str(i), int(torch.randint(3, 40, (1,), generator=gen)), f))
    batches = list(budget_batches(iter(samples), max_batch_size=6, max_frames=12, max_tokens=160, image_frames=8))
    assert [s["key"] for b in batches for s in b] == [s["key"] for s in samples]  # in order, all of them
    for b in batches:
        costs = [sample_cost(s, 8) for s in b]
        assert len(b) <= 6
        if len(b) > 1:
            assert sum(c[0] for c in costs) <= 12 and len(b) * max(c[1] for c in costs) <= 160
    # greedy: a batch only closes when the next sample would break a budget
    for b, nxt in zip(batches, batches[1:]):
        grown = b + nxt[:1]
        costs = [sample_cost(s, 8) for s in grown]
        assert len(grown) > 6 or sum(c[0] for c in costs) > 12 or len(grown) * max(c[1] for c in costs) > 160
    assert [len(b) for b in budget_batches(iter(samples), 7)] == [7] * 8 + [4]


def test_oversized_sample_forms_its_own_batch():
    big = text_sample("big", 500)
    out = list(budget_batches([text_sample("a", 5), big, text_sample("b", 5)], 8, max_tokens=100))
    assert [[s["key"] for s in b] for b in out] == [["a"], ["big"], ["b"]]


def with_latents(sample, n):
    """The sample with n random float16 latents [n, 4, 2, 2] (None for a text-only sample)."""
    latents = None if n == 0 else torch.randn(n, 4, 2, 2, generator=g).half()
    return dict(sample, latents=latents)


def test_latents_are_packed_like_frames():
    video3, image, video2 = frames(3, 3, 8, 8), frames(3, 8, 8), frames(2, 3, 8, 8)
    samples = [with_latents(text_sample("a", 5, video3), 3), with_latents(text_sample("b", 4), 0),
               with_latents(text_sample("c", 4, image), 1), with_latents(text_sample("d", 6, video2), 2)]
    batch = collate(samples, pad_id=0, image_frames=4)
    assert batch["latents"].shape == (6, 4, 2, 2) and batch["frames"].shape == (6, 3, 8, 8)
    tokens = {"a": 3, "b": 0, "c": 4, "d": 2}
    for b, s in enumerate(samples):
        for t, i in enumerate(batch["frame_index"][b].tolist()):
            if t >= tokens[s["key"]]:
                assert i == -1
                continue
            # the target of visual token (b, t) is latents[frame_index[b, t]]: the latent of the frame it reads
            frame = 0 if s["frames"].dim() == 3 else t  # an image's tokens all read its one frame
            assert torch.equal(batch["latents"][i], s["latents"][frame]), (b, t)
            assert torch.equal(batch["frames"][i], s["frames"] if s["frames"].dim() == 3 else s["frames"][t])
    assert collate([text_sample("a", 5, video3)], pad_id=0)["latents"] is None  # no sample has latents


def test_latents_must_match_every_sample_with_frames():
    video = frames(3, 3, 8, 8)
    with pytest.raises(ValueError, match="'plain': 3 frame.* got none"):
        collate([with_latents(text_sample("a", 5, video), 3), text_sample("plain", 5, video)], pad_id=0)
    with pytest.raises(ValueError, match=r"'short': 3 frame.* got \(2, 4, 2, 2\)"):
        collate([with_latents(text_sample("short", 5, video), 2)], pad_id=0)
    other = dict(text_sample("big", 5, video), latents=torch.zeros(3, 4, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="different settings"):
        collate([with_latents(text_sample("a", 5, video), 3), other], pad_id=0)


def test_budget_batches_keep_latents_with_their_frames():
    gen = torch.Generator().manual_seed(2)
    samples = []
    for i in range(30):
        t, f = random_media(gen, 5)
        samples.append(with_latents(text_sample(str(i), 6, f), 0 if t == 0 else 1 if t == 1 else t))
    for group in budget_batches(iter(samples), 4, max_frames=6, image_frames=3):
        batch = collate(group, pad_id=0, image_frames=3)
        if batch["frames"] is None:
            assert batch["latents"] is None
            continue
        expected = torch.cat([s["latents"] for s in group if s["latents"] is not None])
        assert torch.equal(batch["latents"], expected) and len(expected) == len(batch["frames"])


def _forward(model, batch, mode):
    keep = ("frames", "frame_index", "input_ids", "attention_mask", "loss_mask")
    with torch.no_grad():
        return model(**{k: batch[k] for k in keep}, mode=mode)


@pytest.mark.parametrize("mode", ["coarse_only", "coarse_fine", "autoregressive"])
def test_collated_batch_equals_each_sample_alone(tiny_model, smollm2_tokenizer, mode):
    tok = smollm2_tokenizer
    convs = [("What moves?", "The red dot, to the left."), ("Say hi.", "Hi!"), ("Colour?", "Blue.")]
    media = [frames(3, 3, 28, 28), None, frames(3, 28, 28)]
    samples = []
    for i, ((q, a), m) in enumerate(zip(convs, media)):
        ids, mask = tokenize(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "sft", 256,
                             DEFAULT_SYSTEM_PROMPT)
        samples.append(dict(key=str(i), source="s", frames=m, input_ids=ids, loss_mask=mask))
    full = _forward(tiny_model, collate(samples, tok.pad_token_id, tiny_model.image_frames), mode)
    for i, s in enumerate(samples):
        alone = _forward(tiny_model, collate([s], tok.pad_token_id, tiny_model.image_frames), mode)
        n = len(s["input_ids"])
        assert torch.allclose(full["logits"][i, :n], alone["logits"][0], atol=1e-4)
        assert torch.allclose(full["logp_sum"][i], alone["logp_sum"][0], atol=1e-4)
        assert full["num_tokens"][i] == sum(s["loss_mask"][1:])


def test_uint8_frames_equal_normalised_float_frames(tiny_model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (c, cm), (r, rm) = tokenize_dpo(tok, [{"role": "user", "content": "Which way?"}], "Left.", "Up.", 256,
                                    DEFAULT_SYSTEM_PROMPT)
    video = frames(4, 3, 28, 28)
    batch = collate([dict(key="k", source="s", frames=video, chosen_ids=c, chosen_mask=cm, rejected_ids=r,
                          rejected_mask=rm)], tok.pad_token_id)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    args = {k: batch[k] for k in batch if k.startswith(("chosen_", "rejected_"))}
    args = {k.replace("input_ids", "ids"): v for k, v in args.items()}
    with torch.no_grad():
        a = tiny_model.dpo_logps(batch["frames"], frame_index=batch["frame_index"], **args)
        b = tiny_model.dpo_logps((video.float() / 255 - mean) / std, frame_index=batch["frame_index"], **args)
    assert torch.allclose(a["chosen_logps"], b["chosen_logps"], atol=1e-5)
    assert torch.allclose(a["rejected_logps"], b["rejected_logps"], atol=1e-5)
    assert a["chosen_tokens"].item() == sum(cm) and a["rejected_tokens"].item() == sum(rm)
