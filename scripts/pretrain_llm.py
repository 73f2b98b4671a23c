"""Pretrain a small LLM on the synthetic world's language, one of the testbed's LLM choices (the study
compares it with the tiny random LLM and SmolLM2-135M-Instruct; docs: "Does looking help?").

The probe asks about scenes the LLM will see as visual tokens; here it reads the same scenes written
out as text and learns to answer the probe's questions from them: which object a question names, its
colour, shape or motion, which one moved. Every step draws fresh scenes from make_synthetic (the
probe's tasks and object placement, never its clips), written as one line per frame (a static clip:
one line) listing every object in random order with the patch-grid cell of its centre:

    Frame 1: a red circle at row 3 column 5, a grey square at row 1 column 2, ...
    Frame 2: ...
    What colour is the object that moves?  ->  The object that moves is red.

Training is SFT on the answer (tokenization.tokenize in the chat template the study uses), from the
random weights of a backbones.LLM_PRESETS architecture with SmolLM2's tokenizer. The output is a
transformers folder (config.json, model.safetensors, the tokenizer) that `model.llm: <folder>` loads,
plus pretrain.json: settings, loss curve, wall time, samples/s and the held-out answer accuracy per
task (every answer token right, teacher-forced). Folders are named by a hash of the settings under
--out and reused when present. Deterministic per seed at a given thread count.

    python scripts/pretrain_llm.py --out runs/backbones     # prints the folder
"""

import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_synthetic as world  # noqa: E402
from backbones import LLM_PRESETS, llm_config, offline_tokenizer  # noqa: E402
from collate import pad_text  # noqa: E402
from config import DEFAULT_SYSTEM_PROMPT, add_dataclass_flags, dataclass_from_flags  # noqa: E402
from tokenization import tokenize  # noqa: E402

VERSION = 1  # bump when the text or the objective changes: cached folders are then not reused
HELD_OUT = 600  # scenes scored after training


@dataclass(frozen=True)
class Settings:
    """Everything the folder depends on (its name is a hash of these)."""
    preset: str = "tiny"  # backbones.LLM_PRESETS
    frame_size: int = 112  # the probe's scenes: frame size, patch grid, frames, objects
    patch_size: int = 14
    frames: int = 4
    object_scale: float = 0.143
    distractors: list[int] = field(default_factory=lambda: [2, 6])
    tasks: list[str] = field(default_factory=lambda: list(world.TASKS))
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0

    def check(self):
        if self.preset not in LLM_PRESETS:
            raise ValueError(f"preset must be one of {sorted(LLM_PRESETS)}, got {self.preset!r}")
        unknown = sorted(set(self.tasks) - set(world.TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be some of {list(world.TASKS)}, got {self.tasks}")
        if self.steps < 0 or self.batch < 1 or self.frames < 2 or len(self.distractors) != 2:
            raise ValueError("need steps >= 0, batch >= 1, frames >= 2 and distractors [min, max]")

    def folder_name(self) -> str:
        key = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return f"llm-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def describe(target: dict, rest: list, s: int, patch: int, rng: random.Random) -> str:
    """A clip as text: one line per frame (one for a static clip), every object with its centre's cell."""
    def cell(x, y):
        return f"row {(y + s // 2) // patch + 1} column {(x + s // 2) // patch + 1}"

    lines, path = [], target["path"]
    frames = range(len(path)) if target["direction"] else range(1)
    for t in frames:
        objects = [f"{target['colour']} {target['shape']} at {cell(*path[t])}"]
        objects += [f"{o['colour']} {o['shape']} at {cell(*o['box'][:2])}" for o in rest]
        rng.shuffle(objects)  # the order carries no answer
        lines.append(f"Frame {t + 1}: " + ", ".join(objects) + ".")
    return "\n".join(lines)


def sample(s: Settings, rng: random.Random, task: str) -> tuple[list[dict], str]:
    """(the conversation, its task): a scene in words, a probe question, the probe's answer sentence."""
    target, rest, size = world.make_scene(rng, task, s.frame_size, s.frames, s.object_scale, tuple(s.distractors))
    meta = {"task": task, "colour": target["colour"], "shape": target["shape"], "direction": target["direction"]}
    truth, _, question, template = world.answer_key(meta)
    text = describe(target, rest, size, s.patch_size, rng)
    return [{"role": "user", "content": f"{text}\n{question}"},
            {"role": "assistant", "content": template.format(world.phrase(meta, truth))}], task


def batch_of(s: Settings, tokenizer, stream: str, index: int, size: int) -> dict:
    """A batch drawn from its own seed (stream, index): the same for every run."""
    rng = random.Random(f"pretrain_llm/{s.seed}/{stream}/{index}")
    ids, masks, tasks = [], [], []
    for i in range(size):
        messages, task = sample(s, rng, s.tasks[(index * size + i) % len(s.tasks)])
        row, mask = tokenize(tokenizer, messages, "sft", 4096, DEFAULT_SYSTEM_PROMPT)
        ids.append(row), masks.append(mask), tasks.append(task)
    return {**pad_text(ids, masks, tokenizer.pad_token_id), "tasks": tasks}


def answer_logps(llm, batch: dict):
    """(mean loss over the answer tokens, per-row: every answer token the argmax)."""
    ids, am, ti = batch["input_ids"], batch["attention_mask"], batch["target_index"]
    h = llm.model(input_ids=ids, attention_mask=am).last_hidden_state
    rows, cols = ti // (ids.shape[1] - 1), ti % (ids.shape[1] - 1)
    logits = llm.lm_head(h[rows, cols])
    labels = ids[rows, cols + 1]
    wrong = torch.zeros(ids.shape[0], dtype=torch.long).index_add(0, rows, (logits.argmax(-1) != labels).long())
    return torch.nn.functional.cross_entropy(logits, labels), wrong == 0


def train(s: Settings, threads: int, log):
    torch.set_num_threads(threads)
    tokenizer = offline_tokenizer()
    torch.manual_seed(s.seed)
    llm = AutoModelForCausalLM.from_config(llm_config(s.preset, tokenizer), dtype=torch.float32,
                                           attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(llm.parameters(), lr=s.lr, weight_decay=0.01)
    warmup = max(1, s.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * step / max(1, s.steps))))
    curve, window, start = [], [], time.perf_counter()
    llm.train()
    for step in range(s.steps):
        loss, _ = answer_logps(llm, batch_of(s, tokenizer, "train", step, s.batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(float(loss.detach()))  # a CPU run: the sync costs nothing
        if (step + 1) % 100 == 0 or step + 1 == s.steps:
            curve.append({"step": step + 1, "loss": float(np.mean(window)), "seconds": time.perf_counter() - start})
            log(f"step {step + 1}/{s.steps}  loss {np.mean(window):.4f}  "
                f"{(step + 1) * s.batch / (time.perf_counter() - start):.0f} samples/s")
            window = []
    seconds = time.perf_counter() - start
    llm.eval()
    return llm, tokenizer, {"curve": curve, "train_seconds": seconds,
                            "samples_per_second": s.steps * s.batch / seconds if s.steps else None}


@torch.no_grad()
def held_out_accuracy(llm, tokenizer, s: Settings) -> dict:
    """Teacher-forced answer accuracy (every answer token right) per task on HELD_OUT fresh scenes."""
    right = {t: [] for t in s.tasks}
    for i in range(math.ceil(HELD_OUT / 50)):
        batch = batch_of(s, tokenizer, "held_out", i, 50)
        for task, ok in zip(batch["tasks"], answer_logps(llm, batch)[1].tolist()):
            right[task].append(ok)
    return {t: float(np.mean(v)) for t, v in right.items()}


def ensure(s: Settings, root: Path, threads: int = 1, log=print) -> Path:
    """The pretrained folder for these settings under root: trained unless already there."""
    s.check()
    folder = Path(root) / s.folder_name()
    if (folder / "pretrain.json").is_file():
        log(f"pretrained LLM: {folder} (cached)")
        return folder
    log(f"pretraining the LLM into {folder}")
    llm, tokenizer, report = train(s, threads, log)
    report["held_out_accuracy"] = held_out_accuracy(llm, tokenizer, s)
    log(f"held-out answer accuracy: {json.dumps(report['held_out_accuracy'])}")
    tmp = folder.with_name(folder.name + ".part")
    llm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps({"version": VERSION, "settings": dataclasses.asdict(s),
                                                   "threads": threads, **report}, indent=1) + "\n")
    tmp.rename(folder)  # complete or absent: an interrupted run leaves only the .part folder
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/backbones"), help="the cache of pretrained folders")
    parser.add_argument("--threads", type=int, default=1)
    add_dataclass_flags(parser, Settings)
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    settings = dataclass_from_flags(args, Settings)
    folder = ensure(settings, args.out, args.threads)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
