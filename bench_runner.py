"""Scoring benchmark items: clips decoded once in DataLoader workers and batched by clip
(`batches_by_clip`), encoded once and run in every requested mode (`Runner`), each reply scored
(`score`); the validation loss on held-out shards (`run_val`)."""

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bench_loaders import Item
from bench_parsers import (lmms_eval_reply, mentioned_values, mvbench_normalize, pope_answer, scienceqa_letter,
                           videomme_extract)
from collate import pack_frames
from data import Loader, SampleSpec, ShardStream, Source
from decoding import prompt_ids
from frames import from_images, read_media
from media import MediaError, decode_image
from precision import autocast


class Clips(Dataset):
    def __init__(self, clips, max_frames: int, frame_size: int):
        self.clips, self.max_frames, self.frame_size = clips, max_frames, frame_size

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        kind, ref = self.clips[i][1]
        try:
            if kind == "missing":
                return i, f"missing_media: {ref}"
            if kind == "video":
                return i, read_media(ref, self.max_frames, self.frame_size, "video")
            if kind == "image":
                return i, decode_image(ref, self.frame_size)
            # frames stored as images: thinned uniformly, as training reads them (not the first max_frames)
            return i, from_images(ref, self.max_frames, self.frame_size)[0]
        except (MediaError, OSError) as e:
            return i, f"undecodable_media: {type(e).__name__}: {e}"


def batches_by_clip(items, max_frames, frame_size, batch_size, workers):
    """(decoded clips {clip: tensor}, items) batches of at most batch_size items (a clip's items stay
    together); plus (item, reason) for items whose media failed."""
    order, groups = [], {}
    for item in items:
        if item.clip not in groups:
            groups[item.clip] = []
            order.append(item.clip)
        groups[item.clip].append(item)
    clips = [(c, groups[c][0].media) for c in order]
    loader = DataLoader(Clips(clips, max_frames, frame_size), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    pending, decoded = [], {}
    for i, frames in loader:
        clip = clips[i][0]
        if isinstance(frames, str):
            yield None, [(item, frames) for item in groups[clip]]
            continue
        decoded[clip] = frames
        pending += groups[clip]
        if len(pending) >= batch_size:
            yield decoded, pending
            pending, decoded = [], {}
    if pending:
        yield decoded, pending


def candidate_tokens(tokenizer, candidates) -> list[list[int]]:
    """The first token of each way a reply could start with each candidate ("A"; "yes"/"Yes")."""
    out = []
    for c in candidates:
        variants = {c, c.capitalize(), c.upper()} if c.isalpha() and len(c) > 1 else {c}
        out.append(sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in variants}))
    return out


def score(item: Item, reply: str, picked: str) -> dict:
    """One item's record: the reply, what the benchmark's parser reads in it, and whether it is right."""
    rec = {"uid": item.uid, "gold": item.gold, "reply": reply, "likelihood": picked, "category": item.category,
           "likelihood_correct": picked == (item.gold_letter or item.gold)}
    text = lmms_eval_reply(reply)  # what lmms-eval's task scorers are given
    if item.bench == "mvbench":  # the reply and the gold letter normalised alike, then compared
        parsed = mvbench_normalize(text)
        # lmms-eval's MVBench aggregation leaves out replies that are empty once stripped
        rec.update(parsed=parsed, correct=parsed == mvbench_normalize(item.gold), counted=text != "")
    elif item.bench == "videomme":
        parsed = videomme_extract(text)
        rec.update(parsed=parsed, correct=parsed == item.gold)
    elif item.bench == "scienceqa":
        parsed = scienceqa_letter(text)
        rec.update(parsed=parsed, correct=parsed == item.gold)
    elif item.bench == "pope":
        parsed = pope_answer(text)
        rec.update(parsed=parsed, correct=parsed == item.gold)
    else:  # synthetic: the reply names exactly the right value
        named = mentioned_values(reply, item.values)
        rec.update(parsed=",".join(sorted(named)), correct=named == {item.gold})
    rec.setdefault("counted", True)
    return rec


class Runner:
    """Scores batches of items in the requested modes, sharing each batch's DINO encode."""

    def __init__(self, model, modes, device):
        self.model, self.modes, self.device = model, modes, device
        self.timings = defaultdict(float)
        self.token_sets = {}

    def _picks(self, first_logits, items) -> list[str]:
        """Each item's likelihood answer: the candidate whose first token is most likely."""
        logp = torch.log_softmax(first_logits.float(), dim=-1)
        picks = []
        for row, item in zip(logp, items):
            if item.candidates not in self.token_sets:
                self.token_sets[item.candidates] = candidate_tokens(self.model.tokenizer, item.candidates)
            scores = torch.stack([torch.logsumexp(row[ids], 0) for ids in self.token_sets[item.candidates]])
            picks.append(item.candidates[int(scores.argmax())])
        return picks

    def _ids(self, prompts):
        return prompt_ids(self.model, [[{"role": "user", "content": p}] for p in prompts])

    @torch.no_grad()
    def run(self, decoded, items, max_new_tokens):
        """{mode: [(reply, likelihood pick)]} for a batch."""
        model, tok = self.model, self.model.tokenizer
        clips = list(decoded)
        pixels, rows = pack_frames([decoded[c] for c in clips], model.image_frames)
        where = {c: i for i, c in enumerate(clips)}
        index = rows[[where[item.clip] for item in items]]
        start = time.perf_counter()
        pixels = pixels.to(self.device)
        with autocast(self.device):
            kv = model.encode_frames(pixels, chunk=32 if self.device.type == "cpu" else None)
        self.timings["encode_s"] += _sync_time(start, self.device)
        ids, am = self._ids([item.prompt for item in items])
        alt = [item.likelihood_prompt for item in items]
        alt_ids = self._ids(alt) if any(p is not None for p in alt) else None
        out = {}
        for mode in self.modes:
            start = time.perf_counter()
            gen = model.generate_ids(ids, am, pixels, index, kv=kv, mode=mode, max_new_tokens=max_new_tokens)
            logits = gen["first_logits"]
            if alt_ids is not None:  # the likelihood prompt differs: one prefill, same K/V
                logits = model.generate_ids(*alt_ids, pixels, index, kv=kv, mode=mode, max_new_tokens=1)["first_logits"]
            replies = [tok.decode(t, skip_special_tokens=True) for t in gen["tokens"]]
            out[mode] = list(zip(replies, self._picks(logits, items)))
            self.timings[f"{mode}_s"] += _sync_time(start, self.device)
        return out


def _sync_time(start, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def val_source(data_root: Path, shards: str | None = None) -> Source:
    """The held-out shards: `shards` (any shard pattern or URL, as training takes them), else
    DATA_ROOT/val/*.tar; found before the model is loaded."""
    try:
        return Source.from_patterns("val", shards or data_root / "val")
    except FileNotFoundError as e:  # expand's message names the path (and hints at what is there)
        raise FileNotFoundError(f"val: {e}") from None


class FirstSamples(ShardStream):
    """An exact pass that ends after its first `limit` usable samples, so that its last batch ends
    there too: validate() stops only between batches, which would score up to a batch more."""

    def __init__(self, *args, limit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit

    def samples(self, worker: int = 0, workers: int = 1):
        usable = 0
        for sample, state in super().samples(worker, workers):
            yield sample, state
            usable += sample is not None
            if usable >= self.limit:
                return


def run_val(model, source: Source, args, modes, device) -> dict:
    """Held-out shards in our format (DATA_ROOT/val): loss, token and answer accuracy per mode."""
    from objectives import TextCE
    from validation import validate

    spec = SampleSpec(stage=args.val_stage, frame_size=args.frame_size, max_frames=args.max_frames,
                      system_prompt=model.system_prompt, image_frames=model.image_frames)
    workers = args.workers
    if args.limit is None:
        stream = ShardStream([source], spec, model.tokenizer, batch_size=args.batch_size, resampled=False)
    else:
        # --limit N means the first N, as for the other benchmarks: one reader (several would each
        # read their share of the shards, so which N samples came first would depend on --workers)
        stream = FirstSamples([source], spec, model.tokenizer, batch_size=args.batch_size, resampled=False,
                              limit=args.limit)
        workers = min(workers, 1)
    to_device = lambda b: {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}  # noqa: E731
    start = time.perf_counter()
    res = validate(model, Loader(stream, num_workers=workers), objectives=[(TextCE(), 1.0)], modes=modes,
                   to_device=to_device, autocast=autocast(device),
                   max_samples=args.limit if args.limit is not None else sys.maxsize)
    if not res["samples"]:
        raise ValueError(f"val: no usable sample in {args.val_shards or args.data_root / 'val'}")
    return {m: {**r["all"], "per_category": {"source": r["by_source"]}, "seconds": time.perf_counter() - start}
            for m, r in res["modes"].items()}
