"""The benchmarks' items (`Item`), read from their public files under a data root: MVBench, Video-MME,
ScienceQA-IMG, POPE (with lmms-eval's prompts) and the synthetic foveation probe; `LOADERS` by name."""

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from bench_parsers import LETTER_SUFFIX, POPE_SUFFIX, VIDEOMME_INSTRUCTION
from media import frame_extension_index

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
