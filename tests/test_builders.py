"""scripts/build_shards.py: each dataset's on-disk schema, built here in miniature, becomes the right
samples (text, roles, sources, frames, images, DPO pairs), bad rows are skipped and counted, and the
shuffle / shard splitting options behave."""

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards import expand, read_samples

_spec = importlib.util.spec_from_file_location(
    "build_shards", Path(__file__).resolve().parents[1] / "scripts" / "build_shards.py")
bs = sys.modules["build_shards"] = importlib.util.module_from_spec(_spec)  # workers unpickle by name
_spec.loader.exec_module(bs)

VIDEO_FRAMES, VIDEO_FPS, VIDEO_W, VIDEO_H = 12, 4, 64, 48


def gray(i):
    """The grey level of video frame i: frames are told apart by brightness after decoding."""
    return 10 + 20 * i


def write_mp4(path, frames=VIDEO_FRAMES, fps=VIDEO_FPS):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = VIDEO_W, VIDEO_H, "yuv420p"
        for i in range(frames):
            img = np.full((VIDEO_H, VIDEO_W, 3), gray(i), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


def image_bytes(w, h, fmt="JPEG", color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def decode(data):
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    return np.asarray(img.convert("RGB"))


def run(*argv):
    return bs.build(bs.parse_args([str(a) for a in argv]))


def samples(out):
    return {key: files for path in expand(out) for key, files in read_samples(path)}


def meta(files):
    return json.loads(files["json"])


def frame_exts(files):
    return sorted(e for e in files if e.endswith(".jpg") and e != "jpg")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_mp4(root / "clip.mp4")
    (root / "photo.jpg").write_bytes(image_bytes(80, 40))
    (root / "logo.png").write_bytes(image_bytes(30, 60, "PNG"))
    for i in range(5):
        (root / f"f{i}.jpg").write_bytes(image_bytes(40, 20, color=(gray(i),) * 3))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "broken.mp4").write_bytes((root / "clip.mp4").read_bytes()[:300])
    return root


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


FOLDER_ROWS = [
    {"messages": [user("What happens?"), assistant("It gets brighter.")], "source": "mine/video", "media": "clip.mp4",
     "id": "v1", "split": "train"},
    {"messages": [user("Colour?"), assistant("Red.")], "source": "mine/img", "media": "photo.jpg"},
    {"messages": [user("Shape?"), assistant("Tall.")], "source": "mine/img", "media": "logo.png"},
    {"messages": [user("Order?"), assistant("Dark to light.")], "source": "mine/frames",
     "media": [f"f{i}.jpg" for i in range(5)]},
    {"messages": [user("Hi"), assistant("Hello!")], "source": "mine/text", "media": None},
    {"messages": [user("Better caption?")], "source": "mine/dpo", "media": "photo.jpg", "chosen": "A red box.",
     "rejected": "A cat."},
    {"messages": [user("Where?"), assistant("?")], "source": "mine/bad", "media": "gone.mp4"},
    {"messages": [user("Where?"), assistant("?")], "source": "mine/bad", "media": "broken.jpg"},
    {"source": "mine/bad", "media": "photo.jpg"},
    '{"messages": [not json',
]


def test_folder_all_media_kinds_and_bad_rows(tmp_path, media_dir):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", FOLDER_ROWS)
    result = run("folder", "--jsonl", jsonl, "--media-root", media_dir, "--out", tmp_path / "out", "--frame-size", 24)
    assert result["skipped"] == {"missing_file": 1, "bad_image": 1, "missing_fields": 1, "bad_json": 1}
    got = samples(tmp_path / "out")
    assert result["written"] == len(got) == 6
    by_source = {meta(f)["source"]: (k, f) for k, f in got.items()}
    assert set(by_source) == {"mine/video", "mine/img", "mine/frames", "mine/text", "mine/dpo"} and len(got) == 6

    key, video = by_source["mine/video"]
    m = meta(video)
    assert key.startswith("folder_") and m["id"] == "v1" and m["split"] == "train"
    assert m["messages"] == FOLDER_ROWS[0]["messages"]
    # 12 frames at 4 fps = 3 s -> 3 frames at 1 fps, the centres of three equal segments: 2, 6, 10.
    assert frame_exts(video) == ["000.jpg", "001.jpg", "002.jpg"]
    for ext, index in zip(frame_exts(video), (2, 6, 10)):
        frame = decode(video[ext])
        assert frame.shape == (24, 32, 3)  # short side 24, 4:3 kept
        assert abs(frame.mean() - gray(index)) < 6

    jpg, png = (f for f in got.values() if meta(f)["source"] == "mine/img")
    shapes = sorted(decode(f["jpg"]).shape for f in (jpg, png))
    assert shapes == [(24, 48, 3), (48, 24, 3)]  # 80x40 and 30x60 at short side 24
    assert {e for f in (jpg, png) for e in f} == {"json", "jpg"}

    frames = by_source["mine/frames"][1]
    assert frame_exts(frames) == [f"{i:03d}.jpg" for i in range(5)]
    levels = [decode(frames[e]).mean() for e in frame_exts(frames)]
    assert all(abs(v - gray(i)) < 4 for i, v in enumerate(levels))  # stored in the listed order

    assert set(by_source["mine/text"][1]) == {"json"}
    dpo = meta(by_source["mine/dpo"][1])
    assert dpo["messages"] == [user("Better caption?")]
    assert (dpo["chosen"], dpo["rejected"]) == ("A red box.", "A cat.")


def test_crop_raw_and_full_size(tmp_path, media_dir):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", FOLDER_ROWS[:2])
    common = ["folder", "--jsonl", jsonl, "--media-root", media_dir, "--no-shuffle"]
    run(*common, "--out", tmp_path / "crop", "--frame-size", 24, "--crop")
    video, image = samples(tmp_path / "crop").values()
    assert {decode(video[e]).shape for e in frame_exts(video)} == {(24, 24, 3)}
    assert decode(image["jpg"]).shape == (24, 24, 3)

    run(*common, "--out", tmp_path / "full", "--frame-size", 0, "--target-fps", 2)
    video, image = samples(tmp_path / "full").values()
    assert len(frame_exts(video)) == 6  # 3 s at 2 fps
    assert decode(video["000.jpg"]).shape == (VIDEO_H, VIDEO_W, 3)
    assert decode(image["jpg"]).shape == (40, 80, 3)

    run(*common, "--out", tmp_path / "raw", "--video-mode", "raw")
    video, _ = samples(tmp_path / "raw").values()
    assert set(video) == {"json", "mp4"}
    assert video["mp4"] == (media_dir / "clip.mp4").read_bytes()


def test_max_frames_spreads_the_kept_frames(tmp_path, media_dir):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", [FOLDER_ROWS[0], FOLDER_ROWS[3]])
    run("folder", "--jsonl", jsonl, "--media-root", media_dir, "--out", tmp_path / "out", "--no-shuffle",
        "--max-frames", 2, "--frame-size", 0)
    video, listed = samples(tmp_path / "out").values()
    # Two frames from the centres of two equal halves: 12 video frames -> 3, 9; 5 listed frames -> 1, 3.
    for files, picked in ((video, (3, 9)), (listed, (1, 3))):
        assert len(frame_exts(files)) == 2
        assert all(abs(decode(files[e]).mean() - gray(i)) < 6 for e, i in zip(frame_exts(files), picked))


@pytest.mark.parametrize("mode", ["frames", "raw"])
def test_truncated_video_is_skipped(tmp_path, media_dir, mode):
    rows = [dict(FOLDER_ROWS[0], media="broken.mp4"), FOLDER_ROWS[4]]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = run("folder", "--jsonl", jsonl, "--media-root", media_dir, "--out", tmp_path / "out", "--video-mode", mode)
    assert result["skipped"] == {"bad_video": 1} and result["written"] == 1


def test_llava_video(tmp_path, media_dir):
    items = [
        {"id": "academic/v_1", "video": "clip.mp4", "data_source": "0_30_s_academic_v0_1",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the video."},
                           {"from": "gpt", "value": "It fades in."},
                           {"from": "human", "value": "And then? <video>"},
                           {"from": "gpt", "value": " Nothing else.\n"}]},
        {"id": "yt/v_2", "video": "clip.mp4",
         "conversations": [{"from": "human", "value": "<image>\nHow long?"}, {"from": "gpt", "value": "Three seconds."}]},
        {"id": "yt/v_3", "video": "missing.mp4",
         "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(items))
    result = run("llava-video", "--json", tmp_path / "ann.json", "--video-root", media_dir,
                 "--out", tmp_path / "out", "--frame-size", 24, "--no-shuffle")
    assert result["skipped"] == {"missing_file": 1}
    got = list(samples(tmp_path / "out").values())
    assert len(got) == 2
    first, second = map(meta, got)
    assert first["messages"] == [user("Describe the video."), assistant("It fades in."), user("And then?"),
                                 assistant("Nothing else.")]
    assert first["source"] == "llava_video_178k/0_30_s_academic_v0_1" and first["id"] == "academic/v_1"
    assert second["source"] == "llava_video_178k" and second["messages"][0] == user("How long?")
    assert all(len(frame_exts(f)) == 3 for f in got)


def test_openvid(tmp_path, media_dir):
    with open(tmp_path / "OpenVid-1M.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "aesthetic score", "motion score", "fps", "seconds"])
        w.writerow(["clip.mp4", "A grey square brightens.", "5.1", "2.0", "4.0", "3.0"])
        w.writerow(["absent.mp4", "Nothing.", "4.0", "1.0", "30.0", "2.0"])
    common = ["openvid", "--csv", tmp_path / "OpenVid-1M.csv", "--video-root", media_dir, "--frame-size", 24]
    result = run(*common, "--out", tmp_path / "a")
    assert result["written"] == 1 and result["skipped"] == {"missing_file": 1}
    (files,) = samples(tmp_path / "a").values()
    m = meta(files)
    assert m["messages"] == [user("Write a brief caption for this video."), assistant("A grey square brightens.")]
    assert m["source"] == "openvid" and m["id"] == "clip.mp4" and m["meta"]["aesthetic score"] == "5.1"
    assert len(frame_exts(files)) == 3
    run(*common, "--out", tmp_path / "b", "--prompt", "Caption it.")
    (files,) = samples(tmp_path / "b").values()
    assert meta(files)["messages"][0] == user("Caption it.")


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cauldron_rows():
    img = lambda data: {"bytes": data, "path": None}  # noqa: E731
    turns = [{"user": "What colour?", "assistant": "Red.", "source": "x"},
             {"user": "And the shape?", "assistant": "A rectangle.", "source": "x"}]
    return [
        {"images": [img(image_bytes(80, 40))], "texts": turns},
        {"images": [img(image_bytes(30, 60, "PNG"))], "texts": turns[:1]},
        {"images": [], "texts": turns[1:]},
        {"images": [img(image_bytes(40, 40)), img(image_bytes(60, 30))], "texts": turns[:1]},
        {"images": [img(b"\x89PNG\r\n\x1a\n garbage")], "texts": turns[:1]},
    ]


def test_cauldron(tmp_path):
    path = write_parquet(tmp_path / "ai2d" / "train-00000-of-00001.parquet", cauldron_rows())
    result = run("cauldron", "--parquet", path, "--out", tmp_path / "a", "--frame-size", 20, "--no-shuffle")
    assert result["written"] == 3 and result["skipped"] == {"multi_image": 1, "bad_image": 1}
    two_turn, png, text = samples(tmp_path / "a").values()
    assert meta(two_turn)["messages"] == [user("What colour?"), assistant("Red."), user("And the shape?"),
                                          assistant("A rectangle.")]
    assert {meta(f)["source"] for f in (two_turn, png, text)} == {"cauldron/ai2d"}
    assert decode(two_turn["jpg"]).shape == (20, 40, 3) and decode(png["jpg"]).shape == (40, 20, 3)
    assert set(text) == {"json"} and meta(text)["messages"] == [user("And the shape?"), assistant("A rectangle.")]

    result = run("cauldron", "--parquet", path, "--out", tmp_path / "b", "--frame-size", 20, "--no-shuffle",
                 "--multi-image", "frames", "--subset", "renamed")
    assert result["written"] == 4 and result["skipped"] == {"bad_image": 1}
    multi = list(samples(tmp_path / "b").values())[3]
    assert frame_exts(multi) == ["000.jpg", "001.jpg"]
    assert [decode(multi[e]).shape for e in frame_exts(multi)] == [(20, 20, 3), (20, 40, 3)]
    assert meta(multi)["source"] == "cauldron/renamed"


def test_smoltalk(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4")], "source": "math"},
        {"messages": [user("Hi"), assistant("Hello"), user("Bye"), assistant("Bye!")], "source": None},
        {"messages": [user("Unanswered")], "source": "math"},
    ]
    path = write_parquet(tmp_path / "smol-magpie.parquet", rows)
    result = run("smoltalk", "--parquet", path, "--out", tmp_path / "out", "--no-shuffle")
    assert result["written"] == 2 and result["skipped"] == {"missing_fields": 1}
    got = list(samples(tmp_path / "out").values())
    assert all(set(f) == {"json"} for f in got)
    assert [meta(f)["source"] for f in got] == ["smoltalk/math", "smoltalk/smol-magpie"]
    assert [meta(f)["messages"] for f in got] == [rows[0]["messages"], rows[1]["messages"]]


def test_rlaif_v(tmp_path):
    rows = [{"image": {"bytes": image_bytes(48, 32), "path": None}, "question": "What is shown?",
             "chosen": "A red rectangle.", "rejected": "A dog.", "ds_name": "RLAIF-V", "origin_dataset": "coco",
             "idx": f"rlaif_{i}"} for i in range(3)]
    rows[1]["image"] = {"bytes": b"\xff\xd8\xff broken", "path": None}
    path = write_parquet(tmp_path / "RLAIF-V-Dataset_000.parquet", rows)
    result = run("rlaif-v", "--parquet", path, "--out", tmp_path / "out", "--frame-size", 16, "--no-shuffle")
    assert result["written"] == 2 and result["skipped"] == {"bad_image": 1}
    for files, idx in zip(samples(tmp_path / "out").values(), ("rlaif_0", "rlaif_2")):
        m = meta(files)
        assert m["messages"] == [user("What is shown?")] and not any(t["role"] == "assistant" for t in m["messages"])
        assert (m["chosen"], m["rejected"], m["source"], m["id"]) == ("A red rectangle.", "A dog.", "rlaif_v", idx)
        assert decode(files["jpg"]).shape == (16, 24, 3)


def text_rows(n):
    return [{"messages": [user(f"q{i}"), assistant(f"a{i}")], "source": "t", "n": i} for i in range(n)]


def test_shuffle_order_and_shard_split(tmp_path):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", text_rows(20))
    common = ["folder", "--jsonl", jsonl, "--samples-per-shard", 8]
    runs = {name: run(*common, "--out", tmp_path / name, *extra) for name, extra in
            [("s1", ["--shuffle-seed", 1]), ("s1b", ["--shuffle-seed", 1]), ("s2", ["--shuffle-seed", 2]),
             ("plain", ["--no-shuffle"])]}
    assert all(len(r["shards"]) == 3 for r in runs.values())
    assert [sum(1 for _ in read_samples(p)) for p in runs["plain"]["shards"]] == [8, 8, 4]
    order = {name: [meta(f)["n"] for f in samples(tmp_path / name).values()] for name in runs}
    assert order["plain"] == list(range(20))
    assert order["s1"] == order["s1b"] and order["s1"] != order["s2"] and order["s1"] != order["plain"]
    assert sorted(order["s1"]) == sorted(order["s2"]) == list(range(20))
    assert [Path(p).read_bytes() for p in runs["s1"]["shards"]] == [Path(p).read_bytes() for p in runs["s1b"]["shards"]]
    keys = {name: {meta(f)["n"]: k for k, f in samples(tmp_path / name).items()} for name in runs}
    assert keys["s1"] == keys["s2"] == keys["plain"]  # a row keeps its key under any order

    limited = run(*common, "--out", tmp_path / "limit", "--limit", 5)
    assert sorted(meta(f)["n"] for f in samples(tmp_path / "limit").values()) == list(range(5))
    assert limited["written"] == 5


def test_workers_give_the_same_shards(tmp_path, media_dir):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", FOLDER_ROWS * 2)
    common = ["folder", "--jsonl", jsonl, "--media-root", media_dir, "--frame-size", 24, "--samples-per-shard", 5]
    one = run(*common, "--out", tmp_path / "one")
    two = run(*common, "--out", tmp_path / "two", "--workers", 2)
    assert one["skipped"] == two["skipped"] and one["written"] == two["written"] == 12
    assert [Path(p).read_bytes() for p in one["shards"]] == [Path(p).read_bytes() for p in two["shards"]]


def test_main_summary_exit_codes_and_overwrite(tmp_path, media_dir, capsys):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", FOLDER_ROWS)
    argv = ["folder", "--jsonl", str(jsonl), "--media-root", str(media_dir), "--out", str(tmp_path / "out"),
            "--samples-per-shard", "4"]
    assert bs.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "wrote 6 samples in 2 shards" in out
    assert "folder: 10/10 (100%) | " in captured.err and "rows/s" in captured.err  # the progress line
    assert "skipped 4, bad_image=1, bad_json=1, missing_fields=1, missing_file=1" in out
    assert bs.main(argv) == 2  # refuses to mix with existing shards
    assert bs.main(argv[:-1] + ["8", "--overwrite"]) == 0
    assert len(expand(tmp_path / "out")) == 1  # the old second shard is gone

    bad = write_jsonl(tmp_path / "bad.jsonl", FOLDER_ROWS[6:])
    assert bs.main(["folder", "--jsonl", str(bad), "--media-root", str(media_dir), "--out", str(tmp_path / "none")]) == 1
    assert "wrote 0 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bs.parse_args(["smoltalk", "--parquet", "x.parquet", "--out", "o", "--prefix", "has.dot"])
