"""app.py, the web app: its handlers without a browser (a chat turn streams the reply of generate() with
its statistics and the attention gallery; a live session counts, skips and answers without touching the
frame context), then the page as a person uses it, in a real headless Chromium (Debian's chromium and
chromedriver, driven by Selenium): upload a clip and ask in the Chat tab; stream a fake webcam (a .y4m
clip written here) in the Live tab. Screenshots of both tabs land in a tmp folder (and /tmp/app_shots/).
The browser tests skip, with the reason, where Gradio, Selenium or Chromium is missing (.ci/run
installs them: requirements-app.txt and apt's chromium)."""

import importlib.util
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from conftest import lively_llm
from session import StreamSession

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Gradio's queue (6.31) summarises its event timings with a pandas option that pandas 3 deprecates: not ours
GRADIO_WARNINGS = pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated:DeprecationWarning")
SHOTS = Path("/tmp/app_shots")  # a copy of the screenshots, to look at


@pytest.fixture(scope="module")
def model():
    """The app's tiny random model, with livelier LLM layers: greedy replies then vary with the frames."""
    return lively_llm(app.random_model()).eval()


@pytest.fixture(scope="module")
def demo(model):
    return app.Demo(model, source="random:tiny")  # greedy (noise=True samples)


def clip_frames(n=12, h=96, w=128, seed=0):
    """A red square crossing a grey frame, with some noise: uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    frames = np.full((n, h, w, 3), 200, np.uint8) + rng.integers(0, 20, (n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        x = 4 + t * (w - 32) // max(1, n - 1)
        frames[t, h // 3: h // 3 + 24, x: x + 24] = (220, 30, 30)
    return frames


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return app.write_mp4(tmp_path_factory.mktemp("media") / "clip.mp4", clip_frames())


# ---- the handlers, no browser --------------------------------------------------------------------

@pytest.mark.parametrize("mode", app.MODES)
def test_chat_streams_the_reply_of_generate(demo, model, mp4, mode):
    outs = list(demo.chat(str(mp4), "What happens in the video?", [], mode, max_new_tokens=12, temperature=0))
    replies = [h[-1]["content"] for h, _, _ in outs[1:-1]]
    assert len(replies) >= 2 and all(b.startswith(a) for a, b in zip(replies, replies[1:]))  # it grows
    assert all(g is None for _, _, g in outs[:-1])  # the gallery comes once, at the end
    history, stats, gallery = outs[-1]
    frames = app.read_media(mp4, 8, demo.frame_size)
    assert frames.shape == (8, 3, demo.frame_size, demo.frame_size)
    expected = model.generate(frames, "What happens in the video?", max_new_tokens=12, mode=mode)
    assert expected.strip() and history == [{"role": "user", "content": "What happens in the video?"},
                                            {"role": "assistant", "content": expected}]
    assert re.search(r"TTFT \d+ ms · [\d.]+ tokens/s · (\d+) tokens", stats), stats
    assert int(re.search(r"(\d+) tokens in", stats)[1]) == len(replies)
    kinds = ["static"] if mode == "coarse_only" else ["static", "dynamic"]
    assert [c for _, c in gallery] == [f"frame {t} · {k} query" for t in range(1, 9) for k in kinds]
    assert all(isinstance(im, Image.Image) and im.size == (app.SHOW_SIZE, app.SHOW_SIZE) for im, _ in gallery)


def test_chat_image_turns_and_errors(demo, model, tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(clip_frames(1)[0]).save(path)
    first = list(demo.chat(str(path), "Describe the image.", None, "coarse_fine", 6, 0))[-1]
    history, stats, gallery = first
    assert "image (8 glimpses)" in stats and len(gallery) == 2 * model.image_frames
    assert gallery[0][1] == "glimpse 1 · static query"
    # a second turn carries the first (as the Chatbot hands it back: content as typed parts)
    handed_back = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in history]
    history2 = list(demo.chat(str(path), "And then?", handed_back, "coarse_fine", 6, 0))[-1][0]
    image = app.read_media(path, 8, demo.frame_size)
    assert history2[:2] == history and history2[-1]["content"] == model.generate(
        image, history + [{"role": "user", "content": "And then?"}], max_new_tokens=6, mode="coarse_fine")
    text_only = list(demo.chat(None, "Say hi.", [], "autoregressive", 4, 0))[-1]
    assert text_only[2] == [] and "no media" in text_only[1]
    with pytest.raises(ValueError, match="prompt"):
        next(demo.chat(str(path), "  ", [], "autoregressive", 4, 0))
    with pytest.raises(ValueError, match="mode"):
        next(demo.chat(str(path), "Hi", [], "sideways", 4, 0))


def test_live_counts_skips_and_answers_from_the_frames(demo, model):
    frames = clip_frames(12, 120, 160)
    state = None
    for frame in frames:
        state, stats, looked, answer = demo.live(state, frame, 3, "What happens?", 1000.0, "autoregressive", True)
    s = state.session.summary()
    assert (s["frames_seen"], s["frames_added"], s["frames_in_cache"]) == (12, 4, 4)
    assert "frames seen: **12** · added: **4** (skip 3)" in stats
    assert re.search(r"frames/s ingested: \*\*[\d.]+\*\*", stats) and re.search(r"encode: \*\*[\d.]+ ms", stats)
    assert isinstance(looked, Image.Image) and looked.size == (app.SHOW_SIZE, app.SHOW_SIZE)
    # asked once (at the first frame; the interval is long), and asking left the frames' context as it was:
    # a fresh session fed the same kept frames answers the same
    assert state.asked_frame == 1
    fresh = StreamSession(model, frame_size=demo.frame_size)
    fresh.add_frame(frames[0])
    assert answer == fresh.ask("What happens?", max_new_tokens=demo.live_tokens)
    for frame in frames[3::3]:
        fresh.add_frame(frame)
    assert state.session.ask("What happens?", max_new_tokens=4) == fresh.ask("What happens?", max_new_tokens=4)
    # every=0: answered at every frame; a new mode starts a new session; no frame changes nothing
    state, stats, _, answer = demo.live(state, frames[0], 1, "What happens?", 0.0, "autoregressive", False)
    assert state.asked_frame == 13 and answer
    state2, _, _, _ = demo.live(state, frames[0], 1, "", 0.0, "coarse_only", True)
    assert state2 is not state and state2.session.mode == "coarse_only" and state2.session.frames_seen == 1
    same, _, _, _ = demo.live(state2, None, 1, "", 0.0, "coarse_only", True)
    assert same is state2 and same.session.frames_seen == 1


def test_overlay_and_media(tmp_path):
    frame = torch.zeros(3, 28, 28, dtype=torch.uint8)
    attention = torch.zeros(2, 2)
    attention[0, 1] = 1.0  # the top-right patch: bright there, the colour map's dark end elsewhere
    image = np.asarray(app.overlay(frame, attention))
    assert image.shape == (app.SHOW_SIZE, app.SHOW_SIZE, 3)
    assert image[: app.SHOW_SIZE // 2, app.SHOW_SIZE // 2:].mean() > 100 and image[app.SHOW_SIZE // 2:].max() <= 3
    examples = app.make_examples(tmp_path, size=112, frames=4)
    assert [Path(p).name for p, _ in examples] == ["synthetic_motion.mp4", "synthetic_colour.mp4",
                                                  "synthetic_shape.mp4"]
    assert examples[1][1] == "What colour is the circle?"
    assert app.read_media(examples[0][0], 8, 56).shape == (4, 3, 56, 56)


def test_defaults_and_loading(model, tmp_path, monkeypatch):
    assert app.default_frame_size(model) == 112  # tiny random backbones: the quickstart's frame size
    with pytest.raises(ValueError, match="multiple"):
        app.Demo(model, frame_size=100)
    model.save_pretrained(tmp_path / "run" / "final")
    loaded, source, noise = app.load(tmp_path / "run")  # a run folder: model.load_model finds final/
    assert not noise and source.endswith("final")
    assert torch.equal(loaded.q_init, model.q_init)
    monkeypatch.setattr(app, "QUICKSTART_MODEL", tmp_path / "run" / "final")  # no --checkpoint: the quickstart's
    assert app.load()[1:] == (str(tmp_path / "run" / "final"), False)
    monkeypatch.setattr(app, "QUICKSTART_MODEL", tmp_path / "absent")  # ... else tiny random backbones
    assert app.load()[1:] == ("random:tiny", True)


def test_pooled_baseline(tmp_path):
    """No queries: Live streams in coarse_only whatever is asked, the Chat gallery shows the plain frames."""
    torch.manual_seed(0)
    from model import FoveatedVLM

    pooled = FoveatedVLM(llm_name="random:tiny", dino_name="random:tiny", query_dim=32, tokens_per_frame=4).eval()
    demo = app.Demo(pooled)
    state, stats, looked, _ = demo.live(None, clip_frames(1)[0], 1, "What?", 0.0, "autoregressive", True)
    assert state.session.mode == "coarse_only" and isinstance(looked, Image.Image) and "cache: **1** frames" in stats
    path = app.write_mp4(tmp_path / "c.mp4", clip_frames(4))
    gallery = list(demo.chat(str(path), "What?", [], "autoregressive", 3, 0))[-1][2]
    assert [c for _, c in gallery] == ["frame 1", "frame 2", "frame 3", "frame 4"]


# ---- the page, in a real browser -----------------------------------------------------------------

def _browser_missing() -> str | None:
    for module, what in (("gradio", "pip install -r requirements-app.txt"), ("selenium", "pip install selenium")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({what})"
    if not CHROMIUM or not CHROMEDRIVER:
        return "chromium / chromedriver are not installed (apt-get install chromium chromium-driver)"
    return None


def write_y4m(path, frames: np.ndarray, fps: int = 10):
    """uint8 RGB frames [T, H, W, 3] (even H, W) -> a YUV4MPEG2 file (4:2:0, full-range BT.601), the
    format Chromium's fake camera plays (in a loop)."""
    t, h, w, _ = frames.shape
    rgb = frames.astype(np.float32)
    y = rgb @ np.float32([0.299, 0.587, 0.114])
    u = (rgb[..., 2] - y) * 0.564 + 128
    v = (rgb[..., 0] - y) * 0.713 + 128
    half = lambda c: c.reshape(t, h // 2, 2, w // 2, 2).mean((2, 4))  # noqa: E731
    planes = [np.clip(p + 0.5, 0, 255).astype(np.uint8) for p in (y, half(u), half(v))]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(t):
            f.write(b"FRAME\n" + b"".join(p[i].tobytes() for p in planes))
    return path


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app_shots")
    yield folder
    SHOTS.mkdir(parents=True, exist_ok=True)
    for png in folder.glob("*.png"):
        shutil.copy(png, SHOTS / png.name)


@pytest.fixture(scope="module")
def page(model, tmp_path_factory):
    """(url, browser): the app launched in-process on 127.0.0.1 and a free port, and a headless Chromium
    whose fake camera plays a .y4m clip."""
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("browser")
    y4m = write_y4m(folder / "camera.y4m", clip_frames(30, 240, 320, seed=1))
    blocks = app.build_app(model, noise=True, source="random:tiny", examples_dir=folder / "examples")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={y4m}", f"--user-data-dir={folder / 'profile'}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield f"http://127.0.0.1:{port}/", browser
    finally:
        browser.quit()
        blocks.close()


def wait_for(check, timeout=60.0, every=0.25, what="the page"):
    """Poll check() until it returns something truthy; its value."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # an element not there yet, or replaced while read
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def screenshot(browser, path):
    """The whole page: the window stretched to its height first."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, max(1000, min(height + 100, 4000)))
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    browser.save_screenshot(str(path))
    browser.set_window_size(1400, 1000)


def open_tab(browser, url, name):
    from selenium.webdriver.common.by import By

    if not browser.current_url.startswith(url):
        browser.get(url)
    tab = wait_for(lambda: [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                            if t.text.strip() == name], what=f"the {name} tab")[0]
    tab.click()
    return By


@GRADIO_WARNINGS
def test_chat_tab_in_a_browser(page, mp4, shots):
    url, browser = page
    By = open_tab(browser, url, "Chat")
    assert "answers below are noise" in browser.find_element(By.ID, "noise-banner").text
    # an example clip fills the file and the prompt
    browser.find_element(By.CSS_SELECTOR, "#chat-examples tr.tr-body td").click()
    wait_for(lambda: "Which way does the red object move?" == browser.find_element(
        By.CSS_SELECTOR, "#chat-prompt textarea").get_attribute("value"), what="the example's prompt")
    wait_for(lambda: "synthetic_motion.mp4" in browser.find_element(By.ID, "chat-media").text.replace("\n", ""),
             what="the example's clip")
    # our own clip: uploaded, its frames previewed
    browser.find_element(By.CSS_SELECTOR, "#chat-media button[aria-label='Clear']").click()
    browser.find_element(By.CSS_SELECTOR, "#chat-media input[type=file]").send_keys(str(mp4))
    wait_for(lambda: "clip.mp4" in browser.find_element(By.ID, "chat-media").text.replace("\n", ""),
             what="the upload")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#chat-gallery img")) == 8, what="the preview")
    # a preset prompt, a mode, ask
    browser.find_element(By.XPATH, "//*[@id='chat-presets']//label[normalize-space()='count']").click()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#chat-prompt textarea").get_attribute("value")
             == app.PRESETS["count"], what="the preset prompt")
    browser.find_element(By.XPATH, "//*[@id='chat-mode']//label[normalize-space()='coarse_fine']").click()
    browser.find_element(By.ID, "chat-ask").click()
    stats = wait_for(lambda: re.search(r"TTFT \d+ ms · [\d.]+ tokens/s",
                                       browser.find_element(By.ID, "chat-stats").text), what="the reply's statistics")
    assert "coarse_fine · 8 frames" in stats.string
    reply = browser.find_element(By.ID, "chat-reply").text
    assert app.PRESETS["count"] in reply and len(reply.strip()) > len(app.PRESETS["count"]) + 5
    captions = wait_for(lambda: [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#chat-gallery .caption-label")]
                        if len(browser.find_elements(By.CSS_SELECTOR, "#chat-gallery img")) == 16 else None,
                        what="the attention gallery")
    assert "frame 1 · dynamic query" in captions
    screenshot(browser, shots / "chat.png")


@GRADIO_WARNINGS
def test_live_tab_in_a_browser(page, shots):
    url, browser = page
    By = open_tab(browser, url, "Live")
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#live-webcam div[title='grant webcam access'] button"),
             what="the webcam button").click()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#live-webcam button.capture-button"),
             what="the record button").click()

    def counters():
        text = browser.find_element(By.ID, "live-stats").text
        seen, fps = re.search(r"frames seen: (\d+)", text), re.search(r"frames/s ingested: ([\d.]+)", text)
        return (int(seen[1]), float(fps[1])) if seen and fps else None

    first = wait_for(counters, what="the live statistics")
    time.sleep(3)
    later = counters()
    assert later[0] > first[0] + 5 and later[1] > 1.0, (first, later)
    answer = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#live-answer textarea").get_attribute("value"),
                      what="an answer")
    assert answer.strip()
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#live-looked img"), what="the heatmap")
    text = browser.find_element(By.ID, "live-stats").text
    assert re.search(r"encode: [\d.]+ ms · LLM: [\d.]+ ms per frame", text) and "cache:" in text
    screenshot(browser, shots / "live.png")
    browser.find_element(By.CSS_SELECTOR, "#live-webcam button.capture-button").click()  # stop streaming
