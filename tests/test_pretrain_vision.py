"""scripts/pretrain_vision.py: the dense labels checked against the decoded pixels (not against the
generator's variables), the folder it writes loads through the public API like any DINOv2, the run is
deterministic and cached, the gate's bar, and bad vision folders named before anything trains."""

import random

import numpy as np
import pytest
import torch
from transformers import Dinov2Model

import backbones
from config import ConfigError
from conftest import load_script
from model import FoveatedVLM
from test_synthetic import classify, measure_shape

pretrain = load_script("pretrain_vision")
world = load_script("make_synthetic")
TINY = dict(frame_size=112, width=32, depth=2, heads=2, mlp_ratio=2, steps=3, batch=4)
COLOURS = {name: np.array(rgb) for name, rgb in world.PALETTE.items()} | {"grey": np.array(world.GREY)}


def test_dense_labels_match_the_pixels():
    s = pretrain.Settings(**TINY)
    p, g, checked = s.patch_size, s.grid, {"colour": 0, "shape": 0}
    for seed in range(12):
        pixels, index, objects = pretrain.scene(random.Random(seed), s)
        # labels from the object list, checked against the frame as decoded (after the JPEG round trip)
        colour, shape, centre = pretrain.dense_labels(index, objects, p)
        frame = pixels.permute(1, 2, 0).numpy().astype(int)
        background = np.median(frame.reshape(-1, 3), 0)
        names = classify(frame, COLOURS, background)
        for i in np.nonzero(colour > 0)[0]:
            r, c = divmod(i, g)
            cell = names[r * p:(r + 1) * p, c * p:(c + 1) * p]
            coloured = cell[cell != "background"]
            # the labelled colour is what the patch's object pixels show (the most frequent named colour)
            values, counts = np.unique(coloured, return_counts=True)
            assert pretrain.COLOURS[colour[i] - 1] == values[counts.argmax()], (seed, i)
            checked["colour"] += 1
            x, y = centre[i] * p  # the object's centre in pixels: the middle of its colour's pixels around it
            ys, xs = np.nonzero(names == pretrain.COLOURS[colour[i] - 1])
            near = (abs(xs - x) < p) & (abs(ys - y) < p)
            assert abs((xs[near].min() + xs[near].max() + 1) / 2 - x) <= 2
            assert abs((ys[near].min() + ys[near].max() + 1) / 2 - y) <= 2
        for i in np.nonzero(shape > 0)[0]:  # every patch of an object: the object's shape, measured
            r, c = divmod(i, g)
            cell = index[r * p:(r + 1) * p, c * p:(c + 1) * p]
            obj = objects[np.bincount(cell[cell > 0]).argmax() - 1]  # the object covering most of the patch
            assert measure_shape(frame, obj["box"], obj["colour"], COLOURS, background)[0] == \
                world.SHAPES[shape[i] - 1], (seed, i)
            checked["shape"] += 1
        assert ((shape > 0) == (colour > 0)).all() and (shape != 0).all()  # shape where colour names an object
        _, centred, _ = pretrain.dense_labels(index, objects, p, shape_on="centre")
        assert sorted(np.nonzero(centred > 0)[0]) == sorted({pretrain.centre_patch(o, p, g) for o in objects})
    assert checked["colour"] > 50 and checked["shape"] > 20


def test_the_folder_loads_like_dinov2_and_the_run_is_cached(tmp_path):
    s = pretrain.Settings(**TINY)
    folder = pretrain.ensure(s, tmp_path, log=lambda *_: None)
    assert folder.name == s.folder_name() and (folder / "pretrain.json").is_file()
    hf = Dinov2Model.from_pretrained(folder).eval()
    model = FoveatedVLM(llm_name="random:tiny", dino_name=str(folder), query_dim=16).eval()
    frames = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        ours = model.encoder.dino.features(frames)
        theirs = hf(pixel_values=pretrain.normalise(frames)).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # the same settings again: nothing is trained, the folder is reused
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrain.ensure(s, tmp_path, log=lambda *_: None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    # deterministic per seed: another cache, the same weights; another seed, others
    again = Dinov2Model.from_pretrained(pretrain.ensure(s, tmp_path / "b", log=lambda *_: None))
    other = Dinov2Model.from_pretrained(pretrain.ensure(pretrain.Settings(**TINY, seed=1), tmp_path,
                                                        log=lambda *_: None))
    for (name, a), b, c in zip(hf.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(hf.state_dict().values(), other.state_dict().values()))


def test_the_batches_do_not_depend_on_the_number_of_workers():
    s = pretrain.Settings(**{**TINY, "steps": 5, "batch": 2})
    one = list(pretrain.DataLoader(pretrain.Frames(s), batch_size=None, num_workers=0))
    two = list(pretrain.DataLoader(pretrain.Frames(s), batch_size=None, num_workers=2))
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):  # the same steps in the same order
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(one[0]["frames"], one[1]["frames"])


def test_the_gate_fails_a_random_backbone():
    s = pretrain.Settings(**TINY)
    g = pretrain.gate(pretrain.backbone(s).eval(), s)
    assert not g["passed"] and g["shape_accuracy"] < 0.8  # a random ViT does not read shape
    assert min(g["attention_entropy"]) > 0.99  # and attends uniformly
    good = {"colour_accuracy": 0.99, "shape_accuracy": 0.96, "centre_error_px": {"within_half_patch": 0.95},
            "attention_entropy": [0.95, 0.7]}
    assert pretrain.passed(good, s)
    for key, value in (("shape_accuracy", 0.94), ("attention_entropy", [0.95, 0.91])):
        assert not pretrain.passed({**good, key: value}, s)


def test_sincos_positions_are_distinct_and_set_on_random_presets():
    code = backbones.sincos_2d(8, 32)
    distances = torch.cdist(code, code) + torch.eye(64) * 1e9
    assert code.shape == (64, 32) and distances.min() > 0.5
    hf = backbones.random_vision(backbones.dino_config("tiny"))
    grid = hf.embeddings.position_embeddings[0, 1:]
    torch.testing.assert_close(grid, backbones.sincos_2d(5, 32))  # the tiny preset's 5 x 5 grid
    with pytest.raises(ValueError, match="position embeddings"):
        backbones.set_positions(hf, "learned")


def test_bad_vision_folders_are_named(tmp_path, tiny_backbones):
    llm_dir, _ = tiny_backbones
    with pytest.raises(ConfigError, match=r"model\.dino: no vision backbone at .*missing"):
        backbones.vision_config(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"vision: .* holds a 'llama' model"):
        backbones.vision_config(llm_dir, key="vision")
