"""Benchmarks: MVBench, Video-MME, ScienceQA-IMG and POPE with lmms-eval's prompts and answer parsers
(greedy generation), validation loss on held-out shards, and the synthetic foveation probe — in any
of the three forward modes.

    python benchmark.py --mode all --checkpoint runs/stage3_135M --bench mvbench,videomme,scienceqa,pope \\
        --data-root /data/benchmarks --output results.json

Two scores per multiple-choice item. `generate`: the reply generated greedily from lmms-eval's
default prompt and scored by lmms-eval's parser for that benchmark, so the numbers compare with
published lmms-eval numbers. `likelihood`: the candidate answer (option letter; yes/no for POPE)
whose first token the model finds most likely right after the prompt — the first step of the same
generation, so it costs nothing extra. Both report their answer distribution, so a model that
always says "A" (or "yes") shows.

Speed: every clip is decoded once (in DataLoader workers) and DINO-encoded once per run; its K/V
serve every question about it, every prompt variant and every forward mode. Questions are batched
by clip. Results are appended item by item to OUTPUT.items.jsonl, so `--resume` continues an
interrupted run where it stopped.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import string
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from loading import hub_commit
from collate import pack_frames
from config import MODES
from data import Loader, SampleSpec, ShardStream, Source
from media import MediaError, decode_image, decode_video, frame_extension_index, sample_frame_indices
from decoding import prompt_ids
from frames import check_frame_size
from model import load_model
from precision import autocast
from progress import Progress

BENCHES = ("mvbench", "videomme", "scienceqa", "pope", "val", "synthetic")
MAX_NEW_TOKENS = {"mvbench": 16, "videomme": 16, "scienceqa": 16, "pope": 128, "synthetic": 32}
# lmms-eval's MVBench folders (its DATA_LIST), per task, under mvbench/video/
MVBENCH_FOLDERS = {
    "action_sequence": "star/Charades_segment", "action_prediction": "star/Charades_segment",
    "action_antonym": "ssv2_video_mp4", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_segment", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video_segment",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment", "counterfactual_inference": "clevrer/video_validation",
}
# The lmms-eval release whose prompts and answer parsers this file follows; tests/test_lmms_parity.py checks
# them against that release's own task functions.
LMMS_EVAL_VERSION = "0.7.3"
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and "
                        "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
# Reasoning blocks lmms-eval's command line cuts out of every reply before a task scores it (--reasoning_tags)
LMMS_EVAL_REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


# ---- answer parsers (lmms-eval's rules, quirks included, re-implemented) ------------------------------

def lmms_eval_reply(text: str) -> str:
    """The reply as lmms-eval hands it to a task's scorer: its command line removes each complete
    reasoning block (<think>...</think>, then <analysis>...</analysis>; tags are case-sensitive) and,
    where a closing tag is left without an opening one, everything up to the last closing tag; the
    task then strips surrounding whitespace. "<think>A</think> B" -> "B", "A</think>C" -> "C", " \\n" -> ""."""
    for opening, closing in LMMS_EVAL_REASONING_TAGS:
        while opening in text and closing in text:
            start = text.find(opening)
            end = text.find(closing, start)
            if end < 0:  # the only closing tags come before the opening one: left as they are
                break
            text = text[:start] + text[end + len(closing):]
        if closing in text and opening not in text:
            text = text.rpartition(closing)[2]
    return text.strip()


_MVBENCH_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                  "?", "!"]


def mvbench_normalize(text: str) -> str:
    """What MVBench's scorer makes of a reply (and of the gold letter) before comparing the two:
    "X. anything" (X in A-E, any case) -> X; else, with newlines/tabs as spaces, punctuation removed
    or spaced the VQA way, wrapping quotes/parentheses stripped and lowercased, the first standalone
    letter a-e, uppercased ("the answer is a dog" -> A, "(b)" -> B); else that cleaned text ("F" -> "f")."""
    text = text.strip()
    m = re.fullmatch(r"([A-E])\.\s*(.+)", text, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for p in _MVBENCH_PUNCT:
        if (p + " " in original or " " + p in original) or re.search(r"\d,\d", original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"\.(?!\d)", "", text, count=32)  # lmms-eval removes the first 32 periods not before a digit
    for ch in ("'", '"', ")", "("):
        text = text.strip(ch)
    text = text.strip().lower()
    m = re.search(r"\b([a-e])\b", text)
    return m.group(1).upper() if m else text


# The answer phrases Video-MME's extractor looks for (matched in the lowercased reply)
_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# How each way of writing a letter ranks (higher wins; within one form, the later position wins)
_MCQ_FORMS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))


def videomme_extract(text: str, letters: str = "ABCD") -> str:
    """Video-MME's answer letter, as lmms-eval reads it since 0.7.2 (extract_mcq_answer, choices A-D).
    The reply is stripped, then , . ! ? ; : ' " are trimmed from its ends (each in turn, in that order)
    and it is padded with a space on each side. Every capital A-D found is ranked by how it appears:
    the reply starting with it (not followed by a letter) > ending with it (not preceded by one) >
    the first one after an answer phrase ("the answer is", "i choose", ... in any case; even inside a
    word) > "(X)" > "X." > "X:" > "X)" > "X " (the padding counts); among equals the last one wins.
    Only when none of these occurs does a bare capital count (the last). "" when there is none.
    "Answer: C" -> C, "It is B, not A" -> A, "Clearly D" -> D, "Choice B" -> B, "AB" -> B, "b" -> ""."""
    text = text.strip()
    if not text:
        return ""
    for ch in ",.!?;:'\"":
        text = text.strip(ch)
    padded = f" {text} "
    found = []  # (rank, position, letter)
    for letter in letters:
        for form, rank in _MCQ_FORMS:
            at = padded.rfind(form.format(letter))
            if at >= 0:
                found.append((rank, at, letter))
    lowered = padded.lower()  # (its indices are used on the unlowered reply, as lmms-eval does)
    for phrase in _MCQ_PHRASES:
        at = lowered.find(phrase)
        if at >= 0:
            for letter in letters:
                pos = padded.find(letter, at + len(phrase))
                if pos >= 0:
                    found.append((7, pos, letter))
    core = padded.strip()
    if core:
        if core[0] in letters and (len(core) == 1 or not core[1].isalpha()):
            found.append((10, 0, core[0]))
        if core[-1] in letters and (len(core) == 1 or not core[-2].isalpha()):
            found.append((9, len(padded) - 1, core[-1]))
    if not found:
        found = [(0, padded.rfind(letter), letter) for letter in letters if letter in padded]
    return max(found, key=lambda f: f[:2])[2] if found else ""


def scienceqa_letter(text: str) -> str:
    """The option letter ScienceQA's scorer reads in a reply (uppercase; "" for none): the stripped
    reply when it is one letter of either case ("b", " B\\n"), else X from an uppercase "X." at its
    start ("B. foo"); "(B)", "B)", "b." and "The answer is B" read as nothing."""
    text = text.strip()
    low = text.lower()
    if len(low) == 1 and "a" <= low <= "z":
        return low.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        low = text[0].lower()
        if len(low) == 1 and "a" <= low <= "z":
            return low.upper()
    return ""


def pope_answer(text: str) -> str:
    """POPE compares the lowercased, stripped reply with "yes" / "no" exactly ("Yes." is neither), and
    its precision and recall count only those two readings."""
    return text.lower().strip()


def mentioned_values(text: str, values) -> set:
    return {v for v in values if re.search(rf"\b{re.escape(v)}\b", text, flags=re.IGNORECASE)}


# ---- items -----------------------------------------------------------------------------------------

@dataclass
class Item:
    bench: str
    uid: str
    prompt: str  # the user message (the model's chat template and system prompt are added)
    gold: str  # the answer letter, "yes"/"no", or the synthetic value
    media: tuple  # ("video", path) | ("image", bytes) | ("frames", [jpeg bytes]) | ("missing", why)
    category: dict = field(default_factory=dict)
    candidates: tuple = ()  # the likelihood candidates (letters, or yes/no)
    likelihood_prompt: str | None = None  # another prompt for the likelihood score (synthetic)
    gold_letter: str | None = None  # the likelihood answer when it differs from gold (synthetic)
    values: tuple = ()  # synthetic: the values the answer could name
    found_by_name: bool = False  # MVBench: the clip was found by file name, not at lmms-eval's path

    @property
    def clip(self):
        """What identifies the media: the same video file or the same image bytes (POPE asks ~18
        questions per image) is decoded and encoded once."""
        kind, ref = self.media
        if kind == "image":
            return kind, hashlib.sha1(ref).hexdigest()
        return kind, ref if kind in ("video", "missing") else self.uid


def _letters(n):
    return tuple(string.ascii_uppercase[:n])


def mvbench_items(root: Path) -> list[Item]:
    """MVBench's items; each clip is looked for in lmms-eval's folder for its task (MVBENCH_FOLDERS),
    then by file name anywhere inside that folder's tree (an unzip may nest it; counted as
    `found_by_name`) - never in another task's folder, where several tasks reuse names such as
    video_00001.mp4 for different clips."""
    folder = root / "mvbench"
    files = sorted((folder / "json").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"MVBench: no task files {folder / 'json' / '*.json'}")
    by_name = {}  # task folder -> {file name: first path found in its tree}, built once per folder
    items = []
    for path in files:
        task = path.stem
        task_folder = folder / "video" / MVBENCH_FOLDERS.get(task, task)
        for i, doc in enumerate(json.loads(path.read_text())):
            candidates = list(doc["candidates"])
            if doc["answer"] not in candidates:
                raise ValueError(f"{path} item {i}: answer {doc['answer']!r} is not among its candidates")
            letters = _letters(len(candidates))
            options = "".join(f"({x}) {c}\n" for x, c in zip(letters, candidates))
            prompt = f"Question:{doc['question']}\nOption:\n{options}Only give the best option.\n"
            video, found_by_name = task_folder / doc["video"], False
            if not video.is_file():
                if task_folder not in by_name:
                    by_name[task_folder] = {}
                    for dirpath, _, names in sorted(os.walk(task_folder)):
                        for name in sorted(names):
                            by_name[task_folder].setdefault(name, Path(dirpath) / name)
                video = by_name[task_folder].get(Path(doc["video"]).name)
                found_by_name = video is not None
            media = ("video", str(video)) if video else ("missing", f"video {doc['video']} not found in {task_folder}")
            items.append(Item("mvbench", f"{task}/{i}", prompt, letters[candidates.index(doc["answer"])], media,
                              {"task": task}, letters, found_by_name=found_by_name))
    return items


def _parquet_rows(paths):
    """Rows of parquet files, a few hundred at a time (the image datasets embed every image)."""
    import pyarrow.parquet as pq

    images = {}  # one bytes object per distinct image
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                image = _image(row.get("image"))
                if image:
                    row["image"] = images.setdefault(hashlib.sha1(image).hexdigest(), image)
                yield row


def _split_files(folder: Path, name: str, split: str = "test", within: str | None = None) -> list[Path]:
    """The parquet files of one split, in the Hub's naming (SPLIT-00000-of-00003.parquet or SPLIT.parquet),
    anywhere under folder (inside a folder named `within`, if given). A plain download may hold other
    configs and splits beside it (POPE's Full/, ScienceQA's FULL): only this split is read, and a second
    copy of it in another folder is an error rather than a silent merge."""
    pattern = re.compile(rf"{re.escape(split)}(-\d+-of-\d+)?\.parquet")
    found = sorted(p for p in folder.rglob("*.parquet")
                   if pattern.fullmatch(p.name) and (within is None or within in p.relative_to(folder).parts))
    if not found:
        where = f"{folder}" + (f" (in a folder named {within})" if within else "")
        raise FileNotFoundError(f"{name}: no parquet files of the {split} split ({split}-*.parquet) under {where}")
    folders = sorted({str(p.parent) for p in found})
    if len(folders) > 1:
        raise ValueError(f"{name}: {split} split files in {len(folders)} folders ({', '.join(folders)}): keep one copy")
    return found


def videomme_items(root: Path) -> list[Item]:
    folder = root / "videomme"
    items = []
    for row in _parquet_rows(_split_files(folder, "Video-MME")):
        prompt = "\n".join([VIDEOMME_INSTRUCTION, row["question"], *row["options"], LETTER_SUFFIX])
        video = next((p for ext in ("mp4", "MP4", "mkv") if (p := folder / "data" / f"{row['videoID']}.{ext}").is_file()),
                     None)
        media = ("video", str(video)) if video else ("missing", f"video {row['videoID']} not found")
        items.append(Item("videomme", str(row["question_id"]), prompt, row["answer"].strip(), media,
                          {k: row[k] for k in ("duration", "domain", "sub_category", "task_type")},
                          _letters(len(row["options"]))))
    return items


def _image(value):
    if isinstance(value, dict):
        return value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
    return value


def scienceqa_items(root: Path) -> list[Item]:
    folder = root / "scienceqa"
    paths = _split_files(folder, "ScienceQA", within="ScienceQA-IMG")
    items = []
    for i, row in enumerate(_parquet_rows(paths)):
        letters = _letters(len(row["choices"]))
        context = f"Context: {row['hint']}\n" if row.get("hint") else ""
        choices = "\n".join(f"{x}. {c}" for x, c in zip(letters, row["choices"]))
        prompt = f"{context}{row['question']}\n{choices}{LETTER_SUFFIX}"
        image = row.get("image")
        media = ("image", image) if image else ("missing", "no image")
        items.append(Item("scienceqa", str(i), prompt, chr(65 + int(row["answer"])), media,
                          {"subject": row.get("subject") or ""}, letters))
    return items


def pope_items(root: Path) -> list[Item]:
    """POPE's test split (9,000 questions: 3,000 per category). An item is keyed by its category and
    question_id, so that no question is merged into another's record."""
    items = []
    for row in _parquet_rows(_split_files(root / "pope", "POPE")):
        image = row.get("image")
        media = ("image", image) if image else ("missing", "no image")
        category = row.get("category") or ""
        uid = f"{category}/{row['question_id']}" if category else str(row["question_id"])
        items.append(Item("pope", uid, row["question"].strip() + POPE_SUFFIX, row["answer"].lower().strip(), media,
                          {"category": category}, ("yes", "no")))
    return items


def synthetic_items(root: Path) -> list[Item]:
    """The eval split of scripts/make_synthetic.py: the open question (scored by the value its
    reply names) and, for the likelihood score, the 4-way multiple-choice prompt."""
    from shards import expand, read_samples

    folder = root / "synthetic"
    if not (folder / "README.json").is_file():
        raise FileNotFoundError(f"synthetic: no {folder / 'README.json'} (scripts/make_synthetic.py --out {folder} "
                                f"writes it)")
    readme = json.loads((folder / "README.json").read_text())
    if "directions" not in readme:
        raise ValueError(f"{folder} was made by an older make_synthetic.py; generate it again")
    # the answer vocabulary of every task (older outputs, with the three original tasks, list none)
    vocabulary = readme.get("vocabulary") or {"colour": readme["palette"], "shape": readme["shapes"],
                                              "motion": readme["directions"]}
    try:
        paths = expand(folder / "eval")
    except FileNotFoundError as e:  # expand's message names the path (and hints at what is there)
        raise FileNotFoundError(f"synthetic: {e}") from None
    items = []
    for path in paths:
        for key, files in read_samples(path):
            doc = json.loads(files["json"])
            meta = doc["meta"]
            truth = meta.get("answer") or {"colour": meta["colour"], "shape": meta["shape"],
                                           "motion": meta["direction"]}[meta["task"]]
            values = tuple(vocabulary[meta["task"]])
            numbered = sorted((frame_extension_index(ext), ext) for ext in files
                              if frame_extension_index(ext) is not None)
            frames = [files[ext] for _, ext in numbered]
            items.append(Item("synthetic", key, doc["question"], truth, ("frames", frames), {"task": meta["task"]},
                              ("A", "B", "C", "D"), likelihood_prompt=doc["messages"][0]["content"],
                              gold_letter=doc["answer"], values=values))
    return items


LOADERS = {"mvbench": mvbench_items, "videomme": videomme_items, "scienceqa": scienceqa_items, "pope": pope_items,
           "synthetic": synthetic_items}


# ---- media: decoded once per clip, in DataLoader workers -----------------------------------------

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
                return i, decode_video(Path(ref).read_bytes(), self.max_frames, self.frame_size)
            if kind == "image":
                return i, decode_image(ref, self.frame_size)
            # frames stored as images: thinned uniformly, as training reads them (not the first max_frames)
            keep = sample_frame_indices(len(ref), self.max_frames)
            return i, torch.stack([decode_image(ref[j], self.frame_size) for j in keep])
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


# ---- scoring ----------------------------------------------------------------------------------------

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


def summarise(bench: str, records: list[dict]) -> dict:
    def accuracy(recs):
        """Over the counted records (MVBench leaves out replies empty once stripped); 0 when every one was
        left out, as lmms-eval's MVBench aggregation scores a task with no answered item."""
        scored = [r["correct"] for r in recs if r["counted"]]
        return _mean(scored) if scored or not recs else 0.0

    counted = [r for r in records if r["counted"]]
    out = {"items": len(records), "counted": len(counted),
           "accuracy": accuracy(records),
           "likelihood_accuracy": _mean(r["likelihood_correct"] for r in records),
           "answer_distribution": {"generate": dict(Counter(r["parsed"] or "(none)" for r in records).most_common()),
                                   "likelihood": dict(Counter(r["likelihood"] for r in records).most_common())}}
    per = defaultdict(lambda: defaultdict(list))
    for r in records:  # every category shows, even one whose replies were all left out (n: the counted ones)
        for key, value in r["category"].items():
            per[key][value].append(r)
    out["per_category"] = {k: {v: {"n": sum(r["counted"] for r in rs), "accuracy": accuracy(rs),
                                   "likelihood_accuracy": _mean(r["likelihood_correct"] for r in rs)}
                               for v, rs in sorted(vals.items())} for k, vals in per.items()}
    if bench == "mvbench" and "task" in per:
        out["mean_over_tasks"] = _mean(v["accuracy"] for v in out["per_category"]["task"].values())
    if bench == "pope":
        tp = sum(r["gold"] == "yes" and r["parsed"] == "yes" for r in records)
        fp = sum(r["gold"] == "no" and r["parsed"] == "yes" for r in records)
        fn = sum(r["gold"] == "yes" and r["parsed"] == "no" for r in records)  # as lmms-eval: only explicit "no"
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update(precision=precision, recall=recall,
                   f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                   gold_yes_ratio=_mean(r["gold"] == "yes" for r in records),  # what lmms-eval calls yes_ratio
                   predicted_yes_ratio=_mean(r["parsed"] == "yes" for r in records),
                   likelihood_yes_ratio=_mean(r["likelihood"] == "yes" for r in records))
    return out


def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


# ---- running ------------------------------------------------------------------------------------------

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


def _int_at_least(low: int):
    """An argparse `type` for an integer flag >= low, so a bad value is refused at parse time with
    the flag's name ("argument --limit: must be an integer >= 1, got '0'"), before anything loads."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default (not the empty ones: "(default: None)" says nothing) and
    keeps the example commands of the epilog as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


EXAMPLES = """examples:
  # a run directory (its final/ export) or a save_pretrained folder, in every forward mode
  python benchmark.py --checkpoint runs/stage3_135M --data-root /data/benchmarks --output results.json

  # the published checkpoint.pt (weights only): name its backbones
  python benchmark.py --checkpoint checkpoint.pt --llm HuggingFaceTB/SmolLM2-1.7B-Instruct \\
      --dino facebook/dinov2-small --data-root /data/benchmarks --bench mvbench,videomme --mode coarse_fine

  # a Hugging Face Hub repo by id (@revision optional): its export, or its checkpoint.pt with the published
  # backbones (loading.PUBLISHED_BACKBONES; --llm / --dino override them)
  python benchmark.py --checkpoint sanps/fVLM-135M --data-root /data/benchmarks --output results.json

  # continue an interrupted run: keeps what results.json.items.jsonl already holds
  python benchmark.py --checkpoint runs/stage3_135M --data-root /data/benchmarks --output results.json --resume
"""


def read_benchmarks(benches, data_root: Path, limit: int | None, val_shards: str | None = None) -> dict:
    """Every requested benchmark's items ({bench: [Item]}; val: its shard Source), read and checked
    before the model is loaded and before anything is scored: a missing dataset, one whose media are
    all missing, or a duplicated item then fails in seconds, not after the other benchmarks ran."""
    found = {}
    for bench in benches:
        if bench == "val":
            found[bench] = val_source(data_root, val_shards)
            continue
        items = LOADERS[bench](data_root)
        twice = [uid for uid, n in Counter(it.uid for it in items).items() if n > 1]
        if twice:
            raise ValueError(f"{bench}: {len(twice)} item id(s) appear more than once under {data_root / bench} "
                             f"(e.g. {twice[0]!r}): a second copy of its data files?")
        items = items[:limit]
        if not items:
            raise ValueError(f"{bench}: no items in {data_root / bench}")
        missing = [it for it in items if it.media[0] == "missing"]
        if len(missing) == len(items):
            raise ValueError(f"{bench}: no usable item: the media of all {len(items)} items are missing "
                             f"(e.g. {missing[0].media[1]})")
        found[bench] = items
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--mode", default="all", choices=[*MODES, "all"], help="forward mode(s) to score")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, save_pretrained folder, checkpoint file, or a Hugging Face Hub id "
                             "owner/name[@revision] (a path that exists wins)")
    parser.add_argument("--llm", help="backbone LLM (hub id or folder) for a checkpoint file: needed for the "
                                      "published checkpoint.pt, else replaces the one stored in the checkpoint")
    parser.add_argument("--dino", help="vision backbone (hub id or folder) for a checkpoint file, as --llm")
    parser.add_argument("--bench", default="mvbench,videomme,scienceqa,pope",
                        help=f"comma-separated, from {','.join(BENCHES)}")
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding the benchmarks' data")
    parser.add_argument("--output", type=Path, default=Path("results.json"),
                        help="the report (JSON); items are appended to OUTPUT.items.jsonl as they are scored")
    parser.add_argument("--max-frames", type=_int_at_least(1), default=64,
                        help="frames sampled uniformly from each video")
    parser.add_argument("--frame-size", type=_int_at_least(1), default=224,
                        help="frame side in pixels (a multiple of the vision backbone's patch size)")
    parser.add_argument("--limit", type=_int_at_least(1), metavar="N",
                        help="score only the first N items of each benchmark (val: its first N samples) "
                             "(default: all)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=16, help="questions per batch")
    parser.add_argument("--workers", type=_int_at_least(0), default=min(8, os.cpu_count() or 1),
                        help="decoding processes (0: decode in this process) (default: min(8, CPUs), here "
                             "%(default)s)")
    parser.add_argument("--val-shards", metavar="PATTERN",
                        help="`val`'s shards: a pattern, folder or URL (https://host/val-{0000..0009}.tar, "
                             "hf://datasets/..., pipe:CMD) (default: DATA_ROOT/val)")
    parser.add_argument("--val-stage", default="sft", choices=["alignment", "sft"], help="loss masks for `val`")
    parser.add_argument("--resume", action="store_true", help="keep the items already scored in OUTPUT.items.jsonl")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint file that holds pickled Python objects besides tensors; unpickling "
                             "can run code from the file, so only for files you trust")
    args = parser.parse_args(argv)
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    modes = list(MODES) if args.mode == "all" else [args.mode]
    data = read_benchmarks(benches, args.data_root, args.limit, args.val_shards)
    items_path = args.output.with_name(args.output.name + ".items.jsonl")
    settings = run_settings(args, modes)
    done = resume_items(items_path, settings) if args.resume else {}  # a mismatch fails before loading
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, source = load_model(args.checkpoint, args.llm, args.dino, trust=args.trust_checkpoint)
    model.to(device).eval()
    try:
        check_frame_size(args.frame_size, model.encoder.dino.patch_size, f"--frame-size {args.frame_size}")
    except ValueError as e:
        parser.error(str(e))

    if not args.resume or not items_path.is_file() or not items_path.stat().st_size:
        items_path.write_text(json.dumps({"settings": settings}) + "\n")
    results, timings, failed = {}, {}, {}
    for bench in benches:
        start = time.perf_counter()
        if bench == "val":
            results["val"] = run_val(model, data["val"], args, modes, device)
            continue
        items = data[bench]
        todo = [it for it in items if any((bench, m, it.uid) not in done for m in modes)
                and (bench, "skipped", it.uid) not in done]
        runner = Runner(model, modes, device)
        scored = 0
        with open(items_path, "a") as sink, Progress(len(todo), bench, "questions") as bar:
            for decoded, batch in batches_by_clip(todo, args.max_frames, args.frame_size, args.batch_size,
                                                  args.workers):
                if decoded is None:  # the clip's media failed: its items are skipped, with the reason
                    for item, reason in batch:
                        _append(sink, done, {"bench": bench, "mode": "skipped", "uid": item.uid, "reason": reason})
                    bar.update(len(batch))
                    continue
                per_mode = runner.run(decoded, batch, MAX_NEW_TOKENS[bench])
                for mode, answers in per_mode.items():
                    for item, (reply, picked) in zip(batch, answers):
                        if (bench, mode, item.uid) not in done:
                            _append(sink, done, {"bench": bench, "mode": mode, **score(item, reply, picked)})
                scored += len(batch)
                bar.update(len(batch))
        wall = time.perf_counter() - start
        uids = {it.uid for it in items}
        skipped = [r for (b, m, u), r in done.items() if b == bench and m == "skipped" and u in uids]
        results[bench] = {"total": len(items), "found_by_name": sum(it.found_by_name for it in items)}
        for mode in modes:
            records = [r for (b, m, u), r in done.items() if b == bench and m == mode and u in uids]
            if records:
                results[bench][mode] = summarise(bench, records)
                results[bench][mode]["raw"] = records
        results[bench]["skipped"] = {"count": len(skipped),
                                     "by_reason": dict(Counter(r["reason"].split(":")[0] for r in skipped)),
                                     "items": [{"uid": r["uid"], "reason": r["reason"]} for r in skipped]}
        if not all(mode in results[bench] for mode in modes):  # every item's media failed to decode
            failed[bench] = f"no usable item ({len(skipped)} skipped: {results[bench]['skipped']['by_reason']})"
        timings[bench] = {"wall_s": wall, "questions_scored": scored, **dict(runner.timings),
                          "questions_per_s": scored / wall if wall else None,
                          "question_modes_per_s": scored * len(modes) / wall if wall else None}
    report = {"model": _identity(model, source, args), "args": {k: str(v) for k, v in vars(args).items()},
              "scoring": f"lmms-eval {LMMS_EVAL_VERSION} prompts and parsers", "modes": modes, "results": results,
              "timings": timings}
    if failed:
        report["failed"] = failed
    args.output.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    if failed:  # after the report is written: the benchmarks that worked keep their scores
        raise RuntimeError("; ".join(f"{b}: {why}" for b, why in failed.items()) + f" (the others: {args.output})")
    return report


def _append(sink, done, record):
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    done[(record["bench"], record["mode"], record["uid"])] = record


def run_settings(args, modes) -> dict:
    """What a stored item's record depends on: the weights (the checkpoint's path and its files' sizes
    and modification times - a retrained or replaced checkpoint differs), backbones, modes, frame
    sampling, generation length and the lmms-eval release whose parsers scored it. A Hub id: the id and
    the commit it resolves to now (which stands for its files)."""
    commit = hub_commit(args.checkpoint)
    path = Path(args.checkpoint) if commit else Path(args.checkpoint).resolve()
    if commit:
        files = []
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    stat = [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]
    return {"checkpoint": str(path), "checkpoint_files": commit or hashlib.sha1(json.dumps(stat).encode()).hexdigest(),
            "llm": args.llm, "dino": args.dino, "modes": list(modes), "max_frames": args.max_frames,
            "frame_size": args.frame_size, "max_new_tokens": MAX_NEW_TOKENS, "lmms_eval": LMMS_EVAL_VERSION}


def resume_items(path: Path, settings: dict) -> dict:
    """The records of an interrupted run's OUTPUT.items.jsonl, {(bench, mode, uid): record}, after
    checking that they were made with these settings (else a ValueError naming what differs). A last
    line cut by the interruption is cut off the file too, so that the next record starts on its own line."""
    if not path.is_file() or not path.stat().st_size:
        return {}
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"resume: dropped a torn last line of {path} ({len(data) - keep} bytes); that item is scored again",
              file=sys.stderr)
        data = data[:keep]
    lines = data.decode().splitlines()
    try:
        stored = json.loads(lines[0])["settings"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        stored = None
    if stored is None:
        raise ValueError(f"--resume: {path} does not start with the settings line this version writes; "
                         f"score again without --resume")
    differ = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
    if differ:
        what = "; ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in differ)
        raise ValueError(f"--resume: {path} was scored with other settings ({what}); use another --output, "
                         f"or drop --resume to score again")
    done = {}
    for line in lines[1:]:
        r = json.loads(line)
        done[(r["bench"], r["mode"], r["uid"])] = r
    return done


def _identity(model, source, args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"checkpoint": source, "parameters": sum(p.numel() for p in model.parameters()),
            "llm": model.llm.config.name_or_path, "settings": dataclasses.asdict(model.config), "max_frames": args.max_frames,
            "frame_size": args.frame_size, "git_commit": commit, "torch": str(torch.__version__),
            "device": str(next(model.parameters()).device)}


def markdown(report) -> str:
    """The printed table: per benchmark and mode, the generate / likelihood accuracy; items scored of
    the benchmark's total; skipped items (media missing or undecodable)."""
    modes = report["modes"]
    lines = ["| benchmark | " + " | ".join(f"{m} (generate / likelihood)" for m in modes)
             + " | items scored / total | skipped |",
             "|---|" + "---|" * len(modes) + "---|---|"]
    for bench, res in report["results"].items():
        if bench == "val":
            cells = [f"loss {res[m]['loss']:.4f} / answer acc {res[m]['answer_acc']:.3f}" for m in modes]
            lines.append("| val | " + " | ".join(cells) + f" | {res[modes[0]]['samples']} | 0 |")
            continue
        cells = [f"{100 * res[m]['accuracy']:.1f} / {100 * res[m]['likelihood_accuracy']:.1f}" if m in res
                 else "no usable item" for m in modes]
        scored = res[modes[0]]["items"] if modes[0] in res else 0
        lines.append(f"| {bench} | " + " | ".join(cells) + f" | {scored} / {res['total']} | {res['skipped']['count']} |")
    for bench, t in report["timings"].items():
        lines.append(f"\n{bench}: {t['questions_scored']} questions x {len(modes)} mode(s) in {t['wall_s']:.1f}s "
                     f"({t['question_modes_per_s']:.2f} question-modes/s)")
    found = {b: r["found_by_name"] for b, r in report["results"].items() if r.get("found_by_name")}
    for bench, n in found.items():
        lines.append(f"{bench}: {n} clip(s) found by file name inside their task's folder, not at lmms-eval's path")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # bad input exits 2, as argparse's errors do (sys.exit(message) would exit 1); one line, no traceback
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
