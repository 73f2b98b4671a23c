"""lmms-eval model plugin: evaluate an fvlm checkpoint on any lmms-eval task (its prompts, its scorers).

    pip install --no-deps lmms-eval==0.7.3 && pip install -e .     # docs/evaluation.md "lmms-eval plugin" lists the rest
    python -m lmms_eval --model fvlm --model_args checkpoint=runs/stage3_135M,mode=autoregressive,max_frames=64 \\
        --tasks mvbench,videomme --output_path results/ --log_samples

`pip install -e .` registers `manifest` under the entry-point group "lmms_eval.models"; lmms-eval's
model registry finds it there. model_args (comma-separated key=value):

    checkpoint   required: a run directory, a save_pretrained folder or a checkpoint file
    mode         forward mode, one of config.MODES (default autoregressive)
    max_frames   frames sampled uniformly from each video (default 64)
    frame_size   frame side in pixels, a multiple of the vision backbone's patch (default 224)
    llm, dino    backbones (hub ids or folders) for a bare checkpoint file, as benchmark.py --llm / --dino
    trust_checkpoint   unpickle a checkpoint file that holds Python objects (only for files you trust)
    workers      video/image decoding processes (default min(8, CPUs); 0: in this process)
    device       default cuda when available, else cpu (also lmms-eval's --device)
Questions per batch come from lmms-eval's --batch_size (an integer; "auto" is refused).

Each request is answered the way benchmark.py's Runner answers an item: lmms-eval's context string is
the user message of the model's chat template, the task's visuals are decoded as benchmark.py decodes
them (a video path: `max_frames` uniform frames; one image: one frame; several images: the frames of
one clip, thinned uniformly to `max_frames`; none: text only), each clip is encoded once for all the
questions about it in a chunk of requests, and the reply is generated greedily (bf16 autocast on CUDA)
with the task's max_new_tokens (default 16), then cut at the first of its `until` strings. A request
whose media cannot be used (missing, undecodable, several videos) gets an empty reply and a warning.
"""

import io
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

# `pip install -e .` installs this one module, not the repository's flat modules (config, data, model,
# ...), whose generic names would clash with other packages in site-packages. The modules this plugin
# runs on are found here instead: the repository folder goes first on the path, so that those names
# mean ours inside the lmms-eval process.
_REPO = str(Path(__file__).resolve().parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from loguru import logger  # noqa: E402  (lmms-eval's logger)
from tqdm import tqdm  # noqa: E402

from lmms_eval.api.model import lmms  # noqa: E402

try:
    from bench_loaders import Item
    from bench_runner import Runner, batches_by_clip
    from config import MODES
    from decoding import prompt_ids
    from frames import check_frame_size
    from media import IMAGE_EXTENSIONS
    from model import load_model
except ModuleNotFoundError as e:  # installed as a copy (pip install .), away from the repository
    raise ModuleNotFoundError(f"lmms_fvlm needs the fvlm repository next to it ({_REPO} has no {e.name}.py): "
                              f"install it from the repository with `pip install -e .`") from e

MODEL_ID = "fvlm"
DEFAULT_MAX_NEW_TOKENS = 16
# Requests prepared (visuals fetched and kept as bytes) at a time: bounds the memory image tasks take
# while leaving the questions about one clip (Video-MME's 3, POPE's ~18, consecutive in lmms-eval's
# order) in one chunk, where the clip is decoded and encoded once.
CHUNK_REQUESTS = 256
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}  # what Pillow writes to PNG as it is


def manifest():
    """The entry point's payload (pyproject.toml: fvlm = "lmms_fvlm:manifest")."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.FVLM")


# ---- model_args --------------------------------------------------------------------------------------

def _int_arg(name: str, value, low: int) -> int:
    """lmms-eval parses "64" to 64 but leaves "auto" or "8.5" as they are: an integer >= low, or a clear error."""
    number = int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or number < low:
        raise ValueError(f"fvlm model_args {name} must be an integer >= {low}, got {value!r}")
    return number


def _bool_arg(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"fvlm model_args {name} must be true or false, got {value!r}")


def _device_arg(value) -> torch.device:
    if value is None or value == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(value))
    except RuntimeError:
        raise ValueError(f"fvlm model_args device must be a torch device such as cuda, cuda:1 or cpu, got {value!r}") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"fvlm model_args device={value}: CUDA is not available here (use device=cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"fvlm model_args device={value}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---- generation settings -------------------------------------------------------------------------

def generation_settings(gen_kwargs) -> tuple[int, list[str]]:
    """(max_new_tokens, stop strings) from a request's gen_kwargs. Greedy decoding only: sampling or
    beam search is refused, naming the override that makes a task greedy."""
    gen_kwargs = dict(gen_kwargs or {})
    max_new_tokens = gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"fvlm: gen_kwargs max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    do_sample = gen_kwargs.get("do_sample")
    temperature = gen_kwargs.get("temperature") or 0
    if isinstance(do_sample, str):
        do_sample = do_sample.strip().lower() in ("true", "1")
    if do_sample or (do_sample is None and float(temperature) > 0):
        raise ValueError(f"fvlm generates greedily only, but the task asks for sampling (do_sample={do_sample!r}, "
                         f"temperature={temperature!r}); run it greedily with --gen_kwargs do_sample=false,temperature=0")
    num_beams = gen_kwargs.get("num_beams") or 1
    if int(num_beams) != 1:
        raise ValueError(f"fvlm generates greedily only (num_beams=1), the task asks for num_beams={num_beams!r}")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not all(isinstance(s, str) for s in until):
        raise ValueError(f"fvlm: gen_kwargs until must be a string or a list of strings, got {until!r}")
    return max_new_tokens, [s for s in until if s]


def cut_at_stops(text: str, until) -> str:
    """The reply up to the first occurrence of any stop string (as if generation had stopped there)."""
    cut = len(text)
    for stop in until:
        at = text.find(stop)
        if stop and 0 <= at < cut:
            cut = at
    return text[:cut]


# ---- visuals -------------------------------------------------------------------------------------

def _image_bytes(image) -> bytes:
    """A PIL image as lossless PNG bytes (media.decode_image reads bytes, as benchmark.py's items hold them)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # PNG keeps no EXIF: apply a stored rotation now
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _kind_of_path(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower() if "." in Path(path).name else ""
    return "image" if ext in IMAGE_EXTENSIONS else "video"  # mp4, mkv, ... and anything unknown: a video


def media_of(visuals) -> tuple | None:
    """lmms-eval's doc_to_visual output -> bench_loaders.Item media: ("video", path), ("image", bytes),
    ("frames", [bytes]), ("missing", why) for what cannot be shown; None for text only."""
    if visuals is None:
        return None
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    visuals = [v for v in visuals if v is not None]
    if not visuals:
        return None
    videos, images = [], []
    for v in visuals:
        if isinstance(v, (str, os.PathLike)):
            path = str(v)
            if _kind_of_path(path) == "video":
                videos.append(path)
            else:
                try:
                    images.append(Path(path).read_bytes())
                except OSError as e:
                    return "missing", f"image {path}: {e}"
        elif isinstance(v, (bytes, bytearray)):
            images.append(bytes(v))
        elif hasattr(v, "save") and hasattr(v, "mode"):  # a PIL image
            images.append(_image_bytes(v))
        else:
            return "missing", f"unsupported visual of type {type(v).__name__} (audio?)"
    if videos and images:
        return "missing", f"a video and {len(images)} image(s) in one request"
    if len(videos) > 1:
        return "missing", f"{len(videos)} videos in one request"
    if videos:
        return "video", videos[0]
    return ("image", images[0]) if len(images) == 1 else ("frames", images)


class _Generator(Runner):
    """benchmark.py's Runner, generation only: lmms-eval scores the replies, so no likelihood pick."""

    def _picks(self, first_logits, items):
        return [None] * len(items)


# ---- the model ---------------------------------------------------------------------------------------

class FVLM(lmms):
    """An fvlm checkpoint as an lmms-eval "simple" model: generate_until only."""

    is_simple = True

    def __init__(self, checkpoint=None, mode: str = "autoregressive", max_frames=64, frame_size=224, llm=None,
                 dino=None, trust_checkpoint=False, workers=None, batch_size=1, device=None, max_batch_size=None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"fvlm: unknown model_args {sorted(unknown)}; it takes checkpoint, mode, max_frames, "
                             f"frame_size, llm, dino, trust_checkpoint, workers, device (and --batch_size)")
        if checkpoint is None or str(checkpoint).strip() == "":
            raise ValueError("fvlm: model_args checkpoint=PATH is required (a run directory, a save_pretrained folder "
                             "or a checkpoint file)")
        path = Path(str(checkpoint)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"fvlm model_args checkpoint: {path} does not exist")
        if mode not in MODES:
            raise ValueError(f"fvlm model_args mode must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
            raise ValueError(f"fvlm: --batch_size {batch_size} is not supported; give a number of questions per batch")
        self.mode = mode
        self.max_frames = _int_arg("max_frames", max_frames, 1)
        self.frame_size = _int_arg("frame_size", frame_size, 1)
        self._batch_size = _int_arg("batch_size", batch_size, 1)
        self.workers = min(8, os.cpu_count() or 1) if workers is None else _int_arg("workers", workers, 0)
        trust = _bool_arg("trust_checkpoint", trust_checkpoint)
        self._device = _device_arg(device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("fvlm runs in one process (WORLD_SIZE > 1 here): start lmms-eval without "
                             "accelerate/torchrun, one GPU per run (device=cuda:N)")

        model, source = load_model(path, llm or None, dino or None, trust=trust)
        self.model = model.to(self._device).eval()
        check_frame_size(self.frame_size, model.encoder.dino.patch_size, f"fvlm model_args frame_size={self.frame_size}")
        self.source = source
        self._runner = _Generator(self.model, [mode], self._device)
        logger.info(f"fvlm: {source} on {self._device}, mode {mode}, {self.max_frames} frames of "
                    f"{self.frame_size} px, batches of {self._batch_size}")

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- requests --------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        replies = [""] * len(requests)
        failed = Counter()
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="fvlm responding")
        chunk = max(CHUNK_REQUESTS, 4 * self._batch_size)
        for start in range(0, len(requests), chunk):
            by_length = defaultdict(list)  # max_new_tokens -> items: one generation length per batch
            stops, where = {}, {}
            for i in range(start, min(start + chunk, len(requests))):
                args = requests[i].args
                if len(args) != 6:
                    raise ValueError(f"fvlm: expected a simple generate_until request (context, gen_kwargs, "
                                     f"doc_to_visual, doc_id, task, split), got {len(args)} arguments")
                context, gen_kwargs, doc_to_visual, doc_id, task, split = args
                if not isinstance(context, str):
                    raise ValueError(f"fvlm: the context of {task} doc {doc_id} is a {type(context).__name__}, "
                                     f"not a string")
                max_new_tokens, stops[i] = generation_settings(gen_kwargs)
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
                by_length[max_new_tokens].append(Item(MODEL_ID, str(i), context, "", media_of(visuals)))
                where[i] = f"{task} doc {doc_id}"
            for max_new_tokens, items in by_length.items():
                for i, reply in self._answer(items, max_new_tokens, failed, where):
                    replies[i] = cut_at_stops(reply, stops[i])
                    pbar.update(1)
        pbar.close()
        if failed:
            logger.warning(f"fvlm: {sum(failed.values())} of {len(requests)} requests got an empty reply for want of "
                           f"usable media: {dict(failed)}")
        return replies

    @torch.no_grad()
    def _answer(self, items, max_new_tokens, failed, where):
        """(request index, reply) for items: text-only ones in plain batches, the others batched by
        clip as benchmark.py batches them (each clip decoded and encoded once)."""
        text_only = [it for it in items if it.media is None]
        for k in range(0, len(text_only), self._batch_size):
            batch = text_only[k:k + self._batch_size]
            ids, am = prompt_ids(self.model, [[{"role": "user", "content": it.prompt}] for it in batch])
            gen = self.model.generate_ids(ids, am, mode=self.mode, max_new_tokens=max_new_tokens)
            for it, tokens in zip(batch, gen["tokens"]):
                yield int(it.uid), self.model.tokenizer.decode(tokens, skip_special_tokens=True)
        visual = [it for it in items if it.media is not None]
        for decoded, batch in batches_by_clip(visual, self.max_frames, self.frame_size, self._batch_size,
                                              self.workers):
            if decoded is None:  # the clip's media failed
                for it, reason in batch:
                    failed[reason.split(":")[0]] += 1
                    logger.warning(f"fvlm: {where[int(it.uid)]}: {reason}; replying ''")
                    yield int(it.uid), ""
                continue
            answers = self._runner.run(decoded, batch, max_new_tokens)[self.mode]
            for it, (reply, _) in zip(batch, answers):
                yield int(it.uid), reply

    def loglikelihood(self, requests):
        raise NotImplementedError("fvlm answers generate_until tasks only (loglikelihood / multiple_choice output "
                                  "types are not implemented); benchmark.py reports a first-token likelihood score")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("fvlm answers single-round generate_until tasks only (multi-round generation is "
                                  "not implemented)")
