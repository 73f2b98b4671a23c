"""generate.py: the printed reply equals model.generate on the same decoded frames (video, image, frames
folder, text only; streamed or whole; sampled with a seed), the timing line, the attention GIF, the
camera path against a StreamSession fed the same frames (av.open faked), and every bad input as one
`error:` line naming the flag or file with exit code 2, before the model loads where it can."""

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import generate
from conftest import lively_llm, make_model
from media import decode_image, decode_video
from session import StreamSession
from test_media import write_video

SIZE, TOKENS, VIDEO_FRAMES = 56, 8, 6  # 56 px: a 4 x 4 patch grid of the tiny DINOv2
QUESTION = "What happens?"
NUMBER = r"(-|\d+\.\d\d)"
TIMING = re.compile(rf"^frames (\d+)(?: of (\d+) read)? \| encode {NUMBER} ms/frame \| TTFT {NUMBER} ms \| "
                    rf"{NUMBER} tokens/s$")
REPO = Path(__file__).resolve().parents[1]


def loud(model):
    """Visual tokens strong enough to change a random model's reply (so that the checks can fail)."""
    with torch.no_grad():
        model.dino_to_llm.weight.mul_(20)
    return lively_llm(model)


@pytest.fixture(scope="module")
def saved(tiny_backbones, tmp_path_factory):
    """(the model, its save_pretrained folder)."""
    model = loud(make_model(tiny_backbones))
    folder = tmp_path_factory.mktemp("generate") / "model"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 6-frame mp4, a png, and a folder of 12 numbered pngs (f1 .. f12) with a stray text file."""
    root = tmp_path_factory.mktemp("media")
    write_video(root / "clip.mp4", VIDEO_FRAMES)
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (30, 40, 3)).astype(np.uint8)).save(root / "photo.png")
    folder = root / "frames"
    folder.mkdir()
    for i in range(1, 13):
        Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(folder / f"f{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    return {"video": root / "clip.mp4", "image": root / "photo.png", "frames": folder}


def decoded(media, kind, max_frames=64):
    if kind == "video":
        return decode_video(media["video"].read_bytes(), max_frames, SIZE)
    if kind == "image":
        return decode_image(media["image"].read_bytes(), SIZE)
    if kind == "frames":  # natural order: f1, f2, ..., f12; 5 of 12 kept uniformly: f2, f4, f7, f9, f11
        return torch.stack([decode_image((media["frames"] / f"f{i}.png").read_bytes(), SIZE) for i in (2, 4, 7, 9, 11)])
    return None


def cli(capsys, folder, *argv):
    """main() in-process -> (its result, stdout, stderr lines)."""
    result = generate.main(["--checkpoint", str(folder), "--frame-size", str(SIZE), "--max-new-tokens", str(TOKENS),
                            *map(str, argv), QUESTION])
    out = capsys.readouterr()
    return result, out.out, out.err.splitlines()


def timings(err_lines) -> dict:
    assert len(err_lines) == 1, err_lines
    m = TIMING.match(err_lines[0])
    assert m, err_lines[0]
    value = lambda s: None if s == "-" else float(s)  # noqa: E731
    return {"frames": int(m[1]), "read": int(m[2]) if m[2] else None, "encode": value(m[3]), "ttft": value(m[4]),
            "rate": value(m[5])}


@pytest.mark.parametrize("kind, mode, flags", [
    ("video", "autoregressive", ()), ("video", "coarse_fine", ()), ("video", "coarse_only", ("--stream",)),
    ("image", "autoregressive", ()), ("frames", "coarse_fine", ("--max-frames", 5)), ("text", "autoregressive", ()),
    ("video", "autoregressive", ("--stream",))])
def test_reply_equals_generate(saved, media, capsys, kind, mode, flags):
    model, folder = saved
    frames = decoded(media, kind)
    expected = model.generate(frames, QUESTION, max_new_tokens=TOKENS, mode=mode)
    source = () if kind == "text" else (f"--{kind}", media[kind])
    result, out, err = cli(capsys, folder, *source, "--mode", mode, *flags)
    assert out == expected + "\n" and result["reply"] == expected and expected.strip()
    t = timings(err)
    assert t["frames"] == {"video": VIDEO_FRAMES, "image": 1, "frames": 5, "text": 0}[kind]  # frames encoded
    assert (t["encode"] is None) == (kind == "text") and (t["encode"] is None or t["encode"] > 0)
    assert t["ttft"] > 0 and t["rate"] > 0


def test_replies_depend_on_the_media(saved, media):
    """The checks above can fail: each source gets its own reply."""
    model = saved[0]
    replies = {kind: model.generate(decoded(media, kind), QUESTION, max_new_tokens=TOKENS)
               for kind in ("video", "image", "frames", "text")}
    assert len(set(replies.values())) == 4, replies


def test_frames_folder_natural_order(media):
    args = generate.build_parser().parse_args(["--checkpoint", "x", "--frames", str(media["frames"]), "--max-frames",
                                               "5", "--frame-size", str(SIZE), QUESTION])
    assert [p.name for p in generate.frame_files(media["frames"])] == [f"f{i}.png" for i in range(1, 13)]
    assert torch.equal(generate.read_media(args), decoded(media, "frames"))


def test_sampling_with_a_seed(saved, media, capsys):
    model, folder = saved
    frames = decoded(media, "video")
    torch.manual_seed(7)
    expected = model.generate(frames, QUESTION, max_new_tokens=TOKENS, temperature=1.5, top_p=0.9)
    assert expected != model.generate(frames, QUESTION, max_new_tokens=TOKENS)  # sampling changed it
    result = cli(capsys, folder, "--video", media["video"], "--temperature", 1.5, "--top-p", 0.9, "--seed", 7)[0]
    assert result["reply"] == expected


@pytest.mark.parametrize("kind, mode, panels, n_frames", [("video", "autoregressive", 3, VIDEO_FRAMES),
                                                          ("image", "coarse_only", 2, 8)])
def test_attention_gif(saved, media, capsys, tmp_path, kind, mode, panels, n_frames):
    """One GIF frame per visual token (an image: image_frames tokens of one frame): the frame, then the
    static and (not in coarse_only) the dynamic query's attention."""
    model, folder = saved
    gif = tmp_path / "looked.gif"
    result, out, _ = cli(capsys, folder, f"--{kind}", media[kind], "--mode", mode, "--attention", gif)
    assert result["attention"] == str(gif) and out == model.generate(decoded(media, kind), QUESTION, mode=mode,
                                                                     max_new_tokens=TOKENS) + "\n"
    with Image.open(gif) as im:
        assert im.n_frames == n_frames
        side = max(SIZE, generate.GIF_PANEL)
        assert im.size == (panels * side, side + generate.GIF_HEADER)
        im.seek(n_frames - 1)
        im.convert("RGB").save(tmp_path / "last.png")  # for a look
    looked = generate.attention_maps(model, decoded(media, kind), QUESTION, mode)  # looked.attention_maps
    token_frame, maps = looked["token_frame"], looked["maps"]
    assert token_frame == list(range(VIDEO_FRAMES)) if kind == "video" else token_frame == [0] * 8
    assert (maps["dynamic"] is None) == (mode == "coarse_only")
    assert maps["static"].shape == (n_frames, 4, 4) and (maps["static"].sum((1, 2)) <= 1 + 1e-5).all()


class FakeCamera:
    """av.open's stand-in: a container whose stream yields `frames` at 10 fps."""

    def __init__(self, frames):
        self.frames, self.opened = frames, []

    def __call__(self, path, format=None):
        self.opened.append((path, format))
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass

    def decode(self, video=0):
        for i, array in enumerate(self.frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            yield frame


@pytest.mark.parametrize("mode, max_frames, skip", [("autoregressive", 64, 2), ("coarse_only", 3, 1)])
def test_camera_equals_a_stream_session(saved, capsys, monkeypatch, mode, max_frames, skip):
    """--seconds 0.65 of a 10-fps stream: frames 0 .. 6 (7 read), every --skip-th into the session; with
    --max-frames 3 the window evicts (sink 2 + window 1)."""
    model, folder = saved
    rng = np.random.RandomState(2)
    arrays = [rng.randint(0, 256, (48, 64, 3)).astype(np.uint8) for _ in range(10)]
    camera = FakeCamera(arrays)
    monkeypatch.setattr(av, "open", camera)
    result, out, err = cli(capsys, folder, "--camera", 3, "--seconds", 0.65, "--skip", skip, "--mode", mode,
                           "--max-frames", max_frames)
    assert camera.opened == [("/dev/video3", "v4l2")] * 2  # checked before loading, then read
    sink = min(generate.SINK, max_frames - 1)
    session = StreamSession(model, mode=mode, frame_size=SIZE, window=max_frames - sink, sink=sink, skip=skip)
    for array in arrays[:7]:
        session.add_frame(array)
    expected = session.ask(QUESTION, max_new_tokens=TOKENS)
    assert out == expected + "\n" and expected.strip()
    assert session.evicted == (4 if max_frames == 3 else 0)
    t = timings(err)
    added = len(range(0, 7, skip))
    assert t["frames"] == added and t["read"] == (7 if skip > 1 else None)
    assert t["encode"] > 0 and t["ttft"] > 0 and t["rate"] > 0


@pytest.fixture(scope="module")
def pooled(tiny_backbones, tmp_path_factory):
    """The multi-token baseline (4 pooled tokens a frame, no queries) and its folder."""
    model = loud(make_model(tiny_backbones, tokens_per_frame=4))
    folder = tmp_path_factory.mktemp("pooled") / "model"
    model.save_pretrained(folder)
    return model, folder


def test_pooled_baseline(pooled, media, capsys):
    """The baseline generates (every mode its one pass) and its encode (pooled tokens) is timed too."""
    model, folder = pooled
    expected = model.generate(decoded(media, "video"), QUESTION, max_new_tokens=TOKENS)
    result, out, err = cli(capsys, folder, "--video", media["video"], "--mode", "coarse_fine")
    assert out == expected + "\n" and expected.strip()
    t = timings(err)
    assert t["frames"] == VIDEO_FRAMES and t["encode"] > 0 and t["ttft"] > 0


def test_errors(saved, media, pooled, capsys, monkeypatch, tmp_path):
    """Each bad input -> exit 2 and one `error:` line naming the flag / file; those found before the model
    loads never load it."""
    folder = saved[1]
    garbage_video, garbage_image, garbage_ckpt = tmp_path / "bad.mp4", tmp_path / "bad.png", tmp_path / "bad.pt"
    garbage_video.write_bytes(b"\x00not a video" * 50)
    garbage_image.write_bytes(b"not an image")
    garbage_ckpt.write_bytes(b"not a checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    missing = tmp_path / "missing.mp4"
    before_loading = [  # (argv, what the message must name)
        (["--video", missing], [str(missing), "--video"]),
        (["--video", garbage_video], [str(garbage_video), "--video"]),
        (["--image", tmp_path / "nope.png"], ["nope.png", "--image"]),
        (["--image", garbage_image], [str(garbage_image), "--image"]),
        (["--frames", empty], [str(empty), "--frames"]),
        (["--frames", tmp_path / "nowhere"], ["nowhere", "--frames"]),
        (["--video", media["video"], "--image", media["image"]], ["--video", "--image"]),
        (["--attention", tmp_path / "a.gif"], ["--attention"]),  # text only: nothing to draw
        (["--camera", 0, "--attention", tmp_path / "a.gif"], ["--attention", "--camera"]),
        (["--video", media["video"], "--attention", tmp_path / "no" / "a.gif"], ["--attention"]),
        (["--camera", 0, "--mode", "coarse_fine"], ["--mode", "--camera"]),
        (["--camera", 0, "--skip", 11], ["--skip"]),
        (["--video", media["video"], "--top-p", 0], ["--top-p"]),
        (["--max-new-tokens", 0], ["--max-new-tokens"]),
    ]
    loaded = []
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: loaded.append(a))
    cases = [(["--checkpoint", folder, *argv], names) for argv, names in before_loading]
    cases.append((["--checkpoint", tmp_path / "nothing"], ["--checkpoint", "nothing"]))
    for argv, names in cases:
        _expect_error(capsys, argv, names)
    assert not loaded
    monkeypatch.undo()
    for argv, names in [
        (["--checkpoint", folder, "--camera", 99], ["--camera 99", "/dev/video99"]),  # no such device
        (["--checkpoint", garbage_ckpt], ["--checkpoint", str(garbage_ckpt)]),
        (["--checkpoint", folder, "--frame-size", 50], ["--frame-size"]),
        (["--checkpoint", pooled[1], "--video", media["video"], "--attention", tmp_path / "a.gif"],
         ["--attention", "pooled"]),
    ]:
        _expect_error(capsys, argv, names)
    monkeypatch.setattr(av, "open", FakeCamera([]))  # a camera that yields no frame (found after loading)
    _expect_error(capsys, ["--checkpoint", folder, "--camera", 5], ["--camera 5", "/dev/video5"])


def _expect_error(capsys, argv, names):
    with pytest.raises(SystemExit) as exit_:
        generate.main([*map(str, argv), QUESTION])
    out = capsys.readouterr()
    assert exit_.value.code == 2, argv
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not out.out, (argv, out)
    for name in names:
        assert name in lines[0], (argv, lines[0])


def test_exit_code_of_the_command(saved, tmp_path):
    """The real process: one `error:` line and exit code 2 (argparse's and ours)."""
    missing = tmp_path / "missing.mp4"
    for argv, name in ((["--video", str(missing)], str(missing)),
                       (["--video", "a.mp4", "--image", "b.png"], "--image")):
        proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(saved[1]), *argv, QUESTION],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and not proc.stdout
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and name in proc.stderr
