"""scripts/make_synthetic.py: determinism, split sizes and formats, and labels checked against the
decoded JPEG pixels (colour at the target's centre, shape from its filled area, motion from the
target-coloured centroid) rather than against the generator's own variables."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from media import decode_image
from shards import expand, read_samples

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "scripts" / "make_synthetic.py")
make_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_synthetic)

CONFIGS = {"224px": ["--size", "40"],  # the default clip format; eval 100, text 50
           "128px": ["--size", "12", "--frames", "3", "--frame-size", "128"],  # 11-px objects
           "easy": ["--size", "12", "--frame-size", "112", "--object-scale", "0.2", "--distractors", "0", "2"],
           # every task: the question- and history-dependent ones too (the study's probe, 16-px objects)
           "all_tasks": ["--size", "24", "--frames", "4", "--frame-size", "112", "--object-scale", "0.143",
                         "--distractors", "2", "6", "--tasks", *make_synthetic.TASKS]}
CONTENT = ("colour", "shape", "motion")
DIRECTION_WORDS = ("left", "right", "up", "down")


def generate(out, *args):
    make_synthetic.main(["--out", str(out), *args])
    return out


def load(root, split):
    samples = [files for path in expand(root / split) for _, files in read_samples(path)]
    return [(json.loads(files.pop("json")), files) for files in samples]


def decode(data):
    return decode_image(data).permute(1, 2, 0).numpy().astype(int)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def dataset(request, tmp_path_factory):
    root = generate(tmp_path_factory.mktemp(request.param), *CONFIGS[request.param])
    readme = json.loads((root / "README.json").read_text())
    colours = {name: np.array(rgb) for name, rgb in readme["palette"].items()}
    colours["grey"] = np.array(readme["grey"])
    return root, readme, colours


def truth(meta):
    """The answer, read from the meta's objects (not from its `answer` field)."""
    return {"colour": meta["colour"], "qcolour": meta["colour"], "mcolour": meta["colour"], "shape": meta["shape"],
            "qshape": meta["shape"], "motion": meta["direction"]}[meta["task"]]


def mentioned(text, words):
    return {w for w in words if re.search(rf"\b{w}\b", text)}


def vocabulary(task, readme):
    return {"colour": list(readme["palette"]), "qcolour": list(readme["palette"]), "mcolour": list(readme["palette"]),
            "shape": readme["shapes"], "qshape": readme["shapes"], "motion": DIRECTION_WORDS}[task]


def classify(pixels, colours, background):
    """Name of the nearest reference colour (palette, grey, or this clip's background) per pixel."""
    names = [*colours, "background"]
    refs = np.stack([*colours.values(), background])
    return np.array(names)[np.abs(pixels[..., None, :] - refs).max(-1).argmin(-1)]


def centre(box):
    left, top, right, bottom = box
    return (top + bottom - 1) // 2, (left + right - 1) // 2


def measure_shape(frame, box, colour, colours, background):
    """(shape, bounding box of the `colour` pixels near `box`). In its box a triangle (apex up) fills
    the bottom third far more than the top third, a square ~1 of the box, a circle ~0.79, a cross ~0.5."""
    pad = (box[2] - box[0]) // 4  # less than the generator's s // 2 clearance: no other object in view
    top, left = max(0, box[1] - pad), max(0, box[0] - pad)
    near = classify(frame[top: box[3] + pad, left: box[2] + pad], colours, background) == colour
    ys, xs = np.nonzero(near)
    found = [left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1]
    inside = near[box[1] - top: box[3] - top, box[0] - left: box[2] - left]
    third = len(inside) // 3
    if inside[-third:].mean() - inside[:third].mean() > 0.3:
        return "triangle", found
    fill = inside.mean()
    return ("square" if fill > 0.85 else "circle" if fill > 0.57 else "cross"), found


def centroid(frame, colour, colours, background):
    """(y, x) centroid of the pixels of `colour`, among the clearly coloured ones (the background and
    grey are neutral) to keep the classification cheap."""
    ys, xs = np.nonzero(np.ptp(frame, -1) > 50)
    keep = classify(frame[ys, xs], colours, background) == colour
    return np.array([ys[keep].mean(), xs[keep].mean()])


def test_split_sizes_sources_and_text_only(dataset):
    root, readme, _ = dataset
    size = readme["arguments"]["size"]
    held_out = max(100, size // 10)
    expected = {"alignment": size, "sft": size, "dpo": size, "eval": held_out, "text": max(50, size // 5),
                "val_alignment": held_out, "val_sft": held_out, "val_dpo": held_out}
    for split, count in expected.items():
        samples = load(root, split)
        assert len(samples) == count == sum(readme["counts"][split].values()), split
        if split == "text":
            assert all(files == {} and sample["source"] == "synthetic/text" for sample, files in samples)
            for sample, _ in samples:
                assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
                add = re.fullmatch(r"What is (\d+) \+ (\d+)\?", sample["messages"][0]["content"])
                if add:
                    assert sample["messages"][1]["content"].endswith(f"= {int(add[1]) + int(add[2])}.")
            continue
        tasks = [sample["meta"]["task"] for sample, _ in samples]
        wanted = readme["arguments"]["tasks"]
        assert set(tasks) <= set(wanted) and max(map(tasks.count, wanted)) - min(map(tasks.count, wanted)) <= 1
        assert all(sample["source"] == f"synthetic/{sample['meta']['task']}" for sample, _ in samples)


def test_pixels_match_labels(dataset):
    root, readme, colours = dataset
    for split in ("alignment", "eval"):
        for sample, files in load(root, split):
            meta = sample["meta"]
            scale = readme["arguments"]["object_scale"]
            assert meta["object_size"] == max(10, round(meta["frame_size"] * scale))
            low, high = readme["arguments"]["distractors"]
            others = {"qcolour": (3, 3), "qshape": (max(3, low), max(3, high))}.get(meta["task"], (low, high))
            assert others[0] <= len(meta["distractors"]) <= others[1]
            assert meta["answer"] == truth(meta) and meta["family"] == make_synthetic.FAMILIES[meta["task"]]
            assert sorted(files) == [f"{t:03d}.jpg" for t in range(readme["arguments"]["frames"])]
            if meta["task"] not in ("motion", "mcolour"):  # a static clip: one image, analysed once
                assert len(set(files.values())) == 1
                files, meta["boxes"] = {"000.jpg": files["000.jpg"]}, meta["boxes"][:1]
            frames = [decode(files[name]) for name in sorted(files)]
            rgb, background = colours[meta["colour"]], np.median(frames[0].reshape(-1, 3), 0)
            for frame, box in zip(frames, meta["boxes"]):
                assert frame.shape == (meta["frame_size"],) * 2 + (3,)
                pixel = frame[centre(box)]
                assert classify(pixel, colours, background) == meta["colour"], (split, meta)
                assert np.abs(pixel - rgb).max() < 40, (split, meta, pixel)
                shape, found = measure_shape(frame, box, meta["colour"], colours, background)
                assert shape == meta["shape"], (split, meta, found)
                # the stated position: the target's pixels stay inside its box and span most of it
                # (JPEG blurs away a triangle's thin tips)
                assert found[0] >= box[0] and found[1] >= box[1] and found[2] <= box[2] and found[3] <= box[3]
                assert (found[2] - found[0]) * (found[3] - found[1]) >= 0.4 * (box[2] - box[0]) ** 2
            for d in meta["distractors"]:  # distractors are where and what meta says
                assert classify(frames[0][centre(d["box"])], colours, background) == d["colour"]
                assert measure_shape(frames[0], d["box"], d["colour"], colours, background)[0] == d["shape"]
                if meta["task"] in CONTENT:  # the target is the only circle (colour) or coloured object
                    assert d["shape"] != "circle" if meta["task"] == "colour" else d["colour"] == "grey"
            if meta["task"] in ("motion", "mcolour"):  # the target's colour is unique: centroid of its colour
                dy, dx = (centroid(frames[-1], meta["colour"], colours, background)
                          - centroid(frames[0], meta["colour"], colours, background))
                moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
                assert moved == meta["direction"] and max(abs(dx), abs(dy)) > 0.25 * meta["frame_size"]
                assert min(abs(dx), abs(dy)) < 1  # steady along one axis
                # nothing else moves: the frames differ only around the target's sweep (JPEG's 8-px
                # blocks carry the change a block further)
                changed = np.abs(frames[-1] - frames[0]).max(-1) > 60
                x0, y0 = np.min(meta["boxes"], 0)[:2] - 8
                x1, y1 = np.max(meta["boxes"], 0)[2:] + 8
                changed[max(0, y0):y1, max(0, x0):x1] = False
                assert not changed.any(), meta


def test_texts_agree_with_meta(dataset):
    root, readme, _ = dataset
    for sample, _ in load(root, "alignment") + load(root, "val_alignment"):
        meta, messages = sample["meta"], sample["messages"]
        assert [m["content"] for m in messages[:1]] == ["Describe the video."]
        cap = messages[1]["content"]
        assert mentioned(cap, readme["palette"]) >= {meta["colour"]}
        assert mentioned(cap, readme["shapes"]) >= {meta["shape"]}
        assert mentioned(cap, DIRECTION_WORDS) == ({meta["direction"]} if meta["direction"] else set())
    for sample, _ in load(root, "sft") + load(root, "val_sft"):
        meta, (question, answer) = sample["meta"], sample["messages"]
        assert answer_from_question(question["content"], meta) == truth(meta)
        assert mentioned(answer["content"], vocabulary(meta["task"], readme)) == {truth(meta)}
    for sample, _ in load(root, "dpo") + load(root, "val_dpo"):
        meta, words = sample["meta"], vocabulary(sample["meta"]["task"], readme)
        assert [m["role"] for m in sample["messages"]] == ["user"]
        assert mentioned(sample["chosen"], words) == {truth(meta)}
        wrong = mentioned(sample["rejected"], words)
        assert len(wrong) == 1 and truth(meta) not in wrong
        assert sample["chosen"].split()[:3] == sample["rejected"].split()[:3]  # the same sentence
    letters = []
    for sample, _ in load(root, "eval"):
        meta, options, letter = sample["meta"], sample["options"], sample["answer"]
        assert len(set(options)) == 4 and [o == truth(meta) for o in options].count(True) == 1
        assert set(options) <= set(vocabulary(meta["task"], readme))
        assert options["ABCD".index(letter)] == truth(meta) and sample["messages"][1]["content"] == letter
        listing = "".join(f"\n{x}. {o}" for x, o in zip("ABCD", options))
        assert sample["messages"][0]["content"].startswith(sample["question"] + listing + "\n")
        letters.append(letter)
    assert all(letters.count(x) >= len(letters) // 10 for x in "ABCD"), letters


def answer_from_question(question: str, meta: dict) -> str:
    """Answer a probe question from the scene's objects alone: the one object the question names must be
    unique in the clip, and what is asked about it is the answer."""
    objects = [{"colour": meta["colour"], "shape": meta["shape"], "moves": meta["direction"]}]
    objects += [{**d, "moves": None} for d in meta["distractors"]]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):  # colour, qcolour
        named, asked = [o for o in objects if o["shape"] == m[1]], "colour"
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):  # shape, qshape
        named, asked = [o for o in objects if o["colour"] == m[1]], "shape"
    elif m := re.fullmatch(r"Which way does the (\w+) object move\?", question):
        named, asked = [o for o in objects if o["colour"] == m[1]], "moves"
    else:
        assert question == "What colour is the object that moves?", question
        named, asked = [o for o in objects if o["moves"]], "colour"
    assert len(named) == 1, (question, meta)
    return named[0][asked]


def test_question_dependent_targets_are_found_only_through_the_question(dataset):
    """qcolour / qshape clips hold several candidates of the asked kind (a fixed query cannot know which),
    mcolour clips several coloured objects (only motion tells the target); the content tasks one."""
    root, readme, _ = dataset
    for sample, _ in load(root, "sft"):
        meta = sample["meta"]
        coloured = [d for d in meta["distractors"] if d["colour"] != "grey"]
        if meta["task"] == "qcolour":
            assert sorted(d["shape"] for d in meta["distractors"]) == sorted(set(readme["shapes"]) - {meta["shape"]})
            assert len({meta["colour"], *(d["colour"] for d in coloured)}) == 4
        elif meta["task"] == "qshape":
            assert len(coloured) == 3 and len({meta["colour"], *(d["colour"] for d in coloured)}) == 4
        elif meta["task"] == "mcolour":
            assert len(coloured) >= 2 and meta["colour"] not in {d["colour"] for d in coloured}


def test_held_out_splits_are_new_clips(dataset):
    root, _, _ = dataset
    for split in ("alignment", "sft", "dpo"):
        scenes = lambda name: {json.dumps([sample["meta"]["boxes"], sample["meta"]["distractors"]])  # noqa: E731
                               for sample, _ in load(root, name)}
        assert not scenes(split) & scenes(f"val_{split}"), split


def test_deterministic_and_seeded(tmp_path):
    args = ["--size", "6", "--frames", "3", "--frame-size", "96"]
    a, b = generate(tmp_path / "a", *args), generate(tmp_path / "b", *args)
    c = generate(tmp_path / "c", *args, "--seed", "1")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) == 9
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".tar")
    # samples are sub-seeded one by one: a larger --size appends to the same samples
    d = generate(tmp_path / "d", "--size", "9", *args[2:])
    assert load(d, "sft")[:6] == load(a, "sft")


def test_workers_write_the_same_bytes(tmp_path):
    # through the command line, as scripts/ablate.py's probe is made: the spawned workers import the script
    args = ["--size", "70", "--held-out", "5", "--frames", "2", "--frame-size", "96", "--splits", "sft", "text"]
    one = generate(tmp_path / "one", *args)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), "--out", str(tmp_path / "two"),
                    *args, "--workers", "2"], check=True, capture_output=True)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len(files) == 3 and all((one / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
    assert len(load(one, "sft")) == 70
    # what callers (ablate.py, quickstart.py) compare to reuse a folder: the same for either worker count
    readme = json.loads((one / "README.json").read_text())["arguments"]
    for workers in ("1", "2"):
        argv = ["--out", "elsewhere", *args, "--workers", workers]
        assert make_synthetic.recorded(make_synthetic.build_parser().parse_args(argv)) == readme


def test_the_quickstart_reuses_its_dataset(tmp_path, monkeypatch, capsys):
    quickstart = load_script("quickstart")
    monkeypatch.setattr(quickstart, "DATA", tmp_path / "synthetic")
    quickstart.ensure_data()
    quickstart.ensure_data()  # a second run finds the folder it made (not "made with other settings")
    assert capsys.readouterr().out.rstrip().endswith("(already there)")


def test_refuses_to_mix_with_existing_shards(tmp_path):
    args = ["--size", "3", "--frames", "2", "--frame-size", "96"]
    generate(tmp_path, *args)
    with pytest.raises(SystemExit):
        generate(tmp_path, *args)
