"""Frame sampling edge cases and decoding (both video decoders, damaged and empty videos, images)."""

import io
import zlib

import av
import numpy as np
import pytest
import torch

import media
from media import EmptyVideo, MediaError, decode_image, decode_video, encode_jpeg, sample_frame_indices

DECODERS = ["pyav"] + (["decord"] if media.decord is not None else [])
BLOCK = 16  # frame i carries the brightness 6 * i in its top-left 16x16 block; the rest is noise


def write_video(path, n, fps=10, faststart=False):
    rng = np.random.RandomState(0)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            a = rng.randint(0, 256, (48, 64, 3)).astype(np.uint8)
            a[:BLOCK, :BLOCK] = 6 * i
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def frame_numbers(frames):
    return [round(f[:, 2:BLOCK - 2, 2:BLOCK - 2].float().mean().item() / 6) for f in frames]


@pytest.fixture
def decoder(request, monkeypatch):
    if request.param == "pyav":
        monkeypatch.setattr(media, "decord", None)
    return request.param


@pytest.mark.parametrize("n, k, expected", [
    (0, 8, []),
    (5, 8, [0, 1, 2, 3, 4]),
    (1, 8, [0]),
    (8, 8, list(range(8))),
    (100, 4, [12, 37, 62, 87]),
])
def test_sample_frame_indices(n, k, expected):
    assert sample_frame_indices(n, k) == expected


def test_sample_frame_indices_spread_and_fps():
    index = sample_frame_indices(1000, 64)
    gaps = {b - a for a, b in zip(index, index[1:])}
    assert len(index) == 64 and gaps <= {15, 16} and abs(index[0] - (999 - index[-1])) <= 1
    assert len(sample_frame_indices(300, 64, fps=30, target_fps=1.0)) == 10  # a 10 s clip at 1 fps
    assert len(sample_frame_indices(300, 4, fps=30, target_fps=1.0)) == 4
    assert len(sample_frame_indices(10, 64, fps=30, target_fps=1.0)) == 1  # shorter than a second
    assert len(sample_frame_indices(300, 64, fps=0, target_fps=1.0)) == 64  # unknown rate: count only
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)


@pytest.mark.parametrize("decoder", DECODERS, indirect=True)
def test_decode_video_samples_uniformly(tmp_path, decoder):
    data = write_video(tmp_path / "v.mp4", 40)
    frames = decode_video(data, 8)
    assert frames.shape == (8, 3, 48, 64) and frames.dtype == torch.uint8
    assert frame_numbers(frames) == sample_frame_indices(40, 8)
    assert decode_video(data, 64, size=28).shape == (40, 3, 28, 28)
    assert frame_numbers(decode_video(data, 64, target_fps=1.0)) == sample_frame_indices(40, 4)  # 4 s


@pytest.mark.parametrize("decoder", DECODERS, indirect=True)
def test_damaged_tail_samples_over_the_frames_that_decode(tmp_path, decoder):
    data = write_video(tmp_path / "v.mp4", 40, faststart=True)  # header first: it still claims 40 frames
    cut = data[: int(len(data) * 0.6)]
    numbers = frame_numbers(decode_video(cut, 8))
    assert len(numbers) == 8 and numbers == sorted(set(numbers))
    assert 16 <= numbers[-1] < 26  # spread over the ~24 decodable frames, not the claimed 40


@pytest.mark.parametrize("decoder", DECODERS, indirect=True)
def test_empty_and_garbage_videos(tmp_path, decoder):
    source = write_video(tmp_path / "v.mp4", 5)
    buf = io.BytesIO()
    with av.open(io.BytesIO(source)) as src, av.open(buf, "w", format="matroska") as out:
        out.add_stream_from_template(src.streams.video[0])
        out.start_encoding()  # a header, no frames
    with pytest.raises(EmptyVideo):
        decode_video(buf.getvalue(), 8)
    with pytest.raises(MediaError) as e:
        decode_video(b"\x00\x00\x00\x18ftypmp42" + bytes(500), 8)
    assert not isinstance(e.value, EmptyVideo)


def test_decode_image_resize_modes():
    img = torch.zeros(3, 60, 120, dtype=torch.uint8)
    img[0] = 255  # red everywhere, a green square in the middle
    img[:, 20:40, 50:70] = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)
    png = io.BytesIO()
    from PIL import Image
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(png, format="PNG")
    for data in (png.getvalue(), encode_jpeg(img, quality=95)):
        assert decode_image(data).shape == (3, 60, 120)
        fill = (124, 116, 104)  # e.g. the ImageNet mean (a backbone's pad_fill)
        squash, crop, pad = (decode_image(data, 30, mode, fill) for mode in ("squash", "crop", "pad"))
        assert squash.shape == crop.shape == pad.shape == (3, 30, 30)
        assert pad[:, :5].float().sub(torch.tensor(fill).view(3, 1, 1)).abs().max() < 8  # letterbox
        assert pad[0, 15, 2] > 200 and crop[0, 2, 2] > 200  # red content kept at the sides
        green = lambda x: (x[1] > 150).float().mean().item()  # noqa: E731
        assert green(crop) > green(squash) > green(pad) > 0  # crop zooms in, pad shrinks
    with pytest.raises(MediaError):
        decode_image(b"\xff\xd8\xff" + bytes(100), 30)
    with pytest.raises(ValueError):
        decode_image(png.getvalue(), 30, "zoom")
    with pytest.raises(ValueError, match="needs the fill colour"):
        decode_image(png.getvalue(), 30, "pad")


def test_short_side_resize_exif_rotation_and_transparency():
    from PIL import Image

    wide = torch.zeros(2, 3, 60, 120, dtype=torch.uint8)
    assert media.resize(wide, 30, "short").shape == (2, 3, 30, 60)  # aspect kept, nothing cut
    pil = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (3, 40, 20)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert (decode_image(buf.getvalue()) == 255).all()  # shown on white, not black


def test_jpeg_header_size_and_both_jpeg_decoders_agree(monkeypatch):
    from PIL import Image

    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    exif = pil.getexif()
    exif[0x010F] = "maker"  # an APP1 segment before the frame header
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    assert media._jpeg_size(data) == (53, 37) and media._jpeg_size(b"\xff\xd8\xff\xe0") is None
    if media.decode_jpeg is None:
        pytest.skip("torchvision is not installed: Pillow is the only JPEG decoder")
    fast = decode_image(data, 28)
    monkeypatch.setattr(media, "decode_jpeg", None)
    slow = decode_image(data, 28)
    assert (fast.int() - slow.int()).abs().max() <= 2  # same libjpeg family, same resize


def png16(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): pixels uint16 [H, W, C] in
    the channel layout of color_type (0 gray, 4 gray+alpha, 2 RGB, 6 RGBA)."""
    height, width = pixels.shape[:2]

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 on every row
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, color_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("color_type, channels", [(0, 1), (4, 2), (2, 3), (6, 4)])
def test_16_bit_pngs_scale_to_8_bits(color_type, channels):
    from PIL import Image

    rng = np.random.default_rng(color_type)
    pixels = rng.integers(0, 65536, (6, 5, channels), dtype=np.uint16)
    pixels[0, :3, 0] = [0, 65535, 257 * 100]  # black, white, and a value that scales exactly
    if channels in (2, 4):
        pixels[..., -1] = 65535  # opaque: the colour is not blended with the white background
    colour = pixels[..., : 3 if channels >= 3 else 1]
    scaled = np.round(colour.astype(np.float64) * 255 / 65535).astype(np.int64)
    expected = torch.from_numpy(scaled).permute(2, 0, 1).expand(3, -1, -1)  # gray: the same in R, G and B
    decoded = decode_image(png16(pixels, color_type))
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 6, 5)
    assert (decoded.long() - expected).abs().max() <= 1, color_type
    if color_type == 0:  # also as Pillow writes it (from a uint16 array)
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0]).save(buf, format="PNG")
        assert Image.open(buf).mode.startswith("I;16")
        assert (decode_image(buf.getvalue()).long() - expected).abs().max() <= 1
        for wide in (pixels[..., 0].astype(np.int32), pixels[..., 0].astype(">u2")):  # modes I and I;16B
            assert (media.pil_to_tensor(Image.fromarray(wide)).long() - expected).abs().max() <= 1


def test_8_bit_pngs_are_unchanged():
    from PIL import Image

    rng = np.random.default_rng(0)
    for pixels in (rng.integers(0, 256, (6, 5), dtype=np.uint8), rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        expected = torch.from_numpy(pixels if pixels.ndim == 3 else np.stack([pixels] * 3, -1)).permute(2, 0, 1)
        assert torch.equal(decode_image(buf.getvalue()), expected)


@pytest.mark.parametrize("decoder", DECODERS, indirect=True)
def test_undecodable_bytes_give_one_error_line_and_nothing_on_stderr(decoder, capfd):
    """decord's logger would print the input itself as the file's name; it never sees bytes FFmpeg
    cannot open, so the one MediaError is all the user gets."""
    junk = b"MARKER-not-a-video " * 200
    with pytest.raises(MediaError, match="undecodable video"):
        decode_video(junk, 4, 28)
    assert b"MARKER" not in capfd.readouterr().err.encode()
