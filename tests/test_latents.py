"""Latent targets and their precomputation: the pixel target's block means, encode/decode against the
diffusers calls they wrap (tiny random AutoencoderKL / AutoencoderTiny saved in the test, never
downloaded), clear errors for models that cannot be loaded, scripts/precompute_latents.py end to end
(video files converted, bad samples counted, resume), and the loader's latents belonging to exactly
the frames it returns."""

import io
import json
import time

import numpy as np
import pytest
import torch

import latents
from conftest import load_script
from data import SampleSpec, decode_sample
from media import decode_image, encode_jpeg, resize
from shards import ShardWriter, read_samples
from test_data import conversation
from test_media import write_video

diffusers = pytest.importorskip("diffusers")

SIZE = 32  # the tiny autoencoders downsample by 2: latents [4, 16, 16]


precompute = load_script("precompute_latents")


def random_frames(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """{kind: folder} of tiny random autoencoders of each kind (one 2x downsampling, 4 latent channels)."""
    root = tmp_path_factory.mktemp("autoencoders")
    torch.manual_seed(0)
    kl = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                 layers_per_block=1, sample_size=SIZE)
    tiny = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                     num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    kl.save_pretrained(root / "vae")
    tiny.save_pretrained(root / "taesd")
    return {"vae": str(root / "vae"), "taesd": str(root / "taesd")}


# --- the targets ------------------------------------------------------------------------------

def test_pixel_target_is_the_block_mean_scaled_to_minus_one_one():
    frames = random_frames(2, 3, 8, 12)
    target = latents.pixel_target(frames, 4)
    assert target.shape == (2, 3, 4, 4) and target.dtype == torch.float32
    # rows in blocks of 2, columns in blocks of 3
    manual = frames.double().reshape(2, 3, 4, 2, 4, 3).mean(dim=(3, 5)) / 127.5 - 1
    torch.testing.assert_close(target.double(), manual, rtol=0, atol=1e-6)
    extremes = latents.pixel_target(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 8, 8), 2)
    assert extremes[0].eq(-1).all() and extremes[1].eq(1).all()
    with pytest.raises(ValueError, match=r"uint8 frames \[N, 3, H, W\], got torch.float32"):
        latents.pixel_target(frames.float(), 4)


@pytest.mark.parametrize("kind,mode,fill", [("vae", "pad", (255, 0, 0)), ("taesd", "crop", None)])
def test_encode_and_decode_wrap_the_diffusers_calls(autoencoders, kind, mode, fill):
    ae = latents.load_autoencoder(autoencoders[kind], kind)
    frames = random_frames(5, 3, 20, 28)
    z = latents.encode(ae, frames, SIZE, mode, fill, batch_size=2)
    assert z.shape == (5, 4, SIZE // 2, SIZE // 2) and z.dtype == torch.float32
    x = resize(frames, SIZE, mode, fill).float() / 127.5 - 1
    with torch.no_grad():
        out = ae.encode(x)
        raw = out.latent_dist.mean if kind == "vae" else out.latents
        decoded = ae.decode(raw).sample
    scale = {"vae": 0.18215, "taesd": 1.0}[kind]  # SD's latent scale; TAESD's latents are already scaled
    torch.testing.assert_close(z, raw * scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents.encode(ae, frames, SIZE, mode, fill, batch_size=16), z, rtol=1e-4, atol=1e-5)
    images = latents.decode(ae, z, batch_size=3)
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == torch.uint8
    expected = ((decoded.clamp(-1, 1) + 1) * 127.5).round()
    assert (images.float() - expected).abs().max() <= 1


def test_load_autoencoder_refuses_the_other_kind_and_missing_folders(autoencoders, tmp_path):
    with pytest.raises(latents.LatentModelError, match="holds an AutoencoderTiny, but target 'vae' needs an "
                                                       "AutoencoderKL"):
        latents.load_autoencoder(autoencoders["taesd"], "vae")
    with pytest.raises(latents.LatentModelError, match=r"--model='.*missing': no such folder"):
        latents.load_autoencoder(str(tmp_path / "missing"), "taesd", setting="--model")
    with pytest.raises(ValueError, match="kind must be one of"):
        latents.load_autoencoder(autoencoders["taesd"], "pixels")


def test_an_unloadable_hub_model_is_a_clear_error_at_once(monkeypatch):
    calls = []

    def offline(name, **kwargs):  # what diffusers raises offline for a model not in the cache
        calls.append(kwargs.get("local_files_only", False))
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    start = time.perf_counter()
    with pytest.raises(latents.LatentModelError) as e:
        latents.load_autoencoder("stabilityai/sd-vae-ft-mse", "vae", setting="objectives.latent.model")
    assert time.perf_counter() - start < 2
    message = str(e.value)
    assert message.startswith("objectives.latent.model='stabilityai/sd-vae-ft-mse'")
    assert "couldn't connect" in message and "scripts/precompute_latents.py --target vae" in message
    assert "objectives.latent.model=DIR" in message  # or a local folder
    assert calls == [True, False]  # the cache first, then the hub


def test_without_diffusers_the_error_says_what_to_install(monkeypatch, autoencoders):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # import diffusers raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'diffusers>="):
        latents.load_autoencoder(autoencoders["vae"], "vae")


# --- precompute_latents.py -------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """data/sft: synthetic frame clips (make_synthetic.py); data/extra: a video file, a text-only
    sample, an image, and two bad samples. Returns (root, {key: files} of the inputs)."""
    root = tmp_path_factory.mktemp("data")
    load_script("make_synthetic").main(["--out", str(root / "synthetic"), "--size", "4", "--frames", "3",
                                        "--frame-size", "96", "--object-scale", "0.2", "--distractors", "0", "2"])
    (root / "synthetic" / "sft").rename(root / "sft")
    video = write_video(root / "clip.mp4", 12, fps=4)  # 3 s: 3 frames at 1 fps
    with ShardWriter(root / "extra", prefix="extra") as w:
        w.write("video", {"json": conversation("video"), "mp4": video})
        w.write("text", {"json": conversation("text")})
        w.write("image", {"json": conversation("image"), "jpg": encode_jpeg(random_frames(3, 40, 30))})
        w.write("badframe", {"json": conversation("badframe"), "000.jpg": encode_jpeg(random_frames(3, 40, 30)),
                             "001.jpg": b"\xff\xd8\xffgarbage"})
        w.write("mixed", {"json": conversation("mixed"), "jpg": encode_jpeg(random_frames(3, 8, 8)),
                          "000.jpg": encode_jpeg(random_frames(3, 8, 8))})
    inputs = {k: f for d in ("sft", "extra") for p in sorted((root / d).glob("*.tar")) for k, f in read_samples(p)}
    return root, inputs


def run_precompute(root, out, model, *extra):
    return precompute.main(["--shards", str(root / "sft"), str(root / "extra"), "--out", str(out), "--target", "taesd",
                            "--model", model, "--size", str(SIZE), "--device", "cpu", "--batch-size", "4", *extra])


def test_precompute_writes_every_good_sample_with_latents_and_resumes(dataset, autoencoders, tmp_path, capsys):
    root, inputs = dataset
    out = tmp_path / "out"
    assert run_precompute(root, out, autoencoders["taesd"]) == 0
    shards = {p.relative_to(out).as_posix(): p for p in out.rglob("*.tar")}
    assert sorted(shards) == ["extra/extra-00000.tar", "sft/sft-00000.tar"]  # the inputs' layout
    written = {k: f for p in shards.values() for k, f in read_samples(p)}
    assert sorted(written) == sorted(set(inputs) - {"badframe", "mixed"})
    assert written["text"] == inputs["text"]  # text only: copied as it was
    for key, files in written.items():
        if key == "text":
            continue
        frames = 1 if key == "image" else len([ext for ext in files if ext[:3].isdigit()])
        z = np.load(io.BytesIO(files["latents.npy"]), allow_pickle=False)
        assert z.dtype == np.float16 and z.shape == (frames, 4, SIZE // 2, SIZE // 2), key
        if key != "video":  # the same members, plus the latents
            assert {ext: d for ext, d in files.items() if ext != "latents.npy"} == inputs[key]
    video = written["video"]
    assert "mp4" not in video and sorted(video) == ["000.jpg", "001.jpg", "002.jpg", "json", "latents.npy"]
    # the latents are those of the stored frames, decoded as the loader decodes them
    ae = latents.load_autoencoder(autoencoders["taesd"], "taesd")
    key = next(k for k in written if k not in ("text", "video", "image"))
    frames = torch.stack([decode_image(written[key][f"{i:03d}.jpg"], SIZE) for i in range(3)])
    torch.testing.assert_close(torch.from_numpy(np.load(io.BytesIO(written[key]["latents.npy"]))).float(),
                               latents.encode(ae, frames, SIZE), rtol=2e-3, atol=2e-3)
    summary = json.loads((out / "latents.json").read_text())
    assert summary["totals"]["skipped"] == {"bad_image": 1, "mixed_media": 1}
    assert summary["totals"]["videos_converted"] == 1 and summary["totals"]["text_only"] == 1
    assert summary["totals"]["samples"] == len(written)
    printed = capsys.readouterr().out
    assert "skipped bad_image 1, mixed_media 1" in printed and "samples/s" in printed

    # Resume: finished shards are skipped; an interrupted one (its temporary folder left) is redone.
    before = {name: p.read_bytes() for name, p in shards.items()}
    sft_mtime = shards["sft/sft-00000.tar"].stat().st_mtime_ns
    shards["extra/extra-00000.tar"].unlink()
    (out / "extra" / ".extra-00000.tar.partial").mkdir()
    (out / "extra" / ".extra-00000.tar.partial" / "part-00000.tar.partial").write_bytes(b"half a shard")
    assert run_precompute(root, out, autoencoders["taesd"]) == 0
    printed = capsys.readouterr().out
    assert "2 input shards, 1 already done" in printed and "[1/1] extra/extra-00000.tar" in printed
    assert {name: p.read_bytes() for name, p in shards.items()} == before  # deterministic
    assert shards["sft/sft-00000.tar"].stat().st_mtime_ns == sft_mtime
    assert not list(out.rglob("*.partial"))
    assert json.loads((out / "latents.json").read_text())["totals"] == summary["totals"]

    # other settings into the same folder would mix two kinds of latents
    assert run_precompute(root, out, autoencoders["taesd"], "--resize", "crop") == 2
    assert "resize: 'squash' then, 'crop' now" in capsys.readouterr().err


def test_precompute_with_an_unloadable_model_fails_before_reading_shards(dataset, tmp_path, monkeypatch, capsys):
    root, _ = dataset

    def offline(name, **kwargs):
        raise OSError(f"{name} does not appear to have a file named config.json")

    def no_reading(*args, **kwargs):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(diffusers.AutoencoderTiny, "from_pretrained", offline)
    monkeypatch.setattr(precompute, "read_samples", no_reading)
    assert run_precompute(root, tmp_path / "out", "madebyollin/taesd") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model='madebyollin/taesd': cannot load") and "precompute_latents.py" in err
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_the_loader_returns_the_latents_of_exactly_the_frames_it_returns(autoencoders, tmp_path, smollm2_tokenizer):
    """7 distinct stored frames thinned to 3 by the loader: its latents are encode() of its frames (the
    frames are stored at the loader's size, so the loader's frames are the encoder's input)."""
    clip = random_frames(7, 3, SIZE, SIZE, seed=1)
    with ShardWriter(tmp_path / "in") as w:
        w.write("clip", {"json": conversation("clip"), **{f"{i:03d}.jpg": encode_jpeg(f) for i, f in enumerate(clip)}})
        w.write("image", {"json": conversation("image"), "png": _png(random_frames(3, SIZE, SIZE, seed=2))})
        w.write("video", {"json": conversation("video"), "mp4": write_video(tmp_path / "v.mp4", 12, fps=4)})
    assert precompute.main(["--shards", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--target", "vae",
                            "--model", autoencoders["vae"], "--size", str(SIZE), "--device", "cpu"]) == 0
    ae = latents.load_autoencoder(autoencoders["vae"], "vae")
    spec = SampleSpec(frame_size=SIZE, max_frames=3, latents=True)
    written = read_samples(tmp_path / "out" / "shard-00000.tar")
    samples = {k: decode_sample(k, f, spec, smollm2_tokenizer) for k, f in written}
    for key, s in samples.items():
        frames = s["frames"] if s["frames"].dim() == 4 else s["frames"][None]
        assert s["latents"].dtype == torch.float16 and s["latents"].shape == (len(frames), 4, SIZE // 2, SIZE // 2)
        expected = latents.encode(ae, frames, SIZE)
        torch.testing.assert_close(s["latents"].float(), expected, rtol=2e-3, atol=2e-3, msg=key)
    assert samples["clip"]["frames"].shape[0] == 3
    # a test that can fail: the first three stored frames (no thinning) give other latents
    unthinned = latents.encode(ae, torch.stack([decode_image(encode_jpeg(f), SIZE) for f in clip[:3]]), SIZE)
    assert not torch.allclose(samples["clip"]["latents"].float(), unthinned, rtol=2e-3, atol=2e-3)


def _png(frame):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()
