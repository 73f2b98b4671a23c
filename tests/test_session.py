"""session.py: a stream of frames then a question answers exactly as generate() on those frames; a
question leaves no trace; frame skipping; the window evicts with valid positions (the key rotation
checked against keys computed at the target position) and memory stays flat; bad settings refused."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import lively_llm, make_model
from session import StreamSession, shift_keys

SIZE = 28
QUESTION = "What happens in the video?"


def loud(model):
    """Visual tokens strong enough to change a random model's reply (so that the checks can fail)."""
    with torch.no_grad():
        model.dino_to_llm.weight.mul_(20)
    return lively_llm(model)


@pytest.fixture(scope="module")
def model(tiny_backbones):
    return loud(make_model(tiny_backbones))


@pytest.fixture(scope="module")
def pooled(tiny_backbones):
    return loud(make_model(tiny_backbones, tokens_per_frame=4))


def clip(n, seed=0):
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def fed(model, frames, **kwargs):
    session = StreamSession(model, frame_size=SIZE, **kwargs)
    for frame in frames:
        session.add_frame(frame)
    return session


@pytest.mark.parametrize("which, mode", [("model", "autoregressive"), ("model", "coarse_only"), ("pooled", "coarse_only")])
def test_frames_then_ask_equals_generate(which, mode, request):
    m = request.getfixturevalue(which)
    replies = set()
    for seed, n in ((0, 5), (1, 3)):
        frames = clip(n, seed)
        reply = fed(m, frames, mode=mode).ask(QUESTION, max_new_tokens=10)
        assert reply == m.generate(frames, QUESTION, max_new_tokens=10, mode=mode)
        replies.add(reply)
    assert len(replies) == 2 and all(replies)  # the replies depend on the frames: the check can fail


def test_a_question_leaves_no_trace(model):
    frames = clip(6)
    session = fed(model, frames[:3])
    first = session.ask(QUESTION, max_new_tokens=8)
    assert session.ask(QUESTION, max_new_tokens=8) == first  # twice: the same answer
    assert session.cache_tokens == 3
    pieces = session.ask("Describe it.", max_new_tokens=8, stream=True)
    next(pieces)
    with pytest.raises(RuntimeError, match="add_frame during a streamed answer"):
        session.add_frame(frames[3])
    pieces.close()  # an abandoned stream leaves the frames' cache as it was
    for frame in frames[3:]:
        session.add_frame(frame)
    assert session.ask(QUESTION, max_new_tokens=8) == fed(model, frames).ask(QUESTION, max_new_tokens=8)
    assert "".join(session.ask(QUESTION, max_new_tokens=8, stream=True)) == session.ask(QUESTION, max_new_tokens=8)
    s = session.summary()
    assert s["frames_added"] == 6 and s["ttft_ms"] > 0 and s["encode_ms"] > 0 and s["llm_ms"] > 0


def test_frame_skipping_and_input_forms(model):
    frames = clip(9)
    skipping = fed(model, frames, skip=3)
    assert skipping.frames_seen == 9 and skipping.frames_added == 3
    assert skipping.ask(QUESTION, max_new_tokens=8) == fed(model, frames[::3]).ask(QUESTION, max_new_tokens=8)
    # a PIL image and an HWC array of the same pixels, at another size, are resized the same way
    big = torch.nn.functional.interpolate(frames[:2].float(), size=(56, 42)).round().to(torch.uint8)
    forms = [StreamSession(model, frame_size=SIZE).pixels(f) for f in
             (big[0], Image.fromarray(big[0].permute(1, 2, 0).numpy()), big[0].permute(1, 2, 0).numpy())]
    assert forms[0].shape == (1, 3, SIZE, SIZE) and all(torch.equal(forms[0], f) for f in forms[1:])
    with pytest.raises(ValueError, match="uint8 \\[3, H, W\\] tensor"):
        StreamSession(model, frame_size=SIZE).add_frame(torch.rand(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
        StreamSession(model, frame_size=SIZE).add_frame(np.zeros((SIZE, SIZE), np.uint8))


def test_shifted_keys_equal_keys_computed_at_the_new_position(model):
    """A lone token's hidden states do not depend on its position (it attends only to itself), so its
    cached keys at position 7 shifted by -3 must equal its keys cached at position 4, in every layer."""
    emb = torch.randn(1, 1, model.llm.config.hidden_size)
    caches = {}
    for p in (7, 4):
        caches[p] = model.new_cache(1)
        model.append(caches[p], emb, torch.tensor([[p]]))
    inv_freq = model.llm.model.rotary_emb.inv_freq
    for a, b in zip(caches[7].kv.layers, caches[4].kv.layers):
        assert not torch.allclose(a.keys, b.keys)  # the positions matter...
        torch.testing.assert_close(shift_keys(a.keys, -3, inv_freq), b.keys, atol=1e-5, rtol=1e-5)  # ...and shift


def test_window_evicts_after_the_sink_and_keeps_positions_dense(model, pooled):
    frames = clip(40)
    for m, per_frame in ((model, 1), (pooled, 4)):
        mode = "autoregressive" if m is model else "coarse_only"
        session = fed(m, frames, mode=mode, window=5, sink=2)
        assert session.frames_in_cache == 7 and session.evicted == 33 and session.cache_tokens == 7 * per_frame
        assert all(layer.keys.shape[2] == 7 * per_frame for layer in session.cache.kv.layers)
        assert session.ask(QUESTION, max_new_tokens=6)  # answers from the window
        assert session.cache_tokens == 7 * per_frame
    # a window never reached changes nothing
    big = fed(model, frames[:6], window=10)
    assert big.evicted == 0 and big.ask(QUESTION, max_new_tokens=8) == fed(model, frames[:6]).ask(QUESTION, max_new_tokens=8)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_memory_stays_flat_over_ten_thousand_frames(model):
    session = StreamSession(model, frame_size=SIZE, window=16, sink=4)
    frame = clip(1)[0]
    rss = {}
    for i in range(1, 10_001):
        session.add_frame(frame)
        if i % 2000 == 0:
            session.ask(QUESTION, max_new_tokens=4)
            rss[i] = _rss_bytes()
    assert session.cache_tokens == 20 and session.evicted == 10_000 - 20
    growth = rss[10_000] - rss[2000]
    assert growth < 8 * 2 ** 20, f"resident memory grew by {growth / 2 ** 20:.1f} MiB from frame 2,000 to 10,000"


def test_bad_settings_are_refused(model, pooled, tiny_backbones):
    with pytest.raises(ValueError, match="coarse_fine reads the whole clip twice"):
        StreamSession(model, mode="coarse_fine")
    with pytest.raises(ValueError, match="mode autoregressive needs the foveated model's queries; this is the pooled"):
        StreamSession(pooled)
    with pytest.raises(ValueError, match="video_first layout"):
        StreamSession(make_model(tiny_backbones, layout="prompt_first"))
    with pytest.raises(ValueError, match="frame_size 30 is not a multiple of the vision backbone.s 14-px patches"):
        StreamSession(model, frame_size=30)
    with pytest.raises(ValueError, match="window must be >= 1"):
        StreamSession(model, window=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        StreamSession(model, frame_size=SIZE).ask("?", max_new_tokens=0)


def test_bench_stream_reports_every_figure(tmp_path):
    from conftest import load_script

    out = load_script("bench_stream").main(["--size", "tiny", "--frames", "30", "--window", "8", "--contexts", "4", "12",
                                            "--new-tokens", "4", "--frame-size", "28", "--json", str(tmp_path / "s.json")])
    s = out["stream"]
    assert s["frames"] == 30 and s["cache_tokens"] == 12 and s["frames_per_s"] > 0 and s["frame_ms"]["p95"] > 0
    assert [m[0] for m in s["memory_mb"]][-1] == 30
    assert [a["context"] for a in out["answers"]] == [4, 12] and all(a["no_cache_ttft_ms"] > 0 for a in out["answers"])
    assert all(a["decode_tokens_per_s"] > 0 and a["pieces"] >= 1 for a in out["answers"])
    assert (tmp_path / "s.json").is_file()


def test_attention_keeps_the_frame_and_where_its_query_looked(model):
    """attention=True keeps the last frame and its query's attention: the same the encoder gives for the
    query that frame was read with (autoregressive: the one formed after the previous frame)."""
    frames = clip(3)
    session = fed(model, frames[:2], attention=True)
    query = session.query
    session.add_frame(frames[2])
    pixels, attn = session.last
    assert torch.equal(pixels, frames[2])
    expected = model.encoder.query(query.expand(1, -1), model.encode_frames(frames[2][None]), return_attention=True)[1]
    torch.testing.assert_close(attn, expected[0])
    assert fed(model, frames[:1]).last is None  # not kept unless asked
