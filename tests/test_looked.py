"""looked.py: patch cover on hand cases, target share against all-on-target and uniform attention,
the probe's thinning keeping each box on its frame (checked on the decoded pixels), clip scores of a
tiny model in both query modes, the summary, and the figure (box outline where the box is)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script, make_model
from looked import clip_scores, draw_looked, patch_cover, read_probe, scale_box, summarise, target_share
from media import sample_frame_indices
from shards import expand, read_samples

CLIP_FRAMES, MAX_FRAMES, ORIGINAL, SIZE, PATCH = 12, 5, 96, 56, 14  # 56 px: a 4 x 4 grid of the tiny DINOv2


make_synthetic = load_script("make_synthetic")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Moving-target clips of 12 frames at 96 px (scripts/make_synthetic.py)."""
    out = tmp_path_factory.mktemp("looked_synthetic")
    make_synthetic.main(["--out", str(out), "--size", "1", "--frames", str(CLIP_FRAMES), "--frame-size",
                         str(ORIGINAL), "--tasks", "motion", "--object-scale", "0.2", "--distractors", "0", "2"])
    return out / "val_sft"


@pytest.fixture(scope="module")
def probe(synthetic):
    """Three of those clips read at 56 px with at most 5 frames."""
    return read_probe(synthetic, SIZE, MAX_FRAMES, limit=3)


def shard_boxes(folder) -> dict:
    """key -> the boxes of all the clip's frames, as the shard has them."""
    return {key: json.loads(files["json"])["meta"]["boxes"] for path in expand(folder)
            for key, files in read_samples(path)}


def test_patch_cover_hand_cases():
    one = patch_cover([14, 28, 28, 42], 56, 56, PATCH)  # exactly patch (row 2, column 1)
    expected = torch.zeros(4, 4)
    expected[2, 1] = 1
    assert torch.equal(one, expected)
    halves = patch_cover([7, 0, 21, 14], 56, 56, PATCH)  # half of (0, 0) and half of (0, 1)
    expected = torch.zeros(4, 4)
    expected[0, :2] = 0.5
    assert torch.equal(halves, expected)
    # from a 112-px original to 56 px: halved, so the same patch as the first case
    assert torch.equal(patch_cover([28, 56, 56, 84], 112, 56, PATCH), one)
    # any box inside the grid: the covered areas add up to the scaled box's area
    x0, y0, x1, y1 = scale_box([10, 33, 41, 70], 96, 56)
    cover = patch_cover([10, 33, 41, 70], 96, 56, PATCH)
    assert cover.max() <= 1 and cover.min() >= 0
    assert cover.sum().item() * PATCH ** 2 == pytest.approx((x1 - x0) * (y1 - y0), rel=1e-5)
    # a frame that is not a multiple of the patch: the remainder is no patch (60 px -> 4 x 4)
    assert patch_cover([56, 56, 60, 60], 60, 60, PATCH).sum() == 0


def test_target_share_all_on_target_and_uniform():
    cover = torch.zeros(2, 4, 4)
    cover[:, 1, 1:3] = 1  # two whole patches
    cover[:, 2, 1] = 0.5  # and half of a third
    chance = 2.5 / 16
    on_target = (cover == 1).float() / 2  # all the mass on the fully covered patches
    s = target_share(on_target, cover)
    assert torch.allclose(s["share"], torch.ones(2))
    assert s["mean"]["ratio"] == pytest.approx(1 / chance)
    uniform = torch.full((2, 4, 4), 1 / 16)
    s = target_share(uniform, cover)
    assert torch.allclose(s["share"], torch.full((2,), chance))
    assert torch.allclose(s["chance"], torch.full((2,), chance))
    assert s["mean"]["ratio"] == pytest.approx(1.0)
    # prefix tokens holding 60 % of the mass: only the 40 % on patches can be on the target
    s = target_share(on_target * 0.4, cover, total=torch.ones(2))
    assert s["mean"]["share"] == pytest.approx(0.4) and s["mean"]["on_patches"] == pytest.approx(0.4)


def target_centroid(frame: torch.Tensor, colour) -> tuple[float, float]:
    """(x, y) centre of the pixels near the target's palette colour, in pixel-edge coordinates."""
    rgb = frame.permute(1, 2, 0).float()
    near = (rgb - torch.tensor(colour, dtype=torch.float32)).norm(dim=-1) < 60
    ys, xs = near.nonzero(as_tuple=True)
    assert len(xs) > 0, "no target-coloured pixel"
    return xs.float().mean().item() + 0.5, ys.float().mean().item() + 0.5


def box_centre(box) -> tuple[float, float]:
    x0, y0, x1, y1 = scale_box(box, ORIGINAL, SIZE)
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_probe_thinning_keeps_boxes_on_their_frames(synthetic, probe):
    assert len(probe) == 3
    keep = sample_frame_indices(CLIP_FRAMES, MAX_FRAMES)  # [1, 3, 6, 8, 10], not the first five
    for sample, meta in probe:
        assert sample["frames"].shape == (MAX_FRAMES, 3, SIZE, SIZE) and sample["frames"].dtype == torch.uint8
        assert meta["frame_numbers"] == keep and len(meta["boxes"]) == MAX_FRAMES
        assert sample["question"].startswith("Which way does the")
        all_boxes = shard_boxes(synthetic)[sample["key"]]  # the clip's 12 boxes, as the shard has them
        for t, frame in enumerate(sample["frames"]):
            # the target seen in frame t (56 px) sits on the box read_probe gives for it, scaled (to
            # ~0.1 px; neighbouring frames' boxes are >= 1 px away: the target moves ~1.7 px a frame)...
            cx, cy = target_centroid(frame, make_synthetic.PALETTE[meta["colour"]])
            bx, by = box_centre(meta["boxes"][t])
            assert abs(bx - cx) < 0.5 and abs(by - cy) < 0.5
            # ...and of all 12 boxes the nearest is that of the frame kept
            distance = [math.dist(box_centre(b), (cx, cy)) for b in all_boxes]
            assert int(np.argmin(distance)) == keep[t]


@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_clip_scores_tiny_model(tiny_backbones, probe, mode):
    model = make_model(tiny_backbones)
    sample, meta = probe[0]
    scores = clip_scores(model, sample, meta, mode)
    assert scores["cover"].shape == (MAX_FRAMES, 4, 4)
    for kind in ("static", "dynamic"):
        s = scores[kind]
        assert scores["maps"][kind].shape == (MAX_FRAMES, 4, 4)
        for name in ("share", "chance", "ratio", "on_patches"):
            assert s[name].shape == (MAX_FRAMES,) and torch.isfinite(s[name]).all()
        assert ((s["share"] >= 0) & (s["share"] <= 1)).all()
        # the share is part of the mass on patches, which is part of the whole (softmax: 1)
        assert (s["share"] <= s["on_patches"] + 1e-6).all() and (s["on_patches"] <= 1 + 1e-5).all()
        assert s["share"].sum() > 0  # the target is somewhere in every frame: some attention lands on it
        assert torch.allclose(s["chance"], scores["cover"].flatten(1).mean(1))
    # a moving target: the cover changes from frame to frame, with the box kept for each frame
    assert not torch.equal(scores["cover"][0], scores["cover"][-1])
    # the static query's attention does not depend on the mode (coarse_fine computes its own;
    # autoregressive has none and takes coarse_only's)
    assert scores["static"]["share"].tolist() == pytest.approx(
        clip_scores(model, sample, meta, "coarse_only")["static"]["share"].tolist(), abs=1e-5)
    # the dynamic share from the model's raw attention, key by key: key prefix + i * 4 + j is patch (i, j)
    ids = torch.tensor([model.chat_ids([{"role": "user", "content": sample["question"]}])])
    raw = model(frames=sample["frames"][None], input_ids=ids, mode=mode, return_attention=True)["attention"]
    keys, prefix = raw["dynamic"][0, :, -1].mean(1), model.encoder.dino.num_prefix
    for t in range(MAX_FRAMES):
        on_target = sum(keys[t, prefix + i * 4 + j] * scores["cover"][t, i, j] for i in range(4) for j in range(4))
        assert scores["dynamic"]["share"][t].item() == pytest.approx((on_target / keys[t].sum()).item(), abs=1e-6)


def test_clip_scores_without_queries_and_coarse_only(tiny_backbones, probe):
    pooled = make_model(tiny_backbones, tokens_per_frame=4)
    assert clip_scores(pooled, *probe[0], "coarse_fine") is None
    scores = clip_scores(make_model(tiny_backbones), *probe[0], "coarse_only")
    assert scores["dynamic"] is None and "dynamic" not in scores["maps"]
    assert summarise([scores, None])["clips"] == 1 and "dynamic" not in summarise([scores])


def test_summarise_means_and_spread():
    cover = torch.zeros(3, 2, 2)
    cover[:, 0, 0] = 1  # chance 1/4
    clips = []
    for share in (0.2, 0.6):
        attn = torch.zeros(3, 2, 2)
        attn[:, 0, 0] = share
        attn[:, 1, 1] = 1 - share
        clips.append({"static": target_share(attn, cover), "dynamic": target_share(attn * 0 + 0.25, cover)})
    out = summarise(clips)
    assert out["clips"] == 2
    assert out["chance"] == pytest.approx((0.25, 0.0))
    assert out["static"]["share"] == pytest.approx((0.4, 0.2))  # population std of 0.2 and 0.6
    assert out["static"]["ratio"] == pytest.approx((1.6, 0.8))
    assert out["static"]["per_frame"] == pytest.approx([0.4] * 3)
    assert out["dynamic"]["share"] == pytest.approx((0.25, 0.0))


def test_draw_looked_outlines_the_box(tiny_backbones, probe, tmp_path):
    model = make_model(tiny_backbones)
    sample, meta = probe[0]
    scores = clip_scores(model, sample, meta, "coarse_fine")
    boxes = [scale_box(b, meta["frame_size"], SIZE) for b in meta["boxes"]]
    path = draw_looked(tmp_path / "looked.png", sample["frames"],
                       {"static query": scores["maps"]["static"], "dynamic query": scores["maps"]["dynamic"],
                        "left out": None}, boxes, f"{sample['key']}: {sample['question']}")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[0] > 200 and image.shape[1] > 500
    # the outline's colour (lime) is drawn: 3 rows x 5 frames of box edges
    lime = (image[..., 1] > 200) & (image[..., 0] < 80) & (image[..., 2] < 80)
    assert lime.sum() > 15 * 20
    assert image.std() > 20  # frames and heatmaps, not a blank canvas


def test_attention_maps_static_query_is_the_same_in_every_mode(tiny_backbones, probe):
    """autoregressive reads no static tokens: its static map comes from q_static on the encoded frames,
    which must equal what the coarse_only pass attends; the dynamic map differs from it."""
    from looked import attention_maps

    model = make_model(tiny_backbones)
    sample, _ = probe[0]
    maps = {m: attention_maps(model, sample["frames"], sample["question"], m)["maps"]
            for m in ("autoregressive", "coarse_only", "coarse_fine")}
    for m in ("autoregressive", "coarse_fine"):
        torch.testing.assert_close(maps[m]["static"], maps["coarse_only"]["static"])
        assert not torch.allclose(maps[m]["dynamic"], maps[m]["static"])
    assert maps["coarse_only"]["dynamic"] is None
