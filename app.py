"""A local web app for a FoveatedVLM (Gradio, an optional dependency: pip install -r requirements-app.txt).

    python app.py [--checkpoint PATH] [--host 127.0.0.1] [--port 7860]

Two tabs:
- Chat: an uploaded image or video (or one of the synthetic example clips the app renders itself),
  a preset or free prompt, the forward mode; the reply streams in (model.generate(..., stream=True)),
  with its time to first token and tokens/s, and a gallery of the frames overlaid with the last
  backbone block's attention of the static and the dynamic query (where the model looked; looked.py).
- Live: the browser's webcam streamed to the server (gr.Image(sources="webcam", streaming=True) and
  its .stream event), one session.StreamSession per browser session: every frame (or every k-th,
  the frame-skip slider) is one backbone encode and one cached LLM step; a standing question is
  answered in a few tokens at an interval; frames/s ingested, encode and LLM ms per frame, TTFT,
  tokens/s and the cache size, and the current frame with where the query looked in it.

Without --checkpoint the app loads the quickstart's final model (runs/tiny_stage3/final) when it is
there, else tiny random backbones, whose answers are noise (a banner says so). `build_app(model)`
returns the gr.Blocks (the tests launch it in-process); the handlers (`Demo.chat`, `Demo.live`) are
plain Python and need no Gradio.
"""

import argparse
import inspect
import os
import random
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import MODES
from frames import IMAGE_SUFFIXES, VIDEO_SUFFIXES, attention_grid, check_frame_size, read_media
from frames import overlay as draw_overlay

ROOT = Path(__file__).resolve().parent
QUICKSTART_MODEL = ROOT / "runs" / "tiny_stage3" / "final"  # scripts/quickstart.py's final export
PRESETS = {
    "describe": "Describe the video.",
    "count": "How many objects are there?",
    "what happens": "What happens in the video?",
    "motion": "Which way does the coloured object move?",
    "colour": "What colour is the circle?",
}
LIVE_QUESTION = "What happens in the video?"
NOISE_BANNER = ("Tiny random backbones (no --checkpoint, and no quickstart model in runs/tiny_stage3/final): "
                "the answers below are noise. Train one with python scripts/quickstart.py, or pass "
                "--checkpoint PATH.")
SHOW_SIZE = 224  # overlays are drawn at least this large


# ---- model ---------------------------------------------------------------------------------------

def random_model(seed: int = 0):
    """Tiny random backbones (nothing downloaded): the app runs, its answers are noise."""
    from model import FoveatedVLM

    torch.manual_seed(seed)
    return FoveatedVLM(llm_name="random:tiny", dino_name="random:tiny", query_dim=32)


def load(checkpoint=None, llm=None, dino=None, trust: bool = False):
    """(model, where it came from, noise?): the checkpoint (model.load_model), else the quickstart's
    final model when present, else tiny random backbones."""
    if checkpoint is not None:
        from model import load_model

        model, source = load_model(checkpoint, llm, dino, trust=trust)
        return model, str(source), False
    if (QUICKSTART_MODEL / "config.json").is_file():
        from model import FoveatedVLM

        return FoveatedVLM.from_pretrained(QUICKSTART_MODEL), str(QUICKSTART_MODEL), False
    return random_model(), "random:tiny", True


def default_frame_size(model) -> int:
    """112 px for the tiny random vision backbones (the quickstart trains at 112), else 224; a multiple
    of the backbone's patch."""
    patch = model.encoder.dino.patch_size
    size = 112 if str(model.config.dino).startswith("random:") else 224
    return max(patch, size // patch * patch)


# ---- media ---------------------------------------------------------------------------------------

def write_mp4(path, frames, fps: int = 8):
    """uint8 frames ([T, H, W, 3] array or [T, 3, H, W] tensor, even H and W) -> an H.264 mp4 (PyAV;
    MPEG-4 part 2 where this PyAV has no libx264)."""
    import av

    if torch.is_tensor(frames):
        frames = frames.permute(0, 2, 3, 1).numpy()
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_examples(folder, size: int = 224, frames: int = 8) -> list[tuple[str, str]]:
    """Synthetic clips in the style of scripts/make_synthetic.py (one small target among shapes; the
    quickstart's object scale), written as mp4s to folder -> [(path, its question)]."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_synthetic
    from media import decode_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for seed, task in enumerate(("motion", "colour", "shape")):
        jpegs, meta = make_synthetic.make_clip(random.Random(seed), task, size, frames, object_scale=0.25,
                                               distractor_range=(1, 3))
        clip = torch.stack([decode_image(j) for j in jpegs])
        path = write_mp4(folder / f"synthetic_{task}.mp4", clip)
        examples.append((str(path), make_synthetic.answer_key(meta)[2]))
    return examples


# ---- where it looked -----------------------------------------------------------------------------

def overlay(frame: torch.Tensor, attention: torch.Tensor | None, vmax: float | None = None) -> Image.Image:
    """A frame (uint8 [3, S, S]) with an attention map [gh, gw] over it (frames.overlay, over [0, vmax];
    default: the map's own max), at least SHOW_SIZE px a side."""
    image = frame.permute(1, 2, 0).contiguous().numpy()
    if attention is not None:
        image = draw_overlay(image, attention.float().numpy(), float(attention.max()) if vmax is None else vmax)
    image = Image.fromarray(image)
    if image.width < SHOW_SIZE:
        image = image.resize((SHOW_SIZE, SHOW_SIZE * image.height // image.width), Image.NEAREST)
    return image


def looked_maps(model, frames: torch.Tensor, messages: list, mode: str) -> dict | None:
    """Where the static and the dynamic query looked in each frame, for this conversation and mode ->
    {"static": [T, gh, gw], "dynamic": [T, gh, gw] or None} (looked.attention_maps); None for the
    pooled baseline (no queries)."""
    from looked import attention_maps

    return attention_maps(model, frames, messages, mode)["maps"] if model.visual.queries else None


def looked_gallery(model, frames: torch.Tensor, maps: dict | None) -> list[tuple[Image.Image, str]]:
    """Gallery items (image, caption): each frame (glimpse, for an image) with the static query's and
    the dynamic query's attention over it, on one colour scale (0 to the most attention on a patch in
    any of them); the plain frames when there are no maps."""
    video = frames if frames.dim() == 4 else frames[None].expand(model.image_frames, -1, -1, -1)
    word = "frame" if frames.dim() == 4 else "glimpse"
    if maps is None:
        return [(overlay(f, None), f"{word} {t + 1}") for t, f in enumerate(video)]
    present = {k: maps[k] for k in ("static", "dynamic") if maps.get(k) is not None}
    vmax = max(float(v.max()) for v in present.values())
    return [(overlay(video[t], v[t], vmax), f"{word} {t + 1} · {k} query")
            for t in range(len(video)) for k, v in present.items()]


# ---- the handlers --------------------------------------------------------------------------------

def _text(content) -> str:
    """A chat message's content as text (Gradio may hand it back as a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


class Live:
    """One browser session's stream: a StreamSession and what the Live tab shows of it."""

    def __init__(self, demo, mode: str):
        from session import StreamSession

        self.mode = mode
        self.session = StreamSession(demo.model, mode=mode, frame_size=demo.frame_size, window=demo.window,
                                     attention=True)  # the heatmap: the frame's attention, kept as it is read
        self.arrivals = deque(maxlen=30)  # when the last frames reached the server
        self.asked_at, self.asked_frame, self.answer = None, None, ""
        self.look_ms = None
        self.heatmap = None

    def fps(self) -> float | None:
        if len(self.arrivals) < 2 or self.arrivals[-1] <= self.arrivals[0]:
            return None
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])


def _ms(v):
    return "–" if v is None else f"{v:.1f} ms"


class Demo:
    """The app's state shared by every browser session: the model, its settings, a lock (one model
    call at a time), and the two handlers."""

    def __init__(self, model, frame_size: int | None = None, max_frames: int = 8, window: int = 64,
                 noise: bool = False, source: str = "", live_tokens: int = 12):
        self.model = model.eval()
        self.frame_size = frame_size or default_frame_size(model)
        check_frame_size(self.frame_size, model.encoder.dino.patch_size)
        self.max_frames, self.window, self.noise, self.source = max_frames, window, noise, source
        self.live_tokens = live_tokens
        # a random model greedily repeats one token: sampled, its noise at least looks like noise
        self.temperature = 1.0 if noise else 0.0
        self.lock = threading.RLock()
        self._media = (None, None)  # (path, frames): the last file read

    def frames(self, path):
        if not path:
            return None
        if self._media[0] != (path, self.max_frames):
            self._media = ((path, self.max_frames), read_media(path, self.max_frames, self.frame_size))
        return self._media[1]

    def preview(self, path) -> list:
        """The frames the model will read from a file (the Chat gallery before a question)."""
        frames = self.frames(path)
        if frames is None:
            return []
        return looked_gallery(self.model, frames, None)

    def chat(self, path, prompt, history, mode="autoregressive", max_new_tokens=64, temperature=None):
        """One chat turn -> yields (history, statistics markdown, gallery or None while unchanged): the
        reply grows piece by piece; the last yield has the final statistics and the attention gallery."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("type a prompt (or pick a preset)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        temperature = self.temperature if temperature is None else float(temperature)
        frames = self.frames(path)
        history = [{"role": m["role"], "content": _text(m["content"])} for m in (history or [])]
        messages = history + [{"role": "user", "content": prompt}]
        history = messages + [{"role": "assistant", "content": ""}]
        what = "no media" if frames is None else (
            f"{frames.shape[0]} frames" if frames.dim() == 4 else f"image ({self.model.image_frames} glimpses)")
        yield history, f"generating… ({mode}, {what})", None
        # the lock is taken per step, never across a yield: Gradio may resume a generator in another thread
        first, reply, elapsed, tokens = None, "", 0.0, 0
        pieces = self.model.generate(frames, messages, max_new_tokens=int(max_new_tokens), mode=mode,
                                     temperature=temperature, stream=True)
        while True:
            with self.lock:
                step = time.perf_counter()
                piece = next(pieces, None)
                elapsed += time.perf_counter() - step  # model time only, not the page's
            if piece is None:
                break
            if first is None:
                first = elapsed
            tokens += 1  # generate streams a piece per token (less only where a character spans tokens)
            reply += piece
            history[-1] = {"role": "assistant", "content": reply}
            yield history, f"TTFT {1000 * first:.0f} ms · generating… ({mode}, {what})", None
        ttft = "–" if first is None else f"{1000 * first:.0f} ms"
        rate = (tokens - 1) / (elapsed - first) if first is not None and tokens > 1 and elapsed > first else None
        stats = (f"TTFT {ttft} · {'–' if rate is None else f'{rate:.1f}'} tokens/s · {tokens} tokens in "
                 f"{elapsed:.2f} s · {mode} · {what}")
        if not reply.strip():
            history[-1] = {"role": "assistant", "content": f"(an empty reply: {reply!r})"}
        gallery = []
        if frames is not None:
            with self.lock:
                gallery = looked_gallery(self.model, frames, looked_maps(self.model, frames, messages, mode))
        yield history, stats, gallery

    def live(self, state, frame, skip=1, question=LIVE_QUESTION, every=2.0, mode="autoregressive",
             heatmap=True):
        """One webcam frame -> (state, statistics markdown, the frame with where the query looked, the
        standing question's latest answer). state: the browser session's Live (None at first; a new one
        when the mode changes)."""
        mode = self.model.visual.run_mode(mode)  # the pooled baseline streams in coarse_only, its one mode
        if state is None or state.mode != mode:
            state = Live(self, mode)
        if frame is None:
            return state, self.live_stats(state), state.heatmap, state.answer
        if isinstance(frame, np.ndarray) and not frame.flags.writeable:
            frame = frame.copy()  # Gradio's arrays are read-only; torch.from_numpy wants a writable one
        session = state.session
        session.skip = max(1, int(skip))
        state.arrivals.append(time.perf_counter())
        with self.lock:
            added = session.add_frame(frame)
            if added:
                pixels, attn = session.last
                start = time.perf_counter()
                shown = heatmap and attn is not None
                dino = self.model.encoder.dino
                grid = attention_grid(attn[None], dino.num_prefix, dino.grid(*pixels.shape[-2:]))[0] if shown else None
                state.heatmap = overlay(pixels.cpu(), grid)
                state.look_ms = 1000 * (time.perf_counter() - start) if grid is not None else None
            question = (question or "").strip()
            now = time.perf_counter()
            if question and session.frames_added and (state.asked_at is None or now - state.asked_at >= float(every)):
                state.answer = session.ask(question, max_new_tokens=self.live_tokens, temperature=self.temperature)
                state.asked_at, state.asked_frame = time.perf_counter(), session.frames_seen
        return state, self.live_stats(state), state.heatmap, state.answer

    def live_stats(self, state) -> str:
        s, fps = state.session.summary(), state.fps()
        rate = s["tokens_per_s"]
        asked = ("–" if state.asked_at is None else
                 f"at frame {state.asked_frame}, {time.perf_counter() - state.asked_at:.1f} s ago")
        window = "∞" if state.session.window is None else f"{state.session.sink} + {state.session.window}"
        return "\n".join([
            f"- frames seen: **{s['frames_seen']}** · added: **{s['frames_added']}** (skip {state.session.skip})",
            f"- frames/s ingested: **{'–' if fps is None else f'{fps:.1f}'}**",
            f"- encode: **{_ms(s['encode_ms'])}** · LLM: **{_ms(s['llm_ms'])}** per frame"
            + ("" if state.look_ms is None else f" · heatmap: {_ms(state.look_ms)}"),
            f"- TTFT: **{_ms(s['ttft_ms'])}** · tokens/s: **{'–' if rate is None else f'{rate:.1f}'}** · "
            f"last answer {asked}",
            f"- cache: **{s['frames_in_cache']}** frames, {s['cache_tokens']} tokens (window {window}, "
            f"evicted {s['evicted']})",
        ])


# ---- the page ------------------------------------------------------------------------------------

def build_app(model, frame_size: int | None = None, max_frames: int = 8, window: int = 64, noise: bool = False,
              source: str = "", examples_dir=None, stream_every: float = 0.1):
    """The Gradio page (gr.Blocks) for a model; launch it with `.queue().launch(...)` (see main).
    noise: show the banner that the answers are noise (tiny random backbones)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    demo = Demo(model, frame_size, max_frames, window, noise, source)
    examples_dir = Path(examples_dir or tempfile.mkdtemp(prefix="fvlm_examples_"))
    examples = make_examples(examples_dir)
    with gr.Blocks(title="fvlm: foveated video VLM", analytics_enabled=False) as app:
        gr.Markdown("# fvlm: a foveated video VLM\nOne visual token per frame: the LLM chooses where the next "
                    f"frame is looked at. Model: `{source or type(model).__name__}` · frames at "
                    f"{demo.frame_size} px.")
        if noise:
            gr.HTML(f'<div id="noise-banner" style="background:#fff3cd;color:#664d03;border:1px solid #ffda6a;'
                    f'border-radius:6px;padding:10px 14px;font-weight:600">⚠ {NOISE_BANNER}</div>')
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(gr, demo, examples)
            with gr.Tab("Live", id="live"):
                _live_tab(gr, demo, stream_every)
    app.demo = demo  # the handlers, for tests
    return app


def _errors(gr, fn):
    """fn with bad input (a ValueError, an undecodable file) shown as a message on the page."""
    from media import MediaError

    if inspect.isgeneratorfunction(fn):
        def wrapped(*args):
            try:
                yield from fn(*args)
            except (ValueError, MediaError) as e:
                raise gr.Error(str(e)) from e
    else:
        def wrapped(*args):
            try:
                return fn(*args)
            except (ValueError, MediaError) as e:
                raise gr.Error(str(e)) from e
    return wrapped


def _chat_tab(gr, demo, examples):
    """The Chat tab: a file, a prompt, the streamed reply with its speed, and where it looked."""
    def chat(path, prompt, history, mode, max_new_tokens, temperature):
        for history, stats, gallery in demo.chat(path, prompt, history, mode, max_new_tokens, temperature):
            yield history, stats, gr.skip() if gallery is None else gallery

    with gr.Row():
        with gr.Column(scale=1):
            media = gr.File(label="Image or video", file_types=list(IMAGE_SUFFIXES + VIDEO_SUFFIXES),
                            elem_id="chat-media", height=120)
            preset = gr.Radio(list(PRESETS), label="Preset prompts", elem_id="chat-presets")
            prompt = gr.Textbox(label="Prompt", value=PRESETS["describe"], lines=2, elem_id="chat-prompt")
            mode = gr.Radio(list(MODES), value="autoregressive", label="Mode", elem_id="chat-mode")
            with gr.Accordion("Generation", open=False):
                max_new = gr.Slider(1, 256, value=48, step=1, label="max new tokens")
                temperature = gr.Slider(0, 2, value=demo.temperature, step=0.05,
                                        label="temperature (0: greedy)")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                clear = gr.Button("Clear chat", elem_id="chat-clear")
            gr.Examples([[p, q] for p, q in examples], inputs=[media, prompt],
                        label="Example clips (synthetic, rendered by the app)", elem_id="chat-examples")
        with gr.Column(scale=2):
            chatbot = gr.Chatbot(label="Chat", height=300, elem_id="chat-reply")
            stats = gr.Markdown("Ask something: the reply streams here, then its TTFT and tokens/s.",
                                elem_id="chat-stats")
            gallery = gr.Gallery(label="Where it looked: each frame with the static and the dynamic "
                                       "query's attention (last backbone block, mean over heads; "
                                       "dark: least, yellow: most)",
                                 columns=4, height=720, object_fit="contain", elem_id="chat-gallery")
    preset.change(lambda k: PRESETS.get(k, ""), preset, prompt)
    media.change(_errors(gr, lambda p: ([], "", demo.preview(p))), media, [chatbot, stats, gallery])
    for trigger in (ask.click, prompt.submit):
        trigger(_errors(gr, chat), [media, prompt, chatbot, mode, max_new, temperature],
                [chatbot, stats, gallery])
    clear.click(lambda: ([], ""), None, [chatbot, stats])


def _live_tab(gr, demo, stream_every: float):
    """The Live tab: webcam frames into a streaming session, a standing question answered every few seconds."""
    live_state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam",
                              elem_id="live-webcam")
            skip = gr.Slider(1, 10, value=1, step=1, label="frame skip (add every k-th frame)",
                             elem_id="live-skip")
            question = gr.Textbox(value=LIVE_QUESTION, label="Standing question", elem_id="live-question")
            every = gr.Slider(0.5, 10, value=2, step=0.5, label="answer every (s)")
            with gr.Row():
                live_mode = gr.Radio(["autoregressive", "coarse_only"], value="autoregressive",
                                     label="Mode (a new session)")
                heat = gr.Checkbox(value=True, label="foveation heatmap")
            reset = gr.Button("Reset session")
        with gr.Column(scale=1):
            answer = gr.Textbox(label="Answer (a few tokens)", elem_id="live-answer", interactive=False)
            live_stats = gr.Markdown("Start the webcam: frames stream in and the statistics appear here.",
                                     elem_id="live-stats")
            looked = gr.Image(label="Current frame: where the query looked", elem_id="live-looked",
                              interactive=False, height=320)
    webcam.stream(_errors(gr, demo.live), [live_state, webcam, skip, question, every, live_mode, heat],
                  [live_state, live_stats, looked, answer], stream_every=stream_every, time_limit=None,
                  concurrency_limit=4, show_progress="hidden")
    reset.click(lambda: (None, "Session reset.", None, ""), None, [live_state, live_stats, looked, answer])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run directory, save_pretrained folder or checkpoint file "
                                             "(default: the quickstart's final model, else tiny random backbones)")
    parser.add_argument("--llm", help="backbone LLM for a bare checkpoint file (as benchmark.py --llm)")
    parser.add_argument("--dino", help="vision backbone for a bare checkpoint file (as benchmark.py --dino)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint file that holds pickled Python objects besides tensors")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--frame-size", type=int, help="px (default: 112 for tiny random backbones, else 224)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames read from an uploaded video")
    parser.add_argument("--window", type=int, default=64, help="frames kept in a live session's cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error("the web app needs Gradio: pip install -r requirements-app.txt")
    model, source, noise = load(args.checkpoint, args.llm, args.dino, args.trust_checkpoint)
    model = model.to(args.device)
    if noise:
        print(f"note: {NOISE_BANNER}", flush=True)
    try:
        app = build_app(model, args.frame_size, args.max_frames, args.window, noise, source)
    except ValueError as e:
        parser.error(str(e))
    app.queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
